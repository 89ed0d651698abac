"""A Hugging Face causal LM as hidden states and an LM head, for losses that never form its logits.

The logits of a causal LM are z = c tanh(a (h W^T + b) / c): h its final hidden states (after the final norm),
W [V, H] and b [V] its output embedding (get_output_embeddings()), a a logit scale and c a final softcap from
its config where the architecture has them (no tanh without c). The scale's config key depends on the
architecture: MULTIPLIERS multiply the logits (Cohere's logit_scale, Falcon-H1's lm_head_multiplier, ...),
DIVISOR divides them (Granite, MiniCPM3), except in DIVISOR_MULTIPLIES model types (HyperCLOVA X). An
architecture that transforms its logits some other way is caught by check_lm_head, which compares the implied
logits with the model's own on one sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trd_fast import reference

MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")  # config keys: z = key * (h W^T + b)
DIVISOR = "logits_scaling"  # config key: z = (h W^T + b) / key
DIVISOR_MULTIPLIES = ("hyperclovax",)  # model types whose logits_scaling multiplies
SOFTCAP = "final_logit_softcapping"  # config key: z = c tanh(z / c), after the scale


@dataclass(frozen=True)
class LMHead:
    weight: torch.Tensor  # [V, H] the output embedding (a parameter: gradients reach it)
    bias: torch.Tensor | None  # [V] or None
    logit_scale: float  # a in z = c tanh(a (h W^T + b) / c)
    softcap: float | None  # c; None: no tanh

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The implied logits [..., V] fp32 (fp64 for fp64 inputs) of hidden [..., H]: for checks only."""
        return reference.project_logits(hidden, self.weight, self.bias, logit_scale=self.logit_scale,
                                        softcap=self.softcap)


def lm_head(model, name: str = "model") -> LMHead:
    """The LM head of a causal LM (its output embedding and its config's logit scale and final softcap).
    Raises ValueError naming `name` if it has no output embedding or a scale is not a number."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{name}: get_output_embeddings() gives no LM head with a weight ({type(head).__name__})")
    config = model.config.get_text_config()
    scale = 1.0
    for key in MULTIPLIERS:
        if getattr(config, key, None) is not None:
            scale = _number(name, key, getattr(config, key))
            break
    else:
        if getattr(config, DIVISOR, None) is not None:
            divisor = _number(name, DIVISOR, getattr(config, DIVISOR))
            scale = divisor if config.model_type in DIVISOR_MULTIPLIES else 1.0 / divisor
    softcap = getattr(config, SOFTCAP, None)
    return LMHead(head.weight, getattr(head, "bias", None), scale,
                  None if softcap is None else _number(name, SOFTCAP, softcap))


def final_hidden_states(model, inputs: dict, wrapper=None) -> torch.Tensor:
    """[B, T, H]: a causal LM's hidden states after its final norm, the input of its LM head; no logits formed.

    model: the (unwrapped) causal LM, run through its backbone, get_decoder(). wrapper: the module `model` is
    trained in (DDP, FSDP, DeepSpeed; None or `model` itself: none): its forward runs instead, so its hooks see
    the step, keeping no logit position (logits_to_keep) and returning the hidden states.
    """
    if wrapper is None or wrapper is model:
        return model.get_decoder()(**inputs).last_hidden_state
    no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    return wrapper(**inputs, logits_to_keep=no_position, output_hidden_states=True).hidden_states[-1]


def check_lm_head(model, head: LMHead, inputs: dict, name: str = "model") -> None:
    """ValueError naming `name` unless the model's own logits on the first sequence of `inputs` are the ones
    `head` implies from its final hidden states (within 1% of the largest logit: the model may round them)."""
    first = {key: value[:1] if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    training = model.training
    model.eval()  # no dropout: the two forwards must see the same network
    try:
        with torch.no_grad():
            own = model(**first).logits.double()  # [1, T, V]
            implied = head.logits(final_hidden_states(model, first)).double()  # [1, T, V]
    finally:
        model.train(training)
    if own.shape != implied.shape:
        raise ValueError(f"{name}: its logits {tuple(own.shape)} are not its LM head's {tuple(implied.shape)}")
    error = float((own - implied).abs().max()) if own.numel() else 0.0
    size = float(own.abs().max()) if own.numel() else 0.0
    if not error <= 0.01 * size + 1e-5:
        raise ValueError(f"{name}: its logits differ from c tanh(a (h W^T + b) / c) by up to {error:.3g} (largest "
                         f"logit {size:.3g}) with the LM head read from get_output_embeddings() and the config "
                         f"(a = {head.logit_scale}, c = {head.softcap}): its architecture transforms its logits "
                         f"in a way trd_fast does not read; train on logits instead (fused_linear=False)")


def _number(name: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise ValueError(f"{name}: config.{key} = {value!r} is not a finite nonzero number")
    return float(value)

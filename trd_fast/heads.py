"""A Hugging Face causal LM as hidden states and an LM head, for code that never forms all of its logits.

The logits of a causal LM are z = c tanh(a (h W^T + b) / c): h its final hidden states (after the final norm),
W [V, H] and b [V] its output embedding (get_output_embeddings()), a a logit scale and c a final softcap from
its config where the architecture has them (no tanh without c). The scale's config key depends on the
architecture: MULTIPLIERS multiply the logits (Cohere's logit_scale, Falcon-H1's lm_head_multiplier, ...),
DIVISOR divides them (Granite, MiniCPM3), except in DIVISOR_MULTIPLIES model types (HyperCLOVA X). A config
holding one of the UNFUSABLE keys transforms its logits some other way and is refused by name; any other
architecture that does is caught by check_lm_head, which compares the implied logits with the model's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")  # config keys: z = key * (h W^T + b)
DIVISOR = "logits_scaling"  # config key: z = (h W^T + b) / key
DIVISOR_MULTIPLIES = ("hyperclovax",)  # model types whose logits_scaling multiplies
SOFTCAP = "final_logit_softcapping"  # config key: z = c tanh(z / c), after the scale
UNFUSABLE = {  # config key -> how its head departs from z = c tanh(a (h W^T + b) / c)
    "output_logit_soft_cap": "a soft-cap applied in the model's own code (xLSTM)",
    "num_codebooks": "one head per codebook (audio token models)",
    "dim_model_base": "hidden states rescaled before the head (MiniCPM)",
    "mup_width_multiplier": "muP logits divided by the width multiplier",
}


@dataclass(frozen=True)
class LMHead:
    weight: torch.Tensor  # [V, H] the output embedding (a parameter: gradients reach it)
    bias: torch.Tensor | None  # [V] or None
    logit_scale: float  # a in z = c tanh(a (h W^T + b) / c)
    softcap: float | None  # c; None: no tanh

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits [..., V] of hidden [..., H]: the projection in the weight's dtype, as the model's own head
        computes it, then scale and softcap in fp32 (fp64 for an fp64 head)."""
        z = torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def loss_arguments(self, role: str) -> dict:
        """The keyword arguments of fused_linear_distillation_loss that describe this head, for role "student"
        or "teacher" (its hidden states are passed beside them)."""
        return {f"{role}_weight": self.weight, f"{role}_bias": self.bias,
                f"{role}_logit_scale": self.logit_scale, f"{role}_softcap": self.softcap}


def lm_head(model, name: str = "model") -> LMHead:
    """The LM head of a causal LM (its output embedding and its config's logit scale and final softcap).
    Raises ValueError naming `name` if it has no output embedding, naming the config key if a scale is not a
    number or the config has a key of UNFUSABLE."""
    config = model.config.get_text_config()
    for key, why in UNFUSABLE.items():
        if getattr(config, key, None) is not None:
            raise ValueError(f"{name}: config.{key} = {getattr(config, key)!r}: its LM head is not a linear map "
                             f"with a logit scale and softcap ({why}); trd_fast cannot fuse it")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{name}: get_output_embeddings() gives no LM head with a weight ({type(head).__name__})")
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


def decoder_output(model, inputs: dict, wrapper=None):
    """The output of a causal LM's backbone (get_decoder()) in a forward of the model's own (or its wrapper's)
    forward with the LM head on no position (logits_to_keep: an empty index): its last_hidden_state [B, T, H]
    are the final hidden states (after the final norm), and its cache the KV cache when one is used.

    model: the causal LM (or a module that passes get_decoder() through to it, such as a peft model, whose own
    forward applies its adapter settings). wrapper: the module `model` is trained in (DDP, FSDP, DeepSpeed; None:
    none); its forward runs instead, so its hooks see the step."""
    seen = {}
    hook = model.get_decoder().register_forward_hook(lambda module, args, output: seen.setdefault("out", output))
    no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    try:
        (wrapper or model)(**inputs, logits_to_keep=no_position)
    finally:
        hook.remove()
    return seen["out"]


def final_hidden_states(model, inputs: dict, wrapper=None) -> torch.Tensor:
    """[B, T, H]: a causal LM's hidden states after its final norm, the input of its LM head; no logits formed
    (decoder_output)."""
    return decoder_output(model, inputs, wrapper).last_hidden_state


def check_lm_head(model, head: LMHead, inputs: dict, name: str = "model", remedy: str = "") -> None:
    """ValueError naming `name` (and ending with `remedy`) unless the model's own logits on the first sequence of
    `inputs` are the ones `head` implies from its final hidden states (within 1% of the largest logit: the model
    may round them)."""
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
                         f"in a way trd_fast does not read" + (f"; {remedy}" if remedy else ""))


def _number(name: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise ValueError(f"{name}: config.{key} = {value!r} is not a finite nonzero number")
    return float(value)

"""Drop-in use of trd_fast's fused losses in other people's trainers.

  trl.py                 patch_trl(GKDTrainer): TRL's distillation trainers compute their loss with our ops
  gkd_loss.py            generalized_jsd_loss: TRL's GKD loss function, same signature and values, on our kernel
  chunked_divergence.py  chunked_divergence_loss: TRL DistillationTrainer's hidden-state loss, on our fused
                         linear op
  lm_head.py             a causal LM's final hidden states and LM head (weight, bias, logit scale, softcap)
  hf.py                  DistillTrainer: transformers.Trainer distilling from a teacher with DistillationLoss,
                         on logits or (fused_linear=True) on hidden states

Nothing in trd_fast imports this package. Importing it imports neither TRL nor transformers and changes no
global state: the names below load their module on first access, and TRL is imported only by patch_trl.
"""

import importlib

_EXPORTS = {
    "generalized_jsd_loss": "gkd_loss",
    "chunked_divergence_loss": "chunked_divergence",
    "patch_trl": "trl",
    "unpatch_trl": "trl",
    "is_patched": "trl",
    "DistillTrainer": "hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

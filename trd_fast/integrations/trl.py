"""One call makes TRL's distillation trainers compute their loss with trd_fast's fused ops.

    from trl.experimental.gkd import GKDTrainer
    from trd_fast.integrations import patch_trl
    patch_trl(GKDTrainer)          # every GKDTrainer from now on; or patch_trl(trainer) for one instance
    patch_trl()                    # every trainer of TARGETS the installed TRL has

TARGETS below is the whole integration: one row per trainer (the loss it calls, where that loss lives, its
recorded signature, and ours), no per-trainer code.
- GKD, GOLD and IW-OPD share one loss on logits, `generalized_jsd_loss`, a staticmethod they call as
  `self.generalized_jsd_loss(...)` (GOLD also as `GOLDTrainer.generalized_jsd_loss(...)`); the patch replaces
  that staticmethod with `gkd_loss.jsd_loss`, per class, subclass or instance. A row's `extras` are TRL-only
  keyword arguments that trainer's loss adds (GOLD's probability inputs, IW-OPD's top-k support with a tail
  bucket): at their defaults the loss is GKD's and runs on our kernel; any other value calls TRL's own
  function unchanged.
- DistillationTrainer (trl.trainer, TRL 1.16) computes its loss from both models' final hidden states and LM
  heads with the module function `_chunked_divergence_loss`; the patch replaces that function with
  `chunked_divergence.chunked_divergence_loss` (the fused linear op). A module function is shared by every
  DistillationTrainer: patch the class (or a subclass: the same function); an instance raises ValueError.

Supported TRL versions: >= 1.7.0, the first release whose logits loss takes `num_items_in_batch` (GKD's
trainer has lived in trl.experimental.gkd since before 1.0). The source of the three logits losses was read
for 1.7.0, 1.8.0, 1.12.0, 1.15.0 and 1.16.0 and is the same in all of them (IW-OPD: 1.12.0 on);
DistillationTrainer's loss was read for 1.16.0. The tests run against the installed TRL (1.16.0 when this
was written). patch_trl refuses an older TRL, refuses a loss whose signature differs from the one recorded
here, and warns on a TRL newer than the newest checked.

A GKDTrainer built with use_liger_kernel=True (TRL 1.7 to 1.14) computes its loss with Liger's fused linear
JSD and never calls generalized_jsd_loss: patching such an instance warns that it changes nothing.

Nothing here imports TRL or changes anything at import time: TRL is imported by patch_trl / unpatch_trl.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from dataclasses import dataclass

from trd_fast.dependencies import SUPPORTED

MIN_TRL = SUPPORTED["trl"][0]  # first TRL whose generalized_jsd_loss takes num_items_in_batch
CHECKED_TRL = ("1.7.0", "1.8.0", "1.12.0", "1.15.0", "1.16.0")  # versions whose loss source was read
_EMPTY = inspect.Parameter.empty
# GKD's signature: (name, default) of each parameter; a trainer's extras go between reduction and num_items_in_batch.
_HEAD = (("student_logits", _EMPTY), ("teacher_logits", _EMPTY), ("labels", None), ("beta", 0.5),
         ("temperature", 1.0), ("reduction", "batchmean"))
_TAIL = (("num_items_in_batch", None),)
# DistillationTrainer's `_chunked_divergence_loss` (TRL 1.16).
_CHUNKED = (("student_hidden_states", _EMPTY), ("teacher_hidden_states", _EMPTY), ("student_lm_head_weight", _EMPTY),
            ("teacher_lm_head_weight", _EMPTY), ("completion_mask", _EMPTY), ("beta", _EMPTY),
            ("num_items_in_batch", None), ("student_lm_head_bias", None), ("teacher_lm_head_bias", None),
            ("student_logit_scale", 1.0), ("teacher_logit_scale", 1.0), ("student_final_logit_softcapping", None),
            ("teacher_final_logit_softcapping", None), ("temperature", 1.0))
_MISSING = object()


@dataclass(frozen=True)
class Target:
    module: str  # the TRL module that defines the trainer class (and a module-level loss)
    name: str  # the trainer class
    attribute: str  # the loss the patch replaces: a staticmethod of the class, or a function of `module`
    parameters: tuple  # the loss's recorded signature: (name, default) of each parameter
    loss: str  # ours, "module.function" of trd_fast.integrations: takes those parameters by name (extras aside)
    #            and `options` as keywords; looked up when patching
    options: tuple  # patch_trl's options the loss takes: "backend", "inplace_backward"
    in_module: bool = False  # the loss is a function of `module`, shared by every trainer of the class
    extras: tuple = ()  # (name, default) of TRL-only arguments: our kernel at the default, TRL's function otherwise


def _gkd_family(module: str, name: str, extras: tuple = ()) -> Target:
    return Target(module, name, "generalized_jsd_loss", _HEAD + extras + _TAIL, "gkd_loss.jsd_loss",
                  ("backend", "inplace_backward"), extras=extras)


TARGETS = (
    _gkd_family("trl.experimental.gkd.gkd_trainer", "GKDTrainer"),
    _gkd_family("trl.experimental.gold.gold_trainer", "GOLDTrainer", (("logits_are_probs", False),)),
    _gkd_family("trl.experimental.iw_opd.iw_opd_trainer", "IWOPDTrainer", (("top_k", 0), ("add_tail", True))),
    Target("trl.trainer.distillation_trainer", "DistillationTrainer", "_chunked_divergence_loss", _CHUNKED,
           "chunked_divergence.chunked_divergence_loss", ("backend",), in_module=True),
)


def patch_trl(trainer=None, *, backend=None, inplace_backward=False):
    """Make `trainer` compute its distillation loss with trd_fast; returns `trainer`.

    trainer: a TRL trainer class from TARGETS or a subclass (every instance made afterwards), or an instance
    (that trainer only; not for DistillationTrainer, whose loss is a module function: patch the class); None
    patches every TARGETS class the installed TRL has and returns them as a tuple.
    backend: the trd_fast backend (None: TRD_FAST_BACKEND or "auto"). inplace_backward: write the gradient over
    the student logits (saves an [N, V] buffer; only where nothing else needs those logits in backward, e.g. no
    logit soft-capping after the LM head); DistillationTrainer's loss forms no logits and ignores it. Patching
    again replaces the options; unpatch_trl undoes it.
    """
    version = _check_trl_version()
    if trainer is None:
        return tuple(patch_trl(cls, backend=backend, inplace_backward=inplace_backward) for cls in _installed())
    target, owner = _resolve(trainer)
    current = _function(inspect.getattr_static(owner, target.attribute, _MISSING))
    if current is _MISSING:
        raise RuntimeError(f"{target.name}: TRL {version} has no {target.attribute} (read for TRL 1.16.0); "
                           "not patching")
    original = getattr(current, "__wrapped__", current) if _is_ours(current) else current
    _check_signature(original, target, version)
    entry = vars(owner).get(target.attribute, _MISSING)  # the owner's own, not inherited
    own = _function(entry)
    previous = own.trd_fast_previous if _is_ours(own) else entry
    replacement = _replacement(original, target, dict(backend=backend, inplace_backward=inplace_backward))
    replacement.trd_fast_previous = previous
    setattr(owner, target.attribute, staticmethod(replacement) if isinstance(owner, type) else replacement)
    if getattr(owner, "use_liger_gkd_loss", False) is True:
        warnings.warn(f"{type(owner).__name__} was built with use_liger_kernel=True: it computes its loss with "
                      "Liger's fused linear JSD and never calls generalized_jsd_loss, so the patch changes nothing "
                      "(TRL 1.7 to 1.14; later GKDTrainers have no Liger path)", stacklevel=2)
    return trainer


def unpatch_trl(trainer=None):
    """Undo patch_trl on `trainer` (a class or instance, as patch_trl; None: every TARGETS class). Returns it."""
    if trainer is None:
        return tuple(unpatch_trl(cls) for cls in _installed())
    target, owner = _resolve(trainer)
    own = _function(vars(owner).get(target.attribute, _MISSING))
    if _is_ours(own):
        if own.trd_fast_previous is _MISSING:
            delattr(owner, target.attribute)
        else:
            setattr(owner, target.attribute, own.trd_fast_previous)
    return trainer


def is_patched(trainer) -> bool:
    """Whether `trainer` (a TARGETS class, subclass or instance) would call trd_fast's loss; False for others."""
    cls = trainer if isinstance(trainer, type) else type(trainer)
    target = _target_of(cls)
    if target is None:
        return False
    owner = importlib.import_module(target.module) if target.in_module else trainer
    return _is_ours(_function(inspect.getattr_static(owner, target.attribute, None)))


def _resolve(trainer):
    """(the TARGETS row, where its loss is set): the trainer class or instance, or the TRL module."""
    cls = trainer if isinstance(trainer, type) else type(trainer)
    target = _target_of(cls)
    if target is None:
        names = ", ".join(f"{t.module}.{t.name}" for t in TARGETS)
        raise ValueError(f"trainer: expected one of {names}, a subclass or an instance; got {cls.__qualname__}")
    if not target.in_module:
        return target, trainer
    if not isinstance(trainer, type):
        raise ValueError(f"trainer: {target.name}'s loss is the function {target.module}.{target.attribute}, "
                         f"shared by every {target.name}; patch the class, not an instance")
    return target, importlib.import_module(target.module)


def _replacement(original, target: Target, options: dict):
    """A function with `original`'s signature: TRL's own function for non-default extras, ours otherwise."""
    signature = inspect.signature(original)
    module, name = target.loss.rsplit(".", 1)
    ours = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    options = {key: options[key] for key in target.options}
    extras = dict(target.extras)

    @functools.wraps(original)
    def replacement(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if any(a[name] is not default and a[name] != default for name, default in extras.items()):
            return original(*args, **kwargs)
        return ours(**{key: a[key] for key, _ in target.parameters if key not in extras}, **options)

    replacement.__doc__ = (f"TRL's {target.name} loss {target.attribute} on trd_fast's fused ops "
                           f"(trd_fast.integrations.trl).\n\n{original.__doc__ or ''}")
    replacement.trd_fast_target = target
    return replacement


def _check_trl_version() -> str:
    import trl
    from packaging.version import Version

    version = getattr(trl, "__version__", "unknown")
    try:
        parsed = Version(version)
    except Exception:  # an unparseable local build: the signature check still guards
        return version
    if parsed < Version(MIN_TRL):
        raise RuntimeError(f"trd_fast.integrations.trl supports TRL >= {MIN_TRL} (checked: "
                           f"{', '.join(CHECKED_TRL)}); the installed TRL is {version}")
    if parsed.release[:2] > Version(CHECKED_TRL[-1]).release[:2]:
        warnings.warn(f"trd_fast.integrations.trl: TRL {version} is newer than the newest version checked "
                      f"({CHECKED_TRL[-1]}); its loss signature matches, so the patch applies, but re-run "
                      "tests/test_integration_trl.py to confirm the values still agree", stacklevel=3)
    return version


def _check_signature(original, target: Target, version: str) -> None:
    actual = tuple((p.name, p.default) for p in inspect.signature(original).parameters.values())
    if actual != target.parameters:
        def show(params):
            return "(" + ", ".join(n if d is _EMPTY else f"{n}={d!r}" for n, d in params) + ")"
        raise RuntimeError(f"{target.name}'s {target.attribute}{show(actual)} in TRL {version} differs from the "
                           f"signature trd_fast was checked against, {target.attribute}{show(target.parameters)} "
                           f"(TRL {MIN_TRL} to {CHECKED_TRL[-1]}); not patching")


def _target_of(cls) -> Target | None:
    """The TARGETS row of the first class in cls's MRO that TRL defines (matched by module and name), or None."""
    for base in cls.__mro__:
        for target in TARGETS:
            if (base.__module__, base.__name__) == (target.module, target.name):
                return target
    return None


def _installed() -> list:
    """The TARGETS classes the installed TRL has, with their loss (a missing module, class or loss: skipped)."""
    classes = []
    for target in TARGETS:
        try:
            module = importlib.import_module(target.module)
        except ImportError:
            continue
        cls = getattr(module, target.name, None)
        if cls is not None and hasattr(module if target.in_module else cls, target.attribute):
            classes.append(cls)
    return classes


def _function(entry):
    return entry.__func__ if isinstance(entry, staticmethod) else entry


def _is_ours(function) -> bool:
    return hasattr(function, "trd_fast_target")

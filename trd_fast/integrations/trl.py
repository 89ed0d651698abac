"""One call makes TRL's distillation trainers compute their loss with trd_fast's fused kernel.

    from trl.experimental.gkd import GKDTrainer
    from trd_fast.integrations import patch_trl
    patch_trl(GKDTrainer)          # every GKDTrainer from now on; or patch_trl(trainer) for one instance

The trainers share one loss, `generalized_jsd_loss`, a staticmethod they call as `self.generalized_jsd_loss(...)`
(GOLD also as `GOLDTrainer.generalized_jsd_loss(...)`); the patch replaces that staticmethod with
`gkd_loss.jsd_loss`. TARGETS below is the whole integration: one row per trainer, no per-trainer code. A row's
`extras` are TRL-only keyword arguments that trainer's loss adds (GOLD's probability inputs, IW-OPD's top-k
support with a tail bucket): at their defaults the loss is GKD's and runs on our kernel; any other value calls
TRL's own function unchanged.

Supported TRL versions: >= 1.7.0, the first release whose loss takes `num_items_in_batch` (GKD's trainer has
lived in trl.experimental.gkd since before 1.0). The source of the three losses was read for 1.7.0, 1.8.0,
1.12.0, 1.15.0 and 1.16.0 and is the same in all of them (IW-OPD: 1.12.0 on); the tests run against the
installed TRL (1.16.0 when this was written). patch_trl refuses an older TRL, refuses a loss whose
signature differs from the one recorded here, and warns on a TRL newer than the newest checked.

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
from trd_fast.integrations.gkd_loss import jsd_loss

MIN_TRL = SUPPORTED["trl"][0]  # first TRL whose generalized_jsd_loss takes num_items_in_batch
CHECKED_TRL = ("1.7.0", "1.8.0", "1.12.0", "1.15.0", "1.16.0")  # versions whose loss source was read
ATTRIBUTE = "generalized_jsd_loss"
_EMPTY = inspect.Parameter.empty
# GKD's signature: (name, default) of each parameter; a trainer's extras go between reduction and num_items_in_batch.
_HEAD = (("student_logits", _EMPTY), ("teacher_logits", _EMPTY), ("labels", None), ("beta", 0.5),
         ("temperature", 1.0), ("reduction", "batchmean"))
_TAIL = (("num_items_in_batch", None),)
_MISSING = object()


@dataclass(frozen=True)
class Target:
    module: str  # the TRL module that defines the trainer class
    name: str  # the trainer class; its staticmethod `generalized_jsd_loss` is the one replaced
    extras: tuple = ()  # (name, default) of TRL-only arguments: our kernel at the default, TRL's function otherwise

    @property
    def parameters(self) -> tuple:
        return _HEAD + self.extras + _TAIL


TARGETS = (
    Target("trl.experimental.gkd.gkd_trainer", "GKDTrainer"),
    Target("trl.experimental.gold.gold_trainer", "GOLDTrainer", (("logits_are_probs", False),)),
    Target("trl.experimental.iw_opd.iw_opd_trainer", "IWOPDTrainer", (("top_k", 0), ("add_tail", True))),
)


def patch_trl(trainer=None, *, backend=None, inplace_backward=False):
    """Make `trainer` compute `generalized_jsd_loss` with trd_fast; returns `trainer`.

    trainer: a TRL trainer class from TARGETS or a subclass (every instance made afterwards), or an instance
    (that trainer only); None patches every TARGETS class the installed TRL has and returns them as a tuple.
    backend: the trd_fast backend (None: TRD_FAST_BACKEND or "auto"). inplace_backward: write the gradient over
    the student logits (saves an [N, V] buffer; only where nothing else needs those logits in backward, e.g. no
    logit soft-capping after the LM head). Patching again replaces the options; unpatch_trl undoes it.
    """
    version = _check_trl_version()
    if trainer is None:
        return tuple(patch_trl(cls, backend=backend, inplace_backward=inplace_backward) for cls in _installed())
    owner = trainer
    target = _target_of(owner if isinstance(owner, type) else type(owner))
    current = _function(inspect.getattr_static(owner, ATTRIBUTE))
    original = getattr(current, "__wrapped__", current) if _is_ours(current) else current
    _check_signature(original, target, owner, version)
    own = _own_entry(owner)
    previous = _function(own).trd_fast_previous if _is_ours(_function(own)) else own
    replacement = _replacement(original, target, backend, inplace_backward)
    replacement.trd_fast_previous = previous
    setattr(owner, ATTRIBUTE, staticmethod(replacement) if isinstance(owner, type) else replacement)
    if getattr(owner, "use_liger_gkd_loss", False) is True:
        warnings.warn(f"{type(owner).__name__} was built with use_liger_kernel=True: it computes its loss with "
                      "Liger's fused linear JSD and never calls generalized_jsd_loss, so the patch changes nothing "
                      "(TRL 1.7 to 1.14; later GKDTrainers have no Liger path)", stacklevel=2)
    return trainer


def unpatch_trl(trainer=None):
    """Undo patch_trl on `trainer` (a class or instance; None: every TARGETS class). Returns `trainer`."""
    if trainer is None:
        return tuple(unpatch_trl(cls) for cls in _installed())
    own = _function(_own_entry(trainer))
    if _is_ours(own):
        if own.trd_fast_previous is _MISSING:
            delattr(trainer, ATTRIBUTE)
        else:
            setattr(trainer, ATTRIBUTE, own.trd_fast_previous)
    return trainer


def is_patched(trainer) -> bool:
    """Whether `trainer` (class or instance) would call trd_fast's loss."""
    return _is_ours(_function(inspect.getattr_static(trainer, ATTRIBUTE, None)))


def _replacement(original, target: Target, backend, inplace_backward):
    """A function with `original`'s signature: TRL's own function for non-default extras, ours otherwise."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def generalized_jsd_loss(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if any(a[name] is not default and a[name] != default for name, default in target.extras):
            return original(*args, **kwargs)
        return jsd_loss(a["student_logits"], a["teacher_logits"], a["labels"], a["beta"], a["temperature"],
                        a["reduction"], a["num_items_in_batch"], backend=backend, inplace_backward=inplace_backward)

    generalized_jsd_loss.__doc__ = (f"TRL's {target.name}.{ATTRIBUTE} on trd_fast's fused kernel "
                                    f"(trd_fast.integrations.trl).\n\n{original.__doc__ or ''}")
    generalized_jsd_loss.trd_fast_target = target
    return generalized_jsd_loss


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


def _check_signature(original, target: Target, owner, version: str) -> None:
    actual = tuple((p.name, p.default) for p in inspect.signature(original).parameters.values())
    if actual != target.parameters:
        def show(params):
            return "(" + ", ".join(n if d is _EMPTY else f"{n}={d!r}" for n, d in params) + ")"
        name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise RuntimeError(f"{name}.{ATTRIBUTE}{show(actual)} in TRL {version} differs from the signature "
                           f"trd_fast was checked against, {target.name}.{ATTRIBUTE}{show(target.parameters)} "
                           f"(TRL {MIN_TRL} to {CHECKED_TRL[-1]}); not patching")


def _target_of(cls) -> Target:
    """The TARGETS row of the first class in cls's MRO that TRL defines (matched by module and name)."""
    for base in cls.__mro__:
        for target in TARGETS:
            if (base.__module__, base.__name__) == (target.module, target.name):
                return target
    names = ", ".join(f"{t.module}.{t.name}" for t in TARGETS)
    raise ValueError(f"trainer: expected one of {names}, a subclass or an instance; got {cls.__qualname__}")


def _installed() -> list:
    """The TARGETS classes the installed TRL has (a trainer whose module is missing is skipped)."""
    classes = []
    for target in TARGETS:
        try:
            module = importlib.import_module(target.module)
        except ImportError:
            continue
        if hasattr(module, target.name):
            classes.append(getattr(module, target.name))
    return classes


def _own_entry(owner):
    """The attribute as stored on `owner` itself (not inherited), or _MISSING."""
    return vars(owner).get(ATTRIBUTE, _MISSING)


def _function(entry):
    return entry.__func__ if isinstance(entry, staticmethod) else entry


def _is_ours(function) -> bool:
    return hasattr(function, "trd_fast_target")

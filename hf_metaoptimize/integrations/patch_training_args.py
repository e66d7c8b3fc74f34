"""Patch of `transformers.training_args`: the `--optim metaoptimize*` names and the one defaults rule.

- adds `metaoptimize` / `metaoptimize_lion` to the closed `OptimizerNames` enum (shared by TrainingArguments and
  every subclass: Seq2SeqTrainingArguments, TRL's configs, ...), so HfArgumentParser offers them as choices and
  `TrainingArguments.__post_init__` accepts them;
- wraps `TrainingArguments.__post_init__` and `set_optimizer`: for our names, validate `--optim_args` and the
  complete optimizer setting while the arguments are built (before anything is loaded), then apply the rule.

The defaults rule for `--optim metaoptimize*` looks at values only, so it is the same however the arguments were
built (HfArgumentParser, TRL's parser with or without a YAML config, a dict, direct construction) and for every
TrainingArguments subclass:
- `lr_scheduler_type="linear"`, the Trainer's default, becomes "constant" ("constant_with_warmup" when
  warmup_steps > 0): the learned step size is the schedule, and a decay to 0 would multiply it down to 0 whatever
  was learned. Any other schedule you name multiplies the learned step size (for a linear decay on top of it, name
  "polynomial", whose default power is 1).
- `adam_beta1` / `adam_beta2` set the base rule's coefficients (Lion: c, rho; SGD: momentum; RMSProp: lambda); a
  value equal to AdamW's default (0.9 / 0.999) stands for the base's own default (Lion's rho and RMSProp's lambda
  are 0.99).
- `adam_epsilon` is used by the adamw and rmsprop bases; with lion / sgd a value other than the default logs a
  warning.
The chosen values are written into the arguments, so the saved `training_args.bin` / logs show what ran.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ..spec import TRAINER_BETAS
from .deepspeed_config import check_deepspeed_config
from .optim_args import (
    BASE_BETAS,
    BASES_WITH_EPS,
    OPTIM_NAMES,
    check_optimizer_kwargs,
    is_metaoptimize,
    resolve_spec,
)
from .versions import WRAPPED, check_transformers_version

logger = logging.getLogger("hf_metaoptimize")

# AdamW's defaults as TrainingArguments carries them: at these values each base uses its own coefficient.
ADAMW_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


def _extend_enum(enum_cls: type, name: str, value: str) -> None:
    """Add member `name = value` to a closed str Enum (Python 3.10-3.13 internals; tests/test_integration_args.py)."""
    if value in enum_cls._value2member_map_:
        return
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)


def apply_defaults(args: Any, *, building: bool = False) -> dict[str, Any] | None:
    """The defaults rule for `--optim metaoptimize*` (module doc), in place; idempotent. Validates the complete
    setting first (OptimArgsError names the bad value) and returns it (`optim_args.resolve_spec`). No-op (None) for
    other optimizers, unless `building` (a MetaOptimize is being built from these arguments whatever `optim` says,
    e.g. by MetaOptimizeTrainer)."""
    if not building and not is_metaoptimize(getattr(args, "optim", None)):
        return None
    spec = resolve_spec(args)  # raises OptimArgsError before anything is loaded
    check_deepspeed_config(getattr(args, "deepspeed", None))
    _constant_schedule(args)
    base = spec["base"]
    own = dict(zip(TRAINER_BETAS[base], BASE_BETAS[base]))
    for name, value in own.items():
        if getattr(args, name) == ADAMW_DEFAULTS[name] and value != ADAMW_DEFAULTS[name]:
            setattr(args, name, value)
    if base not in BASES_WITH_EPS and args.adam_epsilon != ADAMW_DEFAULTS["adam_epsilon"]:
        logger.warning(
            "--adam_epsilon %g is not used by MetaOptimize with base=%s (it has no epsilon).", args.adam_epsilon, base
        )
    check_optimizer_kwargs(args, spec)  # the optimizer's own rules, on the complete kwargs
    return spec


def _constant_schedule(args: Any) -> None:
    """The schedule part of the rule: the Trainer's default "linear" becomes constant (with warmup if asked)."""
    current = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if current != "linear":
        return
    target = default_schedule(args)
    logger.info(
        "MetaOptimize: lr_scheduler_type 'linear' (the Trainer's default) -> %r: the learned step size is "
        "the schedule; name another schedule to multiply it (e.g. 'polynomial' for a linear decay).",
        target,
    )
    from transformers.trainer_utils import SchedulerType  # loaded with transformers.training_args

    args.lr_scheduler_type = SchedulerType(target)  # accepted before and after TrainingArguments.__post_init__


def default_schedule(args: Any) -> str:
    warmup = getattr(args, "warmup_steps", 0) or 0
    warmup_ratio = getattr(args, "warmup_ratio", 0) or 0  # older versions
    return "constant_with_warmup" if (warmup > 0 or warmup_ratio > 0) else "constant"


def _patch_training_args(module: Any) -> None:
    check_transformers_version()
    optimizer_names = module.OptimizerNames
    for value in OPTIM_NAMES:
        _extend_enum(optimizer_names, value.upper(), value)
    base_cls = module.TrainingArguments
    original = base_cls.__dict__["__post_init__"]
    if not getattr(original, WRAPPED, False):

        @functools.wraps(original)
        def __post_init__(self, *a, **kw):
            apply_defaults(self)
            return original(self, *a, **kw)

        setattr(__post_init__, WRAPPED, True)
        base_cls.__post_init__ = __post_init__

    set_optimizer = base_cls.__dict__.get("set_optimizer")
    if set_optimizer is not None and not getattr(set_optimizer, WRAPPED, False):

        @functools.wraps(set_optimizer)
        def wrapped_set_optimizer(self, name="adamw_torch", *a, **kw):
            result = set_optimizer(self, name, *a, **kw)
            apply_defaults(self)
            return result

        setattr(wrapped_set_optimizer, WRAPPED, True)
        base_cls.set_optimizer = wrapped_set_optimizer

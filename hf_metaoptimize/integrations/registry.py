"""`register()`: teach an installed transformers `--optim metaoptimize` and `--optim metaoptimize_lion`.

What it changes, each part idempotent and applied as soon as its transformers module is loaded (eagerly by
`register()`, or lazily by the import hook of `hf_metaoptimize.integrations.autoregister`):

1. `transformers.training_args`:
   - adds the two names to the closed `OptimizerNames` enum (shared by TrainingArguments and every subclass:
     Seq2SeqTrainingArguments, TRL configs, ...), so HfArgumentParser offers them as choices and
     `TrainingArguments.__post_init__` accepts them;
   - wraps `TrainingArguments.__post_init__` (and `set_optimizer`): for our names it validates `--optim_args`
     and the complete optimizer setting (a bad value stops the run while the arguments are parsed, before anything
     is loaded) and applies the defaults rule below.
2. `transformers.trainer_optimizer`: a handler in `_OPTIMIZER_HANDLERS` (private, version-gated) builds
   `MetaOptimize` from the arguments; `granularity=layer` passes `layer_param_groups(model)` as params.
3. `transformers.trainer`: `Trainer.log` adds the learned step sizes (and the count of skipped non-finite steps)
   to the logs dict of every training logging step BEFORE the Trainer stores it (so they reach
   trainer_state.json, the console and every reporter), and `Trainer.create_scheduler` applies the schedule part
   of the rule to a MetaOptimize optimizer that did not come from `--optim` (`optimizer_cls_and_kwargs=...`).

The defaults rule for `--optim metaoptimize*`. It looks at values only, so it is the same however the arguments
were built (HfArgumentParser, TRL's parser with or without a YAML config, a dict, direct construction) and for
every TrainingArguments subclass:
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
import os
import sys
from typing import Any

from .optim_args import (
    BASE_BETAS,
    BASES_WITH_EPS,
    OPTIM_NAMES,
    OptimArgsError,
    check_optimizer_kwargs,
    is_metaoptimize,
    resolve_spec,
)

logger = logging.getLogger("hf_metaoptimize")

# transformers versions with the `_OPTIMIZER_HANDLERS` dispatch table this module relies on (added in 5.2).
MIN_TRANSFORMERS = (5, 2)
MAX_TRANSFORMERS_EXCLUSIVE = (6, 0)
ALLOW_UNTESTED_ENV = "HF_METAOPTIMIZE_ALLOW_UNTESTED_TRANSFORMERS"

_WRAPPED = "_hf_metaoptimize_wrapped"

# AdamW's defaults as TrainingArguments carries them: at these values each base uses its own coefficient.
ADAMW_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


# ---------------------------------------------------------------------------------------------------------
# version gate
# ---------------------------------------------------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def transformers_version() -> str:
    module = sys.modules.get("transformers")
    version = getattr(module, "__version__", None)
    if version is None:
        from importlib.metadata import version as _dist_version

        version = _dist_version("transformers")
    return version


def check_transformers_version(version: str | None = None) -> None:
    """Raise RuntimeError unless transformers is a version whose private dispatch table we support."""
    version = transformers_version() if version is None else version
    vt = _version_tuple(version)
    if MIN_TRANSFORMERS <= vt < MAX_TRANSFORMERS_EXCLUSIVE:
        return
    supported = (
        f">={'.'.join(map(str, MIN_TRANSFORMERS))},<{'.'.join(map(str, MAX_TRANSFORMERS_EXCLUSIVE))}"
    )
    message = (
        f"hf_metaoptimize.register() supports transformers {supported} (it installs a handler in the private "
        f"transformers.trainer_optimizer._OPTIMIZER_HANDLERS table, added in 5.2); found transformers {version}. "
    )
    if vt >= MAX_TRANSFORMERS_EXCLUSIVE and os.environ.get(ALLOW_UNTESTED_ENV, "").lower() in ("1", "true", "yes"):
        logger.warning(message + f"Continuing because {ALLOW_UNTESTED_ENV} is set.")
        return
    hint = (
        "Upgrade transformers, or build the optimizer yourself: Trainer(..., optimizer_cls_and_kwargs=("
        "hf_metaoptimize.MetaOptimize, {...}))."
        if vt < MIN_TRANSFORMERS
        else f"Set {ALLOW_UNTESTED_ENV}=1 to try anyway, or pin transformers to {supported}."
    )
    raise RuntimeError(message + hint)


# ---------------------------------------------------------------------------------------------------------
# 1. training_args: enum members, the defaults rule in __post_init__ / set_optimizer
# ---------------------------------------------------------------------------------------------------------


def _extend_enum(enum_cls: type, name: str, value: str) -> None:
    """Add member `name = value` to a closed str Enum (Python 3.10-3.13 internals; see INTEGRATION-NOTES)."""
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


def apply_defaults(args: Any, *, building: bool = False) -> None:
    """The defaults rule for `--optim metaoptimize*` (module doc), in place; idempotent. Validates the complete
    setting first (OptimArgsError names the bad value). No-op for other optimizers, unless `building` (a
    MetaOptimize is being built from these arguments whatever `optim` says, e.g. by MetaOptimizeTrainer)."""
    if not building and not is_metaoptimize(getattr(args, "optim", None)):
        return
    spec = resolve_spec(args)  # raises OptimArgsError before anything is loaded
    check_deepspeed_config(getattr(args, "deepspeed", None), spec["granularity"])
    _constant_schedule(args)
    base = spec["base"]
    own = dict(zip(("adam_beta1", "adam_beta2") if base != "rmsprop" else ("adam_beta2",), BASE_BETAS[base]))
    for name, value in own.items():
        if getattr(args, name) == ADAMW_DEFAULTS[name] and value != ADAMW_DEFAULTS[name]:
            setattr(args, name, value)
    if base not in BASES_WITH_EPS and args.adam_epsilon != ADAMW_DEFAULTS["adam_epsilon"]:
        logger.warning("--adam_epsilon %g is not used by MetaOptimize with base=%s (it has no epsilon).",
                       args.adam_epsilon, base)
    check_optimizer_kwargs(args, spec)  # the optimizer's own rules, on the complete kwargs


def _constant_schedule(args: Any) -> None:
    """The schedule part of the rule: the Trainer's default "linear" becomes constant (with warmup if asked)."""
    current = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if current != "linear":
        return
    target = default_schedule(args)
    logger.info("MetaOptimize: lr_scheduler_type 'linear' (the Trainer's default) -> %r: the learned step size is "
                "the schedule; name another schedule to multiply it (e.g. 'polynomial' for a linear decay).", target)
    if isinstance(args.lr_scheduler_type, str) and not hasattr(args.lr_scheduler_type, "value"):
        args.lr_scheduler_type = target  # before TrainingArguments.__post_init__: it converts the string
    else:
        from transformers.trainer_utils import SchedulerType

        args.lr_scheduler_type = SchedulerType(target)


def check_deepspeed_config(config: Any, granularity: str = "scalar") -> None:
    """Refuse DeepSpeed configs (dict, JSON string or file) that would silently replace MetaOptimize, and
    granularity=tensor under ZeRO (a per-tensor step size would become per-partition); while parsing arguments.

    Delegates to `hf_metaoptimize.integrations.deepspeed.check_config` (an "optimizer" section; optimizer offload
    without "zero_force_ds_cpu_optimizer": false).
    """
    if config is None:
        return
    if isinstance(config, str):
        import json

        text = config.strip()
        if not text.startswith("{"):
            if not os.path.isfile(text):
                return  # transformers reports a missing file itself
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        try:
            config = json.loads(text)
        except ValueError:
            return
    if isinstance(config, dict):
        from .deepspeed import check_config

        check_config(config)
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
        if granularity == "tensor" and stage not in (0, "0", None):
            raise OptimArgsError(
                f"--optim_args granularity=tensor is not supported under DeepSpeed ZeRO (stage {stage}): ZeRO "
                "flattens each param group into one partition per rank, so a per-tensor step size would silently "
                "become per-partition. Use granularity=scalar, layer or element."
            )


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
    if not getattr(original, _WRAPPED, False):

        @functools.wraps(original)
        def __post_init__(self, *a, **kw):
            apply_defaults(self)
            return original(self, *a, **kw)

        setattr(__post_init__, _WRAPPED, True)
        base_cls.__post_init__ = __post_init__

    set_optimizer = base_cls.__dict__.get("set_optimizer")
    if set_optimizer is not None and not getattr(set_optimizer, _WRAPPED, False):

        @functools.wraps(set_optimizer)
        def wrapped_set_optimizer(self, name="adamw_torch", *a, **kw):
            result = set_optimizer(self, name, *a, **kw)
            apply_defaults(self)
            return result

        setattr(wrapped_set_optimizer, _WRAPPED, True)
        base_cls.set_optimizer = wrapped_set_optimizer


# ---------------------------------------------------------------------------------------------------------
# 2. trainer_optimizer: the handler
# ---------------------------------------------------------------------------------------------------------


def build_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type, dict[str, Any]]:
    """(MetaOptimize, kwargs) for a TrainingArguments object; `params` is included for granularity=layer."""
    from ..optimizer import MetaOptimize
    from .optim_args import optimizer_kwargs

    apply_defaults(args, building=True)  # idempotent; also for arguments built before register()
    spec = resolve_spec(args)
    kwargs = optimizer_kwargs(args, spec)
    if spec["granularity"] == "layer":
        if model is None:
            raise ValueError("granularity=layer needs the model to find its layers")
        from ..layers import layer_param_groups

        kwargs["params"] = layer_param_groups(model, args.weight_decay)
    return MetaOptimize, kwargs


def _handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    return build_optimizer_cls_and_kwargs(ctx.args, ctx.model)


def _patch_trainer_optimizer(module: Any) -> None:
    check_transformers_version()
    table = getattr(module, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(table, dict) or not hasattr(module, "OptimizerContext"):
        raise RuntimeError(
            f"transformers {transformers_version()} has no transformers.trainer_optimizer._OPTIMIZER_HANDLERS "
            "dispatch table; hf_metaoptimize.register() cannot install --optim metaoptimize. Use "
            "Trainer(..., optimizer_cls_and_kwargs=(hf_metaoptimize.MetaOptimize, {...}))."
        )
    names = sys.modules["transformers.training_args"].OptimizerNames
    for value in OPTIM_NAMES:
        table[names(value)] = _handler


# ---------------------------------------------------------------------------------------------------------
# 3. trainer: step sizes into the logs, the schedule rule for optimizer_cls_and_kwargs
# ---------------------------------------------------------------------------------------------------------


def find_metaoptimize(optimizer: Any) -> Any:
    """The MetaOptimize inside accelerate / DeepSpeed wrappers (or None)."""
    from ..optimizer import MetaOptimize

    for _ in range(6):
        if optimizer is None:
            return None
        if isinstance(optimizer, MetaOptimize):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _patch_trainer(module: Any) -> None:
    trainer_cls = module.Trainer
    log = trainer_cls.__dict__["log"]
    if not getattr(log, _WRAPPED, False):

        @functools.wraps(log)
        def wrapped_log(self, logs, *a, **kw):
            if "learning_rate" in logs and not any(k.startswith("step_size") for k in logs):
                optimizer = find_metaoptimize(getattr(self, "optimizer", None))
                if optimizer is not None:
                    from .stepsizes import step_size_logs

                    logs.update(step_size_logs(optimizer, self, logs["learning_rate"]))
                    if optimizer.param_groups and optimizer.param_groups[0].get("skip_nonfinite"):
                        logs["skipped_steps"] = optimizer.skipped_steps()  # warns on the first skip and on a stall
            return log(self, logs, *a, **kw)

        setattr(wrapped_log, _WRAPPED, True)
        trainer_cls.log = wrapped_log

    create_scheduler = trainer_cls.__dict__["create_scheduler"]
    if not getattr(create_scheduler, _WRAPPED, False):

        @functools.wraps(create_scheduler)
        def wrapped_create_scheduler(self, num_training_steps, optimizer=None):
            if getattr(self, "lr_scheduler", None) is None:
                _maybe_constant_schedule(self.args, optimizer if optimizer is not None else self.optimizer)
            if getattr(self, "is_deepspeed_enabled", False):
                # The Trainer calls create_scheduler right after accelerator.prepare() built the DeepSpeed engine
                # (and before it loads a checkpoint): tell MetaOptimize about its ZeRO partitions there.
                _attach_deepspeed(self.optimizer)
            return create_scheduler(self, num_training_steps, optimizer)

        setattr(wrapped_create_scheduler, _WRAPPED, True)
        trainer_cls.create_scheduler = wrapped_create_scheduler


def _attach_deepspeed(optimizer: Any) -> None:
    if find_metaoptimize(optimizer) is None or find_metaoptimize(optimizer) is optimizer:
        return  # not ours, or not wrapped by DeepSpeed yet (deepspeed_init also calls create_scheduler)
    from .deepspeed import attach

    attach(optimizer)


def _maybe_constant_schedule(args: Any, optimizer: Any) -> None:
    """`optimizer_cls_and_kwargs=(MetaOptimize, ...)` with another `--optim`: the same schedule rule."""
    if find_metaoptimize(optimizer) is not None:
        _constant_schedule(args)


# ---------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------

# module name -> patch function; the import hook applies them as the modules finish loading.
PATCHES = {
    "transformers.training_args": _patch_training_args,
    "transformers.trainer_optimizer": _patch_trainer_optimizer,
    "transformers.trainer": _patch_trainer,
}
_APPLIED: set[str] = set()


def apply_patch(module_name: str) -> None:
    """Apply the patch for one loaded transformers module (idempotent)."""
    if module_name in _APPLIED:
        return
    PATCHES[module_name](sys.modules[module_name])
    _APPLIED.add(module_name)


def register() -> None:
    """Make `--optim metaoptimize` / `metaoptimize_lion` work in transformers (idempotent; see module doc).

    Raises RuntimeError on a transformers version without the dispatch table this relies on.
    """
    import importlib

    check_transformers_version()
    for module_name in PATCHES:
        importlib.import_module(module_name)
        apply_patch(module_name)

"""`register()`: teach an installed transformers `--optim metaoptimize` and `--optim metaoptimize_lion`.

What it changes, each part idempotent and applied as soon as its transformers module is loaded (eagerly by
`register()`, or lazily by the import hook of `hf_metaoptimize.integrations.autoregister`):

1. `transformers.training_args`:
   - adds the two names to the closed `OptimizerNames` enum (shared by TrainingArguments and every subclass:
     Seq2SeqTrainingArguments, TRL configs, ...), so HfArgumentParser offers them as choices and
     `TrainingArguments.__post_init__` accepts them;
   - wraps `TrainingArguments.__post_init__`: for our names it validates `--optim_args` (an unknown key or a bad
     value stops the run while the arguments are parsed, before anything is loaded) and applies the defaults
     below; for every run it records which of lr_scheduler_type / adam_beta1 / adam_beta2 / adam_epsilon the
     user left at their default ("unnamed");
   - marks the defaults of those four fields (same values, a marker subclass of str/float) so that a direct
     `TrainingArguments(...)` call tells a default from a value the user wrote.
2. `transformers.hf_argparser`: HfArgumentParser records which options were on the command line (or keys in a
   dict / JSON / YAML config), because argparse fills in defaults that look exactly like user values.
3. `transformers.trainer_optimizer`: a handler in `_OPTIMIZER_HANDLERS` (private, version-gated) builds
   `MetaOptimize` from the arguments; `granularity=layer` passes `layer_param_groups(model)` as params.
4. `transformers.trainer`: `Trainer.log` adds the learned step sizes to the logs dict of every training logging
   step BEFORE the Trainer stores it (so they reach trainer_state.json, the console and every reporter), and
   `Trainer.create_scheduler` uses a constant schedule for a MetaOptimize optimizer when the user named none
   (this covers `optimizer_cls_and_kwargs=(MetaOptimize, ...)` and `args.set_optimizer(...)`).

Defaults for `--optim metaoptimize*` when the user did not name them:
- `lr_scheduler_type`: "constant" ("constant_with_warmup" when warmup_steps > 0). The learned step size is
  the schedule; the Trainer's default linear decay would multiply it down to 0 and fight the meta rule.
- `adam_beta2`: the base rule's own default (Lion's rho 0.99, RMSProp's lambda 0.99) instead of AdamW's 0.999.
The chosen values are written into the arguments, so the saved `training_args.bin` / logs show what ran.
"""

from __future__ import annotations

import contextvars
import dataclasses
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

# Fields whose "did the user name it?" matters, with the TrainingArguments default they carry.
TRACKED_FIELDS = ("lr_scheduler_type", "adam_beta1", "adam_beta2", "adam_epsilon")
_UNNAMED_ATTR = "_hf_metaoptimize_unnamed"  # frozenset of TRACKED_FIELDS left at their default
_RESOLVED_ATTR = "_hf_metaoptimize_resolved"  # True once our defaults were applied to these args
_WRAPPED = "_hf_metaoptimize_wrapped"

# Set by the wrapped HfArgumentParser while it builds dataclasses: the option names given by the user
# (None: could not be determined).
_PARSE_NAMED: contextvars.ContextVar[Any] = contextvars.ContextVar("hf_metaoptimize_parse_named", default=False)


class _DefaultStr(str):
    """A field default that is equal to, and behaves as, the plain str; only its type says "not named"."""

    __slots__ = ()

    def __reduce__(self):
        return (str, (str(self),))


class _DefaultFloat(float):
    """A field default that is equal to, and behaves as, the plain float; only its type says "not named"."""

    __slots__ = ()

    def __reduce__(self):
        return (float, (float(self),))


_MARKERS = (_DefaultStr, _DefaultFloat)


def _mark(value: Any) -> Any:
    if isinstance(value, _MARKERS):
        return value
    if isinstance(value, str):
        return _DefaultStr(getattr(value, "value", value))
    if isinstance(value, float):
        return _DefaultFloat(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, _DefaultStr):
        return str.__str__(value)
    if isinstance(value, _DefaultFloat):
        return float(value)
    return value


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
# 1. training_args: enum members, __post_init__ wrapper, marked defaults
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


def _all_subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(current.__subclasses__())
    return out


def _mark_defaults(cls: type) -> None:
    """Replace the defaults of TRACKED_FIELDS by equal marker values in `cls` (fields + generated __init__)."""
    fields = getattr(cls, "__dataclass_fields__", {})
    init = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    for name in TRACKED_FIELDS:
        field = fields.get(name)
        if field is None or field.default is dataclasses.MISSING:
            continue
        marked = _mark(field.default)
        field.default = marked
        if code is None:
            continue
        if init.__kwdefaults__ and name in init.__kwdefaults__:
            init.__kwdefaults__[name] = _mark(init.__kwdefaults__[name])
        positional = code.co_varnames[: code.co_argcount]
        defaults = init.__defaults__ or ()
        if name in positional:
            index = positional.index(name) - (len(positional) - len(defaults))
            if 0 <= index < len(defaults) and not isinstance(defaults[index], _MARKERS):
                init.__defaults__ = defaults[:index] + (_mark(defaults[index]),) + defaults[index + 1 :]


def _named_fields(args: Any) -> set[str] | None:
    """Which TRACKED_FIELDS the user named for these args (None: unknown). Also strips the default markers."""
    named = set()
    for name in TRACKED_FIELDS:
        value = getattr(args, name, None)
        if isinstance(value, _MARKERS):
            object.__setattr__(args, name, _plain(value))
        else:
            named.add(name)
    record = _PARSE_NAMED.get()
    if record is False:  # not built by HfArgumentParser: the markers told us
        return named
    # Inside HfArgumentParser its record wins (argparse turns str defaults into plain values).
    if isinstance(record, list):  # parse_args_into_dataclasses: filled by parse_known_args
        record = record[0] if record else None
    return None if record is None else set(record) & set(TRACKED_FIELDS)


def resolve_training_args(args: Any, named: set[str] | None) -> None:
    """Validate our settings and apply the MetaOptimize defaults to TrainingArguments (before its __post_init__)."""
    if named is not None:
        args.__dict__[_UNNAMED_ATTR] = frozenset(set(TRACKED_FIELDS) - named)
    if not is_metaoptimize(getattr(args, "optim", None)):
        return
    spec = resolve_spec(args)  # raises OptimArgsError before anything is loaded
    check_deepspeed_config(getattr(args, "deepspeed", None), spec["granularity"])
    unnamed = args.__dict__.get(_UNNAMED_ATTR)
    if unnamed is None:  # unknown: judge by value
        unnamed = _unnamed_by_value(args)
    base = spec["base"]
    if "lr_scheduler_type" in unnamed:
        args.lr_scheduler_type = default_schedule(args)
    if "adam_beta2" in unnamed and base in ("lion", "rmsprop"):
        args.adam_beta2 = BASE_BETAS[base][-1]
    if "adam_epsilon" not in unnamed and base not in BASES_WITH_EPS:
        logger.warning("--adam_epsilon is ignored by MetaOptimize with base=%s (it has no epsilon).", base)
    check_optimizer_kwargs(args, spec)  # the optimizer's own rules, before anything is loaded
    args.__dict__[_RESOLVED_ATTR] = True


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


def _unnamed_by_value(args: Any) -> frozenset[str]:
    defaults = {"lr_scheduler_type": "linear", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}
    return frozenset(
        name for name, default in defaults.items() if getattr(getattr(args, name, None), "value", getattr(args, name, None)) == default
    )


def default_schedule(args: Any) -> str:
    warmup = getattr(args, "warmup_steps", 0) or 0
    warmup_ratio = getattr(args, "warmup_ratio", 0) or 0  # older versions
    return "constant_with_warmup" if (warmup > 0 or warmup_ratio > 0) else "constant"


def scheduler_unnamed(args: Any) -> bool | None:
    """True/False when known whether the user named lr_scheduler_type; None when unknown."""
    unnamed = getattr(args, "__dict__", {}).get(_UNNAMED_ATTR)
    return None if unnamed is None else "lr_scheduler_type" in unnamed


def _patch_training_args(module: Any) -> None:
    check_transformers_version()
    optimizer_names = module.OptimizerNames
    for value in OPTIM_NAMES:
        _extend_enum(optimizer_names, value.upper(), value)
    base_cls = module.TrainingArguments
    for cls in _all_subclasses(base_cls):
        _mark_defaults(cls)
    original = base_cls.__dict__["__post_init__"]
    if not getattr(original, _WRAPPED, False):

        @functools.wraps(original)
        def __post_init__(self, *a, **kw):
            if not self.__dict__.get("_hf_metaoptimize_seen"):
                self.__dict__["_hf_metaoptimize_seen"] = True
                resolve_training_args(self, _named_fields(self))
            return original(self, *a, **kw)

        setattr(__post_init__, _WRAPPED, True)
        base_cls.__post_init__ = __post_init__

    set_optimizer = base_cls.__dict__.get("set_optimizer")
    if set_optimizer is not None and not getattr(set_optimizer, _WRAPPED, False):

        @functools.wraps(set_optimizer)
        def wrapped_set_optimizer(self, name="adamw_torch", *a, **kw):
            result = set_optimizer(self, name, *a, **kw)
            if is_metaoptimize(name):
                named = {f"adam_{k}" for k in ("beta1", "beta2", "epsilon") if k in kw}
                scheduler_named = scheduler_unnamed(self) is False
                self.__dict__[_UNNAMED_ATTR] = frozenset(
                    {"adam_beta1", "adam_beta2", "adam_epsilon"} - named
                ) | (frozenset() if scheduler_named else {"lr_scheduler_type"})
                resolve_training_args(self, None)
            return result

        setattr(wrapped_set_optimizer, _WRAPPED, True)
        base_cls.set_optimizer = wrapped_set_optimizer

    set_lr_scheduler = base_cls.__dict__.get("set_lr_scheduler")
    if set_lr_scheduler is not None and not getattr(set_lr_scheduler, _WRAPPED, False):

        @functools.wraps(set_lr_scheduler)
        def wrapped_set_lr_scheduler(self, *a, **kw):
            unnamed = self.__dict__.get(_UNNAMED_ATTR)
            if unnamed is not None:
                self.__dict__[_UNNAMED_ATTR] = unnamed - {"lr_scheduler_type"}
            return set_lr_scheduler(self, *a, **kw)

        setattr(wrapped_set_lr_scheduler, _WRAPPED, True)
        base_cls.set_lr_scheduler = wrapped_set_lr_scheduler


# ---------------------------------------------------------------------------------------------------------
# 2. hf_argparser: record which options the user gave
# ---------------------------------------------------------------------------------------------------------


class _ParseError(Exception):
    pass


def _given_dests(parser: Any, args: list[str] | None) -> set[str] | None:
    """The argparse dests present on the command line (defaults suppressed); None if that cannot be told."""
    import argparse

    saved = [(action, action.default) for action in parser._actions]
    saved_error = parser.__dict__.get("error")

    def error(message):
        raise _ParseError(message)

    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        parser.error = error
        namespace, _ = argparse.ArgumentParser.parse_known_args(parser, args=args)
        return set(vars(namespace))
    except (_ParseError, SystemExit, Exception):  # noqa: BLE001 - the real parse reports real errors
        return None
    finally:
        for action, default in saved:
            action.default = default
        if saved_error is None:
            parser.__dict__.pop("error", None)
        else:
            parser.error = saved_error


def _patch_hf_argparser(module: Any) -> None:
    parser_cls = module.HfArgumentParser
    if getattr(parser_cls, _WRAPPED, False):
        return
    original_into = parser_cls.parse_args_into_dataclasses
    original_known = parser_cls.parse_known_args
    original_dict = parser_cls.parse_dict

    @functools.wraps(original_known)
    def parse_known_args(self, args=None, namespace=None):
        result = original_known(self, args=args, namespace=namespace)
        holder = _PARSE_NAMED.get()
        if isinstance(holder, list) and not holder:  # first parse inside parse_args_into_dataclasses
            holder.append(_given_dests(self, args))
        return result

    @functools.wraps(original_into)
    def parse_args_into_dataclasses(self, *a, **kw):
        holder: list = []
        token = _PARSE_NAMED.set(holder)
        try:
            # the dataclasses are built inside the original call, after parse_known_args filled `holder`
            return original_into(self, *a, **kw)
        finally:
            _PARSE_NAMED.reset(token)

    @functools.wraps(original_dict)
    def parse_dict(self, args, *a, **kw):
        token = _PARSE_NAMED.set(set(args))
        try:
            return original_dict(self, args, *a, **kw)
        finally:
            _PARSE_NAMED.reset(token)

    parser_cls.parse_known_args = parse_known_args
    parser_cls.parse_args_into_dataclasses = parse_args_into_dataclasses
    parser_cls.parse_dict = parse_dict
    setattr(parser_cls, _WRAPPED, True)


# ---------------------------------------------------------------------------------------------------------
# 3. trainer_optimizer: the handler
# ---------------------------------------------------------------------------------------------------------


def build_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type, dict[str, Any]]:
    """(MetaOptimize, kwargs) for a TrainingArguments object; `params` is included for granularity=layer."""
    from ..optimizer import MetaOptimize
    from .optim_args import optimizer_kwargs

    spec = resolve_spec(args)
    if not args.__dict__.get(_RESOLVED_ATTR) and spec["base"] in ("lion", "rmsprop") and args.adam_beta2 == 0.999:
        # arguments that never went through our __post_init__ (built before register()): judge by value
        logger.warning(
            "adam_beta2=0.999 looks like the TrainingArguments default; MetaOptimize base=%s uses its own %s. "
            "Call hf_metaoptimize.register() before building the arguments to make an explicit value count.",
            spec["base"], BASE_BETAS[spec["base"]][-1],
        )
        args.adam_beta2 = BASE_BETAS[spec["base"]][-1]
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
# 4. trainer: step sizes into the logs, constant default schedule
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
    if find_metaoptimize(optimizer) is None:
        return
    current = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if current != "linear":
        return
    unnamed = scheduler_unnamed(args)
    if unnamed is False:
        return
    target = default_schedule(args)
    if unnamed is None:
        logger.warning(
            "MetaOptimize: using lr_scheduler_type=%s instead of 'linear', which looks like the TrainingArguments "
            "default (the learned step size is the schedule). These arguments were built before "
            "hf_metaoptimize.register(), so an explicit 'linear' cannot be told from the default; name "
            "lr_scheduler_type after registering to keep it.",
            target,
        )
    else:
        logger.info("MetaOptimize: no lr_scheduler_type named, using %s.", target)
    from transformers.trainer_utils import SchedulerType

    args.lr_scheduler_type = SchedulerType(target)


# ---------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------

# module name -> patch function; the import hook applies them as the modules finish loading.
PATCHES = {
    "transformers.training_args": _patch_training_args,
    "transformers.hf_argparser": _patch_hf_argparser,
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

"""`--optim metaoptimize` settings: the `--optim_args` schema, its parser, and the kwargs for `MetaOptimize`.

Pure Python: nothing here imports transformers, so `TrainingArguments.__post_init__` can validate a run's
settings while the arguments are parsed, long before the model is loaded or the first step is taken.

Sources, later ones win: the optimizer name (`metaoptimize` -> AdamW base, `metaoptimize_lion` -> Lion base,
`metaoptimize_paper` -> AdamW base at the paper-exact setting `hf_metaoptimize.PAPER_EXACT`),
the typed `--metaoptimize_*` fields of `MetaOptimizeTrainingArguments`, then `--optim_args`. A key given both
in `--optim_args` and as a typed field set to a non-default value is an error (two answers for one question).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import spec as _spec

# --optim name -> the base rule it selects (the paper's default pair is AdamW base + Lion meta).
OPTIM_NAMES: dict[str, str] = {"metaoptimize": "adamw", "metaoptimize_lion": "lion", "metaoptimize_paper": "adamw"}
# --optim name -> the settings it implies on top of the defaults (typed flags and --optim_args still win).
OPTIM_PRESETS: dict[str, dict[str, Any]] = {"metaoptimize_paper": dict(_spec.PAPER_EXACT)}

# The rules, their coefficients and defaults come from the one spec (hf_metaoptimize.spec). "layer" is the
# Trainer-level name of block granularity with one block per transformer layer (hf_metaoptimize.layers); "block"
# itself is not offered here because the Trainer's own param groups (decay / no-decay) are not meaningful blocks.
GRANULARITIES = tuple("layer" if g == "block" else g for g in _spec.GRANULARITIES)
BASES, METAS, BASES_WITH_EPS = _spec.BASES, _spec.METAS, _spec.BASES_WITH_EPS
BASE_BETAS, META_BETAS = _spec.DEFAULT_BETAS, _spec.DEFAULT_META_BETAS  # `--adam_beta1/2` feed them (base_betas())
_D = _spec.DEFAULTS


class OptimArgsError(ValueError):
    """A bad `--optim_args` (or `--metaoptimize_*`) setting for `--optim metaoptimize*`."""


def _as_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on", "y", "t"):
        return True
    if low in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ValueError("expected true/false")


def _as_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _as_int(text: str) -> int:
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise ValueError("expected a whole number")
    return int(value)


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def cast(text: str) -> str:
        low = text.strip().lower()
        if low not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return low

    cast.__name__ = "one of " + "|".join(options)
    return cast


_R = _spec.RANGES


@dataclass(frozen=True)
class OptimArg:
    name: str
    cast: Callable[[str], Any]
    help: str
    default: Any = None
    range: _spec.Range | None = None  # the allowed values, from the spec's one table (spec.RANGES)

    @property
    def check(self) -> Callable[[Any], bool] | None:
        return None if self.range is None else self.range.contains

    @property
    def rule(self) -> str:
        """The human-readable form of `check` ("" without a range)."""
        return "" if self.range is None else self.range.text

    @property
    def kind(self) -> str:
        if self.cast is _as_float:
            return "float"
        if self.cast is _as_bool:
            return "bool"
        if self.cast is _as_int:
            return "int"
        return getattr(self.cast, "__name__", "str")


# The schema: every key `--optim_args` accepts for --optim metaoptimize / metaoptimize_lion.
OPTIM_ARGS: dict[str, OptimArg] = {
    a.name: a
    for a in (
        OptimArg("base", _choice(BASES), "base rule that takes the steps (default: from --optim)"),
        OptimArg("meta", _choice(METAS), "meta rule that learns the log step sizes", _D["meta"]),
        OptimArg(
            "granularity",
            _choice(GRANULARITIES),
            "how many step sizes: one (scalar), one per transformer layer + embeddings + head (layer), "
            "one per tensor, one per weight (element)",
            _D["granularity"],
        ),
        OptimArg("meta_lr", _as_float, "meta step size eta on the log step sizes", _D["meta_lr"], _R["meta_lr"]),
        OptimArg(
            "meta_asymmetry",
            _as_float,
            "the step size falls this many times faster than it grows (1: the paper's symmetric rule)",
            _D["meta_asymmetry"],
            _R["meta_asymmetry"],
        ),
        OptimArg(
            "init_multiplier",
            _as_float,
            "the learned multiplier of the learning rate at the first step (1: the paper)",
            _D["init_multiplier"],
            _R["init_multiplier"],
        ),
        OptimArg(
            "cooldown",
            _as_float,
            "final fraction of the run over which the step size falls linearly to 0, meta step frozen (0: none)",
            _D["cooldown"],
            _R["cooldown"],
        ),
        OptimArg(
            "total_steps",
            _as_int,
            "the run's length in optimizer steps, where the cooldown ends (default: the Trainer's max_steps)",
            None,
            _R["total_steps"],
        ),
        OptimArg("gamma", _as_float, "trace discount (1 for stationary training)", _D["gamma"], _R["gamma"]),
        OptimArg(
            "meta_beta1",
            _as_float,
            "meta rule's first coefficient (lion: c_bar 0.9; adam: 0.9)",
            None,
            _R["meta_betas"],
        ),
        OptimArg(
            "meta_beta2",
            _as_float,
            "meta rule's second coefficient (lion: rho_bar 0.99; adam: 0.999)",
            None,
            _R["meta_betas"],
        ),
        OptimArg("meta_eps", _as_float, "meta Adam's epsilon (meta=adam only)", None, _R["meta_eps_adam"]),
        OptimArg(
            "log_step_min",
            _as_float,
            "lower clamp of the learned log step multiplier",
            _D["log_step_bounds"][0],
            _R["log_step_min"],
        ),
        OptimArg(
            "log_step_max",
            _as_float,
            "upper clamp of the learned log step multiplier",
            _D["log_step_bounds"][1],
            _R["log_step_max"],
        ),
        OptimArg(
            "skip_nonfinite",
            _as_bool,
            "skip a step whose gradient or meta-gradient is not finite",
            _D["skip_nonfinite"],
        ),
        OptimArg("foreach", _as_bool, "use the multi-tensor (foreach) kernels (default: auto)", None),
        OptimArg(
            "fused",
            _as_bool,
            "the compiled step (one kernel per 16 tensors; compiles once per machine, cached): true / false; "
            "default: auto (compiled for models of 2M+ weights where it compiles)",
            None,
        ),
    )
}


def valid_keys_text() -> str:
    return ", ".join(OPTIM_ARGS)


def describe_optim_args() -> str:
    """One line per key, for error messages and documentation."""
    lines = []
    for a in OPTIM_ARGS.values():
        extra = f", {a.rule}" if a.rule else ""
        default = "" if a.default is None else f", default {a.default}"
        lines.append(f"  {a.name} ({a.kind}{extra}{default}): {a.help}")
    return "\n".join(lines)


def _fail(optim: str, message: str) -> OptimArgsError:
    return OptimArgsError(
        f"--optim {optim}: {message}\nValid --optim_args keys (comma-separated key=value):\n{describe_optim_args()}"
    )


def parse_optim_args(text: str | None, optim: str = "metaoptimize") -> dict[str, Any]:
    """Parse `"k=v,k2=v2"` (as the Trainer receives `--optim_args`) into typed, validated values.

    Only keys that were given are returned. Raises `OptimArgsError` naming the bad key/value and listing the
    valid keys.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):  # a dict from a config file
        items = [(str(k), str(v)) for k, v in text.items()]
    else:
        items = []
        for chunk in str(text).replace(" ", "").split(","):
            if not chunk:
                continue
            if chunk.count("=") != 1:
                raise _fail(optim, f"--optim_args entry {chunk!r} is not of the form key=value")
            key, value = chunk.split("=")
            items.append((key, value))
    out: dict[str, Any] = {}
    for key, value in items:
        key = key.strip().lower()
        if key not in OPTIM_ARGS:
            close = difflib.get_close_matches(key, OPTIM_ARGS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(optim, f"unknown --optim_args key {key!r}{hint}")
        if key in out:
            raise _fail(optim, f"--optim_args key {key!r} given twice")
        out[key] = parse_value(key, value, optim)
    return out


def parse_value(key: str, value: Any, optim: str = "metaoptimize", flag: str | None = None) -> Any:
    """Cast and check one setting. `flag` names where it came from in messages (default `--optim_args KEY=`)."""
    arg = OPTIM_ARGS[key]
    said = f"--optim_args {key}={value!r}" if flag is None else f"{flag} {value!r}"
    try:
        if arg.cast is _as_bool and isinstance(value, bool):
            cast_value: Any = value
        elif arg.cast is _as_float and isinstance(value, (int, float)) and not isinstance(value, bool):
            cast_value = _as_float(str(float(value)))  # a typed field's number: the same finiteness check
        elif arg.cast is _as_int and isinstance(value, int) and not isinstance(value, bool):
            cast_value = value
        else:
            cast_value = arg.cast(str(value))
    except ValueError as err:
        raise _fail(optim, f"{said} is not valid: {err} ({arg.help})") from None
    if arg.check is not None and not arg.check(cast_value):
        raise _fail(optim, f"{said} is out of range: must be {arg.rule} ({arg.help})")
    return cast_value


def is_metaoptimize(optim: Any) -> bool:
    """Whether an `args.optim` value (str or enum member) names one of our optimizers."""
    value = getattr(optim, "value", optim)
    return isinstance(value, str) and value in OPTIM_NAMES


def optim_name(optim: Any) -> str:
    value = getattr(optim, "value", optim)
    return value if isinstance(value, str) and value in OPTIM_NAMES else "metaoptimize"


# Typed fields of MetaOptimizeTrainingArguments: field name -> optim_args key.
TYPED_FIELDS: dict[str, str] = {f"metaoptimize_{k}": k for k in OPTIM_ARGS if k != "foreach"}


def resolve_spec(args: Any) -> dict[str, Any]:
    """The complete, validated MetaOptimize setting of a TrainingArguments-like object.

    Returns a dict with every key of OPTIM_ARGS filled in (`meta_beta1/2`, `meta_eps`, `foreach` may stay None,
    meaning "the optimizer's default").
    """
    optim = optim_name(getattr(args, "optim", "metaoptimize"))
    spec: dict[str, Any] = {k: a.default for k, a in OPTIM_ARGS.items()}
    spec["base"] = OPTIM_NAMES[optim]
    spec.update(OPTIM_PRESETS.get(optim, {}))
    from_fields: dict[str, Any] = {}
    for field_name, key in TYPED_FIELDS.items():
        if not hasattr(args, field_name):
            continue
        value = getattr(args, field_name)
        if value is None:
            continue
        value = parse_value(key, value, optim, flag=f"--{field_name}")  # same checks as --optim_args
        if value != OPTIM_ARGS[key].default:  # a typed flag at its default leaves the preset's value
            from_fields[key] = value
            spec[key] = value
    given = parse_optim_args(getattr(args, "optim_args", None), optim)
    for key in given.keys() & from_fields.keys():
        if given[key] != from_fields[key]:
            raise _fail(
                optim,
                f"{key} is set twice: --metaoptimize_{key} {from_fields[key]} and --optim_args {key}={given[key]}; "
                "keep one",
            )
    spec.update(given)
    if spec["meta_eps"] is not None and spec["meta"] != "adam":
        raise _fail(optim, f"meta_eps only applies to meta=adam (got meta={spec['meta']})")
    return spec


def base_betas(base: str, beta1: float, beta2: float) -> tuple[float, ...]:
    """Map `--adam_beta1/--adam_beta2` onto the base rule's coefficients.

    adamw: (beta1, beta2) = (rho, lambda); lion: (beta1, beta2) = (c, rho); sgd: (beta1,) = momentum rho;
    rmsprop: (beta2,) = lambda. Callers substitute the base's own default for a coefficient the user did not
    name (registry.apply_defaults does that once, when the arguments are built).
    """
    if base in _spec.TRAINER_BETAS:
        flags = {"adam_beta1": beta1, "adam_beta2": beta2}
        return tuple(float(flags[name]) for name in _spec.TRAINER_BETAS[base])
    raise ValueError(f"unknown base {base!r}")


def optimizer_kwargs(args: Any, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for `MetaOptimize(params, **kwargs)` from TrainingArguments (+ the resolved spec)."""
    spec = resolve_spec(args) if spec is None else spec
    base = spec["base"]
    kwargs: dict[str, Any] = {
        "lr": float(args.learning_rate),
        "base": base,
        "meta": spec["meta"],
        "granularity": "block" if spec["granularity"] == "layer" else spec["granularity"],
        "meta_lr": spec["meta_lr"],
        "meta_asymmetry": spec["meta_asymmetry"],
        "init_multiplier": spec["init_multiplier"],
        "cooldown": spec["cooldown"],
        "gamma": spec["gamma"],
        "betas": base_betas(base, args.adam_beta1, args.adam_beta2),
        "weight_decay": float(args.weight_decay),
        "log_step_bounds": (spec["log_step_min"], spec["log_step_max"]),
        "skip_nonfinite": spec["skip_nonfinite"],
    }
    if base in BASES_WITH_EPS:
        kwargs["eps"] = float(args.adam_epsilon)
    if spec["meta_beta1"] is not None or spec["meta_beta2"] is not None:
        d1, d2 = META_BETAS[spec["meta"]]
        kwargs["meta_betas"] = (
            d1 if spec["meta_beta1"] is None else spec["meta_beta1"],
            d2 if spec["meta_beta2"] is None else spec["meta_beta2"],
        )
    if spec["meta_eps"] is not None:
        kwargs["meta_eps"] = spec["meta_eps"]
    if spec["total_steps"] is not None:
        kwargs["total_steps"] = spec["total_steps"]  # else the Trainer sets the run's length at create_scheduler
    if spec["foreach"] is not None:
        kwargs["foreach"] = spec["foreach"]
    if spec["fused"] is not None:
        kwargs["fused"] = spec["fused"]
    return kwargs


def check_optimizer_kwargs(args: Any, spec: Mapping[str, Any] | None = None) -> None:
    """Validate the complete setting with the optimizer's own rules (:func:`hf_metaoptimize.spec.normalize_group`)
    while the arguments are parsed: a value `MetaOptimize(...)` would refuse is refused here, with the same message."""
    spec = resolve_spec(args) if spec is None else spec
    group = optimizer_kwargs(args, spec)
    try:
        _spec.normalize_group(group, where=f"--optim {optim_name(getattr(args, 'optim', None))}")
    except ValueError as err:
        raise OptimArgsError(str(err)) from None

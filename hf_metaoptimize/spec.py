"""The MetaOptimize specification: rules, defaults, their meanings, and the validation of a param group.

No torch here (a tensor ``lr`` is handled by duck typing): the optimizer, the `--optim_args` schema, the
`TrainingArguments` choices, the docs and the tests import these names, so a default or a rule exists once.
The float64 reference (:mod:`hf_metaoptimize.reference`) keeps its own copy of the rule names on purpose (it is
written from the paper, apart from everything else); a test asserts that the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BASES",
    "METAS",
    "GRANULARITIES",
    "DEFAULTS",
    "DEFAULT_BETAS",
    "BETAS_MEANING",
    "BASES_WITH_EPS",
    "BASE_MOMENTS",
    "TRAINER_BETAS",
    "DEFAULT_META_BETAS",
    "DEFAULT_EPS",
    "PAPER_EXACT",
    "IDENTITY_KEYS",
    "ARGUMENT_KEYS",
    "SCHEDULE_KEYS",
    "BLOCK_KEYS",
    "Range",
    "RANGES",
    "normalize_group",
    "check_lr",
    "meta_rates",
    "cooldown_steps",
]

#: Base rules (paper Table: the first-order optimizer whose step sizes are learned).
BASES = ("adamw", "lion", "sgd", "rmsprop")
#: Meta rules on the log step sizes.
METAS = ("lion", "adam")
#: How many step sizes: one, one per block of param groups, one per tensor, one per weight.
GRANULARITIES = ("scalar", "block", "tensor", "element")

#: Default coefficients of each base rule and what they mean.
DEFAULT_BETAS: dict[str, tuple[float, ...]] = {
    "adamw": (0.9, 0.999),
    "lion": (0.9, 0.99),
    "sgd": (0.9,),
    "rmsprop": (0.99,),
}
BETAS_MEANING: dict[str, str] = {
    "adamw": "(beta1, beta2) = (momentum, second-moment) coefficients",
    "lion": "(beta1, beta2) = (interpolation c, momentum rho) as in the Lion paper",
    "sgd": "(momentum,) = EMA momentum coefficient rho",
    "rmsprop": "(alpha,) = second-moment coefficient lambda",
}
#: Which ``TrainingArguments`` flag feeds each of a base's coefficients (``--adam_beta1`` / ``--adam_beta2``).
TRAINER_BETAS: dict[str, tuple[str, ...]] = {
    "adamw": ("adam_beta1", "adam_beta2"),
    "lion": ("adam_beta1", "adam_beta2"),
    "sgd": ("adam_beta1",),
    "rmsprop": ("adam_beta2",),
}
#: Bases whose update has an ``eps`` in the denominator.
BASES_WITH_EPS = ("adamw", "rmsprop")
#: The per-weight moments (state keys, shaped like the param) each base rule keeps.
BASE_MOMENTS: dict[str, tuple[str, ...]] = {
    "adamw": ("exp_avg", "exp_avg_sq"),
    "lion": ("exp_avg",),
    "sgd": ("exp_avg",),
    "rmsprop": ("exp_avg_sq",),
}
#: Default (c_bar, rho_bar) of the lion meta rule and (beta1, beta2) of the adam meta rule.
DEFAULT_META_BETAS: dict[str, tuple[float, float]] = {"lion": (0.9, 0.99), "adam": (0.9, 0.999)}
DEFAULT_EPS = 1e-8

#: The constructor's defaults (``betas=None`` / ``eps=None`` / ``meta_betas=None``: the rule's own defaults).
DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "base": "adamw",
    "meta": "lion",
    "granularity": "scalar",
    "meta_lr": 2e-2,
    "meta_asymmetry": 1.5,
    "init_multiplier": 0.1,
    "total_steps": None,
    "cooldown": 0.2,
    "gamma": 1.0,
    "betas": None,
    "eps": None,
    "weight_decay": 0.0,
    "meta_betas": None,
    "meta_eps": 1e-8,
    "log_step_bounds": (-14.0, 14.0),
    "skip_nonfinite": True,
    "foreach": None,
    "fused": None,
}

#: Paper-exact Algorithm 3 (Sharifnassab et al., 2025): one fixed meta step size, the learned multiplier starting
#: at 1, no cooldown. ``MetaOptimize(params, lr, **PAPER_EXACT)``; ``--optim metaoptimize_paper`` in the Trainer.
PAPER_EXACT: dict[str, Any] = {"meta_lr": 1e-3, "meta_asymmetry": 1.0, "init_multiplier": 1.0, "cooldown": 0.0}

# What a checkpoint may and may not change (load_state_dict; docs/design.md "Resume").
#: Define the algorithm and the layout of the state: a checkpoint whose values differ is refused.
IDENTITY_KEYS = ("base", "meta", "granularity", "block")
#: Hyper-parameters that may legitimately change on resume: the values passed to the new optimizer win.
ARGUMENT_KEYS = (
    "meta_lr",
    "meta_asymmetry",
    "init_multiplier",
    "total_steps",
    "cooldown",
    "gamma",
    "betas",
    "eps",
    "weight_decay",
    "meta_betas",
    "meta_eps",
    "log_step_bounds",
    "skip_nonfinite",
    "foreach",
    "fused",
)
#: Driven by an LR scheduler: the checkpoint's values win where a scheduler drove them (``initial_lr`` present),
#: as for every torch optimizer; without a scheduler ``lr`` is an argument like the others.
SCHEDULE_KEYS = ("lr", "initial_lr")
#: Hyper-parameters that groups sharing a block must agree on (they define the block's meta update).
BLOCK_KEYS = (
    "meta_lr",
    "meta_asymmetry",
    "init_multiplier",
    "total_steps",
    "cooldown",
    "meta_betas",
    "meta_eps",
    "log_step_bounds",
)
#: Every group must use the same value (one algorithm per optimizer).
GLOBAL_KEYS = ("base", "meta", "granularity")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The values a numeric hyper-parameter may take: finite numbers between ``lo`` and ``hi`` (each end closed
    unless marked open; an infinite end is no bound)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: Any) -> bool:
        if not _is_number(v) or not math.isfinite(v):  # bool, str, None, NaN, inf: never
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    @property
    def text(self) -> str:
        """The range as a person writes it: ``>= 0``, ``> 0``, ``<= 0``, ``in [0, 1)``."""
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if self.lo == -math.inf:
            return f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"


#: The allowed range of every numeric hyper-parameter: the one source of the rules that
#: :func:`normalize_group` enforces and that the ``--optim_args`` schema
#: (:mod:`hf_metaoptimize.integrations.optim_args`) states and checks while the arguments are parsed.
RANGES: dict[str, Range] = {
    "lr": Range(0.0),
    "meta_lr": Range(0.0),
    "meta_asymmetry": Range(0.0, lo_open=True),
    "init_multiplier": Range(0.0, lo_open=True),  # and log(init_multiplier) inside log_step_bounds
    "total_steps": Range(1.0),  # a whole number
    "cooldown": Range(0.0, 1.0),
    "gamma": Range(0.0, 1.0),
    "weight_decay": Range(0.0),
    "betas": Range(0.0, 1.0, hi_open=True),  # every coefficient
    "eps": Range(0.0),
    "meta_betas": Range(0.0, 1.0, hi_open=True),  # every coefficient
    "meta_eps": Range(0.0),
    "meta_eps_adam": Range(0.0, lo_open=True),  # meta='adam' divides by sqrt(v) + meta_eps, and v is 0 at first
    "log_step_min": Range(hi=0.0),  # log_step_bounds[0]
    "log_step_max": Range(lo=0.0),  # log_step_bounds[1]
}


def check_lr(lr: Any, where: str) -> None:
    """``lr`` is a finite number >= 0, or a one-element tensor holding one (read once, at validation time)."""
    rule = f"the initial step size must be a finite number {RANGES['lr'].text}"
    if hasattr(lr, "numel") and hasattr(lr, "item"):  # a tensor, without importing torch
        if lr.numel() != 1:
            raise ValueError(f"{where}: a Tensor lr must have one element, got shape {tuple(lr.shape)}")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"{where}: a Tensor lr must be a real floating-point tensor, got dtype {lr.dtype}")
        value = float(lr.detach().reshape(()).item())
        if not RANGES["lr"].contains(value):
            raise ValueError(f"{where}: invalid lr=tensor({value!r}); {rule}")
        return
    if not RANGES["lr"].contains(lr):
        raise ValueError(f"{where}: invalid lr={lr!r}; {rule}")


def normalize_group(group: dict[str, Any], where: str) -> None:
    """Fill per-rule defaults and validate a group's hyper-parameters in place (ValueError names value and fix).

    Runs on the constructor's defaults, on every added group, and again on any group that was edited or
    loaded from a checkpoint before the next step uses it. Idempotent: a normalized group is left equal.
    Lists are accepted where torch accepts them (``betas``, ``meta_betas``, ``log_step_bounds``) and stored as
    tuples.
    """
    for key, default in DEFAULTS.items():
        group.setdefault(key, default)

    def choice(key: str, options: tuple[str, ...]) -> None:
        val = group[key]
        if not isinstance(val, str) or val not in options:
            raise ValueError(f"{where}: invalid {key}={val!r}; choose one of {', '.join(map(repr, options))}")

    choice("base", BASES)
    choice("meta", METAS)
    choice("granularity", GRANULARITIES)
    base, meta = group["base"], group["meta"]
    check_lr(group["lr"], where)

    def number(key: str, why: str = "") -> None:
        val = group[key]
        if not RANGES[key].contains(val):
            raise ValueError(f"{where}: invalid {key}={val!r}; expected a finite number {RANGES[key].text}{why}")

    number("meta_lr")
    number(
        "meta_asymmetry",
        " (how many times faster the log step size falls than it grows: 1 is the paper's symmetric rule, the "
        f"default is {DEFAULTS['meta_asymmetry']})",
    )
    group["meta_asymmetry"] = float(group["meta_asymmetry"])
    number(
        "init_multiplier",
        " (the learned multiplier of lr at the first step; 1 is the paper's start, the default is "
        f"{DEFAULTS['init_multiplier']})",
    )
    init = group["init_multiplier"]
    total = group["total_steps"]
    if total is not None and (not isinstance(total, int) or not RANGES["total_steps"].contains(total)):
        raise ValueError(
            f"{where}: invalid total_steps={total!r}; expected a whole number {RANGES['total_steps'].text} (the "
            "run's length in optimizer steps, which the cooldown ends at), or None for no cooldown"
        )
    number("cooldown", " (the final fraction of total_steps over which the step size falls to 0; 0 for none)")
    number("gamma", " (the trace's discount; 1 for stationary training)")
    number("weight_decay")

    def coeffs(key: str, value: Any, n: int, meaning: str) -> tuple[float, ...]:
        if _is_number(value) and n == 1:
            value = (value,)
        if not isinstance(value, (tuple, list)) or len(value) != n:
            raise ValueError(f"{where}: invalid {key}={value!r}; expected {n} coefficient(s): {meaning}")
        for b in value:
            if not RANGES[key].contains(b):
                raise ValueError(f"{where}: invalid {key}={value!r}; every coefficient must be {RANGES[key].text}")
        return tuple(float(b) for b in value)

    betas = group["betas"]
    group["betas"] = coeffs(
        "betas",
        DEFAULT_BETAS[base] if betas is None else betas,
        len(DEFAULT_BETAS[base]),
        f"base={base!r} takes {BETAS_MEANING[base]}",
    )
    mb = group["meta_betas"]
    group["meta_betas"] = coeffs(
        "meta_betas",
        DEFAULT_META_BETAS[meta] if mb is None else mb,
        2,
        "(c_bar, rho_bar) for meta='lion', (beta1, beta2) for meta='adam'",
    )

    eps = group["eps"]
    if base in BASES_WITH_EPS:
        group["eps"] = DEFAULT_EPS if eps is None else eps
        number("eps")
        group["eps"] = float(group["eps"])
    elif eps is not None:
        raise ValueError(
            f"{where}: eps={eps!r} is not used by base={base!r}; leave it unset (eps applies to "
            f"{', '.join(BASES_WITH_EPS)})"
        )
    number("meta_eps")
    me = group["meta_eps"]
    if meta == "adam" and not RANGES["meta_eps_adam"].contains(me):
        raise ValueError(
            f"{where}: invalid meta_eps={me!r} for meta='adam'; it must be {RANGES['meta_eps_adam'].text} (the first "
            f"meta-gradient is 0, and 0 / (sqrt(0) + 0) is NaN); leave it at the default {DEFAULTS['meta_eps']}"
        )
    group["meta_eps"] = float(me)

    bounds = group["log_step_bounds"]
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or not RANGES["log_step_min"].contains(bounds[0])
        or not RANGES["log_step_max"].contains(bounds[1])
    ):
        raise ValueError(
            f"{where}: invalid log_step_bounds={bounds!r}; expected (lo, hi) with finite lo "
            f"{RANGES['log_step_min'].text} and hi {RANGES['log_step_max'].text} "
            f"(bounds on the learned log step-size multiplier; the default is {DEFAULTS['log_step_bounds']})"
        )
    group["log_step_bounds"] = (float(bounds[0]), float(bounds[1]))
    if not bounds[0] <= math.log(init) <= bounds[1]:
        raise ValueError(
            f"{where}: init_multiplier={init!r} lies outside log_step_bounds={tuple(bounds)!r} "
            f"(log {math.log(init):.3g}); widen the bounds or pick a multiplier inside them"
        )
    group["init_multiplier"] = float(init)
    group["cooldown"] = float(group["cooldown"])
    if not isinstance(group["skip_nonfinite"], bool):
        raise ValueError(f"{where}: invalid skip_nonfinite={group['skip_nonfinite']!r}; expected True or False")
    for key in ("foreach", "fused"):
        if group[key] not in (None, True, False):
            raise ValueError(f"{where}: invalid {key}={group[key]!r}; expected None, True or False")
    if group["fused"] and group["foreach"] is False:
        raise ValueError(
            f"{where}: fused=True and foreach=False ask for two different implementations; pass one of them"
        )


def meta_rates(group: dict[str, Any]) -> tuple[float, float]:
    """(eta_up, eta_down) = (meta_lr, meta_asymmetry * meta_lr): the meta step when the log step size grows, and
    when it falls (equal in the paper)."""
    up = float(group["meta_lr"])
    return up, up * float(group["meta_asymmetry"])


def cooldown_steps(group: dict[str, Any]) -> int:
    """n_c = floor(cooldown * total_steps): the number of final steps over which the step size falls linearly to 0
    (with the meta step frozen); 0 when ``total_steps`` is None or ``cooldown`` is 0."""
    total = group["total_steps"]
    if total is None or not group["cooldown"]:
        return 0
    return int(math.floor(group["cooldown"] * total + 1e-9))

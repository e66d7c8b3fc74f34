"""The MetaOptimize specification: rules, defaults, their meanings, and the validation of a param group.

No torch here (a tensor ``lr`` is handled by duck typing): the optimizer, the `--optim_args` schema, the
`TrainingArguments` choices, the docs and the tests import these names, so a default or a rule exists once.
The float64 reference (:mod:`hf_metaoptimize.reference`) keeps its own copy of the rule names on purpose (it is
written from the paper, apart from everything else); a test asserts that the two agree.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "BASES",
    "METAS",
    "GRANULARITIES",
    "DEFAULTS",
    "DEFAULT_BETAS",
    "BETAS_MEANING",
    "BASES_WITH_EPS",
    "DEFAULT_META_BETAS",
    "DEFAULT_EPS",
    "IDENTITY_KEYS",
    "ARGUMENT_KEYS",
    "SCHEDULE_KEYS",
    "BLOCK_KEYS",
    "normalize_group",
    "check_lr",
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
#: Bases whose update has an ``eps`` in the denominator.
BASES_WITH_EPS = ("adamw", "rmsprop")
#: Default (c_bar, rho_bar) of the lion meta rule and (beta1, beta2) of the adam meta rule.
DEFAULT_META_BETAS: dict[str, tuple[float, float]] = {"lion": (0.9, 0.99), "adam": (0.9, 0.999)}
DEFAULT_EPS = 1e-8

#: The constructor's defaults (``betas=None`` / ``eps=None`` / ``meta_betas=None``: the rule's own defaults).
DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "base": "adamw",
    "meta": "lion",
    "granularity": "scalar",
    "meta_lr": 1e-3,
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

# What a checkpoint may and may not change (load_state_dict; docs/design.md "Resume").
#: Define the algorithm and the layout of the state: a checkpoint whose values differ is refused.
IDENTITY_KEYS = ("base", "meta", "granularity", "block")
#: Hyper-parameters that may legitimately change on resume: the values passed to the new optimizer win.
ARGUMENT_KEYS = (
    "meta_lr",
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
BLOCK_KEYS = ("meta_lr", "meta_betas", "meta_eps", "log_step_bounds")
#: Every group must use the same value (one algorithm per optimizer).
GLOBAL_KEYS = ("base", "meta", "granularity")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_lr(lr: Any, where: str) -> None:
    """``lr`` is a finite number >= 0, or a one-element tensor holding one (read once, at validation time)."""
    if hasattr(lr, "numel") and hasattr(lr, "item"):  # a tensor, without importing torch
        if lr.numel() != 1:
            raise ValueError(f"{where}: a Tensor lr must have one element, got shape {tuple(lr.shape)}")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"{where}: a Tensor lr must be a real floating-point tensor, got dtype {lr.dtype}")
        value = float(lr.detach().reshape(()).item())
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{where}: invalid lr=tensor({value!r}); the initial step size must be a finite number >= 0"
            )
        return
    if not _is_number(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: invalid lr={lr!r}; the initial step size must be a finite number >= 0")


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

    def nonneg(key: str, upper: float | None = None) -> None:
        val = group[key]
        if not _is_number(val) or not math.isfinite(val) or val < 0:
            raise ValueError(f"{where}: invalid {key}={val!r}; expected a finite number >= 0")
        if upper is not None and val > upper:
            raise ValueError(f"{where}: invalid {key}={val!r}; expected a value in [0, {upper}]")

    nonneg("meta_lr")
    nonneg("gamma", 1.0)
    nonneg("weight_decay")

    def coeffs(key: str, value: Any, n: int, meaning: str) -> tuple[float, ...]:
        if _is_number(value) and n == 1:
            value = (value,)
        if not isinstance(value, (tuple, list)) or len(value) != n:
            raise ValueError(f"{where}: invalid {key}={value!r}; expected {n} coefficient(s): {meaning}")
        for b in value:
            if not _is_number(b) or not (0.0 <= b < 1.0):
                raise ValueError(f"{where}: invalid {key}={value!r}; every coefficient must be in [0, 1)")
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
        eps = DEFAULT_EPS if eps is None else eps
        if not _is_number(eps) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{where}: invalid eps={eps!r}; expected a finite number >= 0")
        group["eps"] = float(eps)
    elif eps is not None:
        raise ValueError(
            f"{where}: eps={eps!r} is not used by base={base!r}; leave it unset (eps applies to adamw, rmsprop)"
        )
    me = group["meta_eps"]
    if not _is_number(me) or not math.isfinite(me) or me < 0:
        raise ValueError(f"{where}: invalid meta_eps={me!r}; expected a finite number >= 0")
    if meta == "adam" and me == 0:
        raise ValueError(
            f"{where}: invalid meta_eps={me!r} for meta='adam'; it must be > 0 (the first meta-gradient is 0, "
            "and 0 / (sqrt(0) + 0) is NaN); leave it at the default 1e-8"
        )
    group["meta_eps"] = float(me)

    bounds = group["log_step_bounds"]
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or not all(_is_number(b) and math.isfinite(b) for b in bounds)
        or not bounds[0] <= 0.0 <= bounds[1]
    ):
        raise ValueError(
            f"{where}: invalid log_step_bounds={bounds!r}; expected (lo, hi) with finite lo <= 0 <= hi "
            f"(bounds on the learned log step-size multiplier; the default is {DEFAULTS['log_step_bounds']})"
        )
    group["log_step_bounds"] = (float(bounds[0]), float(bounds[1]))
    if not isinstance(group["skip_nonfinite"], bool):
        raise ValueError(f"{where}: invalid skip_nonfinite={group['skip_nonfinite']!r}; expected True or False")
    for key in ("foreach", "fused"):
        if group[key] not in (None, True, False):
            raise ValueError(f"{where}: invalid {key}={group[key]!r}; expected None, True or False")
    if group["fused"] and group["foreach"] is False:
        raise ValueError(
            f"{where}: fused=True and foreach=False ask for two different implementations; pass one of them"
        )

"""A table of MetaOptimize configurations, and a helper that steps the fast class and the reference together.

In the spirit of torch's ``OptimizerInfo``: each :class:`OptimCase` is one constructor configuration plus
the param-group layout and gradient pattern it runs on. :data:`CASES` covers every base x meta x
granularity (4 x 2 x 4 = 32) twice: at the shipped rule with a cooldown that starts, freezes the meta step
and runs past its end within the run (``total_steps=50, cooldown=0.3`` on 60 steps), and at the paper-exact
setting (``PAPER_EXACT``: symmetric meta step, multiplier starting at 1, no cooldown); then the variants
(weight decay, gamma < 1, several groups with and without
``"block"`` keys, per-group lr / weight decay / betas, params whose grad is None on some steps, params that
join late, non-finite gradients, tight log_step bounds, meta_lr = 0, gamma = 0, Adam meta settings).

:func:`run_pair` builds two identical sets of small, transformer-like params, steps
``hf_metaoptimize.optimizer.MetaOptimize`` and ``hf_metaoptimize.reference.MetaOptimizeReference`` on the
same random gradients, and returns both optimizers and both param sets. The fast class is imported
inside :func:`run_pair`, so that collecting the tests works before it exists.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
from typing import Any, NamedTuple

import torch

from hf_metaoptimize.spec import BASES, GRANULARITIES, METAS, PAPER_EXACT  # the one list of rules

# name -> shape: a tiny transformer block, plus one 3-d tensor.
PARAM_SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (11, 8),
    "attn.qkv.weight": (24, 8),
    "attn.qkv.bias": (24,),
    "attn.out.weight": (8, 8),
    "norm.weight": (8,),
    "mlp.up.weight": (16, 8),
    "mlp.down.weight": (8, 16),
    "conv.weight": (2, 3, 2),
}

# Five groups; two share the "layer0" block, the last two have no "block" key (each its own block).
LAYERED_GROUPS: tuple[dict[str, Any], ...] = (
    {"params": ("embed.weight",), "block": "embed"},
    {"params": ("attn.qkv.weight", "attn.qkv.bias", "attn.out.weight"), "block": "layer0"},
    {"params": ("mlp.up.weight", "mlp.down.weight"), "block": "layer0"},
    {"params": ("norm.weight",)},
    {"params": ("conv.weight",)},
)
# Per-group hyper-parameters on top of the same layout (the first two groups share a block, so they
# agree on the meta settings and differ only in base settings).
PER_GROUP_GROUPS: tuple[dict[str, Any], ...] = (
    {"params": ("embed.weight",), "block": "embed", "lr": 3e-3, "weight_decay": 0.0},
    {"params": ("attn.qkv.weight", "attn.qkv.bias", "attn.out.weight"), "block": "layer0", "lr": 2e-2},
    {"params": ("mlp.up.weight", "mlp.down.weight"), "block": "layer0", "weight_decay": 0.3, "betas": (0.9, 0.95)},
    {"params": ("norm.weight", "conv.weight"), "lr": 5e-3, "meta_lr": 2e-2, "gamma": 0.9},
)
SINGLE_GROUP = None  # one plain list of all params

DEFAULT_LR = {"adamw": 1e-2, "lion": 3e-3, "sgd": 5e-2, "rmsprop": 1e-2}
LATE_STEPS = 7  # params in OptimCase.late get no grad for their first LATE_STEPS steps


@dataclasses.dataclass(frozen=True)
class OptimCase:
    """One configuration: constructor kwargs, the group layout and the gradient pattern."""

    name: str
    kwargs: dict[str, Any]
    groups: tuple[dict[str, Any], ...] | None = LAYERED_GROUPS
    late: tuple[str, ...] = ()  # grad None for the first LATE_STEPS steps (lazy state joins later)
    sometimes_none: tuple[str, ...] = ()  # grad None on every third step (state but no grad)
    nonfinite_at: tuple[int, ...] = ()  # steps at which one grad entry is inf (even) or nan (odd)

    def __repr__(self) -> str:  # used in pytest ids and failure messages
        return f"OptimCase({self.name})"


# the paper-exact rule at the test table's meta step size
PAPER = {**PAPER_EXACT, "meta_lr": 1e-2}
# a cooldown over the last 15 of 50 steps, then 10 steps past the end (step size 0) in a 60-step run
COOLDOWN = {"total_steps": 50, "cooldown": 0.3}


def _core_cases() -> list[OptimCase]:
    cases = []
    for base, meta, granularity in itertools.product(BASES, METAS, GRANULARITIES):
        kwargs = dict(lr=DEFAULT_LR[base], base=base, meta=meta, granularity=granularity, meta_lr=1e-2, **COOLDOWN)
        cases.append(OptimCase(f"{base}-{meta}-{granularity}", kwargs))
    return cases


def _paper_cases() -> list[OptimCase]:
    cases = []
    for base, meta, granularity in itertools.product(BASES, METAS, GRANULARITIES):
        kwargs = dict(lr=DEFAULT_LR[base], base=base, meta=meta, granularity=granularity, **PAPER)
        cases.append(OptimCase(f"paper-{base}-{meta}-{granularity}", kwargs))
    return cases


def _variant_cases() -> list[OptimCase]:
    cases = []
    for base in BASES:
        for granularity in ("scalar", "block", "element"):
            kwargs = dict(
                lr=DEFAULT_LR[base], base=base, granularity=granularity, meta_lr=1e-2, weight_decay=0.1, gamma=0.99
            )
            cases.append(OptimCase(f"{base}-wd-gamma099-{granularity}", kwargs))
    for granularity in GRANULARITIES:
        cases.append(
            OptimCase(
                f"adamw-single-group-{granularity}",
                dict(lr=1e-2, granularity=granularity, meta_lr=1e-2, weight_decay=0.1),
                groups=SINGLE_GROUP,
            )
        )
        cases.append(
            OptimCase(
                f"adamw-per-group-{granularity}",
                dict(lr=1e-2, granularity=granularity, meta_lr=1e-2, weight_decay=0.1, betas=(0.85, 0.99)),
                groups=PER_GROUP_GROUPS
                if granularity != "scalar"
                else tuple({k: v for k, v in g.items() if k not in ("meta_lr",)} for g in PER_GROUP_GROUPS),
            )
        )
        for base, meta in (("adamw", "lion"), ("lion", "adam"), ("sgd", "lion")):
            cases.append(
                OptimCase(
                    f"{base}-{meta}-grad-none-{granularity}",
                    dict(
                        lr=DEFAULT_LR[base],
                        base=base,
                        meta=meta,
                        granularity=granularity,
                        meta_lr=1e-2,
                        weight_decay=0.05,
                    ),
                    late=("attn.qkv.bias", "norm.weight"),
                    sometimes_none=("mlp.down.weight", "conv.weight"),
                )
            )
        # step 7 is also the first step of the late param: its lazy state is created on a skipped step
        cases.append(
            OptimCase(
                f"rmsprop-nonfinite-{granularity}",
                dict(lr=1e-2, base="rmsprop", granularity=granularity, meta_lr=1e-2),
                late=("embed.weight",),
                nonfinite_at=(3, 7, 12, 13, 40),
            )
        )
        cases.append(
            OptimCase(
                f"adamw-adam-meta-settings-{granularity}",
                dict(
                    lr=1e-2,
                    meta="adam",
                    granularity=granularity,
                    meta_lr=3e-2,
                    meta_betas=(0.8, 0.95),
                    meta_eps=1e-6,
                    eps=1e-6,
                    weight_decay=0.1,
                ),
            )
        )
        cases.append(
            OptimCase(
                f"lion-tight-bounds-{granularity}",
                dict(
                    lr=3e-3,
                    base="lion",
                    granularity=granularity,
                    meta_lr=2e-2,
                    log_step_bounds=(-0.05, 0.06),
                    init_multiplier=1.0,
                ),
            )
        )
    cases += [
        OptimCase("adamw-meta-lr-zero", dict(lr=1e-2, granularity="element", meta_lr=0.0, weight_decay=0.1)),
        OptimCase("adamw-gamma-zero", dict(lr=1e-2, granularity="tensor", meta_lr=1e-2, gamma=0.0)),
        OptimCase(
            "lion-lion-gamma-zero",
            dict(
                lr=3e-3,
                base="lion",
                granularity="scalar",
                meta_lr=1e-2,
                gamma=0.0,
                weight_decay=0.1,
                betas=(0.95, 0.98),
                meta_betas=(0.8, 0.9),
            ),
        ),
        OptimCase(
            "sgd-bare-float-betas",
            dict(lr=5e-2, base="sgd", granularity="block", meta_lr=1e-2, betas=0.8, weight_decay=0.01),
        ),
        OptimCase(
            "rmsprop-bare-float-betas",
            dict(lr=1e-2, base="rmsprop", granularity="tensor", meta_lr=1e-2, betas=0.9, eps=1e-6, weight_decay=0.01),
        ),
        OptimCase("adamw-skip-nonfinite-off", dict(lr=1e-2, granularity="scalar", meta_lr=1e-2, skip_nonfinite=False)),
    ]
    return cases


CORE_CASES: list[OptimCase] = _core_cases()
PAPER_CASES: list[OptimCase] = _paper_cases()
CASES: list[OptimCase] = CORE_CASES + PAPER_CASES + _variant_cases()


class RunPair(NamedTuple):
    fast: torch.optim.Optimizer
    ref: torch.optim.Optimizer
    fast_params: dict[str, torch.nn.Parameter]
    ref_params: dict[str, torch.nn.Parameter]


def fast_class() -> type[torch.optim.Optimizer]:
    return importlib.import_module("hf_metaoptimize.optimizer").MetaOptimize


def reference_class() -> type[torch.optim.Optimizer]:
    return importlib.import_module("hf_metaoptimize.reference").MetaOptimizeReference


def make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.nn.Parameter((0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype))
        for name, shape in PARAM_SHAPES.items()
    }


def make_param_groups(case: OptimCase, params: dict[str, torch.nn.Parameter]) -> list[Any]:
    if case.groups is None:
        return list(params.values())
    return [{**group, "params": [params[name] for name in group["params"]]} for group in case.groups]


def gradients(case: OptimCase, steps: int, seed: int = 0) -> list[dict[str, torch.Tensor | None]]:
    """Float64 gradients, per step, per param name (None = no grad that step).

    Each is a fixed per-param mean (so z has a consistent sign and the step sizes travel) whose sign flips
    half way (so they travel back), plus N(0, 1) noise.
    """
    gen = torch.Generator().manual_seed(1000 + seed)
    means = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in PARAM_SHAPES.items()}
    out = []
    for t in range(steps):
        sign = 1.0 if t < steps // 2 else -1.0
        grads: dict[str, torch.Tensor | None] = {}
        for name, shape in PARAM_SHAPES.items():
            g = sign * 0.5 * means[name] + torch.randn(shape, generator=gen, dtype=torch.float64)
            if name in case.late and t < LATE_STEPS:
                g = None
            elif name in case.sometimes_none and t % 3 == 2:
                g = None
            grads[name] = g
        if t in case.nonfinite_at:
            name = next(n for n in ("attn.out.weight", "mlp.up.weight") if grads[n] is not None)
            grads[name] = grads[name].clone()
            grads[name].view(-1)[t % grads[name].numel()] = math.inf if t % 2 == 0 else math.nan
        out.append(grads)
    return out


def run_pair(
    case: OptimCase | dict[str, Any],
    steps: int = 60,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    fast_cls: type[torch.optim.Optimizer] | None = None,
    ref_cls: type[torch.optim.Optimizer] | None = None,
) -> RunPair:
    """Step the fast class and the reference on identical params and gradients; return both."""
    if isinstance(case, dict):
        case = OptimCase("adhoc", case)
    fast_cls = fast_cls or fast_class()
    ref_cls = ref_cls or reference_class()
    fast_params = make_params(dtype, seed)
    ref_params = make_params(dtype, seed)
    fast = fast_cls(make_param_groups(case, fast_params), **case.kwargs)
    ref = ref_cls(make_param_groups(case, ref_params), **case.kwargs)
    for grads in gradients(case, steps, seed):
        for params, opt in ((fast_params, fast), (ref_params, ref)):
            for name, p in params.items():
                g = grads[name]
                p.grad = None if g is None else g.to(dtype, copy=True)  # never share a grad tensor
            opt.step()
    return RunPair(fast, ref, fast_params, ref_params)

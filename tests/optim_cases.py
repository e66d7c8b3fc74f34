"""A table of MetaOptimize configurations, and a helper that steps the fast class and the reference together.

In the spirit of torch's ``OptimizerInfo``: each :class:`OptimCase` is one constructor configuration plus
the param-group layout and gradient pattern it runs on. :data:`CASES` covers every base x meta x
granularity (4 x 2 x 4 = 32) twice: at the shipped rule with a cooldown that starts, freezes the meta step
and runs past its end within the run (``total_steps=50, cooldown=0.3`` on 60 steps), and at the paper-exact
setting (``PAPER_EXACT``: symmetric meta step, multiplier starting at 1, no cooldown); then the variants
(weight decay, gamma < 1, several groups with and without
``"block"`` keys, per-group lr / weight decay / betas, params whose grad is None on some steps, params that
join late, non-finite gradients, tight log_step bounds, meta_lr = 0, gamma = 0, Adam meta settings).
Each case says which parts of the contract (tests/test_contract.py) apply to it through ``supports_*`` /
``has_*`` properties derived from its own settings, so a flag cannot disagree with the configuration.

:data:`ERROR_INPUTS` is the table of refused inputs (torch's ``ErrorOptimizerInput``): every validated
hyper-parameter, the rules across param groups, and edits of a group that the next step must refuse, each with
the exception and a pattern that names the bad value and the fix.

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

from hf_metaoptimize.spec import BASES, DEFAULTS, GRANULARITIES, METAS, PAPER_EXACT  # the one list of rules

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
NO_DECAY = ("attn.qkv.bias", "norm.weight")  # the Trainer's no-decay group: biases and norms

DEFAULT_LR = {"adamw": 1e-2, "lion": 3e-3, "sgd": 5e-2, "rmsprop": 1e-2}
INF_TRACE_PARAM = "attn.out.weight"  # OptimCase.inf_trace_at: its meta-gradient is then not finite, its grads are
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
    inf_trace_at: int | None = None  # before this step the trace of INF_TRACE_PARAM becomes inf (grads stay finite)

    def __repr__(self) -> str:  # used in pytest ids and failure messages
        return f"OptimCase({self.name})"

    @property
    def supports_nonfinite_skip(self) -> bool:
        """Whether a step with a non-finite gradient is skipped (changes nothing but the nonfinite_steps counter):
        not with ``skip_nonfinite=False``, where the NaN goes through as in torch's optimizers."""
        return bool(self.kwargs.get("skip_nonfinite", DEFAULTS["skip_nonfinite"]))

    @property
    def has_cooldown(self) -> bool:
        """Whether the run has a cooldown (``total_steps`` and ``cooldown`` > 0): the step size falls to 0 and the
        meta step freezes over the last steps, a path of its own in the step and in a resumed run's clock."""
        return self.kwargs.get("total_steps", DEFAULTS["total_steps"]) is not None and bool(
            self.kwargs.get("cooldown", DEFAULTS["cooldown"])
        )

    def in_short_run(self, total_steps: int) -> OptimCase:
        """The same case with its cooldown (if it has one) squeezed into a run of ``total_steps`` steps."""
        if not self.has_cooldown:
            return self
        return dataclasses.replace(self, kwargs={**self.kwargs, "total_steps": total_steps})


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
        # the Trainer's split: two groups that differ in weight decay alone step as one (foreach and compiled)
        *(
            OptimCase(
                f"adamw-decay-split-{granularity}",
                dict(lr=1e-2, granularity=granularity, meta_lr=1e-2, gamma=0.99),
                groups=(
                    {"params": tuple(n for n in PARAM_SHAPES if n not in NO_DECAY), "weight_decay": 0.1},
                    {"params": NO_DECAY, "weight_decay": 0.0},
                ),
            )
            for granularity in ("tensor", "element")
        ),
        # element granularity without the guard computes no <h, g> sums at all (the meta step reads h * g)
        OptimCase(
            "adamw-skip-nonfinite-off-element",
            dict(lr=1e-2, granularity="element", meta_lr=1e-2, weight_decay=0.1, skip_nonfinite=False),
        ),
    ]
    return cases


@dataclasses.dataclass(frozen=True)
class ErrorInput:
    """A refused input: constructor kwargs on a group layout (``groups`` as in :class:`OptimCase`), or, with
    ``edit``, a valid optimizer whose param group 0 is edited after one step: the next step must refuse it."""

    name: str
    kwargs: dict[str, Any]
    match: str  # regex that must name the bad value and the fix
    error: type[Exception] = ValueError
    groups: tuple[dict[str, Any], ...] | None = None
    edit: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"ErrorInput({self.name})"


def _error_inputs() -> list[ErrorInput]:
    E = ErrorInput
    number = "expected a finite number"
    lr_rule = "the initial step size must be a finite number >= 0"
    two = ({"params": ("embed.weight",), "block": "x"}, {"params": ("norm.weight",), "block": "x", "meta_lr": 1e-2})
    return [
        E("base", dict(base="adam"), r"invalid base='adam'; choose one of 'adamw', 'lion', 'sgd', 'rmsprop'"),
        E("meta", dict(meta="sgd"), r"invalid meta='sgd'; choose one of 'lion', 'adam'"),
        E("granularity", dict(granularity="layer"), r"invalid granularity='layer'; choose one of 'scalar', 'block'"),
        E("lr-negative", dict(lr=-1.0), rf"invalid lr=-1.0; {lr_rule}"),
        E("lr-nan", dict(lr=math.nan), rf"invalid lr=nan; {lr_rule}"),
        E("lr-inf", dict(lr=math.inf), rf"invalid lr=inf; {lr_rule}"),
        E("lr-str", dict(lr="1e-3"), rf"invalid lr='1e-3'; {lr_rule}"),
        E("lr-tensor-nan", dict(lr=torch.tensor(math.nan)), rf"invalid lr=tensor\(nan\); {lr_rule}"),
        E("lr-tensor-negative", dict(lr=torch.tensor(-1.0)), rf"invalid lr=tensor\(-1.0\); {lr_rule}"),
        E(
            "lr-tensor-shape",
            dict(lr=torch.tensor([1e-3, 1e-3])),
            r"a Tensor lr must have one element, got shape \(2,\)",
        ),
        E(
            "lr-tensor-int",
            dict(lr=torch.tensor(1)),
            r"a Tensor lr must be a real floating-point tensor, got dtype torch.int64",
        ),
        E("meta_lr-negative", dict(meta_lr=-1e-3), rf"invalid meta_lr=-0.001; {number} >= 0"),
        E("meta_lr-inf", dict(meta_lr=math.inf), rf"invalid meta_lr=inf; {number} >= 0"),
        E(
            "meta_asymmetry-zero",
            dict(meta_asymmetry=0.0),
            rf"invalid meta_asymmetry=0.0; {number} > 0 \(how many times faster .* 1 is the paper's",
        ),
        E(
            "init_multiplier-zero",
            dict(init_multiplier=0.0),
            rf"invalid init_multiplier=0.0; {number} > 0 \(the learned multiplier of lr",
        ),
        E(
            "init_multiplier-outside-bounds",
            dict(init_multiplier=1e-7),
            r"init_multiplier=1e-07 lies outside log_step_bounds=\(-14.0, 14.0\).*widen the bounds or pick",
        ),
        E("total_steps-zero", dict(total_steps=0), r"invalid total_steps=0; expected a whole number >= 1 .*or None"),
        E("total_steps-float", dict(total_steps=10.5), r"invalid total_steps=10.5; expected a whole number >= 1"),
        E("total_steps-bool", dict(total_steps=True), r"invalid total_steps=True; expected a whole number >= 1"),
        E("cooldown-above-one", dict(cooldown=1.5), rf"invalid cooldown=1.5; {number} in \[0, 1\]"),
        E("cooldown-negative", dict(cooldown=-0.1), rf"invalid cooldown=-0.1; {number} in \[0, 1\]"),
        E("gamma-above-one", dict(gamma=1.5), rf"invalid gamma=1.5; {number} in \[0, 1\]"),
        E("gamma-negative", dict(gamma=-0.5), rf"invalid gamma=-0.5; {number} in \[0, 1\]"),
        E("weight_decay-negative", dict(weight_decay=-0.1), rf"invalid weight_decay=-0.1; {number} >= 0"),
        E("weight_decay-nan", dict(weight_decay=math.nan), rf"invalid weight_decay=nan; {number} >= 0"),
        E(
            "betas-length",
            dict(betas=(0.9,)),
            r"invalid betas=\(0.9,\); expected 2 coefficient\(s\): base='adamw' takes \(beta1, beta2\)",
        ),
        E("betas-bare-float-adamw", dict(betas=0.9), r"invalid betas=0.9; expected 2 coefficient\(s\)"),
        E(
            "betas-length-sgd",
            dict(base="sgd", betas=(0.9, 0.99)),
            r"invalid betas=\(0.9, 0.99\); expected 1 coefficient\(s\): base='sgd' takes \(momentum,\)",
        ),
        E("betas-one", dict(betas=(0.9, 1.0)), r"invalid betas=\(0.9, 1.0\); every coefficient must be in \[0, 1\)"),
        E(
            "betas-negative",
            dict(betas=(-0.1, 0.9)),
            r"invalid betas=\(-0.1, 0.9\); every coefficient must be in \[0, 1\)",
        ),
        E("eps-negative", dict(eps=-1e-8), rf"invalid eps=-1e-08; {number} >= 0"),
        E(
            "eps-unused-lion",
            dict(base="lion", eps=1e-8),
            r"eps=1e-08 is not used by base='lion'; leave it unset \(eps applies to adamw, rmsprop\)",
        ),
        E("eps-unused-sgd", dict(base="sgd", eps=1e-8), r"eps=1e-08 is not used by base='sgd'; leave it unset"),
        E(
            "meta_betas-above-one",
            dict(meta_betas=(1.2, 0.9)),
            r"invalid meta_betas=\(1.2, 0.9\); every coefficient must be in \[0, 1\)",
        ),
        E("meta_betas-length", dict(meta_betas=(0.9,)), r"invalid meta_betas=\(0.9,\); expected 2 coefficient"),
        E("meta_eps-negative", dict(meta_eps=-1.0), rf"invalid meta_eps=-1.0; {number} >= 0"),
        E(
            "meta_eps-zero-adam",
            dict(meta="adam", meta_eps=0.0),
            r"invalid meta_eps=0.0 for meta='adam'; it must be > 0 .*leave it at the default",
        ),
        E(
            "log_step_bounds-lo-positive",
            dict(log_step_bounds=(0.5, 2.0)),
            r"invalid log_step_bounds=\(0.5, 2.0\); expected \(lo, hi\) with finite lo <= 0 and hi >= 0",
        ),
        E(
            "log_step_bounds-hi-negative",
            dict(log_step_bounds=(-2.0, -0.5)),
            r"invalid log_step_bounds=\(-2.0, -0.5\); expected \(lo, hi\) with finite lo <= 0 and hi >= 0",
        ),
        E(
            "log_step_bounds-infinite",
            dict(log_step_bounds=(-math.inf, 1.0)),
            r"invalid log_step_bounds=\(-inf, 1.0\); expected \(lo, hi\) with finite lo",
        ),
        E(
            "log_step_bounds-length",
            dict(log_step_bounds=(-1.0, 0.0, 1.0)),
            r"invalid log_step_bounds=\(-1.0, 0.0, 1.0\); expected \(lo, hi\)",
        ),
        E("skip_nonfinite", dict(skip_nonfinite="yes"), r"invalid skip_nonfinite='yes'; expected True or False"),
        E("foreach", dict(foreach="yes"), r"invalid foreach='yes'; expected None, True or False"),
        E("fused", dict(fused="auto"), r"invalid fused='auto'; expected None, True or False"),
        E(
            "fused-and-foreach-false",
            dict(fused=True, foreach=False),
            r"fused=True and foreach=False ask for two different implementations; pass one of them",
        ),
        # the rules across param groups
        E(
            "groups-differ-in-base",
            {},
            r"every param group must use the same 'base': group 0 has 'adamw', group 1 has 'lion'; use one "
            "MetaOptimize per base",
            groups=({"params": ("embed.weight",)}, {"params": ("norm.weight",), "base": "lion", "eps": None}),
        ),
        E(
            "block-groups-differ-in-meta_lr",
            dict(granularity="block"),
            r"param groups 0 and 1 share block 'x' but differ in 'meta_lr' \(0.02 vs 0.01\); groups of one block "
            "share one meta update",
            groups=two,
        ),
        E(
            "scalar-groups-differ-in-meta_lr",
            dict(granularity="scalar"),
            r"granularity='scalar' shares one step size .* group 1 sets meta_lr=0.01 .* use granularity='block' or "
            "'tensor'",
            groups=tuple({k: v for k, v in g.items() if k != "block"} for g in two),
        ),
        E(
            "group-value",
            {},
            rf"param group 1: invalid gamma=2.0; {number} in \[0, 1\]",
            groups=({"params": ("embed.weight",)}, {"params": ("norm.weight",), "gamma": 2.0}),
        ),
        # a group edited between steps is validated before the next step uses it
        E("edit-gamma", {}, rf"param group 0: invalid gamma=2.0; {number} in \[0, 1\]", edit=dict(gamma=2.0)),
        E("edit-lr-nan", {}, rf"param group 0: invalid lr=nan; {lr_rule}", edit=dict(lr=math.nan)),
        E("edit-lr-negative-int", {}, rf"param group 0: invalid lr=-1; {lr_rule}", edit=dict(lr=-1)),
        E(
            "edit-betas-list",
            {},
            r"param group 0: invalid betas=\[0.9, 1.5\]; every coefficient must be in \[0, 1\)",
            edit=dict(betas=[0.9, 1.5]),
        ),
        E("edit-base", {}, r"param group 0: invalid base='adam'; choose one of 'adamw'", edit=dict(base="adam")),
    ]


ERROR_INPUTS: list[ErrorInput] = _error_inputs()
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


def make_param_groups(case: OptimCase | ErrorInput, params: dict[str, torch.nn.Parameter]) -> list[Any]:
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


def set_grads(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor | None], dtype: torch.dtype) -> None:
    """One step's gradients (from :func:`gradients`) onto the params, as copies in the params' dtype."""
    for name, p in params.items():
        g = grads[name]
        p.grad = None if g is None else g.to(dtype, copy=True)  # never share a grad tensor


def run_pair(
    case: OptimCase | dict[str, Any],
    steps: int = 60,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    fast_cls: type[torch.optim.Optimizer] | None = None,
    ref_cls: type[torch.optim.Optimizer] | None = None,
    note: Any = None,
) -> RunPair:
    """Step the fast class and the reference on identical params and gradients; return both. `note(t, grads)`:
    the norm each hands its guard before step t (``note_grad_norm``), or None for none."""
    if isinstance(case, dict):
        case = OptimCase("adhoc", case)
    fast_cls = fast_cls or fast_class()
    ref_cls = ref_cls or reference_class()
    fast_params = make_params(dtype, seed)
    ref_params = make_params(dtype, seed)
    fast = fast_cls(make_param_groups(case, fast_params), **case.kwargs)
    ref = ref_cls(make_param_groups(case, ref_params), **case.kwargs)
    for t, grads in enumerate(gradients(case, steps, seed)):
        for params, opt in ((fast_params, fast), (ref_params, ref)):
            if t == case.inf_trace_at:
                opt.state[params[INF_TRACE_PARAM]]["trace"].fill_(math.inf)
            set_grads(params, grads, dtype)
            noted = None if note is None else note(t, [p.grad for p in params.values() if p.grad is not None])
            if noted is not None:
                opt.note_grad_norm(noted)
            opt.step()
    return RunPair(fast, ref, fast_params, ref_params)

"""MetaOptimize: a first-order optimizer whose step sizes are learned online.

Implements Algorithm 3 ("Hessian-free, 2x2 approximation") of Sharifnassab, Salehkaleybar & Sutton,
"MetaOptimize: A Framework for Optimizing Step Sizes and Other Meta-parameters" (ICML 2025). The exact
numerical contract (state keys, step order) is written down in ``docs/design.md``; the float64 reference
in :mod:`hf_metaoptimize.reference` is its line-by-line ground truth and the tests hold this fast path to it.

The class is bookkeeping: validation (rules and defaults in :mod:`hf_metaoptimize.spec`), lazy state
(``_init_group``), the block layout of the meta-gradients (``_block_sums`` / ``_block_members``), checkpoint
checks. ``step()`` reads like Algorithm 3. The math lives in :mod:`hf_metaoptimize.rules` (the per-tensor
function and its foreach twin); ``_base_group_step`` is the one dispatcher (foreach, the per-tensor function
eagerly for ``foreach=False``, or compiled, :mod:`hf_metaoptimize._fused`). Cross-rank reductions live in
:mod:`hf_metaoptimize.distributed` and, for DeepSpeed ZeRO, :mod:`hf_metaoptimize.integrations.deepspeed`.
Nothing in step() reads a tensor value on the host.
"""

from __future__ import annotations

import logging
import math
import operator
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from .distributed import any_dtensor, complete_meta_grads, shard_layout
from .distributed import local_tensor as _local
from .rules import (
    add0_,
    cooldown_scale,
    foreach_base_step,
    foreach_meta_step_element,
    grad_norms,
    guard_workspace,
    meta_grad,
    meta_step_shared,
    norm_layout,
    packed,
    sum_norms,
    wide_dtype,
)
from .spec import (
    ARGUMENT_KEYS,
    BASE_MOMENTS,
    BASES,
    BLOCK_KEYS,
    DEFAULTS,
    GLOBAL_KEYS,
    GRANULARITIES,
    METAS,
    check_lr,
    cooldown_steps,
    normalize_group,
)

__all__ = ["MetaOptimize", "BASES", "METAS", "GRANULARITIES", "STALL_STEPS"]

logger = logging.getLogger("hf_metaoptimize")

#: :meth:`MetaOptimize.skipped_steps` warns again when this many consecutive steps were skipped as non-finite.
STALL_STEPS = 100
#: With ``fused=None, foreach=None`` (the default) models of at least this many weights use the compiled step.
AUTO_FUSED_MIN_WEIGHTS = 1 << 21

# Per-param state that must stay in float32 (or wider) whatever the param dtype. torch's
# Optimizer.load_state_dict casts every floating state tensor except "step" to the param dtype; these keys
# are restored at full precision by the load hooks below.
_WIDE_KEYS = (
    "trace",
    "log_step",
    "meta_exp_avg",
    "meta_exp_avg_sq",
    "meta_step",
    "block_step",
    "nonfinite_steps",
    "meta_grad",
)
# float32 counters whatever the param dtype
# 0-d per-param state kept packed, one vector per key (MetaOptimize._pack_0d); param-shaped entries are left alone
_PACKED_KEYS = ("step", "log_step", "meta_exp_avg", "meta_exp_avg_sq", "meta_step", "block_step", "nonfinite_steps")
_COUNTER_KEYS = ("meta_step", "block_step", "nonfinite_steps")


def _snapshot(group: dict[str, Any]) -> tuple:
    """A group's hyper-parameters as comparable values (tensors by identity: no value is read); ``params`` and the
    scheduler-driven ``lr`` / ``initial_lr`` are left out (``lr`` is checked on its own every step)."""
    return tuple(
        (k, ("tensor", id(v)) if isinstance(v, Tensor) else v)
        for k, v in group.items()
        if k not in ("params", "initial_lr") and not (k == "lr" and not isinstance(v, Tensor))
    )


class MetaOptimize(Optimizer):
    r"""A base optimizer (AdamW, Lion, SGD+momentum, RMSProp) whose step sizes are learned during training.

    Each parameter moves by the base optimizer's update with step size
    ``alpha = group["lr"] * exp(log_step) * s``. ``log_step`` starts at ``ln(init_multiplier)`` and is learned
    online by a meta optimizer (Lion or Adam) that descends the meta-gradient ``z = <trace, grad>``, where the
    trace ``h <- gamma * (1 - weight_decay * alpha) * h + dw`` accumulates the parameter's actual displacements
    ``dw`` (paper Algorithm 3). A step size that would have raised the loss (z > 0) shrinks, one that would
    have lowered it grows; no extra forward or backward pass is needed. ``s`` is the cooldown factor: 1, except
    over the last ``cooldown`` fraction of a run whose length ``total_steps`` is known, where it falls linearly
    to 0 while the learned part is frozen (the Trainer sets ``total_steps`` for you).

    The defaults are the shipped rule (docs/design.md "The shipped rule", chosen by docs/defaults_research.md);
    ``MetaOptimize(params, lr, **hf_metaoptimize.PAPER_EXACT)`` is the paper's Algorithm 3 exactly.

    Args:
        params: iterable of parameters or of param-group dicts. A group may carry a ``"block"`` key:
            under ``granularity="block"`` groups with equal ``"block"`` share one learned step size.
        lr (float, default 1e-4): the reference step size alpha0 AND the multiplier an LR scheduler drives. The
            first step uses ``lr * init_multiplier``; the learned multiplier then travels (it is not bounded
            by ``lr``), so a usual AdamW learning rate is a fine choice. ``lr=0`` is a strict no-op.
        base (str, default "adamw"): base rule, one of ``"adamw"``, ``"lion"``, ``"sgd"`` (EMA momentum
            ``m <- rho*m + (1-rho)*g``), ``"rmsprop"`` (bias-corrected). Weight decay is decoupled for all.
        meta (str, default "lion"): meta rule for ``log_step``: ``"lion"`` (each log step size moves by
            +meta_lr, -meta_asymmetry * meta_lr or 0 per step) or ``"adam"``.
        granularity (str, default "scalar"): how many step sizes: ``"scalar"`` (one for all params),
            ``"block"`` (one per block of param groups), ``"tensor"`` (one per parameter tensor),
            ``"element"`` (one per weight: two more param-sized float32 buffers, three with ``meta="adam"``).
        meta_lr (float, default 2e-2): meta step size eta_up: with Lion meta the step size grows by at most a
            factor ``exp(meta_lr)`` per step (x7 in 100 steps). The paper uses 1e-3. ``0`` (with
            ``init_multiplier=1``) makes MetaOptimize the plain base optimizer with step size ``lr``.
        meta_asymmetry (float, default 1.5): the step size falls this many times faster than it grows
            (eta_down = meta_asymmetry * meta_lr): a too-large step size does damage the meta-gradient sees
            late. ``1`` is the paper's symmetric rule.
        init_multiplier (float, default 0.1): the learned multiplier's start, ``exp(log_step_1)``: the run
            starts at ``lr * init_multiplier`` and climbs (an automatic warm-up). The paper starts at 1.
        total_steps (int, optional): the run's length in optimizer steps; enables the cooldown. Default None
            (no cooldown). The Trainer integration sets it to the run's ``max_steps`` unless you pass it.
            Stepping past it leaves the params where they are (step size 0) and warns once.
        cooldown (float, default 0.2): the final fraction of ``total_steps`` over which the step size falls
            linearly to 0, with the meta step frozen: ``n_c = floor(cooldown * total_steps)`` steps. ``0``
            turns it off.
        gamma (float, default 1.0): trace discount (1 for stationary training, e.g. 0.999 for
            non-stationary / continual problems).
        betas (tuple, default per base): adamw ``(0.9, 0.999)``; lion ``(0.9, 0.99)`` = ``(c, rho)``;
            sgd ``(0.9,)``; rmsprop ``(0.99,)``. A bare float is accepted for sgd and rmsprop.
        eps (float, default 1e-8): denominator term of adamw and rmsprop; must be left unset for lion/sgd.
        weight_decay (float, default 0.0): decoupled weight decay kappa (AdamW convention:
            ``dw`` includes ``-alpha * kappa * w``).
        meta_betas (tuple, default per meta): lion ``(0.9, 0.99)`` = ``(c_bar, rho_bar)``; adam
            ``(0.9, 0.999)``.
        meta_eps (float, default 1e-8): denominator term of the adam meta rule.
        log_step_bounds (tuple, default (-14.0, 14.0)): ``log_step`` is clamped into this interval after
            every meta update, i.e. the learned multiplier stays within about [8e-7, 1.2e6] of ``lr``.
        skip_nonfinite (bool, default True): a step whose gradients contain inf/NaN (judged by their norms, as
            ``torch.nn.utils.clip_grad_norm_`` does: a squared norm beyond the grads' dtype counts too) is
            skipped: no parameter and no state tensor changes, and each participating parameter's
            ``state["nonfinite_steps"]`` is incremented (:meth:`skipped_steps` counts them). A meta-gradient that
            is not finite although the gradients are (a trace beyond the float range) leaves its step size where
            it is for that step. Done without a host sync: every update coefficient is multiplied by an on-device
            0/1 flag and the math reads a zeroed copy of the gradients (``p.grad`` is never written). Cost: one
            read of every gradient (``torch._foreach_norm``: one op for all tensors) before the update; none
            where the step is handed the norm the clipping computed (:meth:`note_grad_norm`; the Trainer does).
            ``False`` lets inf/NaN through into params and state, as torch's optimizers do.
        foreach (bool, optional): ``True``: the multi-tensor (``torch._foreach_*``) path; ``False``: the
            per-tensor kernel of ``fused`` run uncompiled, one tensor at a time (slow; no compiler needed).
            Default None: chosen with ``fused`` (below).
        fused (bool, optional): ``True``: the base step, the trace and (element granularity) the meta step as ONE
            compiled elementwise kernel over 16 tensors per call (``hf_metaoptimize/_fused.py``, AOTInductor:
            C++ on CPU, Triton on GPU): each weight's param, grad and state are read and written once instead of a
            dozen times, and the dispatch cost is one call per 16 tensors. The first use of a configuration
            compiles it (tens of seconds on a CPU), once per machine: packages are cached on disk
            (``HF_METAOPTIMIZE_CACHE``, default ``~/.cache/hf_metaoptimize``), so resumed runs and other
            processes load it. Same equations; results agree with the foreach path to rounding, not bit for bit.
            Default None with ``foreach`` None: the compiled step for models of at least
            ``AUTO_FUSED_MIN_WEIGHTS`` (2M) weights where it compiles (a failure is said once, as a warning, and
            the foreach path is used), the foreach path for smaller ones.

    Memory: the base optimizer's state plus ONE float32 trace per weight; scalar / block / tensor
    granularity add a few scalars per parameter tensor, element granularity two (Lion meta: log step and
    meta momentum) or three (Adam meta) more float32 buffers per weight. Compute: one dot product per
    parameter tensor per step and a handful of elementwise passes; ``step()`` never synchronises with the
    host (``step_sizes()`` neither). Step times against torch's AdamW are on docs/benchmarks.md
    (``benchmarks/bench_step.py``).

    State (per parameter, created on the first step in which it has a gradient): ``step``, the base
    moments (``exp_avg``, ``exp_avg_sq``, in the param dtype), ``trace``, ``log_step``,
    ``meta_exp_avg`` (+ ``meta_exp_avg_sq``, ``meta_step`` for adam meta), ``block_step`` (the steps its
    block has taken: the cooldown's clock), ``nonfinite_steps``; trace / log_step / meta state / counters are
    float32 (float64 for float64 params), also after ``load_state_dict``. Under scalar / block granularity
    every member of a block holds an identical copy of the block's ``log_step``, meta state and
    ``block_step``, so per-parameter sharding and checkpointing keep working.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = MetaOptimize(model.parameters(), lr=1e-3, total_steps=1000)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> [[s.shape for s in group] for group in opt.step_sizes()]
        [[torch.Size([]), torch.Size([])]]
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = DEFAULTS["lr"],
        *,
        base: str = DEFAULTS["base"],
        meta: str = DEFAULTS["meta"],
        granularity: str = DEFAULTS["granularity"],
        meta_lr: float = DEFAULTS["meta_lr"],
        meta_asymmetry: float = DEFAULTS["meta_asymmetry"],
        init_multiplier: float = DEFAULTS["init_multiplier"],
        total_steps: int | None = DEFAULTS["total_steps"],
        cooldown: float = DEFAULTS["cooldown"],
        gamma: float = DEFAULTS["gamma"],
        betas: tuple[float, ...] | float | None = None,
        eps: float | None = None,
        weight_decay: float = DEFAULTS["weight_decay"],
        meta_betas: tuple[float, float] | None = None,
        meta_eps: float = DEFAULTS["meta_eps"],
        log_step_bounds: tuple[float, float] = DEFAULTS["log_step_bounds"],
        skip_nonfinite: bool = DEFAULTS["skip_nonfinite"],
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            base=base,
            meta=meta,
            granularity=granularity,
            meta_lr=meta_lr,
            meta_asymmetry=meta_asymmetry,
            init_multiplier=init_multiplier,
            total_steps=total_steps,
            cooldown=cooldown,
            gamma=gamma,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            meta_betas=meta_betas,
            meta_eps=meta_eps,
            log_step_bounds=log_step_bounds,
            skip_nonfinite=skip_nonfinite,
            foreach=foreach,
            fused=fused,
        )
        normalize_group(defaults, where="MetaOptimize")
        super().__init__(params, defaults)
        self._index_cache: dict[Any, Tensor] = {}
        # the compiled step's flat views of params and state; the foreach path's small-bucket workspaces
        self._views: dict[Any, Any] = {}
        # The full list of param groups. DeepSpeed ZeRO-1/2 temporarily replaces `param_groups` by a one-group
        # list around each step() call; this is how the optimizer still sees every block.
        self._all_groups = self.param_groups
        # How the meta-gradients are completed when step() sees rank-local flat partitions (DeepSpeed ZeRO):
        # integrations.deepspeed.ZeroPartitions, set by its attach(); None otherwise (one process, DDP, FSDP2).
        self._partitions: Any = None
        self._skip_seen: tuple[int, int, int] | None = None  # host-side: (skipped, applied, streak) at last check
        self._calls = 0  # host-side count of step() calls, for the one warning past total_steps
        self.register_load_state_dict_pre_hook(_check_checkpoint)
        self.register_load_state_dict_post_hook(_restore_wide_state)
        self.register_state_dict_post_hook(_copy_packed_state)
        self._check_groups()

    # ------------------------------------------------------------------ bookkeeping
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # torch: a bare Tensor becomes [Tensor], defaults filled in
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.is_complex() or not p.is_floating_point():
                    raise ValueError(f"MetaOptimize supports real floating-point parameters only, got dtype {p.dtype}")
            self._validate(len(self.param_groups) - 1, group)
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._index_cache = {}
        self._views = {}
        self._all_groups = self.param_groups
        self.__dict__.setdefault("_partitions", None)
        self.__dict__.setdefault("_skip_seen", None)
        self._group_snapshots = {}
        self._pack_dirty = True  # views may not survive pickling: packed again at the next step

    def _validate(self, gi: int, group: dict[str, Any]) -> None:
        """Validation in one place: the group's own values (:func:`hf_metaoptimize.spec.normalize_group`), then
        the rules across groups (:meth:`_check_across`)."""
        normalize_group(group, where=f"param group {gi}")
        self._check_across(self.__dict__.get("_all_groups", self.param_groups))

    def _check_groups(self, force: bool = False) -> None:
        """Re-validate every param group that is new, edited or loaded since the last check (before a step uses it).

        A group's values are compared with a snapshot taken when it was last validated (tensors by identity, no
        value read); ``lr`` is checked on its own, cheaply, because schedulers change it every step. Every changed
        group is normalized first, then the rules across groups run once. Costs a few microseconds per group per
        step.
        """
        groups = self._all_groups
        snaps = self.__dict__.setdefault("_group_snapshots", {})
        changed = False
        for gi, group in enumerate(groups):
            if force or snaps.get(gi) != _snapshot(group):
                normalize_group(group, where=f"param group {gi}")
                changed = True
                continue
            lr = group["lr"]
            if (type(lr) is float or type(lr) is int) and not 0 <= lr < math.inf:  # False for NaN too
                check_lr(lr, f"param group {gi}")
        if changed or len(snaps) != len(groups):
            self._check_across(groups)
            self._views.clear()  # params may have left: their views must not keep them (and their state) alive
            self._plan = None  # the step's layout merges groups by their values: derived again
            snaps.clear()
            snaps.update((gi, _snapshot(group)) for gi, group in enumerate(groups))

    @staticmethod
    def _check_across(groups: list[dict[str, Any]]) -> None:
        """One algorithm per optimizer (GLOBAL_KEYS equal in every group), one meta update per block."""
        for gi, group in enumerate(groups):
            for key in GLOBAL_KEYS:
                first = groups[0][key]
                if group[key] != first:
                    raise ValueError(
                        f"every param group must use the same {key!r}: group 0 has {first!r}, group "
                        f"{gi} has {group[key]!r}; use one MetaOptimize per {key}"
                    )
        seen: dict[Any, int] = {}
        for gi, group in enumerate(groups):
            key = group.get("block", None)
            if key is None:
                continue
            if key in seen:
                other = groups[seen[key]]
                for k in BLOCK_KEYS:
                    if other[k] != group[k]:
                        raise ValueError(
                            f"param groups {seen[key]} and {gi} share block {key!r} but differ in {k!r} "
                            f"({other[k]!r} vs {group[k]!r}); groups of one block share one meta update"
                        )
            else:
                seen[key] = gi
        if groups and groups[0]["granularity"] == "scalar":
            ref = groups[0]
            for gi, group in enumerate(groups[1:], start=1):
                for k in BLOCK_KEYS:
                    if ref[k] != group[k]:
                        raise ValueError(
                            f"granularity='scalar' shares one step size across all param groups, but group "
                            f"{gi} sets {k}={group[k]!r} and group 0 {k}={ref[k]!r}; use "
                            "granularity='block' or 'tensor' for per-group meta settings"
                        )

    def _block_key(self, gi: int, group: dict[str, Any], p: Tensor) -> Any:
        gran = group["granularity"]
        if gran == "scalar":
            return 0
        if gran == "block":
            key = group.get("block", None)
            return ("__group__", gi) if key is None else ("block", key)
        return ("param", id(p))

    def _cached_index(self, key: tuple, device: torch.device) -> Tensor:
        """An int64 index tensor on `device`, built once per distinct layout (no per-step H2D copy)."""
        ck = (device, key)
        idx = self._index_cache.get(ck)
        if idx is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            idx = torch.tensor(key, dtype=torch.long, device=device)
            self._index_cache[ck] = idx
        return idx

    def _init_state(self, p: Tensor, group: dict[str, Any], donor: dict[str, Tensor] | None) -> None:
        state = self.state[p]
        base, meta, gran = group["base"], group["meta"], group["granularity"]
        wide = wide_dtype(p.dtype)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for k in BASE_MOMENTS[base]:
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["trace"] = torch.zeros_like(p, dtype=wide, memory_format=torch.contiguous_format)
        meta_keys = ["log_step", "meta_exp_avg"] + (["meta_exp_avg_sq", "meta_step"] if meta == "adam" else [])
        meta_keys.append("block_step")
        log_init = math.log(group["init_multiplier"])  # the learned multiplier starts at init_multiplier
        for k in meta_keys:
            dt = torch.float32 if k in _COUNTER_KEYS else wide
            if gran != "element" and donor is not None:
                state[k] = donor[k].detach().to(device=p.device, dtype=dt, copy=True)
            elif gran == "element" and k not in _COUNTER_KEYS:
                state[k] = torch.zeros_like(p, dtype=wide, memory_format=torch.contiguous_format)
            else:
                state[k] = torch.zeros((), dtype=dt, device=p.device)
            if k == "log_step" and (gran == "element" or donor is None) and log_init != 0.0:
                state[k].fill_(log_init)
        state["nonfinite_steps"] = torch.zeros((), dtype=torch.float32, device=p.device)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step_sizes(self) -> list[list[Tensor]]:
        """The step sizes the next step will use, ``lr * exp(log_step) * s``, one list per param group (``s``: the
        cooldown factor, 1 outside the cooldown or without ``total_steps``).

        Each entry is a float32 tensor on the parameter's device: 0-d for scalar / block / tensor
        granularity, shaped like the parameter for element granularity. A parameter that has no state yet
        reports its block's current value (or ``lr * init_multiplier``). Under DeepSpeed ZeRO the entries are the
        rank's flat partitions of each group (tensor granularity: a vector, one entry per tensor piece the partition
        holds, in the order of ``_partitions.fragments``). No host synchronisation.
        """
        return self._step_sizes(relative=False, last=False)

    @torch.no_grad()
    def step_size_multipliers(self, cooldown: bool = False) -> list[list[Tensor]]:
        """The learned part alone, ``exp(log_step)`` (``init_multiplier`` at the start, without the cooldown factor),
        laid out like :meth:`step_sizes`.

        Unlike ``step_sizes()`` it does not scale with ``lr``, so it still shows what was learned where a
        scheduler has driven ``lr`` to 0. With ``cooldown=True`` each entry is multiplied by the cooldown factor
        of the step its block took LAST (what the Trainer logs beside that step's learning rate). No host
        synchronisation.
        """
        return self._step_sizes(relative=True, last=cooldown)

    def _step_sizes(self, relative: bool, last: bool) -> list[list[Tensor]]:
        """lr (or 1) * exp(log_step) [* s]: s of the next step (``step_sizes``), of the last step (``last``), or
        none (``relative`` alone)."""
        donors = self._block_donors()
        out: list[list[Tensor]] = []
        for gi, group, params in self._group_params():
            lr, gran = (1.0 if relative else group["lr"]), group["granularity"]
            row = []
            for p in params:
                st = self.state.get(p)
                if not (st and "log_step" in st):
                    st = donors.get(self._block_key(gi, group, p)) if gran in ("scalar", "block") else None
                if st is None:  # no state yet: the first step's value
                    shape = p.shape if gran == "element" else ()
                    ls = torch.full(shape, math.log(group["init_multiplier"]), dtype=torch.float32, device=p.device)
                    t = torch.ones((), dtype=torch.float64, device=p.device)
                else:
                    ls = st["log_step"].to(device=p.device)
                    t = st["block_step"].to(device=p.device, dtype=torch.float64) + (0 if last else 1)
                size = torch.exp(ls) * lr
                cool = cooldown_scale(group, t) if (last or not relative) else None
                if cool is not None:  # the step size of the NEXT step includes its cooldown factor
                    size = size * cool.to(size.dtype)
                row.append(size.to(torch.float32))
            out.append(row)
        return out

    def note_grad_norm(self, total_norm: Tensor | float) -> None:
        """Hand the next :meth:`step` the total norm of the grads it will see, so that its non-finite guard
        (``skip_nonfinite=True``) takes it instead of reading every grad again.

        ``total_norm`` is what ``torch.nn.utils.clip_grad_norm_`` returns (the norm before clipping; any p-norm
        with p > 0), over grads that include every grad of this optimizer: a 0-d tensor (on any device) or a
        Python number. A finite norm means every entry was finite, and clipping by a finite factor keeps them so:
        the step runs as the guard's own norms would have let it (params and state bit for bit the same). A norm
        that is not finite skips the step, as the guard would for these grads before clipping (also where the
        squared norm alone overflowed). The Trainer does this for you after its clipping (``max_grad_norm > 0``,
        the default 1.0). In a loop of your own::

            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.note_grad_norm(norm)
            opt.step()

        Saves one read of every grad per step (about a tenth of the default step's memory traffic); costs a
        pass over the params in Python here and in the step (their grads' identities and version counters).
        The note serves one step: the next ``step()`` takes it whether it uses it or not. A grad replaced, or
        changed in place, after the note (seen by the grad's version counter: an in-place op on a sharded
        DTensor grad does not move it, so leave FSDP2 grads alone between the two calls) voids it: that step
        reads the grads itself and a warning says so once. Under FSDP2 every rank must note the same (global)
        norm; the step still combines the ranks' verdicts in the all-reduce it makes anyway. Not available under
        DeepSpeed ZeRO (its engine clips and checks the grads itself) nor with ``skip_nonfinite=False`` (no
        guard to feed): both raise. Reads nothing on the host and copies nothing to the device (a Python number is
        written there by a fill).
        """
        if not self._all_groups[0]["skip_nonfinite"]:
            raise ValueError(
                "note_grad_norm: skip_nonfinite=False, so the step has no non-finite guard to hand a norm to; "
                "leave the call out (or pass skip_nonfinite=True)."
            )
        if self._partitions is not None:
            raise RuntimeError(
                "note_grad_norm: under DeepSpeed ZeRO the engine clips and checks the grads itself and the step "
                "never reads them for the guard; leave the call out."
            )
        grads = _grads_of(self.param_groups)
        if not grads:
            raise ValueError("note_grad_norm: no param of this optimizer has a grad; call it after backward().")
        home = _local(grads[0]).device
        if isinstance(total_norm, Tensor):
            if any_dtensor([total_norm]):
                raise TypeError(
                    "note_grad_norm: total_norm is a DTensor; pass the global norm as a plain tensor "
                    "(total_norm.full_tensor(), on every rank)."
                )
            if total_norm.numel() != 1 or total_norm.dtype.is_complex or total_norm.dtype == torch.bool:
                raise ValueError(
                    f"note_grad_norm: total_norm must be one real number; got a tensor of shape "
                    f"{tuple(total_norm.shape)} and dtype {total_norm.dtype}. Pass what clip_grad_norm_ returns."
                )
            norm = total_norm.detach().reshape(())
            wide = torch.float64 if norm.dtype == torch.float64 else torch.float32
            norm = norm.to(device=home, dtype=wide, non_blocking=True)
        elif isinstance(total_norm, (int, float)) and not isinstance(total_norm, bool):
            if total_norm < 0:
                raise ValueError(
                    f"note_grad_norm: total_norm={total_norm!r} is negative; a norm is >= 0 (inf or NaN skip the "
                    "step). Pass what clip_grad_norm_ returns."
                )
            # a fill with the number as a kernel argument: no host-to-device copy (from pageable memory, a sync)
            norm = torch.full((), float(total_norm), dtype=torch.float32, device=home)
        else:
            raise TypeError(
                f"note_grad_norm: total_norm must be a 0-d tensor or a Python number; got {type(total_norm).__name__}."
                " Pass what clip_grad_norm_ returns."
            )
        self.__dict__["_noted_norm"] = (norm, _grad_signature(grads))

    def _take_noted_norm(self) -> Tensor | None:
        """The norm of :meth:`note_grad_norm` for this step's grads, or None (none noted, or voided by a grad
        replaced or changed in place since: said once). Taken either way: a note serves one step."""
        noted = self.__dict__.pop("_noted_norm", None)
        if noted is None:
            return None
        norm, sig = noted
        if sig == _grad_signature(_grads_of(self.param_groups)):
            return norm
        if not self.__dict__.get("_warned_stale_note"):
            self.__dict__["_warned_stale_note"] = True
            logger.warning(
                "MetaOptimize: a grad was replaced or changed in place after note_grad_norm(), so the noted norm "
                "is not this step's; the step read the grads itself (said once). Call note_grad_norm() last, "
                "right before step()."
            )
        return None

    def skipped_steps(self, warn: bool = True) -> int:
        """Number of steps skipped as non-finite so far (``skip_nonfinite=True``); logs a warning when there are some.

        The first call that sees a skipped step logs a warning (logger ``hf_metaoptimize``); another comes each
        time skips continue for :data:`STALL_STEPS` (100) consecutive steps, i.e. the run is stalled: every step
        is refused, so the step size cannot shrink by itself. "Consecutive" is judged between calls: the steps
        since the previous call count towards it when none of them was applied. The Trainer calls this at every
        logging step and logs the count as ``skipped_steps``; in a plain loop, call it now and then (e.g. where
        you log the loss). Reads two numbers from the device (a host sync; ``step()`` itself never syncs).
        """
        counts = [
            (st["nonfinite_steps"], st["step"])
            for st in self.state.values()
            if isinstance(st, dict) and "nonfinite_steps" in st
        ]
        if not counts:
            return 0
        dev = _local(counts[0][0]).device
        skipped, applied = (
            int(v)
            for v in torch.stack(
                [
                    torch.stack([_local(t).to(device=dev, dtype=torch.float64) for t in col]).amax()
                    for col in zip(*counts)
                ]
            )
            .cpu()
            .tolist()
        )  # the one host transfer
        prev = self._skip_seen
        last_skipped, last_applied, streak = prev if prev is not None else (0, 0, 0)
        new_skips, new_applied = skipped - last_skipped, applied - last_applied
        if new_skips < 0 or new_applied < 0:  # the state was replaced (a checkpoint load): start counting again
            last_skipped, new_skips, new_applied, streak = 0, skipped, applied, 0
        streak = streak + new_skips if new_applied == 0 else 0
        self._skip_seen = (skipped, applied, streak)
        if not warn or new_skips == 0:
            return skipped
        if last_skipped == 0:
            logger.warning(
                "MetaOptimize skipped %d of the last %d step(s) because a gradient or meta-gradient was not finite "
                "(inf/NaN); skipped steps change no weight and no state. Check the loss scale, the data and the "
                "initial step size (lr).",
                new_skips,
                new_skips + new_applied,
            )
        elif streak >= STALL_STEPS and (streak - new_skips) // STALL_STEPS != streak // STALL_STEPS:
            logger.warning(
                "MetaOptimize has skipped every step for %d consecutive steps (%d skipped in all, %d applied): the "
                "run is stalled, the step size cannot shrink while every step is refused. Stop and restart from a "
                "good checkpoint with a smaller lr (or fix the source of the inf/NaN gradients).",
                streak,
                skipped,
                applied,
            )
        return skipped

    def _group_params(self) -> list[tuple[int, dict[str, Any], list[Tensor]]]:
        """(index, group, params) for every param group; under DeepSpeed ZeRO the rank's partitions."""
        part = self.__dict__.get("_partitions")
        if part is None:
            return [(gi, g, list(g["params"])) for gi, g in enumerate(self._all_groups)]
        return [(gi, g, part.params(gi)) for gi, g in enumerate(self._all_groups)]

    def _block_donors(self) -> dict[Any, dict[str, Tensor]]:
        """First member with state of every block (scalar / block granularity)."""
        donors: dict[Any, dict[str, Tensor]] = {}
        for gi, group, params in self._group_params():
            if group["granularity"] not in ("scalar", "block"):
                return donors
            for p in params:
                st = self.state.get(p)
                if st and "log_step" in st:
                    donors.setdefault(self._block_key(gi, group, p), st)
        return donors

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one MetaOptimize step (Algorithm 3). Returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()  # groups edited or loaded since the last step are validated before use
        noted = self._take_noted_norm()  # a note serves this step, used or not
        plan = self._layout()
        if plan is None:
            return loss
        active = plan.active
        self._count_call()
        if "_auto_fused" not in self.__dict__:
            self._choose_fused(active)
        grads = plan.grads(self._fused_on, raw=self._partitions is None)
        if self._partitions is not None:  # DeepSpeed ZeRO: this call sees some partitions only
            self._partitions.step(self, plan, grads)  # integrations.deepspeed.ZeroPartitions
            return loss
        skip = self._all_groups[0]["skip_nonfinite"]
        element = self._all_groups[0]["granularity"] == "element"
        # Design step 3, the guard: from the grads alone (their norms: one read, no meta-gradient needed before the
        # update; or the norm the caller noted, :meth:`note_grad_norm`); FSDP2: one all-reduce agrees on it,
        # together with the meta-gradients when they come first.
        buckets = plan.base_buckets(self._fused_on)
        if not skip:
            norm, filled = None, {}
        elif noted is not None:
            norm, filled = noted, {}
        else:
            norm, filled = plan.norms(grads, buckets, self._views)
        # Algorithm 3 step 1, z_p = <h_p, g_p> from the OLD trace (rank-local, float32+): the per-tensor kernel
        # computes it while it reads h and g for the update (shared granularities; element granularity's meta step
        # reads h * g per weight and needs no sums), completed after the base step; the foreach path before it.
        late = all(self._fused_on(g) and self._kernel_dots(g) for _, g, _ in active)
        zsink: list[tuple[list[Tensor], Tensor]] | None = [] if late else None
        zvec, zelem = (None, {}) if late else self._local_meta_grads(active, grads, not element, plan.states)
        zvec, norm = plan.complete(zvec, norm, self._cached_index)
        ok, okf = _finite_guard(norm, self._unit(active))
        if zvec is not None:
            red, keys = self._block_sums(active, zvec, plan)
        # Algorithm 3 steps 2-3: base step with alpha = lr * exp(log_step), then the trace
        for bucket in buckets:
            bucket.step(self.state, grads, okf, ok is not None, self._views, zsink, filled.get(id(bucket)))
        if late:
            zvec, _ = plan.complete(_assemble(plan.params, zsink, self._cached_index), None, self._cached_index)
            red, keys = self._block_sums(active, zvec, plan)
        # Algorithm 3 step 4: the meta step on each block
        if self._all_groups[0]["granularity"] == "element":
            self._element_meta_steps(active, zelem, okf)
        else:
            for group, members, sts, z in self._meta_calls(plan, red, keys):
                meta_step_shared(self.state, group, members, z, okf, sts, self._meta_update(group))
        _count_skipped(plan.flat_states, ok, okf)
        return loss

    def _layout(self) -> _Plan | None:
        """This step's :class:`_Plan`: the one kept from the previous step while its layout holds (the same params with
        a grad, the same state dicts, no new state, no load, no edited group), else a new one, with lazy state for new
        params (None when no param has a grad). The check is two passes over the params: each one's identity where
        it has a grad, and the identity of its state dict (``opt.state.clear()`` or a replaced dict starts it anew)."""
        sig = (
            id(self._partitions),
            tuple((id(g), tuple(id(p) if p.grad is not None else 0 for p in g["params"])) for g in self.param_groups),
        )
        plan = self.__dict__.get("_plan")
        if (
            plan is not None
            and plan.sig == sig
            and not self.__dict__.get("_pack_dirty", True)
            and all(map(operator.is_, map(self.state.get, plan.params), plan.flat_states))  # no state dict replaced
        ):
            return plan
        self._plan = None
        if self._partitions is None:
            _refuse_unattached_partitions(self)
        active = self._init_group()
        if not active:
            return None
        if self._partitions is None and self.__dict__.get("_pack_dirty", True):
            self._pack_0d()
        plan = _Plan(self, sig, active)
        if self._partitions is None:  # under DeepSpeed every call sees other partitions: made anew each call
            self._plan = plan
        return plan

    def _fused_on(self, group: dict[str, Any]) -> bool:
        """Whether this group steps with the per-tensor function (``rules.tensor_step``): compiled for ``fused=True`` or
        the automatic choice (both ``fused`` and ``foreach`` left at None, made once at the first step,
        :meth:`_choose_fused`), run eagerly one tensor at a time for ``foreach=False``."""
        if group["fused"] is not None or group["foreach"] is not None:
            return bool(group["fused"]) or group["foreach"] is False
        auto = self.__dict__.get("_auto_fused")
        return bool(auto)

    def _choose_fused(self, active: list[tuple[int, dict[str, Any], list[Tensor]]]) -> None:
        """The automatic choice of the step's implementation, once: the compiled kernel (``fused``) for models of
        at least :data:`AUTO_FUSED_MIN_WEIGHTS` weights where it compiles (or loads from its cache), else the
        foreach path. A failure to compile is said once (a warning) and the foreach path is used; the math is the
        same either way. The package prepared is the one the step runs: the kernel for the grads as they are
        (``_Plan.grads``)."""
        groups = self._all_groups
        if any(g["fused"] is not None or g["foreach"] is not None for g in groups):
            self._auto_fused = False
            return
        weights = sum(p.numel() for g in groups for p in g["params"])
        if weights < AUTO_FUSED_MIN_WEIGHTS:
            self._auto_fused = False
            return
        from . import _fused

        try:
            for _, group, plist in active:
                config = _fused.config_of(group, group["skip_nonfinite"], self._kernel_dots(group))
                for p in plist:
                    _fused.prepare(config, p, p.grad, self.state[p])  # the kernel step() will run
        except RuntimeError as e:
            warnings.warn(
                f"MetaOptimize: the compiled step is not available on this machine ({e}); using the foreach path "
                "(the same math, slower on large models). Pass foreach=True to choose it and silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._auto_fused = False
            return
        logger.info("MetaOptimize: %d weights: using the compiled (fused) step; foreach=True picks the other", weights)
        self._auto_fused = True

    def _meta_update(self, group: dict[str, Any]) -> Callable[..., tuple] | None:
        """The 0-d meta step's function for this group: on the compiled path the compiled program
        (``_fused.meta_program``: one call instead of ~25 small ops), else the eager ``rules.meta_update`` (None)."""
        if not self._fused_on(group) or group["foreach"] is False:
            return None
        from ._fused import meta_program

        return meta_program

    def _kernel_dots(self, group: dict[str, Any]) -> bool:
        """Whether the per-tensor kernel computes this group's meta-gradients ``z_p`` itself, while it reads h and g
        for the update (nothing needs them before it: the guard reads the grads alone): shared step sizes (element
        granularity reads ``h * g`` per weight), not under DeepSpeed ZeRO (whose partitions reduce them first)."""
        return group["granularity"] != "element" and self._partitions is None

    def _count_call(self) -> None:
        """Warn once when stepped past ``total_steps`` (the cooldown has brought the step size to 0). A host
        counter of step() calls (restored from the checkpoint's step counts on load): no device read."""
        if self._partitions is not None:
            return  # DeepSpeed ZeRO calls step() once per partition group
        self.__dict__["_calls"] = calls = self.__dict__.get("_calls", 0) + 1
        total = self._all_groups[0]["total_steps"]
        if total is not None and calls == total + 1 and cooldown_steps(self._all_groups[0]):
            logger.warning(
                "MetaOptimize: step %d is past total_steps=%d; the cooldown has brought the step size to 0, so "
                "the params no longer move. Pass the run's real length as total_steps (the Trainer does), or "
                "cooldown=0 for no cooldown.",
                calls,
                total,
            )

    def _init_group(self) -> list[tuple[int, dict[str, Any], list[Tensor]]]:
        """(group index, group, params with a grad) for the groups this call steps, with lazy state.

        Every group, except under DeepSpeed ZeRO (one group / sub-group per call). State is created here, not in
        ``__init__``: FSDP2 swaps the params after construction, ZeRO hands in flat partitions. A new member of a
        scalar / block step size copies its block's current log step and meta state.
        """
        groups = self._all_groups
        shared = groups[0]["granularity"] in ("scalar", "block")
        gindex = {id(g): i for i, g in enumerate(groups)}
        active: list[tuple[int, dict[str, Any], list[Tensor]]] = []
        donors: dict[Any, dict[str, Tensor]] | None = None
        for group in self.param_groups:
            gi = gindex[id(group)]
            plist = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MetaOptimize does not support sparse gradients")
                if not self.state.get(p):
                    donor = None
                    if shared:
                        if donors is None:
                            donors = self._block_donors()
                        donor = donors.get(self._block_key(gi, group, p))
                    self._init_state(p, group, donor)
                    self._pack_dirty = True
                    if self._partitions is not None:
                        self._partitions.init_state(self, p, group)
                    if shared and donor is None:
                        donors[self._block_key(gi, group, p)] = self.state[p]
                plist.append(p)
            if plist:
                active.append((gi, group, plist))
        return active

    def _pack_0d(self) -> None:
        """Keep each 0-d per-param state (:data:`_PACKED_KEYS`) as consecutive elements of one vector per key, in
        param order: the step then reads and writes n of them with one op (``rules.stack0`` / ``copy0`` /
        ``add0_``) instead of n. Each entry stays a 0-d tensor of its own param's state (a view), so the state
        dict, checkpoints and sharding see what they saw before (``state_dict()`` hands out copies). Runs again
        after new state or a load; a key whose entries differ in device or dtype stays unpacked (the same numbers,
        n ops)."""
        self._pack_dirty = False
        sts = [self.state[p] for g in self._all_groups for p in g["params"] if self.state.get(p)]
        for k in _PACKED_KEYS:
            have = [st for st in sts if k in st]
            ts = [st[k] for st in have]
            if len(ts) < 2 or any(t.dim() != 0 for t in ts) or len({(t.device, t.dtype) for t in ts}) != 1:
                continue
            if packed(ts):
                continue
            for st, v in zip(have, torch.stack(ts).unbind(0)):
                st[k] = v

    def _unit(self, active: list[tuple[int, dict[str, Any], list[Tensor]]]) -> Tensor:
        """The step's finite flag without the guard: 1, in the meta-gradients' dtype and on their device."""
        h = _local(self.state[active[0][2][0]]["trace"])
        return torch.ones((), dtype=h.dtype, device=h.device)

    def _local_meta_grads(
        self,
        active: list[tuple[int, dict[str, Any], list[Tensor]]],
        grads: dict[int, list[Tensor]],
        sums: bool,
        states: dict[int, list[dict[str, Tensor]]] | None = None,
    ) -> tuple[Tensor, dict[int, list[Tensor]]]:
        """Algorithm 3 step 1 on rank-local tensors, before the base step: one 0-d ``<h_p, g_p>`` per param, as one
        vector in param order; for element granularity (foreach path) also the elementwise ``h * g`` per param,
        which the meta step consumes. Without `sums` (element granularity: its meta step reads h * g alone) the
        vector is empty, of the dtype and device it would have had, and no dot product is computed. `states`: each
        group's state dicts (the step's plan has them; else looked up)."""
        element = self._all_groups[0]["granularity"] == "element"
        zparts: list[Tensor] = []
        zelem: dict[int, list[Tensor]] = {}
        kinds: set[tuple[torch.device, torch.dtype]] = set()
        for gi, group, plist in active:
            sts = [self.state[p] for p in plist] if states is None else states[gi]
            traces = [_local(st["trace"]) for st in sts]
            kinds.update((h.device, h.dtype) for h in traces)  # each z_p's: the trace's
            if element and not self._fused_on(group):
                ze = torch._foreach_mul(traces, [_local(g) for g in grads[gi]])
                zelem[gi] = ze
                if sums:
                    zparts.append(torch.stack([z.sum() for z in ze]))
            elif sums:
                zparts.append(torch.stack([meta_grad(h, _local(g)) for h, g in zip(traces, grads[gi])]))
        if len(kinds) > 1:  # params on several devices / of mixed precision
            wide = torch.float64 if any(dt == torch.float64 for _, dt in kinds) else torch.float32
            home = active[0][2][0].device
            zparts = [z.to(device=home, dtype=wide) for z in zparts]
            kinds = {(home, wide)}
        if not sums:
            ((device, dtype),) = kinds
            return torch.empty(0, dtype=dtype, device=device), zelem
        return (zparts[0] if len(zparts) == 1 else torch.cat(zparts)), zelem

    def _block_sums(
        self, active: list[tuple[int, dict[str, Any], list[Tensor]]], zvec: Tensor, plan: _Plan | None = None
    ) -> tuple[Tensor, dict[Any, int] | None]:
        """One meta-gradient per block: scalar sums every z_p, block sums by block key (``keys``: key -> row),
        tensor and element keep one entry per param. `plan`: where the block layout is kept between steps."""
        gran = self._all_groups[0]["granularity"]
        if gran == "scalar":
            return zvec.sum().reshape(1), None
        if gran != "block":
            return zvec, None

        def layout_of() -> tuple[dict[Any, int], list[int]]:
            keys: dict[Any, int] = {}
            rows = [keys.setdefault(self._block_key(gi, g, p), len(keys)) for gi, g, plist in active for p in plist]
            return keys, rows

        keys, layout = layout_of() if plan is None else plan.get("blocks", layout_of)
        red = torch.zeros(len(keys), dtype=zvec.dtype, device=zvec.device)
        red.index_add_(0, self._cached_index(tuple(layout), zvec.device), zvec)
        return red, keys

    def _meta_calls(
        self, plan: _Plan, red: Tensor, keys: dict[Any, int] | None
    ) -> list[tuple[dict[str, Any], list[Tensor], list[dict[str, Tensor]], Tensor]]:
        """(group, members, their states, z) of the 0-d meta steps of this step: every member WITH STATE of a block
        that has a param in this step (scalar: all of them; tensor: the active params), each with its block's
        meta-gradient (from `red`, the block sums), and groups with the same meta settings
        (:data:`~hf_metaoptimize.spec.BLOCK_KEYS`) in one call: each member's update reads only its own state, its
        z and those settings, so merging changes no number. Who the members are is kept in the plan."""
        calls = plan.get("meta", lambda: self._meta_members(plan, keys))
        out = []
        for group, members, sts, pick in calls:
            if pick is None:  # scalar: one z for all
                z = red.reshape(()).expand(len(members))
            elif isinstance(pick, slice):
                z = red[pick]
            else:
                z = red.index_select(0, self._cached_index(pick, red.device))
            out.append((group, members, sts, z))
        return out

    def _meta_members(
        self, plan: _Plan, keys: dict[Any, int] | None
    ) -> list[tuple[dict[str, Any], list[Tensor], list[dict[str, Tensor]], Any]]:
        """The members of each meta-step call and where their z are in the block sums (None: the one scalar;
        a slice; or a tuple of rows), groups with equal :data:`~hf_metaoptimize.spec.BLOCK_KEYS` merged."""
        groups = self._all_groups
        gran = groups[0]["granularity"]
        items: list[tuple[dict[str, Any], list[Tensor], list[int] | None]] = []
        if gran == "tensor":
            start = 0
            for _, group, plist in plan.active:
                items.append((group, plist, list(range(start, start + len(plist)))))
                start += len(plist)
        elif gran == "scalar":
            # a group whose params all stepped: its active list is its params (the same order), all with state
            whole = {id(g): plist for _, g, plist in plan.active if len(plist) == len(g["params"])}
            for g in groups:
                ml = whole.get(id(g)) or [p for p in g["params"] if self.state.get(p)]
                if ml:
                    items.append((g, ml, None))
        else:  # block: members of active blocks, their z gathered from the block sums
            for gi, group in enumerate(groups):
                ml, rows = [], []
                for p in group["params"]:
                    k = self._block_key(gi, group, p)
                    if k in keys and self.state.get(p):
                        ml.append(p)
                        rows.append(keys[k])
                if ml:
                    items.append((group, ml, rows))
        merged: dict[tuple, list[Any]] = {}
        for group, ml, rows in items:
            key = tuple(group[k] for k in BLOCK_KEYS)
            if key not in merged:
                merged[key] = [group, [], []]
            merged[key][1].extend(ml)
            merged[key][2].append(rows)
        out = []
        for group, ml, parts in merged.values():
            if parts[0] is None:
                pick: Any = None
            else:
                rows = [r for part in parts for r in part]
                contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
                pick = slice(rows[0], rows[0] + len(rows)) if contiguous else tuple(rows)
            out.append((group, ml, [self.state[p] for p in ml], pick))
        return out

    def _element_meta_steps(self, active, zelem, okf) -> None:
        """Per-weight meta step (element granularity) on the foreach path; z = h * g are our temporaries."""
        for gi, group, plist in active:
            if self._fused_on(group):
                continue  # the fused kernel has done it, with the base step
            foreach_meta_step_element(self.state, group, plist, zelem[gi], okf, self._views)


def _assemble(
    params: list[Tensor], parts: list[tuple[list[Tensor], Tensor]], index: Callable[[tuple, Any], Tensor]
) -> Tensor:
    """The kernel's meta-gradients, bucket by bucket (`parts`: each bucket's params and their z), as one vector in
    the order of `params` (the order :meth:`MetaOptimize._local_meta_grads` gives), of one dtype and device (the
    widest, on the first param's device, when they differ)."""
    if len(parts) == 1 and len(parts[0][0]) == len(params) and all(map(operator.is_, parts[0][0], params)):
        return parts[0][1]
    kinds = {(z.device, z.dtype) for _, z in parts}
    if len(kinds) > 1:
        wide = torch.float64 if any(dt == torch.float64 for _, dt in kinds) else torch.float32
        home = _local(params[0]).device
        parts = [(ps, z.to(device=home, dtype=wide)) for ps, z in parts]
    pos = {id(p): i for i, p in enumerate(params)}
    z0 = parts[0][1]
    out = torch.empty(len(params), dtype=z0.dtype, device=z0.device)
    for ps, z in parts:
        out.index_copy_(0, index(tuple(pos[id(p)] for p in ps), z.device), z)
    return out


def _refuse_unattached_partitions(opt: MetaOptimize) -> None:
    """Never run silently wrong when stepped group by group on rank-local partitions (DeepSpeed ZeRO): the
    meta-gradients need every block whole (:mod:`hf_metaoptimize.integrations.deepspeed` attaches the
    partitions; it also knows ZeRO-3's marks)."""
    if opt.param_groups is not opt._all_groups:
        from .integrations.deepspeed import UNATTACHED

        raise RuntimeError(UNATTACHED)
    if "deepspeed" in sys.modules:
        from .integrations.deepspeed import refuse_unattached

        refuse_unattached(opt)


# ---------------------------------------------------------------------- the step's layout
class _Plan:
    """What a step derives from its layout, once, and reuses while the layout holds: which params step (those with a
    grad, in param-group order), their state dicts, the merged base-step buckets, the meta steps' members, the
    shard layout of the meta-gradients. A step then costs, per param, its grad and the kernel's input checks; the
    rest is vector math. `sig`: what it was derived from (:meth:`MetaOptimize._layout` compares it at every step);
    new state, a load and edited groups make a new one. Values a step reads from the state (step counts, log step
    sizes, ...) are read from the state dicts at every step, never kept here: an entry replaced in a state dict is
    what the next step uses."""

    def __init__(self, opt: MetaOptimize, sig: tuple, active: list[tuple[int, dict[str, Any], list[Tensor]]]) -> None:
        self.sig = sig
        self.active = active
        self.states = {gi: [opt.state[p] for p in plist] for gi, _, plist in active}
        self.params = [p for _, _, plist in active for p in plist]
        self.flat_states = [st for gi, _, _ in active for st in self.states[gi]]
        # the dtype each group's grads are read in by the foreach path: the trace's (None: all already are)
        self.widen = {}
        for gi, _, plist in active:
            dts = [st["trace"].dtype for st in self.states[gi]]
            self.widen[gi] = None if all(p.dtype == dt for p, dt in zip(plist, dts)) else dts
        self.memo: dict[Any, Any] = {}  # derived once: block layouts, meta members, shard layout, buckets

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()`, computed once per plan."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def grads(self, fused_on: Callable[[dict[str, Any]], bool], raw: bool) -> dict[int, list[Tensor]]:
        """Each group's grads as the math reads them: as they are for the per-tensor kernel (`raw`: it widens a
        low-precision grad as it reads it; no float32 copy, which would cost a write and two reads of 4 bytes per
        weight), in the trace's dtype (a copy for low precision) for the foreach path and DeepSpeed's partitions."""
        out = {}
        for gi, group, plist in self.active:
            gs = [p.grad for p in plist]
            dts = self.widen[gi]
            if dts is not None and not (raw and fused_on(group)):
                gs = [g if g.dtype == dt else g.to(dt) for g, dt in zip(gs, dts)]
            out[gi] = gs
        return out

    def norms(
        self, grads: dict[int, list[Tensor]], buckets: list[_Bucket], cache: dict[Any, Any]
    ) -> tuple[Tensor, dict[int, tuple[Tensor, list[Tensor]]]]:
        """The guard's grad norms of this step's grads, and the flat workspaces they filled on the way, by bucket id
        (:func:`rules.guard_workspace`: the copy the foreach step makes anyway, normed once, handed to that bucket's
        step); the other grads by :func:`rules.grad_norms`, grouped as found once per bucket layout."""
        parts, rest, filled, taken = [], [], {}, set()
        for b in buckets:
            gs = b.grads(grads)
            hit = None if b.fused or b.converted else guard_workspace(cache, gs, taken)
            if hit is None:
                rest.extend(gs)
            else:
                parts.append(hit[0])
                filled[id(b)] = hit[1]
        if rest:
            layout = self.get(("norms", tuple(map(id, buckets))), lambda: norm_layout(rest))
            parts.append(grad_norms(rest, layout))
        return sum_norms(parts), filled

    def complete(
        self, zvec: Tensor | None, norm: Tensor | None, index: Callable[[tuple, Any], Tensor]
    ) -> tuple[Tensor | None, Tensor | None]:
        """The meta-gradients and / or the guard's grad norms (either may be None) completed over ranks, in ONE
        all-reduce where params are sharded (FSDP2; :func:`hf_metaoptimize.distributed.complete_meta_grads`), with
        the shard layout of the params found once. One process and DDP: as they are."""
        layout = self.get("shard", lambda: shard_layout(self.params))
        if layout is None or (zvec is None and norm is None):
            return zvec, norm
        if norm is None:
            return complete_meta_grads(zvec, self.params, index, layout), None
        mask, groups = layout
        if zvec is None:  # the guard's flag alone: a sum over ranks is finite iff every rank's is
            return None, complete_meta_grads(norm.reshape(1), [None], index, ((1,), groups)).reshape(())
        both = torch.cat([zvec, norm.reshape(1).to(device=zvec.device, dtype=zvec.dtype)])
        both = complete_meta_grads(both, self.params, index, ((*mask, 1), groups))
        return both[:-1], both[-1]

    def base_buckets(self, fused_on: Callable[[dict[str, Any]], bool]) -> list[_Bucket]:
        """The base step's buckets: active groups whose step hyper-parameters are equal merged (:func:`_merge_key`),
        then split by (device, dtype). The merge is decided at every step from the groups' values (a scheduler may
        change one group's lr alone); the buckets of each decision are made once."""
        keys = tuple(_merge_key(group, fused_on) for _, group, _ in self.active)
        return self.get(("buckets", keys), lambda: _buckets(self, keys, fused_on))


def _merge_key(group: dict[str, Any], fused_on: Callable[[dict[str, Any]], bool]) -> tuple:
    """Groups with equal keys step as one (every value the base step reads, but the weight decay: it goes per
    tensor)."""
    return (fused_on(group), *(("tensor", id(v)) if isinstance(v := group.get(k), Tensor) else v for k in _STEP_KEYS))


class _Bucket:
    """The params of one base-step call: one (merged group, device, dtype), with their states, weight decays, keys
    (their ids: the compiled step's view cache key, stable when a param is a DTensor whose local shard is a new
    tensor at every step) and where their grads are in the step's per-group grad lists."""

    __slots__ = ("group", "params", "states", "kappas", "where", "device", "dtype", "fused", "keys", "converted")

    def __init__(self, group, params, states, kappas, where, device, dtype, fused, converted) -> None:
        self.group, self.params, self.states, self.kappas = group, params, states, kappas
        self.where, self.device, self.dtype, self.fused = where, device, dtype, fused
        self.keys = [id(p) for p in params]
        self.converted = converted  # the foreach path reads float32 copies of these grads (low precision)

    def grads(self, grads: dict[int, list[Tensor]]) -> list[Tensor]:
        """This bucket's grads, picked from the step's per-group lists."""
        if len(self.where) == 1 and self.where[0][1] is None:
            return grads[self.where[0][0]]
        return [grads[gi][i] for gi, idx in self.where for i in idx]

    def step(self, state, grads, okf, sanitize, views, zsink, workspace=None) -> None:
        """Base update with alpha = lr * exp(log_step), w <- w + dw, and the trace (Algorithm 3 steps 2-3) on this
        bucket (:func:`_base_group_step`). `workspace`: the foreach workspace the guard filled with its grads."""
        _base_group_step(
            state,
            self.group,
            self.params,
            self.grads(grads),
            okf,
            sanitize,
            self.fused,
            None,
            self.kappas,
            views,
            zsink,
            self,
            workspace,
        )


def _buckets(plan: _Plan, keys: tuple, fused_on: Callable[[dict[str, Any]], bool]) -> list[_Bucket]:
    """The base step's buckets for one merge decision (`keys`, one per active group): the active groups with equal
    keys merged (the decay / no-decay split of every Trainer run becomes one list, the weight decay per tensor),
    then split by (device, dtype), in order of first appearance."""
    merged: dict[tuple, list[int]] = {}
    for n, key in enumerate(keys):
        merged.setdefault(key, []).append(n)
    out = []
    for members in merged.values():
        group = plan.active[members[0]][1]
        split: dict[tuple, list[tuple[int, int]]] = {}  # (device, dtype) -> (active index, position) pairs
        for n in members:
            gi, _, plist = plan.active[n]
            for i, p in enumerate(plist):
                split.setdefault((p.device, p.dtype), []).append((n, i))
        for (device, dtype), pos in split.items():
            params = [plan.active[n][2][i] for n, i in pos]
            states = [plan.states[plan.active[n][0]][i] for n, i in pos]
            kappas = [plan.active[n][1]["weight_decay"] for n, _ in pos]
            where: list[tuple[int, list[int] | None]] = []
            for n in members:
                gi, plist = plan.active[n][0], plan.active[n][2]
                idx = [i for m, i in pos if m == n]
                if idx:
                    where.append((gi, None if len(idx) == len(plist) and len(split) == 1 else idx))
            if len(where) > 1 or where[0][1] is not None:  # a general pick: no whole-list shortcut
                where = [(gi, list(range(len(plan.states[gi]))) if idx is None else idx) for gi, idx in where]
            converted = any(plan.widen[gi] is not None for gi, _ in where)
            out.append(_Bucket(group, params, states, kappas, where, device, dtype, fused_on(group), converted))
    return out


def _grads_of(groups: list[dict[str, Any]]) -> list[Tensor]:
    """The grads the params of `groups` hold, in param order (params without one left out)."""
    return [p.grad for group in groups for p in group["params"] if p.grad is not None]


def _grad_signature(grads: list[Tensor]) -> tuple:
    """Which grads these are and how often each was changed in place (its version counter): equal between
    :meth:`MetaOptimize.note_grad_norm` and the step iff no grad was replaced or changed (by a torch op that
    counts) in between."""
    return tuple((id(g), g._version) for g in grads)


# ---------------------------------------------------------------------- the math
def _finite_guard(norm: Tensor | None, unit: Tensor) -> tuple[Tensor | None, Tensor]:
    """(ok, okf): the step's on-device finite flag from the grads' norms (:func:`rules.grad_norms`; None without the
    guard) and the same as a 0/1 float of `unit`'s dtype and device (a skipped step multiplies every coefficient
    that moves a param or a state tensor by it). Algorithm 3 is then skipped as a whole, without a host sync."""
    if norm is None:
        return None, unit
    ok = torch.isfinite(norm).to(unit.device)
    return ok, ok.to(unit.dtype)


def _count_skipped(states: list[dict[str, Tensor]], ok: Tensor | None, okf: Tensor) -> None:
    """``nonfinite_steps += 1`` in the state of every param of a skipped step (0 added otherwise; nothing without the
    guard)."""
    if ok is not None:
        add0_([st["nonfinite_steps"] for st in states], 1.0 - okf.to(torch.float32))


# Group hyper-parameters the base step (and, for element granularity, the in-place meta step) reads, but the
# weight decay: both paths take it per tensor.
_STEP_KEYS = (
    "lr",
    "betas",
    "eps",
    "gamma",
    "foreach",
    "fused",
    "meta_lr",
    "meta_asymmetry",
    "total_steps",
    "cooldown",
    "meta_betas",
    "meta_eps",
    "log_step_bounds",
)


def _base_group_step(
    state: dict[Tensor, dict[str, Tensor]],
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    okf: Tensor,
    sanitize: bool,
    fused: bool,
    own: bool | None = None,
    kappas: list[float] | None = None,
    views: dict[Any, Any] | None = None,
    zsink: list[tuple[list[Tensor], Tensor]] | None = None,
    bucket: _Bucket | None = None,
    workspace: tuple[Tensor, list[Tensor]] | None = None,
) -> None:
    """Base update with alpha = lr * exp(log_step), w <- w + dw, and the trace (Algorithm 3 steps 2-3).

    `okf` is 1.0 for a normal step and 0.0 for a skipped (non-finite) one; every coefficient that moves a
    param or a state tensor is multiplied by it, and (when `sanitize`) the math reads a zeroed copy of the
    grads, so a skipped step changes nothing bit for bit. ``p.grad`` itself is never written.

    `zsink` (the per-tensor kernel only): each bucket's params and their meta-gradients ``<h_p, g_p>`` from the OLD
    traces, computed by the kernel while it reads them (Algorithm 3 step 1, done here instead of before the step).
    `bucket`: the step's layout of these params (:class:`_Bucket`: one device and dtype, their states), else
    derived here. `workspace`: the foreach workspace the guard's norms filled with these grads this step.
    """
    if bucket is not None:
        runs = [(bucket.device, bucket.dtype, params, grads, kappas, bucket.states, bucket.keys)]
    else:
        split: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            split.setdefault((p.device, p.dtype), []).append(i)
        runs = []
        for (device, dtype), idx in split.items():
            decay = None if kappas is None else [kappas[i] for i in idx]
            runs.append((device, dtype, [params[i] for i in idx], [grads[i] for i in idx], decay, None, None))
    for device, dtype, ps, gs, decay, sts, keys in runs:
        if fused:  # the per-tensor kernel: compiled, or eagerly for foreach=False
            from ._fused import bucket_step

            dots, okd = zsink is not None, okf.to(device)
            z = bucket_step(state, group, ps, gs, okd, dtype, sanitize, views, decay, dots, sts, keys)
            if zsink is not None:
                zsink.append((ps, z))
            continue
        if zsink is not None:
            raise RuntimeError("the foreach path computes the meta-gradients before the step")
        foreach_base_step(state, group, ps, gs, okf.to(device), dtype, sanitize, own, decay, views, workspace)


# ---------------------------------------------------------------------- checkpoint precision
_RESUME_HELP = (
    "Either resume with the checkpoint's settings ({saved}; with the Trainer: the same --optim and --optim_args "
    "as the run that saved it), or start the optimizer fresh (do not load its state; with the Trainer: start a new "
    "run from the saved model weights instead of --resume_from_checkpoint)."
)


def _settings(group: dict[str, Any]) -> str:
    return ", ".join(f"{k}={group.get(k)!r}" for k in GLOBAL_KEYS)


def _check_checkpoint(optimizer: MetaOptimize, state_dict: dict[str, Any]) -> dict[str, Any]:
    """load_state_dict pre-hook: refuse a foreign or mismatched checkpoint, let the new arguments win where they
    may (:data:`hf_metaoptimize.spec.ARGUMENT_KEYS`), and remember the full-precision state (see
    :func:`_restore_wide_state`). Returns the state dict torch then loads (the caller's dict is not modified)."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or not isinstance(state_dict.get("state"), dict):
        raise ValueError(
            "MetaOptimize.load_state_dict expects what MetaOptimize.state_dict() returns (a dict with 'state' and "
            f"'param_groups'); got a {type(state_dict).__name__} with keys {sorted(map(str, state_dict))}"
        )
    _refuse_foreign(state_dict)
    current = optimizer.param_groups
    if saved and current:
        for key in GLOBAL_KEYS:
            if saved[0].get(key) != current[0][key]:
                raise ValueError(
                    f"MetaOptimize.load_state_dict: the checkpoint was saved with {key}={saved[0].get(key)!r}, this "
                    f"optimizer has {key}={current[0][key]!r}. Its state (trace, log step sizes, meta state) "
                    "belongs to the algorithm that saved it and would silently keep running it. "
                    + _RESUME_HELP.format(saved=_settings(saved[0]))
                )
    if len(saved) != len(current):
        raise ValueError(
            f"MetaOptimize.load_state_dict: the checkpoint has {len(saved)} param group(s), this optimizer has "
            f"{len(current)}: the block layout differs (with the Trainer, granularity=layer makes one group per layer "
            "and scalar/tensor/element the Trainer's two decay groups). "
            + _RESUME_HELP.format(saved=_settings(saved[0]) if saved else "")
        )
    for gi, (sg, cg) in enumerate(zip(saved, current)):
        for key in GLOBAL_KEYS:
            if sg.get(key) != cg[key]:
                raise ValueError(
                    f"MetaOptimize.load_state_dict: param group {gi} of the checkpoint has {key}={sg.get(key)!r}, "
                    f"this optimizer has {key}={cg[key]!r}. " + _RESUME_HELP.format(saved=_settings(sg))
                )
        if len(sg["params"]) != len(cg["params"]):
            raise ValueError(
                f"MetaOptimize.load_state_dict: param group {gi} of the checkpoint has {len(sg['params'])} "
                f"parameter(s), this optimizer's has {len(cg['params'])}: not the same model or param groups. "
                + _RESUME_HELP.format(saved=_settings(sg))
            )
        if cg["granularity"] == "block" and sg.get("block") != cg.get("block"):
            raise ValueError(
                f"MetaOptimize.load_state_dict: param group {gi} of the checkpoint belongs to block "
                f"{sg.get('block')!r}, this optimizer's to block {cg.get('block')!r}: the block layout differs. "
                + _RESUME_HELP.format(saved=_settings(sg))
            )
    groups = []
    for sg, cg in zip(saved, current):
        group = dict(sg)
        for key in ARGUMENT_KEYS:  # may change on resume: the new optimizer's value wins
            if key in cg:
                group[key] = cg[key]
        if "initial_lr" not in sg:  # no scheduler drove lr: it is an argument like the others
            group["lr"] = cg["lr"]
        groups.append(group)
    state = _fill_block_steps(state_dict["state"])
    state_dict = {**state_dict, "state": state}
    _stash_wide_state(optimizer, state_dict)
    return {**state_dict, "param_groups": groups}


def _fill_block_steps(state: dict[Any, Any]) -> dict[Any, Any]:
    """A checkpoint from before the cooldown (version 0.1: no ``block_step``) gets each param's own ``step``: the
    block's step count wherever every member of a block stepped together, the usual case."""
    if all(not isinstance(st, dict) or "block_step" in st or "step" not in st for st in state.values()):
        return state
    out = {}
    for pid, st in state.items():
        if isinstance(st, dict) and "step" in st and "block_step" not in st:
            st = {**st, "block_step": torch.as_tensor(st["step"], dtype=torch.float32).clone()}
        out[pid] = st
    return out


def _refuse_foreign(state_dict: dict[str, Any]) -> None:
    """A state dict saved by another optimizer (e.g. torch.optim.AdamW) loads into torch's machinery and only fails
    at the first step, far from the cause: name what it is instead."""
    groups = state_dict["param_groups"]
    missing = [k for k in GLOBAL_KEYS if any(k not in g for g in groups)]
    keys = sorted({str(k) for st in state_dict["state"].values() if isinstance(st, dict) for k in st})
    no_trace = bool(keys) and "trace" not in keys
    if not missing and not no_trace:
        return
    kind = "another optimizer"
    if keys and set(keys) <= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}:
        kind = "an Adam / AdamW-style optimizer (torch.optim.AdamW, --optim adamw_torch*)"
    elif keys and set(keys) <= {"step", "momentum_buffer"}:
        kind = "SGD"
    what = f"param groups without {missing}" if missing else "per-parameter state without a 'trace'"
    raise ValueError(
        f"MetaOptimize.load_state_dict: this state dict was saved by {kind}, not by MetaOptimize ({what}; state "
        f"keys {keys or 'none'}). Its state cannot continue a MetaOptimize run. Start the optimizer fresh (load "
        "the model weights only; with the Trainer: start a new run from the checkpoint's model instead of "
        "--resume_from_checkpoint), or resume with the optimizer that saved it."
    )


def _stash_wide_state(optimizer: MetaOptimize, state_dict: dict[str, Any]) -> None:
    """Part of the load_state_dict pre-hook: remember the full-precision trace / log_step / meta state / counters."""
    stash: dict[int, dict[str, Tensor]] = {}
    for pid, st in state_dict.get("state", {}).items():
        if isinstance(st, dict):
            wide = {k: v for k, v in st.items() if k in _WIDE_KEYS and isinstance(v, Tensor)}
            if wide:
                stash[pid] = wide
    optimizer._wide_stash = stash
    optimizer._wide_stash_ids = [g["params"] for g in state_dict.get("param_groups", [])]


def _copy_packed_state(optimizer: MetaOptimize, state_dict: dict[str, Any]) -> dict[str, Any]:
    """state_dict post-hook: the packed 0-d state (:meth:`MetaOptimize._pack_0d`) goes out as copies, plain 0-d
    tensors of their own, so a checkpoint writer never sees (or saves) the vector behind them."""

    def view0(v: Any) -> bool:
        return isinstance(v, Tensor) and v.dim() == 0 and v._base is not None

    state = {}
    for pid, st in state_dict["state"].items():
        if isinstance(st, dict) and any(view0(v) for v in st.values()):
            st = {k: v.clone() if view0(v) else v for k, v in st.items()}
        state[pid] = st
    return {**state_dict, "state": state}


def _restore_wide_state(optimizer: MetaOptimize) -> None:
    """load_state_dict post-hook: undo torch's cast of our float32 state to the param dtype."""
    stash = getattr(optimizer, "_wide_stash", {})
    ids = getattr(optimizer, "_wide_stash_ids", [])
    for saved_ids, group in zip(ids, optimizer.param_groups):
        for pid, p in zip(saved_ids, group["params"]):
            for k, v in stash.get(pid, {}).items():
                dt = torch.float32 if k in _COUNTER_KEYS else wide_dtype(p.dtype)
                optimizer.state[p][k] = v.detach().to(device=p.device, dtype=dt, copy=True)
    optimizer._wide_stash, optimizer._wide_stash_ids = {}, []
    counts = [st["block_step"] for st in optimizer.state.values() if isinstance(st, dict) and "block_step" in st]
    optimizer._calls = int(torch.cat([c.reshape(-1).cpu() for c in counts]).max()) if counts else 0  # at load
    optimizer._index_cache = {}
    optimizer._views = {}  # views of the replaced state would keep it alive until the next step
    optimizer._pack_dirty = True
    optimizer._all_groups = optimizer.param_groups  # load_state_dict installs a new list
    optimizer._check_groups(force=True)  # loaded groups are validated now, not at the first step

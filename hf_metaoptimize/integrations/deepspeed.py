"""DeepSpeed ZeRO support: exact meta-gradients over flat partitions (every granularity), and config checks.

ZeRO hands a client optimizer one flat, rank-local fp32 partition per param group (stage 1/2, and DeepSpeed's
bf16 optimizer) or per sub-group (stage 3) and calls ``step()`` once per partition. A meta-gradient is a sum
over a whole block (scalar: every weight; block: a param group; tensor: one tensor) on every rank, so after
``deepspeed.initialize`` the optimizer must be told which partitions exist, which tensor fragments each holds,
and over which process group they are split:

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=MetaOptimize(...), config=cfg)
    hf_metaoptimize.integrations.deepspeed.attach(engine)

or, in one call, ``engine, optimizer, _, _ = hf_metaoptimize.integrations.deepspeed.initialize(...)`` with
``deepspeed.initialize``'s arguments. The Trainer integration attaches by itself. An optimizer stepped on
partitions without it raises instead of computing rank-local step sizes.

Why the optimizer does not attach itself: the data-parallel group and the layout of the partitions are known
only to DeepSpeed's ZeRO wrapper, and under ZeRO-1/2 nothing the optimizer holds points back to it (DeepSpeed
sets a back-reference on the params under ZeRO-3 and CPU offload only). Guessing the world group instead would
be silently wrong under model or pipeline parallelism.

This module is the ZeRO reduction strategy (:class:`ZeroPartitions`); the one-process / DDP / FSDP2
reductions live in :mod:`hf_metaoptimize.distributed`. It relies on DeepSpeed internals
(``single_partition_of_fp32_groups``, ``bit16_groups`` and their ``_hp_mapping`` fragment addresses,
``fp32_partitioned_groups_flat``, ``fp16_groups``, ``sub_group_to_group_id``, ``dp_process_group``);
:data:`SUPPORTED` names the versions it was checked with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import reduce_partial_sums
from ..optimizer import MetaOptimize, _base_group_step, _count_skipped, _finite_guard, _Plan
from ..rules import grad_norms, meta_step_shared
from .deepspeed_config import check_config

__all__ = ["attach", "initialize", "check_config", "ZeroPartitions", "SUPPORTED"]


#: DeepSpeed versions whose ZeRO internals this module was verified against (major, minor).
SUPPORTED = ((0, 16), (0, 19))

# Per-param state that is one number per tensor under granularity="tensor": a vector over the partition's
# tensor fragments (every other tensor state is shaped like the partition).
_PER_TENSOR_KEYS = ("step", "log_step", "meta_exp_avg", "meta_exp_avg_sq", "meta_step", "block_step")


def _version() -> tuple[int, int]:
    import deepspeed

    major, minor = (int(x) for x in deepspeed.__version__.split(".")[:2])
    return major, minor


def _find(obj: Any) -> tuple[Any, MetaOptimize]:
    """Walk engine / accelerate wrapper / ZeRO optimizer down to (zero_optimizer, MetaOptimize)."""
    chain = _walk(obj)
    for parent, node in zip([None, *chain], chain):
        if isinstance(node, MetaOptimize):
            return parent, node
    raise ValueError(
        f"attach() expects a DeepSpeed engine (or its optimizer) built with a MetaOptimize client optimizer; "
        f"found no MetaOptimize inside {type(obj).__name__}"
    )


class _Fragments:
    """The tensors of one flat partition: ``n`` tensors in its group (or sub-group), on every rank alike; this
    rank's partition holds the pieces ``index[k]`` (which tensor), ``start[k]``, ``numel[k]`` (where)."""

    def __init__(self, n: int, pieces: list[tuple[int, int, int]], size: int) -> None:
        pieces = sorted(pieces, key=lambda x: x[1])
        end = 0
        for i, start, numel in pieces:
            if not 0 <= i < n or start < end or numel <= 0:
                raise RuntimeError(f"MetaOptimize: inconsistent ZeRO fragment map {pieces} for {n} tensors")
            end = start + numel
        if end > size:
            raise RuntimeError(f"MetaOptimize: ZeRO fragments end at {end}, past the partition's {size} elements")
        self.n = n
        self.index = tuple(i for i, _, _ in pieces)
        self.start = tuple(s for _, s, _ in pieces)
        self.numel = tuple(m for _, _, m in pieces)


def _hp_fragments(lp_params: list[Tensor], flat: Tensor) -> _Fragments:
    """ZeRO-1/2 and the bf16 optimizer: DeepSpeed's own map of each low-precision param to its piece of this
    rank's fp32 partition (``param._hp_mapping``, None where the param has no piece here)."""
    pieces = []
    for i, lp in enumerate(lp_params):
        mapping = getattr(lp, "_hp_mapping", None)
        if mapping is not None:
            addr = mapping.get_hp_fragment_address()
            pieces.append((i, int(addr.start), int(addr.numel)))
    return _Fragments(len(lp_params), pieces, flat.numel())


def _stage3_fragments(params: list[Tensor], flat: Tensor) -> _Fragments:
    """ZeRO-3: a sub-group's flat partition is every param's rank-local partition, in order."""
    pieces, start = [], 0
    for i, p in enumerate(params):
        numel = int(p.partition_numel())
        pieces.append((i, start, numel))
        start += numel
    if start != flat.numel():
        raise RuntimeError(
            f"MetaOptimize: ZeRO-3 sub-group partitions add up to {start} elements, the flat buffer has "
            f"{flat.numel()}; this DeepSpeed version lays partitions out differently than the ones in SUPPORTED"
        )
    return _Fragments(len(params), pieces, flat.numel())


class ZeroPartitions:
    """The meta-gradient reduction over DeepSpeed ZeRO partitions (the optimizer's ``_partitions``).

    ``members`` lists every flat partition this rank will see, in the order ``step()`` is called on them, with
    the index of its param group; ``group`` is the data-parallel process group they are split over;
    ``fragments`` (granularity="tensor") maps each partition to the tensor pieces it holds. Every call of
    :meth:`step` is collective over ``group``: the ranks step the same partition index together.
    """

    def __init__(self, opt: MetaOptimize, members, group, origin: str, fragments: dict[int, _Fragments] | None):
        self.members, self.group, self.origin, self.fragments = members, group, origin, fragments
        gran = opt._all_groups[0]["granularity"]
        if gran == "tensor" and fragments is None:
            raise ValueError(f"granularity='tensor' under {origin}: no tensor fragment map for its partitions")
        self.blocks: dict[Any, list[tuple[int, Tensor]]] = {}
        if gran in ("scalar", "block"):
            for gi, t in members:
                self.blocks.setdefault(opt._block_key(gi, opt._all_groups[gi], t), []).append((gi, t))
        self.last = {id(v[-1][1]): k for k, v in self.blocks.items()}

    def params(self, gi: int) -> list[Tensor]:
        """The partitions of param group `gi` on this rank."""
        return [t for i, t in self.members if i == gi]

    def init_state(self, opt: MetaOptimize, t: Tensor, group: dict[str, Any]) -> None:
        """granularity="tensor": the 0-d per-tensor state becomes one entry per tensor piece of the partition."""
        if group["granularity"] != "tensor":
            return
        n = len(self.fragments[id(t)].index)
        st = opt.state[t]
        for k in _PER_TENSOR_KEYS:
            if k in st:
                st[k] = st[k].reshape(1).expand(n).clone()

    def step(self, opt: MetaOptimize, plan: _Plan, grads: dict[int, list[Tensor]]) -> None:
        """Algorithm 3 on the partitions of this call (collective over the data-parallel group); `plan`: the call's
        layout (``MetaOptimize._layout``)."""
        if opt._all_groups[0]["granularity"] == "tensor":
            for gi, group, plist in plan.active:
                for t, g in zip(plist, grads[gi]):
                    self._tensor_step(opt, group, t, g)
            return
        self._block_step(opt, plan, grads)

    def _block_step(self, opt: MetaOptimize, plan: _Plan, grads: dict[int, list[Tensor]]) -> None:
        """Scalar / block / element granularity. The finiteness flag is agreed over the data-parallel group at
        every call. Scalar / block: each partition records its meta-gradient contribution; the call that steps
        the LAST partition of a block sums the contributions of all of them (all ranks, one all-reduce) and
        applies the block's meta update to every member, so that the next base step of every member uses
        beta_{t+1}, exactly as in Algorithm 3."""
        active = plan.active
        gran = opt._all_groups[0]["granularity"]
        zvec, zelem = opt._local_meta_grads(active, grads, gran != "element", plan.states)
        norm = None
        if opt._all_groups[0]["skip_nonfinite"]:  # the guard, from the grads, agreed over the data-parallel group
            local = grad_norms([g for gs in grads.values() for g in gs]).reshape(1)
            norm = reduce_partial_sums(local, torch.ones_like(local), [self.group]).reshape(())
        ok, okf = _finite_guard(norm, opt._unit(active))
        plist_all = [p for _, _, plist in active for p in plist]
        if gran != "element":
            contrib = zvec if ok is None else torch.where(ok, zvec, torch.zeros_like(zvec))
            for p, z in zip(plist_all, contrib.unbind(0)):
                st = opt.state[p]
                if "meta_grad" not in st:
                    st["meta_grad"] = torch.zeros((), dtype=st["trace"].dtype, device=p.device)
                st["meta_grad"].copy_(z)
        for bucket in plan.base_buckets(opt._fused_on):
            bucket.step(opt.state, grads, okf, ok is not None, None, None)
        if gran == "element":
            opt._element_meta_steps(active, zelem, okf)
        else:
            done = [self.last[id(p)] for p in plist_all if id(p) in self.last]
            if done:
                sums = torch.stack(
                    [
                        torch.stack(
                            [
                                opt.state[t]["meta_grad"].to(zvec.device)
                                for _, t in self.blocks[k]
                                if "meta_grad" in opt.state.get(t, {})
                            ]
                        ).sum()
                        for k in done
                    ]
                )
                sums = reduce_partial_sums(sums, torch.ones_like(sums), [self.group])
                for k, zb in zip(done, sums.unbind(0)):
                    by_group: dict[int, list[Tensor]] = {}
                    for gi, t in self.blocks[k]:
                        if opt.state.get(t):
                            by_group.setdefault(gi, []).append(t)
                    for gi, ml in by_group.items():
                        meta_step_shared(opt.state, opt._all_groups[gi], ml, zb, okf)
        _count_skipped(plan.flat_states, ok, okf)

    def _tensor_step(self, opt: MetaOptimize, group: dict[str, Any], t: Tensor, g: Tensor) -> None:
        """granularity="tensor" on one partition: each tensor piece is stepped as a tensor of its own (views into
        the partition and its state), with the meta-gradient of its WHOLE tensor: the pieces' sums
        ``<h, g>`` are added up per tensor over the ranks (one all-reduce, which also agrees on finiteness), and
        every rank holding a piece of a tensor applies the same meta update to its copy of that tensor's meta
        state."""
        frag, st = self.fragments[id(t)], opt.state[t]
        views = [t.narrow(0, s, n) for s, n in zip(frag.start, frag.numel)]
        gviews = [g.narrow(0, s, n) for s, n in zip(frag.start, frag.numel)]
        pseudo: dict[Tensor, dict[str, Tensor]] = {}
        for k, (v, s, n) in enumerate(zip(views, frag.start, frag.numel)):
            pseudo[v] = {
                key: (val[k] if key in _PER_TENSOR_KEYS else val.narrow(0, s, n))
                for key, val in st.items()
                if key not in ("nonfinite_steps", "meta_grad")
            }
        h = st["trace"]
        dots = [torch.dot(h.narrow(0, s, n), gv) for s, n, gv in zip(frag.start, frag.numel, gviews)]
        zfrag = torch.stack(dots) if dots else torch.zeros(0, dtype=h.dtype, device=h.device)
        idx = opt._cached_index(frag.index, h.device)
        full = torch.zeros(frag.n + 1, dtype=h.dtype, device=h.device)
        full[: frag.n].index_add_(0, idx, zfrag)
        if group["skip_nonfinite"] and gviews:  # the guard's grad norms travel in the same all-reduce
            full[frag.n] = grad_norms(gviews).to(h.dtype)
        full = reduce_partial_sums(full, torch.ones_like(full), [self.group])
        norm = full[frag.n] if group["skip_nonfinite"] else None
        ok, okf = _finite_guard(norm, torch.ones((), dtype=h.dtype, device=h.device))
        z = full[: frag.n].index_select(0, idx)
        if views:
            _base_group_step(pseudo, group, views, gviews, okf, ok is not None, opt._fused_on(group), own=False)
            meta_step_shared(pseudo, group, views, z, okf)
        _count_skipped([opt.state[t]], ok, okf)


def refuse_unattached(opt: MetaOptimize) -> None:
    """Never run silently wrong when stepped on ZeRO-3 partitions without :func:`attach` (ZeRO-1/2 are caught by
    the optimizer itself: they swap its ``param_groups`` around each call)."""
    if any(hasattr(p, "ds_id") for g in opt.param_groups for p in g["params"]):
        raise RuntimeError(UNATTACHED)


UNATTACHED = (
    "MetaOptimize is being stepped one param group / partition at a time on rank-local flat partitions "
    "(DeepSpeed ZeRO). Its meta-gradients need the whole block across groups and ranks: call "
    "hf_metaoptimize.integrations.deepspeed.attach(engine) right after deepspeed.initialize(...), or use "
    "hf_metaoptimize.integrations.deepspeed.initialize(...) in its place (the Trainer integration attaches for you)."
)


def attach(engine_or_optimizer: Any) -> MetaOptimize:
    """Tell the MetaOptimize inside a DeepSpeed engine about its ZeRO partitions. Returns the optimizer.

    Accepts the engine, ``engine.optimizer``, or accelerate's ``DeepSpeedOptimizerWrapper``. Idempotent. Every
    granularity is exact under ZeRO-1/2/3 (equal to one process). Raises RuntimeError for a DeepSpeed version
    whose internals were not verified, ValueError for ZeRO-3 optimizer-state swapping to NVMe.
    """
    zero, opt = _find(engine_or_optimizer)
    name = type(zero).__name__ if zero is not None else ""
    lo, hi = SUPPORTED
    if not lo <= _version() <= hi:
        raise RuntimeError(
            f"hf_metaoptimize.integrations.deepspeed was verified with DeepSpeed {lo[0]}.{lo[1]} to "
            f"{hi[0]}.{hi[1]}; found {'.'.join(map(str, _version()))}. Pin deepspeed in that range."
        )
    tensor = opt._all_groups[0]["granularity"] == "tensor"
    fragments: dict[int, _Fragments] | None = {} if tensor else None
    if name == "DeepSpeedZeroOptimizer":  # ZeRO-1 / ZeRO-2
        flats = zero.single_partition_of_fp32_groups
        members = list(enumerate(flats))
        if tensor:
            fragments = {id(f): _hp_fragments(zero.bit16_groups[i], f) for i, f in members}
        origin = f"DeepSpeed ZeRO-{zero.partition_gradients and 2 or 1}"
    elif name == "DeepSpeedZeroOptimizer_Stage3":
        if getattr(zero, "offload_optimizer", False) and getattr(zero, "swap_optimizer", False):
            raise ValueError("MetaOptimize does not support ZeRO-3 optimizer-state swapping to NVMe")
        flats = zero.fp32_partitioned_groups_flat
        members = [(zero.sub_group_to_group_id[s], flats[s]) for s in range(len(flats))]
        if tensor:
            fragments = {id(flats[s]): _stage3_fragments(zero.fp16_groups[s], flats[s]) for s in range(len(flats))}
        origin = "DeepSpeed ZeRO-3"
    elif name == "BF16_Optimizer":
        flats = zero.fp32_groups_flat_partition
        members = list(enumerate(flats))
        if tensor:
            fragments = {id(f): _hp_fragments(zero.bf16_groups[i], f) for i, f in members}
        origin = "DeepSpeed bf16 optimizer"
    else:
        # No partitioning wrapper (e.g. ZeRO disabled, fp32): the optimizer sees the real params.
        return opt
    opt._partitions = ZeroPartitions(opt, members, zero.dp_process_group, origin, fragments)
    return opt


def initialize(*args: Any, **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` followed by :func:`attach`: the same arguments and return value."""
    import deepspeed

    out = deepspeed.initialize(*args, **kwargs)
    if any(isinstance(o, MetaOptimize) for o in _walk(out[1])):
        attach(out[0])
    return out


def _walk(obj: Any) -> list[Any]:
    """`obj`, its ``.optimizer``, that one's ``.optimizer``, ... (at most 8 deep)."""
    seen = []
    while obj is not None and len(seen) < 8:
        seen.append(obj)
        obj = getattr(obj, "optimizer", None)
    return seen

"""Cross-rank reductions of MetaOptimize for one process, DDP and FSDP2 (DeepSpeed ZeRO partitions: the
strategy in :mod:`hf_metaoptimize.integrations.deepspeed`, which uses :func:`reduce_partial_sums` from here).

MetaOptimize needs cross-tensor sums (the meta-gradient of a block, and the "is this step finite" flag).
When a parameter is sharded (FSDP2 ``fully_shard`` DTensors), every rank holds part of it and the sums
computed from the local shards are partial; they are added up here with ONE batched ``all_reduce`` per
step on the process group of the shard mesh dimension. Replicated parameters (one process, DDP, the
replicate dimension of HSDP) already see the full gradient and are never reduced: a second reduction would
count them ``world_size`` times.

Nothing here imports ``torch.distributed.tensor`` (slow to import); a DTensor can only exist if that module
was imported by whoever built it.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "local_tensor",
    "any_dtensor",
    "shard_group",
    "shard_layout",
    "reduce_partial_sums",
    "complete_meta_grads",
    "shutdown",
]

#: Seconds ``shutdown()`` releases the GIL after destroying the process groups (see its docstring).
DRAIN_SECONDS = 0.2


def _dtensor_type() -> type | None:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


_PLAIN = (Tensor, torch.nn.Parameter)


def local_tensor(t: Tensor) -> Tensor:
    """The rank-local shard of a DTensor (a view sharing storage), the tensor itself otherwise."""
    if type(t) in _PLAIN:  # the common case, without a module lookup
        return t
    dt = _dtensor_type()
    if dt is not None and isinstance(t, dt):
        return t.to_local()
    return t


def any_dtensor(tensors: list[Tensor]) -> bool:
    """Whether any of `tensors` is a DTensor (then the elementwise math must run on local shards)."""
    dt = _dtensor_type()
    return dt is not None and any(isinstance(t, dt) for t in tensors)


def shard_group(p: Tensor) -> Any | None:
    """Process group over which the local shards of `p` add up to the whole tensor; None if not sharded.

    FSDP2 parameters are DTensors with a ``Shard`` placement on one mesh dimension (the other dimension of a
    2-D HSDP mesh, if any, is ``Replicate``: no reduction there).
    """
    dt = _dtensor_type()
    if dt is None or not isinstance(p, dt):
        return None
    dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError(
            f"MetaOptimize: a parameter sharded over {len(dims)} mesh dimensions ({p.placements}) is not "
            "supported; shard parameters over one mesh dimension (FSDP2 / HSDP)"
        )
    return p.device_mesh.get_group(dims[0])


def reduce_partial_sums(vec: Tensor, mask: Tensor, groups: list[Any]) -> Tensor:
    """Sum over ranks the entries of `vec` that come from sharded parameters; keep the others.

    `mask[i]` is 1 where entry i is a rank-local partial sum, 0 where it is already complete; `groups` holds
    the distinct process groups of the sharded entries (they must share one). One collective, no host
    synchronisation.
    """
    if len(groups) != 1:
        raise NotImplementedError(
            "MetaOptimize: parameters sharded over different process groups in one optimizer; use one "
            "device mesh for all parameters of an optimizer"
        )
    import torch.distributed as dist

    mask = mask.to(vec.dtype)
    part = vec * mask
    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=groups[0])
    return part + vec * (1 - mask)


def shard_layout(params: list[Tensor]) -> tuple[tuple[int, ...], list[Any]] | None:
    """Which of `params` are sharded (a 0/1 per param) and their distinct shard process groups; None when none is
    (one process, DDP, or DTensor never imported: no look at every param)."""
    if _dtensor_type() is None:
        return None
    pgroups = [shard_group(p) for p in params]
    if all(g is None for g in pgroups):
        return None
    distinct = list({id(g): g for g in pgroups if g is not None}.values())
    return tuple(int(g is not None) for g in pgroups), distinct


_UNKNOWN = object()


def complete_meta_grads(
    zvec: Tensor, params: list[Tensor], index: Callable[[tuple, Any], Tensor], layout: Any = _UNKNOWN
) -> Tensor:
    """The per-param meta-gradients ``z_p = <h_p, g_p>`` (one entry per param of `params`), complete over ranks.

    One process and DDP: nothing to do (DDP's gradients are already averaged; replicated params are never
    reduced again). FSDP2: the entries of sharded params (DTensors) are rank-local partial sums; one all-reduce
    over their shard group completes them. `index(layout, device)` builds (and caches) the 0/1 mask tensor;
    `layout`: :func:`shard_layout` of `params` where the caller keeps it (else found here).
    DeepSpeed ZeRO partitions are reduced by :class:`hf_metaoptimize.integrations.deepspeed.ZeroPartitions`.
    """
    if layout is _UNKNOWN:
        layout = shard_layout(params)
    if layout is None:
        return zvec
    mask, distinct = layout
    return reduce_partial_sums(zvec, index(mask, zvec.device), distinct)


def shutdown(barrier: bool = True) -> None:
    """End a multi-process run cleanly: barrier, ``destroy_process_group()``, then let gloo's threads finish.

    Why each part (CPU / gloo, measured): left to interpreter exit, an initialised process group aborts a finished
    rank now and then (``terminate called without an active exception``, SIGABRT). The barrier makes every rank
    done with communication before any tears down. The destroy alone is not enough: a backtrace of the abort shows
    a gloo worker thread destroying a completed barrier's work object, which holds weak references to the
    collectives that were in flight when the barrier was issued (c10::intrusive_ptr runs a destructor when the
    last weak reference goes); their tensors are owned by Python, freeing them takes the GIL, and Python 3.11
    ends a thread that asks for the GIL during finalisation with pthread_exit, whose forced unwind through that
    noexcept destructor is the ``std::terminate``. So after the destroy, ``gc.collect()`` drops Python-side
    cycles and a short sleep (:data:`DRAIN_SECONDS`) releases the GIL, so that the worker threads finish that
    destruction (microseconds of work) while the interpreter is still alive.

    ``barrier=False`` skips the barrier (use it when this rank failed: the others may never reach it). A no-op
    when torch.distributed was never imported or no process group is initialised.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()
        time.sleep(DRAIN_SECONDS)

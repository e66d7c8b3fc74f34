"""DeepSpeed ZeRO support: exact block meta-gradients over flat partitions, and config checks.

ZeRO hands a client optimizer one flat, rank-local fp32 partition per param group (stage 1/2) or per
sub-group (stage 3) and calls ``step()`` once per partition. MetaOptimize's block meta-gradient needs the
sum over every partition of the block on every rank, so after ``deepspeed.initialize`` the optimizer must
be told which partitions exist and over which process group they are split:

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=MetaOptimize(...), config=cfg)
    hf_metaoptimize.integrations.deepspeed.attach(engine)

The Trainer integration calls :func:`attach` itself. An optimizer stepped on partitions without it raises
instead of computing rank-local step sizes. ``granularity="tensor"`` is refused under ZeRO (a per-tensor step
size would silently become per-partition); scalar, block and element granularity are exact.

This module relies on DeepSpeed internals (``single_partition_of_fp32_groups``, ``fp32_partitioned_groups_flat``,
``sub_group_to_group_id``, ``dp_process_group``); :data:`SUPPORTED` names the versions it was checked with.
"""

from __future__ import annotations

from typing import Any

from ..optimizer import MetaOptimize
from .deepspeed_config import check_config

__all__ = ["attach", "check_config", "SUPPORTED"]


#: DeepSpeed versions whose ZeRO internals this module was verified against (major, minor).
SUPPORTED = ((0, 16), (0, 19))


def _version() -> tuple[int, int]:
    import deepspeed

    major, minor = (int(x) for x in deepspeed.__version__.split(".")[:2])
    return major, minor


def _find(obj: Any) -> tuple[Any, MetaOptimize]:
    """Walk engine / accelerate wrapper / ZeRO optimizer down to (zero_optimizer, MetaOptimize)."""
    seen = 0
    node, parent = obj, None
    while node is not None and seen < 8:
        if isinstance(node, MetaOptimize):
            return parent, node
        parent, node = node, getattr(node, "optimizer", None)
        seen += 1
    raise ValueError(
        f"attach() expects a DeepSpeed engine (or its optimizer) built with a MetaOptimize client optimizer; "
        f"found no MetaOptimize inside {type(obj).__name__}"
    )


def attach(engine_or_optimizer: Any) -> MetaOptimize:
    """Tell the MetaOptimize inside a DeepSpeed engine about its ZeRO partitions. Returns the optimizer.

    Accepts the engine, ``engine.optimizer``, or accelerate's ``DeepSpeedOptimizerWrapper``. Idempotent.
    Raises ValueError for unsupported combinations (tensor granularity under ZeRO) and RuntimeError for a
    DeepSpeed version whose internals were not verified.
    """
    zero, opt = _find(engine_or_optimizer)
    name = type(zero).__name__ if zero is not None else ""
    lo, hi = SUPPORTED
    if not lo <= _version() <= hi:
        raise RuntimeError(
            f"hf_metaoptimize.integrations.deepspeed was verified with DeepSpeed {lo[0]}.{lo[1]} to "
            f"{hi[0]}.{hi[1]}; found {'.'.join(map(str, _version()))}. Pin deepspeed in that range."
        )
    if name == "DeepSpeedZeroOptimizer":  # ZeRO-1 / ZeRO-2
        members = [(i, t) for i, t in enumerate(zero.single_partition_of_fp32_groups)]
        group = zero.dp_process_group
        origin = f"DeepSpeed ZeRO-{zero.partition_gradients and 2 or 1}"
    elif name == "DeepSpeedZeroOptimizer_Stage3":
        flats = zero.fp32_partitioned_groups_flat
        members = [(zero.sub_group_to_group_id[s], flats[s]) for s in range(len(flats))]
        group = zero.dp_process_group
        origin = "DeepSpeed ZeRO-3"
        if getattr(zero, "offload_optimizer", False) and getattr(zero, "swap_optimizer", False):
            raise ValueError("MetaOptimize does not support ZeRO-3 optimizer-state swapping to NVMe")
    elif name == "BF16_Optimizer":
        members = [(i, t) for i, t in enumerate(zero.fp32_groups_flat_partition)]
        group = zero.dp_process_group
        origin = "DeepSpeed bf16 optimizer"
    else:
        # No partitioning wrapper (e.g. ZeRO disabled, fp32): the optimizer sees the real params.
        return opt
    opt._attach_partitions(members, group, origin)
    return opt

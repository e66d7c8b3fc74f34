"""Host reads of tensor values, seen at the dispatcher: used by the contract tests (every case-table row) and by the
multi-process worker (DDP, FSDP2 DTensors).

A read patched at the Python level (``Tensor.item``, ``__bool__``, ...) misses the reads that C++ makes: torch's
argument parser calls ``item()`` on a 0-d tensor passed where an op takes a Scalar (e.g. the weight of
``torch._foreach_lerp_``). Every such read, from Python or C++, reaches the dispatcher as ``_local_scalar_dense``,
which a ``TorchDispatchMode`` sees; on a GPU each one is a device sync.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostRead(AssertionError):
    pass


class ValueReads(TorchDispatchMode):
    """Inside ``with ValueReads() as r:``, ``r.reads`` lists the aten ops that copied a tensor's value to the host;
    with ``strict=True`` the first one raises :class:`HostRead` instead."""

    OPS = (torch.ops.aten._local_scalar_dense, torch.ops.aten.item, torch.ops.aten.is_nonzero)

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict, self.reads = strict, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.OPS:
            if self.strict:
                raise HostRead(f"host read of a tensor value: {func}")
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

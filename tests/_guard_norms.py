"""Counting the steps that norm the grads for the non-finite guard (``_Plan.norms``): none where a step took a norm
handed over by ``MetaOptimize.note_grad_norm``. Used by the test fixture ``guard_norms`` and the torchrun worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def counting_guard_norms() -> Iterator[list[int]]:
    """Inside the block, ``calls[0]`` counts the guard's norm passes."""
    from hf_metaoptimize import optimizer as mo

    calls = [0]
    norms = mo._Plan.norms

    def counted(self, *a, **k):
        calls[0] += 1
        return norms(self, *a, **k)

    mo._Plan.norms = counted
    try:
        yield calls
    finally:
        mo._Plan.norms = norms

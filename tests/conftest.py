"""Test-session settings that must be in place before hf_metaoptimize is imported."""

import os

import pytest

# The compiled (fused) step in chunks of 2 tensors: the same code path as the default 16, a faster compile.
# tests/test_fused.py::test_fused_production_chunk runs the real chunk size once.
os.environ.setdefault("HF_METAOPTIMIZE_FUSED_CHUNK", "2")


@pytest.fixture
def deepspeed_cpu_ops():
    """The environment for a test's DeepSpeed CPU launches, with DeepSpeed's ops built and no stale build lock
    (tests/_proc.py, ``deepspeed_cpu_launches``, says why)."""
    pytest.importorskip("deepspeed")
    from _proc import deepspeed_cpu_launches

    with deepspeed_cpu_launches() as env:
        yield env


@pytest.fixture
def guard_norms():
    """How many times a step normed the grads for its non-finite guard (``_Plan.norms``), as a one-element list:
    0 more where the step took a noted norm (``MetaOptimize.note_grad_norm``)."""
    from _guard_norms import counting_guard_norms

    with counting_guard_norms() as calls:
        yield calls

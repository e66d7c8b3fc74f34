"""Test-session settings that must be in place before hf_metaoptimize is imported."""

import os

# The compiled (fused) step in chunks of 2 tensors: the same code path as the default 16, a faster compile.
# tests/test_fused.py::test_fused_production_chunk runs the real chunk size once.
os.environ.setdefault("HF_METAOPTIMIZE_FUSED_CHUNK", "2")

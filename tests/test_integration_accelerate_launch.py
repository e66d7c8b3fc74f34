"""The launcher under `accelerate launch --cpu -m hf_metaoptimize.launch script.py ...`."""

from __future__ import annotations

import pytest
from _proc import BIN, SCRIPTS, TINY_CLM_TRAIN, run, tiny_clm_step_size_logs


@pytest.mark.slow
def test_accelerate_launch_cpu(tmp_path):
    out = tmp_path / "out"
    flags = "--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    launch = [BIN / "accelerate", "launch", *flags, "-m", "hf_metaoptimize.launch"]
    proc = run([*launch, SCRIPTS / "tiny_clm.py", "--output_dir", out, *TINY_CLM_TRAIN], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tiny_clm_step_size_logs(out)

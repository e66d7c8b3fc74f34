"""The launcher under torchrun: 2 CPU ranks (gloo, --use_cpu) form one job with --optim metaoptimize_lion."""

from __future__ import annotations

import pytest
from _proc import SCRIPTS, TINY_CLM_TRAIN, tiny_clm_step_size_logs, torchrun


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    out = tmp_path / "out"
    target = ["hf_metaoptimize.launch", SCRIPTS / "tiny_clm.py", "--output_dir", out, *TINY_CLM_TRAIN]
    proc = torchrun(2, target, timeout=300, module=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("optim=metaoptimize_lion lr_scheduler_type=constant") == 2  # both ranks parsed it
    logs = tiny_clm_step_size_logs(out)
    assert logs[-1]["epoch"] == pytest.approx(4 * 2 * 4 / 64)  # 2 ranks x batch 4 per step: one job, not two

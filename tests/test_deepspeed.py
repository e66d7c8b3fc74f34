"""DeepSpeed ZeRO-1/2/3 (2 CPU ranks, gloo): equal to one process, exact resume, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _proc import TORCHRUN, free_port  # noqa: E402

WORKER = Path(__file__).with_name("ds_worker.py")
CASES = [(1, "tensor", False)] + [(s, g, False) for s in (1, 2, 3) for g in ("scalar", "block", "element")]
CASES += [(2, "block", True)]  # fused=True on flat partitions


@pytest.mark.slow
@pytest.mark.parametrize("stage,granularity,fused", CASES)
def test_zero_two_ranks_match_one_process_and_resume(stage, granularity, fused, tmp_path):
    pytest.importorskip("deepspeed")
    cmd = [
        "timeout",
        "280",
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(WORKER),
        "--stage",
        str(stage),
        "--granularity",
        granularity,
        "--out",
        str(tmp_path),
    ]
    cmd += ["--fused"] if fused else []
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=320)
    reports = sorted(tmp_path.glob("rank*.json"))
    assert len(reports) == 2, out.stdout[-3000:] + out.stderr[-3000:]
    errors = [e for r in reports for e in json.loads(r.read_text())["errors"]]
    assert not errors, errors
    assert out.returncode == 0, out.stderr[-3000:]


def test_config_checks_name_the_fix():
    from hf_metaoptimize.integrations.deepspeed import check_config

    check_config({"zero_optimization": {"stage": 2}})
    check_config(
        {
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "zero_force_ds_cpu_optimizer": False,
        }
    )
    with pytest.raises(ValueError, match='"zero_force_ds_cpu_optimizer": false'):
        check_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ValueError, match='Remove the "optimizer" section'):
        check_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}})


def test_unattached_partitioned_stepping_is_refused():
    import torch

    from hf_metaoptimize import MetaOptimize

    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = MetaOptimize([{"params": [a]}, {"params": [b]}], lr=1e-2)
    a.grad = torch.ones(3)
    full = opt.param_groups
    opt.param_groups = [full[0]]  # what ZeRO-1/2 do around each step() call
    with pytest.raises(RuntimeError, match="integrations.deepspeed.attach"):
        opt.step()
    opt.param_groups = full
    opt.step()


def test_shipped_configs_keep_metaoptimize():
    import yaml

    from hf_metaoptimize.integrations.deepspeed import check_config

    root = Path(__file__).resolve().parent.parent / "examples" / "configs"
    stages = {}
    for path in sorted(root.glob("ds_*.json")):
        cfg = json.loads(path.read_text())
        check_config(cfg)  # no "optimizer" section; offload only with zero_force_ds_cpu_optimizer false
        stages[path.stem] = cfg["zero_optimization"]["stage"]
    assert stages == {"ds_zero2": 2, "ds_zero2_offload": 2, "ds_zero3": 3}
    fsdp = yaml.safe_load((root / "accelerate_fsdp2.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2

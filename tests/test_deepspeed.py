"""DeepSpeed ZeRO-1/2/3 (2 CPU ranks, gloo), every granularity: equal to one process, exact resume, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _proc import rank_reports, torchrun  # noqa: E402

WORKER = Path(__file__).with_name("ds_worker.py")
CASES = [(s, g, False) for s in (1, 2, 3) for g in ("scalar", "block", "tensor", "element")]
CASES += [(2, "block", True), (3, "tensor", True)]  # fused=True on flat partitions and on their tensor pieces


@pytest.mark.slow
@pytest.mark.parametrize("stage,granularity,fused", CASES)
def test_zero_two_ranks_match_one_process_and_resume(stage, granularity, fused, tmp_path, deepspeed_cpu_ops):
    args = [WORKER, "--stage", stage, "--granularity", granularity, "--out", tmp_path]
    args += ["--fused"] if fused else []
    rank_reports(tmp_path, torchrun(2, args, timeout=280, env=deepspeed_cpu_ops))


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


def test_a_killed_build_does_not_hang_later_launches():
    """torch's extension lock left by a launch killed mid-build is cleared before the next DeepSpeed launch (it
    would wait on it forever), and the op is there to load."""
    pytest.importorskip("deepspeed")
    from _proc import DS_EXTENSIONS, deepspeed_cpu_build, deepspeed_cpu_launches

    stale = DS_EXTENSIONS / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.touch()
    with deepspeed_cpu_launches() as env:
        assert not stale.exists()
        assert env["TORCH_EXTENSIONS_DIR"] == str(DS_EXTENSIONS)
        if deepspeed_cpu_build() == "built":
            assert list(stale.parent.glob("*.so")), "the build printed 'built' but left no library to load"

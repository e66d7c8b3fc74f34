"""`import hf_metaoptimize` (and the launcher / hook / layer modules) import torch only."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("transformers", "deepspeed", "accelerate", "peft", "datasets", "matplotlib")


def test_import_does_not_pull_the_hf_stack():
    code = (
        "import sys\n"
        "import hf_metaoptimize, hf_metaoptimize.launch, hf_metaoptimize.layers, hf_metaoptimize.plot, "
        "hf_metaoptimize.cli, hf_metaoptimize.integrations.autoregister, hf_metaoptimize.integrations.optim_args, "
        "hf_metaoptimize.integrations.registry, hf_metaoptimize.integrations.stepsizes\n"
        "assert hasattr(hf_metaoptimize, 'MetaOptimize')\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run(["timeout", "120", sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_lazy_names_resolve():
    import hf_metaoptimize

    for name in (
        "register",
        "MetaOptimizeTrainer",
        "MetaOptimizeTrainingArguments",
        "StepSizePlotCallback",
        "layer_param_groups",
        "plot_step_sizes",
    ):
        assert getattr(hf_metaoptimize, name) is not None

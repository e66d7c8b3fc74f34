"""hf_metaoptimize: MetaOptimize (learned step sizes) for PyTorch and the Hugging Face stack.

``import hf_metaoptimize`` only imports torch. The Hugging Face integration (transformers, accelerate,
peft, deepspeed) is imported lazily, on first use of one of its names.
"""

from __future__ import annotations

import importlib
from typing import Any

from .optimizer import MetaOptimize
from .spec import DEFAULTS, PAPER_EXACT

__version__ = "0.2.0"

# name -> module that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "register": "hf_metaoptimize.integrations.transformers",
    "MetaOptimizeTrainer": "hf_metaoptimize.integrations.transformers",
    "MetaOptimizeTrainingArguments": "hf_metaoptimize.integrations.transformers",
    "StepSizePlotCallback": "hf_metaoptimize.integrations.transformers",
    "layer_param_groups": "hf_metaoptimize.layers",
    "plot_step_sizes": "hf_metaoptimize.plot",
}

__all__ = ["MetaOptimize", "DEFAULTS", "PAPER_EXACT", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_metaoptimize' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

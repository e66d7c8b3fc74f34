"""Patch of `transformers.trainer_optimizer`: a handler in the private `_OPTIMIZER_HANDLERS` table (added in
transformers 5.2, version-gated) builds `MetaOptimize` for `--optim metaoptimize*`; `granularity=layer` passes
`layer_param_groups(model)` as params."""

from __future__ import annotations

import sys
from typing import Any

from .optim_args import OPTIM_NAMES
from .patch_training_args import apply_defaults
from .versions import check_transformers_version, transformers_version


def build_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type, dict[str, Any]]:
    """(MetaOptimize, kwargs) for a TrainingArguments object; `params` is included for granularity=layer."""
    from ..optimizer import MetaOptimize
    from .optim_args import optimizer_kwargs

    spec = apply_defaults(args, building=True)  # idempotent; also for arguments built before register()
    kwargs = optimizer_kwargs(args, spec)
    if spec["granularity"] == "layer":
        if model is None:
            raise ValueError("granularity=layer needs the model to find its layers")
        from ..layers import layer_param_groups

        kwargs["params"] = layer_param_groups(model, args.weight_decay)
    return MetaOptimize, kwargs


def _handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    return build_optimizer_cls_and_kwargs(ctx.args, ctx.model)


def _patch_trainer_optimizer(module: Any) -> None:
    check_transformers_version()
    table = getattr(module, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(table, dict) or not hasattr(module, "OptimizerContext"):
        raise RuntimeError(
            f"transformers {transformers_version()} has no transformers.trainer_optimizer._OPTIMIZER_HANDLERS "
            "dispatch table; hf_metaoptimize.register() cannot install --optim metaoptimize. Use "
            "Trainer(..., optimizer_cls_and_kwargs=(hf_metaoptimize.MetaOptimize, {...}))."
        )
    names = sys.modules["transformers.training_args"].OptimizerNames
    for value in OPTIM_NAMES:
        table[names(value)] = _handler

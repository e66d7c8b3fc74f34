"""Patch of `transformers.trainer.Trainer`:

- `Trainer.log` adds the learned step sizes (and the count of skipped non-finite steps) to the logs dict of every
  training logging step BEFORE the Trainer stores it, so they reach trainer_state.json, the console and every
  reporter;
- `Trainer.create_scheduler` applies the schedule part of the defaults rule to a MetaOptimize optimizer that did
  not come from `--optim` (`optimizer_cls_and_kwargs=(MetaOptimize, ...)`), and attaches MetaOptimize to its
  DeepSpeed ZeRO partitions right after `accelerator.prepare` built the engine.
"""

from __future__ import annotations

import functools
from typing import Any

from .patch_training_args import _constant_schedule
from .versions import WRAPPED


def find_metaoptimize(optimizer: Any) -> Any:
    """The MetaOptimize inside accelerate / DeepSpeed wrappers (or None)."""
    from ..optimizer import MetaOptimize

    for _ in range(6):
        if optimizer is None:
            return None
        if isinstance(optimizer, MetaOptimize):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _patch_trainer(module: Any) -> None:
    trainer_cls = module.Trainer
    log = trainer_cls.__dict__["log"]
    if not getattr(log, WRAPPED, False):

        @functools.wraps(log)
        def wrapped_log(self, logs, *a, **kw):
            if "learning_rate" in logs and not any(k.startswith("step_size") for k in logs):
                optimizer = find_metaoptimize(getattr(self, "optimizer", None))
                if optimizer is not None:
                    from .stepsizes import step_size_logs

                    logs.update(step_size_logs(optimizer, self, logs["learning_rate"]))
                    if optimizer.param_groups and optimizer.param_groups[0].get("skip_nonfinite"):
                        logs["skipped_steps"] = optimizer.skipped_steps()  # warns on the first skip and on a stall
            return log(self, logs, *a, **kw)

        setattr(wrapped_log, WRAPPED, True)
        trainer_cls.log = wrapped_log

    create_scheduler = trainer_cls.__dict__["create_scheduler"]
    if not getattr(create_scheduler, WRAPPED, False):

        @functools.wraps(create_scheduler)
        def wrapped_create_scheduler(self, num_training_steps, optimizer=None):
            if getattr(self, "lr_scheduler", None) is None:
                _maybe_constant_schedule(self.args, optimizer if optimizer is not None else self.optimizer)
            if getattr(self, "is_deepspeed_enabled", False):
                # The Trainer calls create_scheduler right after accelerator.prepare() built the DeepSpeed engine
                # (and before it loads a checkpoint): tell MetaOptimize about its ZeRO partitions there.
                _attach_deepspeed(self.optimizer)
            return create_scheduler(self, num_training_steps, optimizer)

        setattr(wrapped_create_scheduler, WRAPPED, True)
        trainer_cls.create_scheduler = wrapped_create_scheduler


def _attach_deepspeed(optimizer: Any) -> None:
    if find_metaoptimize(optimizer) is None or find_metaoptimize(optimizer) is optimizer:
        return  # not ours, or not wrapped by DeepSpeed yet (deepspeed_init also calls create_scheduler)
    from .deepspeed import attach

    attach(optimizer)


def _maybe_constant_schedule(args: Any, optimizer: Any) -> None:
    """`optimizer_cls_and_kwargs=(MetaOptimize, ...)` with another `--optim`: the same schedule rule."""
    if find_metaoptimize(optimizer) is not None:
        _constant_schedule(args)

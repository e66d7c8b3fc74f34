"""Patch of `transformers.trainer.Trainer`:

- `Trainer.log` adds the learned step sizes (and the count of skipped non-finite steps) to the logs dict of every
  training logging step BEFORE the Trainer stores it, so they reach trainer_state.json, the console and every
  reporter;
- `Trainer.create_scheduler` applies the schedule part of the defaults rule to a MetaOptimize optimizer that did
  not come from `--optim` (`optimizer_cls_and_kwargs=(MetaOptimize, ...)`), tells MetaOptimize the run's length
  (`total_steps`, where its cooldown ends) when the schedule is constant and the user did not give one, and
  attaches MetaOptimize to its DeepSpeed ZeRO partitions right after `accelerator.prepare` built the engine.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ..spec import cooldown_steps
from .patch_training_args import _constant_schedule
from .versions import WRAPPED

logger = logging.getLogger("hf_metaoptimize")


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
                target = optimizer if optimizer is not None else self.optimizer
                _maybe_constant_schedule(self.args, target)
                set_run_length(self.args, target, num_training_steps)
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


def set_run_length(args: Any, optimizer: Any, num_training_steps: int) -> None:
    """Give MetaOptimize the run's length (its cooldown ends there) unless the user gave one (`total_steps`) or
    the schedule already anneals (then the scheduler's decay is the cooldown; both together is asked for by
    passing total_steps)."""
    opt = find_metaoptimize(optimizer)
    if opt is None or not num_training_steps or num_training_steps < 1:
        return
    groups = opt._all_groups
    if any(g["total_steps"] is not None for g in groups) or not any(g["cooldown"] for g in groups):
        return
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if schedule not in ("constant", "constant_with_warmup"):
        logger.info(
            "MetaOptimize: lr_scheduler_type %r already decays the step size, so MetaOptimize's own cooldown is "
            "off; pass --optim_args total_steps=N to have both.",
            schedule,
        )
        return
    for g in groups:
        g["total_steps"] = int(num_training_steps)
    logger.info(
        "MetaOptimize: cooldown over the last %d of %d steps (cooldown=%g of the run)",
        cooldown_steps(groups[0]),
        num_training_steps,
        groups[0]["cooldown"],
    )


def _maybe_constant_schedule(args: Any, optimizer: Any) -> None:
    """`optimizer_cls_and_kwargs=(MetaOptimize, ...)` with another `--optim`: the same schedule rule."""
    if find_metaoptimize(optimizer) is not None:
        _constant_schedule(args)

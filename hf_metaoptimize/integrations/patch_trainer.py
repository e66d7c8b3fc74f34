"""Patch of `transformers.trainer.Trainer`:

- `Trainer.log` adds the learned step sizes (and the count of skipped non-finite steps) to the logs dict of every
  training logging step BEFORE the Trainer stores it, so they reach trainer_state.json, the console and every
  reporter;
- `Trainer._clip_grad_norm` (where this transformers has it) hands the norm it computed to MetaOptimize
  (`MetaOptimize.note_grad_norm`), so that its non-finite guard does not read every grad a second time; only
  where that norm covers every grad of the optimizer and the guard is on, never under DeepSpeed;
- `Trainer.create_scheduler` applies the schedule part of the defaults rule to a MetaOptimize optimizer that did
  not come from `--optim` (`optimizer_cls_and_kwargs=(MetaOptimize, ...)`), tells MetaOptimize the run's length
  (`total_steps`, where its cooldown ends) when the schedule is constant and the user did not give one, and
  attaches MetaOptimize to its DeepSpeed ZeRO partitions right after `accelerator.prepare` built the engine.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from ..distributed import any_dtensor
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

    clip = trainer_cls.__dict__.get("_clip_grad_norm")
    if clip is not None and not getattr(clip, WRAPPED, False):

        @functools.wraps(clip)
        def wrapped_clip(self, model, *a, **kw):
            norm = clip(self, model, *a, **kw)
            _note_clip_norm(self, model, norm)
            return norm

        setattr(wrapped_clip, WRAPPED, True)
        trainer_cls._clip_grad_norm = wrapped_clip

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


def _note_clip_norm(trainer: Any, model: Any, norm: Any) -> None:
    """After the Trainer's clipping: its pre-clip norm to MetaOptimize's guard (see the module docstring). The
    coverage check (every param of the optimizer is one of `model`'s) is made once per (model, optimizer)."""
    if norm is None or getattr(trainer, "is_deepspeed_enabled", False):
        return
    opt = find_metaoptimize(getattr(trainer, "optimizer", None))
    if opt is None or opt._partitions is not None or not opt._all_groups[0]["skip_nonfinite"]:
        return
    key = (id(model), id(opt), sum(len(g["params"]) for g in opt.param_groups))
    seen = trainer.__dict__.get("_metaoptimize_clip_covers")
    if seen is None or seen[0] != key:
        mine = {id(p) for p in model.parameters()}
        covers = all(id(p) in mine for g in opt.param_groups for p in g["params"])
        trainer.__dict__["_metaoptimize_clip_covers"] = seen = (key, covers)
        if not covers:
            logger.info(
                "MetaOptimize: some of its params are not the model's, so the Trainer's clipping norm does not "
                "cover their grads; its guard reads the grads itself."
            )
    if not seen[1]:
        return
    if not isinstance(norm, torch.Tensor):
        norm = float(norm)
    elif any_dtensor([norm]):
        norm = norm.full_tensor()  # every rank clips, so every rank is here: a collective is safe
    opt.note_grad_norm(norm)


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

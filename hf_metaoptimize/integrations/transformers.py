"""Hugging Face Trainer integration: `register()`, `MetaOptimizeTrainingArguments`, `MetaOptimizeTrainer`,
`StepSizePlotCallback`.

Importing this module imports transformers and calls `register()` (see `registry.py` for what that changes), so
that `--optim metaoptimize` parses and the step sizes are logged in any Trainer of the process.

Routes (docs/trainer.md):
- unmodified scripts: `python -m hf_metaoptimize.launch train.py --optim metaoptimize ...`;
- own scripts: `hf_metaoptimize.register()` then `TrainingArguments(optim="metaoptimize", ...)`;
  or `MetaOptimizeTrainingArguments` (typed `--metaoptimize_*` flags) with `MetaOptimizeTrainer`;
  or `Trainer(..., optimizer_cls_and_kwargs=(MetaOptimize, {...}))` after `register()`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from .optim_args import BASES, GRANULARITIES, METAS, OPTIM_ARGS
from .registry import (
    build_optimizer_cls_and_kwargs,
    find_metaoptimize,
    register,
)
from .stepsizes import step_size_logs

__all__ = [
    "MetaOptimizeTrainer",
    "MetaOptimizeTrainingArguments",
    "StepSizePlotCallback",
    "load_training_args",
    "register",
    "step_size_logs",
]

logger = logging.getLogger("hf_metaoptimize")

register()


def _default(key: str) -> Any:
    """The typed flag's default: the --optim_args schema's, which reads hf_metaoptimize.spec.DEFAULTS."""
    return OPTIM_ARGS[key].default


def _help(key: str) -> str:
    return f"MetaOptimize {OPTIM_ARGS[key].help} (same as --optim_args {key}=...)"


@dataclass
class MetaOptimizeTrainingArguments(TrainingArguments):
    """TrainingArguments with `--optim metaoptimize` as the default and typed `--metaoptimize_*` flags.

    The typed flags are defaults for the `--optim_args` keys of the same name; giving one key both ways with
    different values is an error. At the Trainer's default `--lr_scheduler_type linear` a MetaOptimize run uses a
    constant schedule (with warmup when `--warmup_steps` > 0): the learned step size is the schedule.
    """

    optim: OptimizerNames | str = field(
        default="metaoptimize",
        metadata={
            "help": "The optimizer. metaoptimize: AdamW base + Lion meta (the paper's pair) at the shipped rule; "
            "metaoptimize_lion: Lion base; metaoptimize_paper: the paper's Algorithm 3 exactly. Any other "
            "TrainingArguments optimizer name works as usual."
        },
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="linear",
        metadata={
            "help": "LR schedule. For MetaOptimize the Trainer's default 'linear' means constant "
            "(constant_with_warmup with --warmup_steps): the learned step size is the schedule; any other schedule "
            "multiplies the learned step size ('polynomial' for a linear decay on top of it)."
        },
    )
    adam_beta2: float = field(
        default=0.999,
        metadata={
            "help": "AdamW's beta2, Lion's rho, RMSProp's lambda. At the AdamW default 0.999 the Lion and RMSProp "
            "bases of MetaOptimize use their own 0.99."
        },
    )
    metaoptimize_base: Literal[BASES] | None = field(
        default=None, metadata={"help": _help("base") + "; default: from --optim"}
    )
    metaoptimize_meta: Literal[METAS] = field(default=_default("meta"), metadata={"help": _help("meta")})
    metaoptimize_granularity: Literal[GRANULARITIES] = field(
        default=_default("granularity"), metadata={"help": _help("granularity")}
    )
    metaoptimize_meta_lr: float = field(default=_default("meta_lr"), metadata={"help": _help("meta_lr")})
    metaoptimize_meta_asymmetry: float = field(
        default=_default("meta_asymmetry"), metadata={"help": _help("meta_asymmetry")}
    )
    metaoptimize_init_multiplier: float = field(
        default=_default("init_multiplier"), metadata={"help": _help("init_multiplier")}
    )
    metaoptimize_cooldown: float = field(default=_default("cooldown"), metadata={"help": _help("cooldown")})
    metaoptimize_total_steps: int | None = field(default=None, metadata={"help": _help("total_steps")})
    metaoptimize_gamma: float = field(default=_default("gamma"), metadata={"help": _help("gamma")})
    metaoptimize_meta_beta1: float | None = field(default=None, metadata={"help": _help("meta_beta1")})
    metaoptimize_meta_beta2: float | None = field(default=None, metadata={"help": _help("meta_beta2")})
    metaoptimize_meta_eps: float | None = field(default=None, metadata={"help": _help("meta_eps")})
    metaoptimize_log_step_min: float = field(default=_default("log_step_min"), metadata={"help": _help("log_step_min")})
    metaoptimize_log_step_max: float = field(default=_default("log_step_max"), metadata={"help": _help("log_step_max")})
    metaoptimize_skip_nonfinite: bool = field(
        default=_default("skip_nonfinite"), metadata={"help": _help("skip_nonfinite")}
    )
    metaoptimize_fused: bool | None = field(default=None, metadata={"help": _help("fused")})
    metaoptimize_plot: bool = field(
        default=True,
        metadata={"help": "MetaOptimizeTrainer writes OUTPUT_DIR/step_sizes.png at the end of training."},
    )

    def __post_init__(self):
        register()
        super().__post_init__()


class StepSizePlotCallback(TrainerCallback):
    """At the end of training, write a PNG of the step sizes per block beside the loss curve.

    Args:
        filename: file name inside `output_dir` (default `step_sizes.png`).
        output_dir: where to write (default: `args.output_dir`).
        print_summary: also print the final step sizes to stdout.
    """

    def __init__(
        self, filename: str = "step_sizes.png", output_dir: str | os.PathLike | None = None, print_summary: bool = False
    ):
        self.filename = filename
        self.output_dir = output_dir
        self.print_summary = print_summary
        self.path: Path | None = None

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if not any(k.startswith("step_size") for entry in state.log_history for k in entry):
            logger.info("StepSizePlotCallback: no step sizes in the log history (not a MetaOptimize run?).")
            return
        from ..plot import plot_step_sizes, summarize

        out = Path(self.output_dir or args.output_dir) / self.filename
        self.path = plot_step_sizes(state.log_history, out)
        logger.info("Wrote the step-size plot to %s", self.path)
        if self.print_summary:
            print(summarize(state.log_history))
            print(f"step-size plot: {self.path}")


class MetaOptimizeTrainer(Trainer):
    """A Trainer that always optimizes with MetaOptimize, configured from its arguments.

    Settings come from `args.optim` when it is metaoptimize / metaoptimize_lion (else the metaoptimize
    defaults), the `--metaoptimize_*` fields of `MetaOptimizeTrainingArguments`, and `--optim_args`; betas /
    epsilon / weight decay from `--adam_beta1/2`, `--adam_epsilon`, `--weight_decay`. It logs the step sizes and,
    unless `args.metaoptimize_plot` is False, writes `step_sizes.png` at the end of training. It does not use
    the private transformers optimizer dispatch table.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        register()
        super().__init__(*args, **kwargs)
        if getattr(self.args, "metaoptimize_plot", True) and not any(
            isinstance(cb, StepSizePlotCallback) for cb in self.callback_handler.callbacks
        ):
            self.add_callback(StepSizePlotCallback())

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: Any = None) -> tuple[Any, Any]:
        return build_optimizer_cls_and_kwargs(args, model)

    def step_sizes(self) -> dict[str, float]:
        """The current step sizes as they would be logged (host sync: call it at logging points only)."""
        optimizer = find_metaoptimize(self.optimizer)
        return {} if optimizer is None else step_size_logs(optimizer, self)


def load_training_args(path: str | os.PathLike) -> TrainingArguments:
    """Load a `training_args.bin` saved by a `--optim metaoptimize` run.

    The pickle holds the enum member `OptimizerNames.METAOPTIMIZE`, which exists only after `register()`; and
    it is a full pickle, so it needs `weights_only=False` (only load files you trust).
    """
    import torch

    register()
    return torch.load(path, weights_only=False)

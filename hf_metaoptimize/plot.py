"""Step-size trajectories beside the loss curve, from a Trainer's `log_history` (trainer_state.json).

matplotlib is imported lazily, with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
SUMMARY_KEYS = ("step_size/min", "step_size/median", "step_size/max")


def find_trainer_state(path: str | os.PathLike) -> Path:
    """`path` itself (a json file), `path/trainer_state.json`, or that of the newest `path/checkpoint-N`."""
    path = Path(path)
    if path.is_file():
        return path
    direct = path / STATE_FILE
    if direct.is_file():
        return direct
    checkpoints = sorted(
        (
            p
            for p in path.glob("checkpoint-*")
            if (p / STATE_FILE).is_file() and re.fullmatch(r"checkpoint-\d+", p.name)
        ),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if checkpoints:
        return checkpoints[-1] / STATE_FILE
    raise FileNotFoundError(f"no {STATE_FILE} in {path} or its checkpoint-* folders")


def load_log_history(source: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        with open(find_trainer_state(source), encoding="utf-8") as handle:
            return list(json.load(handle).get("log_history", []))
    return [dict(entry) for entry in source]


def step_size_series(log_history: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) for every `step_size*` key in the log history."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if key.startswith("step_size") and isinstance(value, (int, float)) and step is not None:
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float(value))
    return series


def _series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in log_history:
        if key in entry and "step" in entry and isinstance(entry[key], (int, float)):
            steps.append(int(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def summarize(source: str | os.PathLike | Iterable[Mapping[str, Any]]) -> str:
    """A small table of the logged step sizes per block: the first, the peak (and its step), the last."""
    history = load_log_history(source)
    series = step_size_series(history)
    if not series:
        return "no step sizes in the log history (was the run trained with --optim metaoptimize?)"
    lr_steps, lr_values = _series(history, "learning_rate")
    keys = [k for k in series if k not in SUMMARY_KEYS] + [k for k in SUMMARY_KEYS if k in series]
    lr_label = "learning_rate (alpha0 x schedule)"
    width = max([len(k) for k in keys] + [len(lr_label)])
    head = f"{'learned step size':<{width}}  {'first log':>10}  {'peak':>10}  {'peak/first':>10}  {'at step':>7}"
    lines = [head + f"  {'last log':>10}  (step {series[keys[0]][0][-1]})"]
    for key in keys:
        steps, values = series[key]
        peak = max(range(len(values)), key=lambda i: values[i])
        ratio = values[peak] / values[0] if values[0] else math.nan
        row = f"{key:<{width}}  {values[0]:10.3e}  {values[peak]:10.3e}  {ratio:10.3f}  {steps[peak]:>7}"
        lines.append(row + f"  {values[-1]:10.3e}")
    if lr_values:
        row = f"{lr_label:<{width}}  {lr_values[0]:10.3e}  {max(lr_values):10.3e}  {'':>10}  {'':>7}"
        lines.append(row + f"  {lr_values[-1]:10.3e}")
    return "\n".join(lines)


def plot_step_sizes(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    out: str | os.PathLike | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Write a PNG: learned step sizes per block (log scale) on the left, training / eval loss on the right.

    Args:
        source: an output dir (or checkpoint dir, or trainer_state.json), or a log_history list.
        out: PNG path (default: `<source dir>/step_sizes.png`; required when `source` is a list).
    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    history = load_log_history(source)
    if out is None:
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError("out= is required when the source is a log history")
        base = Path(source)
        out = (base.parent if base.is_file() else base) / "step_sizes.png"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    series = step_size_series(history)
    blocks = {k: v for k, v in series.items() if k not in SUMMARY_KEYS}
    fig, (ax_step, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))

    if "step_size/min" in series and "step_size/max" in series:
        steps, lows = series["step_size/min"]
        _, highs = series["step_size/max"]
        ax_step.fill_between(steps, lows, highs, color="0.85", label="min..max")
    if "step_size/median" in series:
        ax_step.plot(*series["step_size/median"], color="black", lw=2, label="median")
    cmap = plt.get_cmap("viridis")
    names = list(blocks)
    for i, name in enumerate(names):
        label = name.split("/", 1)[1] if "/" in name else "step size"
        color = cmap(i / max(1, len(names) - 1)) if len(names) > 1 else "tab:blue"
        ax_step.plot(*blocks[name], color=color, lw=1.2, label=label if len(names) <= 14 else None)
    lr_steps, lr_values = _series(history, "learning_rate")
    if lr_values:
        ax_step.plot(lr_steps, lr_values, color="tab:red", ls="--", lw=1, label="learning_rate (alpha0 x schedule)")
    if series or lr_values:
        ax_step.set_yscale("log")
    ax_step.set_xlabel("step")
    ax_step.set_ylabel("step size  lr * exp(log_step) * cooldown")
    ax_step.set_title("learned step sizes" + ("" if series else " (none logged)"))
    ax_step.grid(True, which="both", alpha=0.3)
    if ax_step.get_legend_handles_labels()[0]:
        ax_step.legend(fontsize=7, loc="best")

    loss_steps, loss_values = _series(history, "loss")
    eval_steps, eval_values = _series(history, "eval_loss")
    if loss_values:
        ax_loss.plot(loss_steps, loss_values, label="train loss")
    if eval_values:
        ax_loss.plot(eval_steps, eval_values, "o-", label="eval loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.grid(True, alpha=0.3)
    if loss_values or eval_values:
        ax_loss.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out

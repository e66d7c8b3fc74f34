"""Aggregate the run JSON of a suite into tables, plots and a markdown page (plus summary.json).

    python -m benchmarks.report --suite full [--out benchmarks/results/full] [--docs docs/benchmarks.md]

Numbers: "final" = the metric at the last step (test NLL for digits / LoRA, validation loss in nats per token
on the held-out plays for Shakespeare), mean over seeds (std over seeds when there are several). A grid
family (AdamW fixed, AdamW + cosine, Lion + cosine) is represented by its best grid point (lowest mean final
loss; on Shakespeare the point chosen with seed 0). Ratios are final-loss ratios against the best AdamW +
cosine: below 1 beats it. Sensitivity spread = max / min final loss over the decade points 1e-5 ... 1e-2 of
the initial step size (learning rate for the fixed-LR and cosine baselines).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import common, suites

TASK_TITLES = {
    "digits": "digits MLP (test NLL)",
    "shakespeare": "Shakespeare GPT-2 (validation loss, held-out plays)",
    "lora": "LoRA MiniLM genre classification through the Trainer (test NLL)",
}
METRIC = {"digits": "test NLL", "shakespeare": "val loss", "lora": "test NLL"}
NOTES = Path(__file__).with_name("page_notes.md")
COLORS = {
    "adamw_fixed": "tab:gray",
    "adamw_cosine": "black",
    "lion_cosine": "tab:brown",
    "sf_adamw": "tab:olive",
    "prodigy": "tab:pink",
    "dadapt_adam": "tab:cyan",
    "mo_adamw_scalar": "tab:blue",
    "mo_adamw_tensor": "tab:green",
    "mo_adamw_layer": "tab:purple",
    "mo_lion_scalar": "tab:orange",
    "mo_lion_tensor": "tab:red",
    "mo_lion_layer": "gold",
}


# ---------------------------------------------------------------------------------------------------------
# loading and statistics
# ---------------------------------------------------------------------------------------------------------


def load(out: Path) -> list[dict]:
    recs = []
    for path in sorted(out.glob("*/*.json")):
        if path.name.endswith(".error.json") or path.parent.name in ("overhead", "cache"):
            continue
        rec = json.loads(path.read_text())
        if "task" in rec and "run_id" in rec:
            recs.append(rec)
    return recs


def _loss(rec: dict) -> float:
    loss = rec["final"].get("loss")
    return math.inf if loss is None else float(loss)


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    if any(not math.isfinite(v) for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _setting_key(rec: dict) -> tuple:
    spec = rec["optimizer"]
    return tuple(sorted((k, str(v)) for k, v in spec.items()))


def aggregate(recs: list[dict], task: str, purpose_in=("main",)) -> dict[str, list[dict]]:
    """contender -> list of settings {spec, lr, runs, loss, std, acc, seeds}, for the given task/purposes."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        if r["task"] == task and r["purpose"] in purpose_in:
            by[(r["contender"], _setting_key(r))].append(r)
    out: dict[str, list[dict]] = defaultdict(list)
    for (contender, _), runs in by.items():
        runs.sort(key=lambda r: r["seed"])
        loss, std = _stats([_loss(r) for r in runs])
        accs = [r["final"].get("accuracy") for r in runs if r["final"].get("accuracy") is not None]
        out[contender].append(
            {
                "contender": contender,
                "spec": runs[0]["optimizer"],
                "lr": runs[0]["optimizer"].get("lr"),
                "runs": runs,
                "seeds": [r["seed"] for r in runs],
                "loss": loss,
                "std": std,
                "acc": statistics.fmean(accs) if accs else None,
                "wall_s": statistics.fmean([r.get("wall_s", math.nan) for r in runs]),
                "diverged": sum(bool(r["diverged"]) for r in runs),
            }
        )
    return out


def best_setting(settings: list[dict], grid_seeds: list[int] | None) -> dict | None:
    """The grid point with the lowest final loss: by the grid seeds' mean when given (phase-A choice)."""
    if not settings:
        return None

    def key(s: dict) -> float:
        if grid_seeds is None:
            return s["loss"]
        vals = [_loss(r) for r in s["runs"] if r["seed"] in grid_seeds]
        return statistics.fmean(vals) if vals and all(math.isfinite(v) for v in vals) else math.inf

    return min(settings, key=key)


def task_summary(recs: list[dict], task: str, suite: str) -> dict[str, Any]:
    tcfg = suites.TASKS.get(suite, {}).get(task, {}) if suite != "select" else {}
    grid_seeds = None if tcfg.get("grid_seeds", "all") == "all" else tcfg["grid_seeds"]
    main = aggregate(recs, task)
    rows: dict[str, dict] = {}
    grids: dict[str, list[dict]] = {}
    for contender, settings in main.items():
        if contender in suites.GRID_FAMILIES:
            best = best_setting(settings, grid_seeds)
            grids[contender] = sorted(settings, key=lambda s: s["lr"])
        else:
            best = min(settings, key=lambda s: s["loss"])  # one setting per contender in the main purpose
        rows[contender] = best
    ref = rows.get("adamw_cosine")
    default = rows.get(suites.MO_DEFAULT_VARIANT)
    ratio = (default["loss"] / ref["loss"]) if (ref and default and ref["loss"] > 0) else None
    sens = sensitivity(recs, task)
    return {
        "rows": rows,
        "grids": grids,
        "reference": ref,
        "default": default,
        "ratio": ratio,
        "sensitivity": sens,
        "grid_seeds": grid_seeds,
    }


def sensitivity(recs: list[dict], task: str) -> dict[str, dict]:
    """contender -> {lr -> mean final loss} over main + sensitivity runs, and the spread over the window."""
    allr = aggregate(recs, task, ("main", "sensitivity"))
    out: dict[str, dict] = {}
    wanted = ["adamw_fixed", "adamw_cosine", *[c for c in allr if c.startswith("mo_")]]
    lo, hi = suites.SENSITIVITY_WINDOW
    for contender in wanted:
        settings = allr.get(contender, [])
        if contender.startswith("mo_"):  # only the frozen-default setting swept over lr
            settings = [
                s for s in settings if all(s["spec"].get(k) == v for k, v in suites.MO_DEFAULTS.items() if k != "lr")
            ]
        points = {s["lr"]: s for s in settings}
        if len(points) < 3:
            continue
        # the seeds every point has (on Shakespeare only seed 0 is swept), so all points average alike
        seeds = set.intersection(*(set(s["seeds"]) for s in points.values()))
        loss, acc = {}, {}
        for lr in sorted(points):
            runs = [r for r in points[lr]["runs"] if r["seed"] in seeds]
            loss[lr] = _stats([_loss(r) for r in runs])[0]
            accs = [r["final"].get("accuracy") for r in runs if r["final"].get("accuracy") is not None]
            acc[lr] = statistics.fmean(accs) if accs else None
        window = [lr for lr in suites.DECADES if lo * 0.999 <= lr <= hi * 1.001 and lr in points]
        spread = None
        if len(window) == 4:
            losses = [loss[lr] for lr in window]
            spread = max(losses) / min(losses) if all(math.isfinite(v) for v in losses) else math.inf
        out[contender] = {"points": loss, "acc": acc, "seeds": sorted(seeds), "spread": spread, "window": window}
    return out


# ---------------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "diverged"
    return f"{x:.{digits}f}"


def fmt_lr(lr: float | None) -> str:
    if lr is None:
        return "-"
    return f"{lr:.0e}".replace("e-0", "e-") if lr < 0.1 else f"{lr:g}"


def setting_text(row: dict) -> str:
    spec = row["spec"]
    kind = spec["optimizer"]
    if kind in ("prodigy", "dadapt_adam"):
        return f"lr {spec['lr']:g} (d0 1e-6)"
    if kind == "sf_adamw":
        return f"lr {spec['lr']:g}, no warm-up"
    if kind == "metaoptimize":
        return f"alpha0 {fmt_lr(spec['lr'])}, {spec['meta']} meta, eta {spec['meta_lr']:g}, gamma {spec['gamma']:g}"
    return f"lr {fmt_lr(spec['lr'])}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


ORDER = [
    "adamw_cosine",
    "adamw_fixed",
    "lion_cosine",
    "sf_adamw",
    "prodigy",
    "dadapt_adam",
    *[suites.mo_name(b, g) for b in suites.MO_BASES for g in suites.MO_GRANULARITIES],
]


def contender_table(task: str, ts: dict) -> str:
    ref = ts["reference"]
    has_acc = any(r["acc"] is not None for r in ts["rows"].values())
    header = ["contender", "setting", "seeds", f"final {METRIC[task]}", "± std"]
    header += ["accuracy"] if has_acc else []
    header += ["x AdamW+cosine", "s/run"]
    rows = []
    for c in sorted(ts["rows"], key=lambda c: ORDER.index(c) if c in ORDER else 99):
        r = ts["rows"][c]
        name = suites.LABELS.get(c, c) + (" **(default)**" if c == suites.MO_DEFAULT_VARIANT else "")
        ratio = r["loss"] / ref["loss"] if ref and math.isfinite(r["loss"]) else None
        row = [name, setting_text(r), str(len(r["seeds"])), fmt(r["loss"]), fmt(r["std"])]
        row += [fmt(r["acc"], 3)] if has_acc else []
        row += [fmt(ratio, 3), f"{r['wall_s']:.0f}"]
        rows.append(row)
    return md_table(header, rows)


def grid_table(task: str, ts: dict) -> str:
    lrs = sorted({s["lr"] for g in ts["grids"].values() for s in g})
    if not lrs:
        return ""
    header = ["family"] + [fmt_lr(lr) for lr in lrs]
    rows = []
    for fam in suites.GRID_FAMILIES:
        if fam not in ts["grids"]:
            continue
        by = {s["lr"]: s for s in ts["grids"][fam]}
        best = ts["rows"][fam]["lr"]
        cells = []
        for lr in lrs:
            s = by.get(lr)
            if s is None:
                cells.append("")
                continue
            txt = fmt(s["loss"])
            if lr == best:
                txt = f"**{txt}**"
            cells.append(txt + (f" ({len(s['runs'])})" if len(s["runs"]) > 1 else ""))
        rows.append([suites.LABELS[fam].split(" (")[0]] + cells)
    return md_table(header, rows)


def has_mo_sweep(ts: dict) -> bool:
    return any(c.startswith("mo_") for c in ts["sensitivity"])


def sensitivity_table(task: str, ts: dict) -> str:
    sens = ts["sensitivity"]
    if not has_mo_sweep(ts):
        return ""
    lrs = sorted({lr for s in sens.values() for lr in s["points"]})
    header = ["contender", "seeds"] + [fmt_lr(lr) for lr in lrs] + ["spread 1e-5..1e-2"]
    rows = []
    for c, s in sens.items():
        name = suites.LABELS.get(c, c).replace(" (best of grid)", "").replace(" (best of 5)", "")
        cells = [fmt(s["points"].get(lr)) if lr in s["points"] else "" for lr in lrs]
        seeds = ",".join(str(x) for x in s["seeds"])
        rows.append([name, seeds] + cells + [fmt(s["spread"], 2) if s["spread"] is not None else "-"])
    return md_table(header, rows)


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(task: str, ts: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for c in sorted(ts["rows"], key=lambda c: ORDER.index(c) if c in ORDER else 99):
        r = ts["rows"][c]
        run = r["runs"][0]
        style = "-" if c.startswith("mo_") else "--"
        lw = 2.2 if c == suites.MO_DEFAULT_VARIANT else 1.2
        label = f"{c} ({setting_text(r).split(',')[0]})"
        ev = run["eval"]
        pts = [(s, v) for s, v in zip(ev["step"], ev["loss"]) if v is not None]
        if pts:
            axes[0].plot(*zip(*pts), style, color=COLORS.get(c), lw=lw, label=label)
        tr = run["train"]
        pts = [(s, v) for s, v in zip(tr["step"], tr["loss"]) if v is not None]
        if pts:
            axes[1].plot(*zip(*pts), style, color=COLORS.get(c), lw=lw * 0.8, alpha=0.85)
    axes[0].set_title(f"{task}: {METRIC[task]} (seed {ts['rows'][next(iter(ts['rows']))]['runs'][0]['seed']})")
    axes[1].set_title(f"{task}: training loss (mean over each logging interval)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=1, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(summaries: dict[str, dict], path: Path) -> bool:
    tasks = [t for t, ts in summaries.items() if has_mo_sweep(ts)]
    if not tasks:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ts = summaries[task]
        for c, s in ts["sensitivity"].items():
            lrs = list(s["points"])
            vals = [v if math.isfinite(v) else float("nan") for v in s["points"].values()]
            style = "o-" if c.startswith("mo_") else "s--"
            ax.plot(lrs, vals, style, color=COLORS.get(c), label=suites.LABELS.get(c, c).split(" (")[0])
        for c in ("sf_adamw", "prodigy", "dadapt_adam"):
            if c in ts["rows"]:
                ax.axhline(ts["rows"][c]["loss"], ls=":", color=COLORS[c], label=f"{suites.LABELS[c]}")
        lo, hi = suites.SENSITIVITY_WINDOW
        ax.axvspan(lo, hi, color="tab:blue", alpha=0.05)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("initial step size alpha0 (MetaOptimize) / learning rate (AdamW)")
        ax.set_ylabel(f"final {METRIC[task]}")
        ax.set_title(f"{task}: final loss vs initial step size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_step_sizes(task: str, ts: dict, path: Path) -> bool:
    mo = [c for c in ORDER if c.startswith("mo_") and c in ts["rows"]]
    if not mo:
        return False
    plt = _plt()
    n = len(mo) + 1
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, c in zip(flat, mo):
        run = ts["rows"][c]["runs"][0]
        trace = run["step_sizes"]
        series = trace["values"]
        many = len(series) > 12
        for key, vals in series.items():
            pts = [(s, v) for s, v in zip(trace["step"], vals) if v is not None]
            if pts:
                ax.plot(*zip(*pts), lw=0.8 if many else 1.4, alpha=0.6 if many else 0.95, label=None if many else key)
        ax.set_yscale("log")
        ax.set_title(f"{c} (alpha0 {fmt_lr(run['optimizer']['lr'])})", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        if not many and len(series) > 1:
            ax.legend(fontsize=6)
        elif many:
            ax.text(0.02, 0.02, f"{len(series)} tensors", transform=ax.transAxes, fontsize=7)
    ref_ax = flat[len(mo)]
    for c in ("adamw_cosine", "adamw_fixed", "lion_cosine", "prodigy", "dadapt_adam", "sf_adamw"):
        if c not in ts["rows"]:
            continue
        run = ts["rows"][c]["runs"][0]
        trace = run["step_sizes"]
        for key, vals in trace["values"].items():
            pts = [(s, v) for s, v in zip(trace["step"], vals) if v is not None and v > 0]
            if pts:
                ref_ax.plot(*zip(*pts), "--", color=COLORS.get(c), label=f"{c} {key}")
    ref_ax.set_yscale("log")
    ref_ax.set_title("reference: scheduled lr, Prodigy / D-Adapt d*lr", fontsize=9)
    ref_ax.set_xlabel("step")
    ref_ax.grid(alpha=0.3, which="both")
    ref_ax.legend(fontsize=6)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"{task}: learned step sizes lr*exp(log_step) (seed 0)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------
# overhead
# ---------------------------------------------------------------------------------------------------------

STEP_GOALS = {
    "mo_scalar": 1.35,
    "mo_tensor": 1.35,
    "mo_element": 2.0,
    "mo_scalar_fused": 1.35,
    "mo_tensor_fused": 1.35,
    "mo_element_fused": 2.0,
}


def overhead_section(out: Path) -> tuple[str, dict]:
    parts, data = [], {}
    step = out / "overhead" / "step.json"
    if step.exists():
        s = json.loads(step.read_text())
        data["step"] = s
        rows = []
        for r in s["rows"]:
            goal = STEP_GOALS.get(r["optimizer"])
            verdict = "-" if goal is None else (f"<= {goal:g}: " + ("met" if r["ratio"] <= goal else "**missed**"))
            rows.append(
                [
                    r["optimizer"],
                    f"{r['median_ms']:.1f}",
                    f"{r['ratio']:.2f}",
                    verdict,
                    f"{r['state_bytes'] / 1e6:.1f}",
                    f"{r['extra_bytes_per_weight']:.2f}",
                ]
            )
        parts.append(
            f"**Optimizer step** (`benchmarks/bench_step.py`): {s['weights'] / 1e6:.1f}M weights in {s['tensors']} "
            f"transformer-shaped tensors, {s['threads']} thread, torch {s['torch']}, "
            "A/B interleaved rounds, medians.\n\n"
            + md_table(["optimizer", "median ms", "x AdamW(foreach)", "goal", "state MB", "extra bytes / weight"], rows)
        )
    tr = out / "overhead" / "trainer_step.json"
    if tr.exists():
        t = json.loads(tr.read_text())
        data["trainer"] = t
        rows = []
        for r in t["rows"]:
            goal = (
                ""
                if r["optimizer"] == "adamw_torch"
                else ("<= 1.05: " + ("met" if r["ratio"] <= 1.05 else "**missed**"))
            )
            rr = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
            rows.append(
                [
                    r["optimizer"],
                    f"{r['median_ms']:.1f}",
                    f"{r['ratio']:.3f}",
                    goal,
                    f"{r.get('optimizer_step_ms', float('nan')):.2f}",
                    rr,
                ]
            )
        m = t["model"]
        parts.append(
            "**Trainer step** (`benchmarks/bench_trainer_step.py`): the Shakespeare GPT-2 "
            f"({t['parameters'] / 1e3:.0f}k "
            f"weights, {m['n_layer']} layers, d={m['n_embd']}, batch {m['batch_size']} x {m['context']} tokens), "
            f"`--optim metaoptimize` vs `--optim adamw_torch`, {t['rounds']} interleaved rounds x "
            f"{t['steps_per_chunk']} steps (first {t['skip']} of each dropped), median time from step begin to step "
            "end (data, forward, backward, clipping, optimizer, scheduler).\n\n"
            + md_table(
                ["--optim", "median ms", "x adamw_torch", "goal", "of which optimizer.step() ms", "per-round ratios"],
                rows,
            )
        )
    return "\n\n".join(parts), data


# ---------------------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------------------


def _headline(summaries: dict[str, dict]) -> str:
    header = [
        "task",
        "metric",
        "AdamW + cosine, tuned",
        "MetaOptimize default",
        "ratio",
        "best MetaOptimize variant",
        "Schedule-Free",
        "Prodigy",
        "D-Adapt Adam",
    ]
    rows = []
    for task, ts in summaries.items():
        ref, default = ts["reference"], ts["default"]
        mo = {c: r for c, r in ts["rows"].items() if c.startswith("mo_")}
        best_mo = min(mo.items(), key=lambda kv: kv[1]["loss"]) if mo else None

        def cell(r):
            if r is None:
                return "-"
            acc = f" / {r['acc']:.3f}" if r["acc"] is not None else ""
            return fmt(r["loss"]) + acc

        rows.append(
            [
                task,
                METRIC[task] + (" / acc" if ref and ref["acc"] is not None else ""),
                cell(ref) + (f" (lr {fmt_lr(ref['lr'])})" if ref else ""),
                cell(default),
                fmt(ts["ratio"], 3),
                (f"{best_mo[0]}: {cell(best_mo[1])}" if best_mo else "-"),
                cell(ts["rows"].get("sf_adamw")),
                cell(ts["rows"].get("prodigy")),
                cell(ts["rows"].get("dadapt_adam")),
            ]
        )
    return md_table(header, rows)


def _invocations(run_log: dict) -> str:
    inv = run_log.get("invocations", [])
    if len(inv) <= 1:
        return ""
    parts = " + ".join(
        f"{i['total_s'] / 60:.0f} min ({i.get('runs_executed', '?')} runs"
        + (f"; {i['note']}" if i.get("note") else "")
        + ")"
        for i in inv
    )
    return f"; resumed, {len(inv)} invocations: {parts}"


def _protocol(recs: list[dict], suite: str) -> str:
    lines = []
    for task in ("digits", "shakespeare", "lora"):
        rs = [r for r in recs if r["task"] == task]
        if not rs:
            continue
        r = rs[0]
        cfg = {k: v for k, v in r["config"].items() if k not in ("trainer",)}
        shas = {x["data"]["sha256"] for x in rs}
        lines.append(
            f"- **{task}**: {r['data']['description']}. Data SHA-256 `{r['data']['sha256'][:16]}...`"
            + (" (all runs agree)" if len(shas) == 1 else f" (**{len(shas)} different hashes**)")
            + f". Config: `{json.dumps(cfg, default=str)}`."
        )
    return "\n".join(lines)


def build(suite: str, out: Path, docs: Path) -> dict[str, Any]:
    recs = load(out)
    docs.parent.mkdir(parents=True, exist_ok=True)
    if suite == "select":
        return build_select(recs, out, docs)
    prefix = "bench_" if docs.parent.resolve() != out.resolve() else ""
    summaries = {}
    for task in ("digits", "shakespeare", "lora"):
        if any(r["task"] == task for r in recs):
            summaries[task] = task_summary(recs, task, suite)
    images: dict[str, str] = {}
    for task, ts in summaries.items():
        if ts["rows"]:
            name = f"{prefix}curves_{task}.png"
            plot_curves(task, ts, docs.parent / name)
            images[f"curves_{task}"] = name
            name = f"{prefix}stepsizes_{task}.png"
            if plot_step_sizes(task, ts, docs.parent / name):
                images[f"stepsizes_{task}"] = name
    name = f"{prefix}sensitivity.png"
    if plot_sensitivity(summaries, docs.parent / name):
        images["sensitivity"] = name
    overhead_md, overhead = overhead_section(out)
    log_path = out / "run_log.json"
    run_log = json.loads(log_path.read_text()) if log_path.exists() else {}
    versions = recs[0]["versions"] if recs else common.versions()
    machine = recs[0]["machine"] if recs else common.machine()

    md = [f"# Benchmarks: MetaOptimize vs tuned AdamW + cosine and learning-rate-free optimizers ({suite} suite)", ""]
    md.append(
        f"Measured on **{machine['cpu']}** ({machine['cores']} cores, shared; every process on 1 thread), "
        f"torch {versions.get('torch')}, transformers {versions.get('transformers')}, peft {versions.get('peft')}, "
        f"schedulefree {versions.get('schedulefree')}, prodigyopt {versions.get('prodigyopt')}, dadaptation "
        f"{versions.get('dadaptation')}; hf-metaoptimize {versions.get('hf-metaoptimize')} "
        f"(git {versions.get('git')}). "
        f"{len(recs)} runs"
        + (
            f"; `make bench` took **{run_log['total_s'] / 60:.0f} min** wall "
            f"(tasks {run_log.get('tasks_s', 0) / 60:.0f} min with {run_log.get('jobs')} "
            f"process(es) side by side, overhead {run_log.get('overhead_s', 0) / 60:.1f} min"
            + _invocations(run_log)
            + ")"
            if run_log.get("total_s")
            else ""
        )
        + "."
    )
    md.append("")
    md.append(
        "Reproduce: `make bench` (all of it, resumable), `make bench-quick` (smoke version, used by the tests), "
        "`python -m benchmarks.run --suite select` (the sweeps behind the defaults, "
        "[benchmarks_select.md](benchmarks_select.md)). Every run's JSON (task, optimizer, config, seed, "
        f"step -> loss, step-size trace, package versions, data SHA-256) is in `{_rel(out)}/<task>/`."
    )
    md.append("")
    md.append("## Summary")
    md.append("")
    d = suites.MO_DEFAULTS
    md.append(
        f"MetaOptimize runs with ONE frozen setting on every task: initial step size alpha0 = {fmt_lr(d['lr'])}, "
        f'{d["meta"]} meta rule, meta step size {d["meta_lr"]:g}, gamma {d["gamma"]:g} ("default" = AdamW base, '
        "scalar step size). The AdamW + cosine reference is the best of a 5-point learning-rate grid chosen on the "
        "reported data (oracle-tuned). Ratio = default MetaOptimize final loss / tuned AdamW + cosine final loss "
        "(< 1: MetaOptimize better)."
    )
    md.append("")
    md.append(_headline(summaries))
    md.append("")
    if any(has_mo_sweep(ts) for ts in summaries.values()):
        rows = []
        for task, ts in summaries.items():
            for c, s in ts["sensitivity"].items():
                if s["spread"] is not None:
                    rows.append([task, suites.LABELS.get(c, c).split(" (")[0], fmt(s["spread"], 2)])
        if rows:
            md.append(
                "Sensitivity spread (max / min final loss over initial step sizes 1e-5, 1e-4, 1e-3, 1e-2; "
                "1.00 = insensitive):"
            )
            md.append("")
            md.append(md_table(["task", "contender", "spread"], rows))
            md.append("")
    if overhead:
        bits = []
        for r in overhead.get("step", {}).get("rows", []):
            if r["optimizer"] != "adamw_foreach":
                bits.append(f"{r['optimizer']} {r['ratio']:.2f}x")
        for r in overhead.get("trainer", {}).get("rows", []):
            if r["optimizer"] != "adamw_torch":
                bits.append(f"Trainer {r['optimizer']} {r['ratio']:.2f}x")
        md.append("Overhead vs AdamW: " + ", ".join(bits) + " (details below).")
        md.append("")
    for task, ts in summaries.items():
        md.append(f"## {TASK_TITLES[task]}")
        md.append("")
        md.append(contender_table(task, ts))
        md.append("")
        g = grid_table(task, ts)
        if g:
            seeds_note = (
                "mean over all seeds"
                if ts["grid_seeds"] is None
                else f"seed {ts['grid_seeds'][0]}; the best point (bold) rerun with the other seeds, (n) = seeds"
            )
            md.append(f"Learning-rate grids (final {METRIC[task]}, {seeds_note}):")
            md.append("")
            md.append(g)
            md.append("")
        s = sensitivity_table(task, ts)
        if s:
            md.append(
                f"Final {METRIC[task]} vs initial step size (MetaOptimize: alpha0 with the frozen meta settings; "
                "AdamW: the learning rate; mean over the seeds every point of a row has):"
            )
            md.append("")
            md.append(s)
            md.append("")
        if f"curves_{task}" in images:
            md.append(f"![{task} curves]({images[f'curves_{task}']})")
            md.append("")
        if f"stepsizes_{task}" in images:
            md.append(f"![{task} step sizes]({images[f'stepsizes_{task}']})")
            md.append("")
    if "sensitivity" in images:
        md.append("## Sensitivity to the initial step size")
        md.append("")
        md.append(f"![sensitivity]({images['sensitivity']})")
        md.append("")
    if overhead_md:
        md.append("## Overhead")
        md.append("")
        md.append(overhead_md)
        md.append("")
    md.append("## Protocol")
    md.append("")
    md.append(_protocol(recs, suite))
    md.append("")
    md.append(
        "Contenders: AdamW (`torch.optim.AdamW`, betas 0.9/0.999) at fixed learning rates and with linear warm-up "
        "(5% of the steps; 10% for LoRA) + cosine decay to 0; Lion (betas 0.9/0.99, written out in "
        "`benchmarks/common.py`) with the same schedule; Schedule-Free AdamW, Prodigy and D-Adaptation Adam with "
        "their constructors' defaults (lr 2.5e-3 / 1.0 / 1.0, no schedule, no warm-up; weight decay decoupled); "
        "MetaOptimize with AdamW and Lion bases at scalar, per-tensor and per-layer (block) granularity, constant "
        "lr. Per-layer blocks come from `hf_metaoptimize.layers.layer_param_groups` (one per transformer layer + "
        "embeddings + head; one per Linear layer for the MLP). Every contender sees the same data order, "
        "initialisation, weight decay (on matrices only) and gradient clipping within a task. LoRA runs go through "
        '`transformers.Trainer`; MetaOptimize there is `optim="metaoptimize"` / `"metaoptimize_lion"` with '
        "`optim_args`, after `hf_metaoptimize.register()`."
    )
    md.append("")
    if NOTES.exists() and suite == "full":
        md.append(NOTES.read_text().strip())
        md.append("")
    docs.write_text("\n".join(md))

    summary = {
        "suite": suite,
        "runs": len(recs),
        "images": images,
        "mo_defaults": suites.MO_DEFAULTS,
        "default_variant": suites.MO_DEFAULT_VARIANT,
        "run_log": run_log,
        "tasks": {task: _json_task(ts) for task, ts in summaries.items()},
        "overhead": {
            "step": {r["optimizer"]: r["ratio"] for r in overhead.get("step", {}).get("rows", [])},
            "trainer": {r["optimizer"]: r["ratio"] for r in overhead.get("trainer", {}).get("rows", [])},
        },
    }
    common.write_json(out / "summary.json", summary)
    summary["text"] = _text(summaries, overhead)
    return summary


def _json_task(ts: dict) -> dict:
    def row(r):
        return {
            "setting": r["spec"],
            "final_loss": common.clean_float(r["loss"]) if r["loss"] == r["loss"] else None,
            "std": None if not math.isfinite(r["std"]) else r["std"],
            "accuracy": r["acc"],
            "seeds": r["seeds"],
            "diverged_runs": r["diverged"],
        }

    return {
        "contenders": {c: row(r) for c, r in ts["rows"].items()},
        "grids": {f: {fmt_lr(s["lr"]): common.clean_float(s["loss"]) for s in g} for f, g in ts["grids"].items()},
        "ratio_default_to_tuned_cosine": ts["ratio"],
        "sensitivity": {
            c: {
                "points": {fmt_lr(k): common.clean_float(v) for k, v in s["points"].items()},
                "spread": None if s["spread"] is None else common.clean_float(s["spread"]),
            }
            for c, s in ts["sensitivity"].items()
        },
    }


def _text(summaries: dict[str, dict], overhead: dict) -> str:
    lines = []
    for task, ts in summaries.items():
        lines.append(f"\n== {task}: final {METRIC[task]} ==")
        lines.append(f"{'contender':<20}{'setting':<46}{'seeds':>6}{'final':>10}{'acc':>8}{'x cos':>8}")
        ref = ts["reference"]
        for c in sorted(ts["rows"], key=lambda c: ORDER.index(c) if c in ORDER else 99):
            r = ts["rows"][c]
            ratio = r["loss"] / ref["loss"] if ref and math.isfinite(r["loss"]) else None
            lines.append(
                f"{c:<20}{setting_text(r)[:45]:<46}{len(r['seeds']):>6}{fmt(r['loss']):>10}"
                f"{fmt(r['acc'], 3):>8}{fmt(ratio, 3):>8}"
            )
        for c, s in ts["sensitivity"].items():
            if s["spread"] is not None:
                lines.append(f"  sensitivity spread {c}: {fmt(s['spread'], 2)}")
    for r in overhead.get("step", {}).get("rows", []):
        lines.append(f"step {r['optimizer']:<20}{r['ratio']:.2f}x AdamW")
    for r in overhead.get("trainer", {}).get("rows", []):
        lines.append(f"Trainer {r['optimizer']:<24}{r['ratio']:.3f}x adamw_torch")
    return "\n".join(lines)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(common.REPO))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------
# the `select` page
# ---------------------------------------------------------------------------------------------------------


def select_table(recs: list[dict], task: str) -> tuple[str, list[dict]]:
    rs = [r for r in recs if r["task"] == task and r["purpose"] == "select"]
    by: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rs:
        s = r["optimizer"]
        by[(s["meta"], s["meta_lr"], s["gamma"])][s["lr"]].append(_loss(r))
    lrs = sorted({lr for v in by.values() for lr in v})
    rows, table = [], []
    lo, hi = suites.SENSITIVITY_WINDOW
    for key in sorted(by):
        means = {lr: _stats(v)[0] for lr, v in by[key].items()}
        window = [means[lr] for lr in lrs if lo * 0.999 <= lr <= hi * 1.001 and lr in means]
        finite = [v for v in means.values() if math.isfinite(v)]
        best = min(finite) if finite else math.inf
        worst = max(window) if window else math.nan
        rows.append(
            {
                "meta": key[0],
                "meta_lr": key[1],
                "gamma": key[2],
                "points": means,
                "best": best,
                "worst_in_window": worst,
            }
        )
        table.append(
            [key[0], f"{key[1]:g}", f"{key[2]:g}"] + [fmt(means.get(lr)) for lr in lrs] + [fmt(best), fmt(worst)]
        )
    header = ["meta", "eta", "gamma"] + [fmt_lr(lr) for lr in lrs] + ["best", "worst of window"]
    return md_table(header, table), rows


def build_select(recs: list[dict], out: Path, docs: Path) -> dict[str, Any]:
    plt = _plt()
    md = ["# Choosing MetaOptimize's frozen defaults: the `select` sweeps", ""]
    md.append(
        "AdamW base, scalar step size; final loss (digits: test NLL, mean of the seeds; Shakespeare: "
        "validation loss, seed 0) by meta rule, meta step size eta, trace discount gamma (rows) and initial "
        'step size alpha0 (columns). "worst of window" = the worst final loss over alpha0 in '
        "[1e-5, 1e-2] that was run. Produced by `python -m benchmarks.run --suite select`; the choice and "
        "its reasons are in [benchmarks.md](benchmarks.md#how-the-defaults-were-chosen)."
    )
    md.append("")
    data = {}
    tasks = [t for t in ("digits", "shakespeare") if any(r["task"] == t for r in recs)]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.5 * max(1, len(tasks)), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        table, rows = select_table(recs, task)
        data[task] = rows
        md.append(f"## {task}")
        md.append("")
        md.append(table)
        md.append("")
        cmap = plt.get_cmap("tab20")
        for i, row in enumerate(rows):
            lrs = sorted(row["points"])
            ax.plot(
                lrs,
                [row["points"][lr] if math.isfinite(row["points"][lr]) else float("nan") for lr in lrs],
                "o-" if row["meta"] == "lion" else "s--",
                color=cmap(i % 20),
                label=f"{row['meta']} eta={row['meta_lr']:g} gamma={row['gamma']:g}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("alpha0")
        ax.set_ylabel("final loss")
        ax.set_title(task)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    img = docs.parent / "bench_select.png"
    fig.savefig(img, dpi=110)
    plt.close(fig)
    md.append(f"![select sweeps]({img.name})")
    md.append("")
    docs.write_text("\n".join(md))
    summary = {
        "suite": "select",
        "runs": len(recs),
        "tasks": {
            t: [
                {
                    **r,
                    "points": {fmt_lr(k): common.clean_float(v) for k, v in r["points"].items()},
                    "best": common.clean_float(r["best"]),
                    "worst_in_window": common.clean_float(r["worst_in_window"]),
                }
                for r in rows
            ]
            for t, rows in data.items()
        },
    }
    common.write_json(out / "summary.json", summary)
    summary["text"] = "\n".join(line for line in md if line.startswith(("#", "|")))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["full", "quick", "select"], default="full")
    ap.add_argument("--out", default=None)
    ap.add_argument("--docs", default=None)
    a = ap.parse_args()
    out = Path(a.out or common.REPO / "benchmarks" / "results" / a.suite)
    docs = (
        Path(a.docs)
        if a.docs
        else {
            "full": common.REPO / "docs" / "benchmarks.md",
            "select": common.REPO / "docs" / "benchmarks_select.md",
            "quick": out / "benchmarks.md",
        }[a.suite]
    )
    print(build(a.suite, out, docs)["text"])


if __name__ == "__main__":
    main()

"""The step-size plot: PNG from trainer_state.json (CLI) and at the end of training (callback)."""

from __future__ import annotations

import json
import struct

import pytest

from hf_metaoptimize.cli import main
from hf_metaoptimize.plot import find_trainer_state, plot_step_sizes, summarize


def history(blocks=("embeddings", "transformer.h.0", "transformer.h.1", "head")):
    out = []
    for step in range(10, 110, 10):
        entry = {"loss": 5.0 - step / 50, "learning_rate": 1e-4, "step": step, "epoch": step / 100}
        values = {b: 1e-4 * (1 + i * 0.2) ** (step / 50) for i, b in enumerate(blocks)}
        entry.update({f"step_size/{b}": v for b, v in values.items()})
        entry.update(
            {
                "step_size/min": min(values.values()),
                "step_size/max": max(values.values()),
                "step_size/median": sorted(values.values())[len(values) // 2],
            }
        )
        out.append(entry)
        if step % 50 == 0:
            out.append({"eval_loss": 4.8 - step / 60, "step": step, "epoch": step / 100})
    out.append({"train_runtime": 1.0, "train_loss": 4.0, "step": 100, "epoch": 1.0})
    return out


def assert_png(path, min_width=600):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= 200
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


def test_cli_plot_from_checkpoint_dir(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-100"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": history(), "global_step": 100}))
    assert find_trainer_state(tmp_path) == ckpt / "trainer_state.json"
    assert main(["plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step_size/transformer.h.1" in out and f"wrote {tmp_path / 'step_sizes.png'}" in out
    assert_png(tmp_path / "step_sizes.png")


def test_scalar_and_missing(tmp_path):
    scalar = [{"loss": 3.0, "learning_rate": 1e-3, "step_size": 1e-3 * (1 + s / 100), "step": s} for s in range(1, 20)]
    assert_png(plot_step_sizes(scalar, tmp_path / "scalar.png"))
    assert "step_size " in summarize(scalar)
    assert "no step sizes" in summarize([{"loss": 1.0, "step": 1}])
    assert main(["plot", str(tmp_path / "nothing-here")]) == 1


def test_callback_writes_the_plot_at_train_end(tmp_path):
    from transformers import TrainerState, TrainingArguments

    from hf_metaoptimize import StepSizePlotCallback

    state = TrainerState()
    state.log_history = history()
    callback = StepSizePlotCallback(print_summary=False)
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    callback.on_train_end(args, state, None)
    assert callback.path == tmp_path / "step_sizes.png"
    assert_png(callback.path)


def test_plot_needs_an_output_for_a_list():
    with pytest.raises(ValueError, match="out= is required"):
        plot_step_sizes(history(), None)

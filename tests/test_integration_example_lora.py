"""examples/lora_minilm.py in a quick mode: LoRA on the pretrained MiniLM through MetaOptimizeTrainer with
--optim metaoptimize and one step size per BERT layer."""

from __future__ import annotations

import json

from _proc import run_python as run


def test_lora_minilm_quick(tmp_path):
    quick = (
        "--optim metaoptimize --metaoptimize_granularity layer --max_steps 3 --logging_steps 3 --samples_per_class 24 "
        "--per_device_train_batch_size 8 --learning_rate 1e-3 --report_to none --use_cpu --save_strategy no "
        "--disable_tqdm true"
    ).split()
    proc = run(["examples/lora_minilm.py", "--output_dir", str(tmp_path), *quick])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trainable params" in proc.stdout and "learned step sizes:" in proc.stdout
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    (train,) = [e for e in history if "loss" in e]
    layers = {k for k in train if k.startswith("step_size/bert.encoder.layer.")}
    assert len(layers) == 6 and "step_size/head" in train and "step_size/embeddings" not in train  # frozen
    assert any("eval_accuracy" in e for e in history)
    assert (tmp_path / "step_sizes.png").is_file()

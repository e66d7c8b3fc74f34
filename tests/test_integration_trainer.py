"""The Trainer with MetaOptimize: logged step sizes, schedules on every route, accumulation + clipping, LoRA."""

from __future__ import annotations

import _tiny
import pytest
import torch

import hf_metaoptimize
from hf_metaoptimize import MetaOptimize

hf_metaoptimize.register()

from transformers import TrainerCallback  # noqa: E402


class SeenByCallbacks(TrainerCallback):
    """Stands in for the reporters (TensorBoard, W&B): they receive exactly what on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def inner(optimizer):
    return hf_metaoptimize.integrations.registry.find_metaoptimize(optimizer)


def count_step_size_reads(monkeypatch):
    from hf_metaoptimize.integrations import stepsizes

    calls = []
    original = stepsizes.step_size_logs

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(stepsizes, "step_size_logs", counted)
    return calls


def test_scalar_step_size_is_logged_before_storage(tmp_path, monkeypatch):
    calls = count_step_size_reads(monkeypatch)
    seen = SeenByCallbacks()
    trainer = _tiny.make_trainer(tmp_path, callbacks=[seen], max_steps=6, logging_steps=2, optim_args="meta_lr=0.05")
    trainer.train()
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in train_logs] == [2, 4, 6]
    for entry in train_logs:
        assert set(k for k in entry if k.startswith("step_size")) == {"step_size"}
        assert isinstance(entry["step_size"], float)
    # the learned value, not the scheduler's: it moved away from learning_rate, which stayed constant
    assert train_logs[-1]["step_size"] != train_logs[-1]["learning_rate"] == 1e-3
    assert train_logs[-1]["step_size"] == pytest.approx(float(inner(trainer.optimizer).step_sizes()[0][0]))
    assert [e["step_size"] for e in seen.logs if "loss" in e] == [e["step_size"] for e in train_logs]
    assert not any("step_size" in e for e in trainer.state.log_history if "loss" not in e)  # final summary
    assert len(calls) == 3  # one per logging step: no host sync on other steps
    assert trainer.lr_scheduler.__class__.__name__ == "LambdaLR"
    assert trainer.args.lr_scheduler_type == "constant"
    assert [e["learning_rate"] for e in train_logs] == [1e-3] * 3


@pytest.mark.parametrize("granularity", ["layer", "tensor", "element"])
def test_finer_granularities_log_min_median_max_and_blocks(tmp_path, granularity):
    trainer = _tiny.make_trainer(
        tmp_path, max_steps=4, logging_steps=4, optim_args=f"granularity={granularity},meta_lr=0.05"
    )
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    keys = {k for k in entry if k.startswith("step_size")}
    blocks = {"embeddings", "transformer.h.0", "transformer.h.1", "head"}
    assert keys == {"step_size/min", "step_size/median", "step_size/max"} | {f"step_size/{b}" for b in blocks}
    assert entry["step_size/min"] <= entry["step_size/median"] <= entry["step_size/max"]
    for b in blocks:
        assert entry["step_size/min"] <= entry[f"step_size/{b}"] <= entry["step_size/max"]
    assert entry["step_size/min"] < entry["step_size/max"]  # they learned different values


def test_optimizer_cls_and_kwargs_route_gets_a_constant_schedule(tmp_path):
    def run(**arg_overrides):
        args = _tiny.training_args(tmp_path, optim="adamw_torch", max_steps=4, **arg_overrides)
        trainer = _tiny.make_trainer(
            tmp_path, args=args, trainer_kwargs={"optimizer_cls_and_kwargs": (MetaOptimize, {"lr": 1e-3})}
        )
        trainer.train()
        return trainer

    trainer = run()
    assert isinstance(inner(trainer.optimizer), MetaOptimize)
    assert trainer.args.lr_scheduler_type == "constant"
    assert "step_size" in trainer.state.log_history[0]
    assert run(lr_scheduler_type="linear").args.lr_scheduler_type == "constant"  # the default: the same rule
    assert run(lr_scheduler_type="cosine").args.lr_scheduler_type == "cosine"  # another schedule: kept
    assert run(warmup_steps=2).args.lr_scheduler_type == "constant_with_warmup"


def test_a_named_schedule_multiplies_the_learned_step_size(tmp_path):
    trainer = _tiny.make_trainer(
        tmp_path, max_steps=4, logging_steps=1, lr_scheduler_type="polynomial", optim_args="meta_lr=0,init_multiplier=1"
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    # learning_rate: the lr of the logged step (read before the scheduler steps); step_size uses the same lr.
    # polynomial (power 1, lr_end 1e-7): the linear decay on top of the learned step size
    assert [e["learning_rate"] for e in logs] == pytest.approx([1e-7 + (1e-3 - 1e-7) * (1 - t / 4) for t in range(4)])
    assert [e["step_size"] for e in logs] == pytest.approx([e["learning_rate"] for e in logs])  # meta_lr=0


def test_step_size_over_learning_rate_is_the_learned_multiplier(tmp_path):
    trainer = _tiny.make_trainer(
        tmp_path, max_steps=4, logging_steps=1, lr_scheduler_type="cosine", optim_args="meta_lr=0.05,granularity=tensor"
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    optimizer = inner(trainer.optimizer)
    multipliers = [float(optimizer.state[p]["log_step"].exp()) for g in optimizer.param_groups for p in g["params"]]
    last = logs[-1]
    assert last["step_size/max"] / last["learning_rate"] == pytest.approx(max(multipliers), rel=1e-5)
    assert last["step_size/min"] / last["learning_rate"] == pytest.approx(min(multipliers), rel=1e-5)


def test_metaoptimize_trainer_with_plain_arguments(tmp_path):
    from transformers import TrainingArguments

    from hf_metaoptimize import MetaOptimizeTrainer, StepSizePlotCallback

    args = TrainingArguments(
        str(tmp_path),
        max_steps=4,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
        optim_args="granularity=layer,base=lion",
    )
    trainer = _tiny.make_trainer(tmp_path, trainer_cls=MetaOptimizeTrainer, args=args)
    trainer.train()
    optimizer = inner(trainer.optimizer)
    assert optimizer.param_groups[0]["base"] == "lion" and optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert trainer.args.lr_scheduler_type == "constant"
    assert "step_size/transformer.h.1" in trainer.state.log_history[0]
    assert set(trainer.step_sizes()) == {k for k in trainer.state.log_history[0] if k.startswith("step_size")}
    assert any(isinstance(cb, StepSizePlotCallback) for cb in trainer.callback_handler.callbacks)
    assert (tmp_path / "step_sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def record_step_grads(trainer):
    """Grad norms and grads that reach MetaOptimize.step (hook on the inner optimizer)."""
    records = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        records.append(
            (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item(), grads)
        )

    trainer.create_optimizer()
    inner(trainer.optimizer).register_step_pre_hook(hook)
    return records


def test_accumulated_clipped_gradient_reaches_the_optimizer(tmp_path):
    def run(batch, accum, clip):
        trainer = _tiny.make_trainer(
            tmp_path,
            model=_tiny.tiny_gpt2(dropout=0.0),
            max_steps=3,
            logging_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            max_grad_norm=clip,
            optim_args="meta_lr=0.05",
        )
        records = record_step_grads(trainer)
        trainer.train()
        return trainer, records

    full, full_rec = run(8, 1, 0.05)
    accum, accum_rec = run(4, 2, 0.05)
    assert len(full_rec) == len(accum_rec) == 3  # one optimizer step per accumulated batch
    logged = [e["grad_norm"] for e in accum.state.log_history if "grad_norm" in e]
    for (norm, grads), (_, full_grads), pre_clip in zip(accum_rec, full_rec, logged):
        assert pre_clip > 0.05 and norm == pytest.approx(0.05, rel=1e-4)  # clipped before step()
        for a, b in zip(grads, full_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # the accumulated gradient = full batch
    for a, b in zip(full.model.parameters(), accum.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    sizes_full = [float(s) for row in inner(full.optimizer).step_sizes() for s in row]
    sizes_accum = [float(s) for row in inner(accum.optimizer).step_sizes() for s in row]
    assert sizes_full == pytest.approx(sizes_accum, rel=1e-5)


class TouchGrads(TrainerCallback):
    """Scales every grad in place between the Trainer's clipping and optimizer.step()."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)


def test_the_trainer_hands_its_clipping_norm_to_the_guard(tmp_path, guard_norms, monkeypatch, caplog):
    """With clipping (max_grad_norm > 0) the step takes the Trainer's pre-clip norm: the guard reads no grad, and
    the run is the one where the guard norms the grads itself, bit for bit. Without clipping, with a grad changed
    after the clipping (a callback), or with a param the model does not hold, the guard reads the grads."""

    def run(clip=0.5, callbacks=None, extra_param=False):
        model = _tiny.tiny_gpt2(dropout=0.0)
        kwargs = {}
        if extra_param:  # an optimizer the user built, holding a param outside the model
            opt = MetaOptimize([*model.parameters(), torch.nn.Parameter(torch.zeros(3))])
            kwargs = dict(trainer_kwargs=dict(optimizers=(opt, None)))
        trainer = _tiny.make_trainer(
            tmp_path, model=model, max_steps=4, max_grad_norm=clip, callbacks=callbacks, **kwargs
        )
        before = guard_norms[0]
        trainer.train()
        return trainer, guard_norms[0] - before

    noted, reads = run()
    assert reads == 0
    with monkeypatch.context() as m:
        m.setattr(MetaOptimize, "note_grad_norm", lambda self, norm: None)
        plain, reads = run()
    assert reads == 4
    for a, b in zip(noted.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)
    assert run(clip=0.0)[1] == 4
    assert run(extra_param=True)[1] == 4
    with caplog.at_level("WARNING", logger="hf_metaoptimize"):
        assert run(callbacks=[TouchGrads()])[1] == 4
    assert "changed in place after note_grad_norm()" in caplog.text


def test_lora_through_the_trainer(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny.tiny_gpt2(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0),
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = _tiny.make_trainer(
        tmp_path,
        model=model,
        max_steps=6,
        logging_steps=3,
        optim_args="granularity=layer,meta_lr=0.05,init_multiplier=1",
        learning_rate=1e-2,
    )
    trainer.train()
    optimizer = inner(trainer.optimizer)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert {g["block"] for g in optimizer.param_groups} == {"transformer.h.0", "transformer.h.1"}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        if n in lora_b:
            assert not torch.equal(p, lora_b[n]), n
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert {"step_size/transformer.h.0", "step_size/transformer.h.1"} <= set(logs[-1])
    assert logs[-1]["loss"] < logs[0]["loss"]


# ---------------------------------------------------------------- the cooldown knows the run's length
def test_the_trainer_gives_metaoptimize_the_run_length_and_the_cooldown_ends_it(tmp_path):
    """Constant schedule (the MetaOptimize default): total_steps = max_steps, the last 20% fall linearly to 0
    (10 steps, cooldown 0.2: steps 9 and 10 at s = 1/2 and 0), with the meta step frozen."""
    trainer = _tiny.make_trainer(tmp_path, max_steps=10, logging_steps=1, optim_args="meta_lr=0,init_multiplier=1")
    trainer.train()
    opt = inner(trainer.optimizer)
    assert all(g["total_steps"] == 10 for g in opt.param_groups)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    lr = 1e-3
    assert [e["step_size"] / lr for e in logs] == pytest.approx([1] * 8 + [0.5, 0.0])


@pytest.mark.parametrize(
    ("schedule", "optim_args", "expected"),
    [
        ("cosine", "", None),  # the scheduler already decays: MetaOptimize's own cooldown stays off
        ("constant", "total_steps=40", 40),  # the user's value wins
        ("constant", "cooldown=0", None),  # no cooldown asked: nothing to set
    ],
)
def test_run_length_is_only_set_where_it_is_the_cooldown(tmp_path, schedule, optim_args, expected):
    trainer = _tiny.make_trainer(tmp_path, max_steps=2, lr_scheduler_type=schedule, optim_args=optim_args or None)
    trainer.train()
    assert all(g["total_steps"] == expected for g in inner(trainer.optimizer).param_groups)


def test_metaoptimize_paper_is_the_paper_setting(tmp_path):
    from hf_metaoptimize import PAPER_EXACT

    trainer = _tiny.make_trainer(tmp_path, max_steps=2, optim="metaoptimize_paper")
    trainer.train()
    group = inner(trainer.optimizer).param_groups[0]
    assert {k: group[k] for k in PAPER_EXACT} == PAPER_EXACT
    assert group["total_steps"] is None  # cooldown 0: no run length needed

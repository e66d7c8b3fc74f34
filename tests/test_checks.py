"""Bad input gets a clear error, nothing is silently replaced, a checkpoint continues exactly or is refused.

Every test here names a probe that a user hit: the value that was accepted, the state that was silently kept,
the error that said nothing about the cause.
"""

from __future__ import annotations

import io
import logging

import pytest
import torch

from hf_metaoptimize import MetaOptimize, spec
from hf_metaoptimize import optimizer as optimizer_module


def params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, generator=gen).requires_grad_(), torch.randn(4, generator=gen).requires_grad_()]


def steps(opt: MetaOptimize, ps: list[torch.Tensor], n: int, seed: int = 1, nan: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in ps:
            p.grad = torch.full_like(p, float("nan")) if nan else torch.randn(p.shape, generator=gen)
        opt.step()


def saved(opt: MetaOptimize) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- checkpoints carry their configuration
@pytest.mark.parametrize(
    "key,old,new",
    [
        ("base", "adamw", "rmsprop"),
        ("meta", "lion", "adam"),
        ("granularity", "scalar", "element"),
        ("granularity", "tensor", "scalar"),
    ],
)
def test_checkpoint_of_another_algorithm_is_refused_naming_both_values(key, old, new):
    a = params()
    opt = MetaOptimize(a, lr=1e-2, **{key: old})
    steps(opt, a, 3)
    b = params()
    fresh = MetaOptimize(b, lr=1e-2, **{key: new})
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(saved(opt))
    msg = str(info.value)
    assert f"{key}={old!r}" in msg and f"{key}={new!r}" in msg
    assert "resume with the checkpoint's settings" in msg and "start the optimizer fresh" in msg
    assert not fresh.state  # nothing was loaded


def test_checkpoint_with_another_block_layout_is_refused():
    def model_groups(ps, layer):
        if layer:
            return [{"params": [ps[0]], "block": "a"}, {"params": [ps[1]], "block": "b"}]
        return [{"params": ps}]

    a = params()
    opt = MetaOptimize(model_groups(a, True), lr=1e-2, granularity="block")
    steps(opt, a, 2)
    with pytest.raises(ValueError, match=r"the checkpoint has 2 param group\(s\), this optimizer has 1"):
        MetaOptimize(model_groups(params(), False), lr=1e-2, granularity="block").load_state_dict(saved(opt))
    renamed = [{"params": [p], "block": n} for p, n in zip(params(), ("a", "c"))]
    with pytest.raises(ValueError, match="belongs to block 'b', this optimizer's to block 'c'"):
        MetaOptimize(renamed, lr=1e-2, granularity="block").load_state_dict(saved(opt))


def test_a_corrupt_checkpoint_value_is_named():
    a = params()
    opt = MetaOptimize(a, lr=1e-2, granularity="block")
    steps(opt, a, 2)
    sd = saved(opt)
    sd["param_groups"][0]["granularity"] = "blok"
    with pytest.raises(ValueError, match="granularity='blok'"):
        MetaOptimize(params(), lr=1e-2, granularity="block").load_state_dict(sd)


def test_tunable_settings_follow_the_new_arguments_on_resume():
    a = params()
    opt = MetaOptimize(a, lr=1e-2, meta_lr=1e-3, gamma=1.0, weight_decay=0.0)
    steps(opt, a, 3)
    sd = saved(opt)
    new = dict(
        lr=3e-3,
        meta_lr=5e-2,
        gamma=0.99,
        weight_decay=0.1,
        betas=[0.8, 0.99],
        fused=False,
        log_step_bounds=(-3, 3),
        skip_nonfinite=False,
    )
    resumed = MetaOptimize(params(), **new)
    resumed.load_state_dict(sd)
    group = resumed.param_groups[0]
    for key, value in new.items():
        assert group[key] == (tuple(value) if isinstance(value, list) else value), key
    # the learned state itself comes from the checkpoint
    for p_saved, p_new in zip(opt.param_groups[0]["params"], group["params"]):
        assert torch.equal(opt.state[p_saved]["log_step"], resumed.state[p_new]["log_step"])


def test_a_scheduler_driven_lr_comes_from_the_checkpoint():
    a = params()
    opt = MetaOptimize(a, lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=10)
    for _ in range(4):
        steps(opt, a, 1)
        sched.step()
    sd, sched_sd = saved(opt), sched.state_dict()
    b = params()
    resumed = MetaOptimize(b, lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LinearLR(resumed, start_factor=1.0, end_factor=0.1, total_iters=10)
    resumed.load_state_dict(sd)
    sched2.load_state_dict(sched_sd)
    assert resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 1e-2  # where the schedule stood


@pytest.mark.parametrize("foreign", ["adamw", "sgd"])
def test_a_foreign_optimizers_state_dict_is_refused_at_load(foreign):
    a = params()
    other = torch.optim.AdamW(a, lr=1e-3) if foreign == "adamw" else torch.optim.SGD(a, lr=1e-3, momentum=0.9)
    steps(other, a, 2)  # type: ignore[arg-type]
    fresh = MetaOptimize(params(), lr=1e-3)
    with pytest.raises(ValueError, match="not by MetaOptimize") as info:
        fresh.load_state_dict(saved(other))  # type: ignore[arg-type]
    assert ("AdamW" if foreign == "adamw" else "SGD") in str(info.value)
    with pytest.raises(ValueError, match="expects what MetaOptimize.state_dict"):
        fresh.load_state_dict({"model": {}})


def test_own_empty_state_dict_round_trips():  # accelerate's AcceleratedOptimizer does this at once
    opt = MetaOptimize(params(), lr=1e-3)
    opt.load_state_dict(opt.state_dict())


# ---------------------------------------------------------------- values that guarantee NaN or ascent
@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_a_tensor_lr_must_be_finite_and_nonnegative(bad):
    with pytest.raises(ValueError, match="invalid lr=tensor"):
        MetaOptimize(params(), lr=torch.tensor(bad))
    MetaOptimize(params(), lr=torch.tensor(1e-3))


def test_adam_meta_needs_a_positive_meta_eps():
    with pytest.raises(ValueError, match="meta_eps=0.*must be > 0"):
        MetaOptimize(params(), meta="adam", meta_eps=0.0)
    MetaOptimize(params(), meta="lion", meta_eps=0.0)  # unused by the lion meta rule


# ---------------------------------------------------------------- groups edited or loaded are re-validated
def test_edited_group_values_are_checked_before_the_next_step():
    a = params()
    opt = MetaOptimize(a, lr=1e-2)
    steps(opt, a, 1)
    opt.param_groups[0]["betas"] = [0.8, 0.99]  # torch optimizers accept lists
    steps(opt, a, 1)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    opt.param_groups[0]["gamma"] = 2.0
    with pytest.raises(ValueError, match="param group 0: invalid gamma=2.0"):
        steps(opt, a, 1)
    opt.param_groups[0]["gamma"] = 1.0
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="invalid lr=nan"):
        steps(opt, a, 1)


def test_groups_of_one_block_edited_alike_stay_valid():
    a = params()
    opt = MetaOptimize([{"params": [a[0]], "block": "x"}, {"params": [a[1]], "block": "x"}], granularity="block")
    steps(opt, a, 1)
    for group in opt.param_groups:  # lists, as torch accepts them: normalized before they are compared
        group["log_step_bounds"] = [-3, 3]
    steps(opt, a, 1)
    assert [g["log_step_bounds"] for g in opt.param_groups] == [(-3.0, 3.0)] * 2
    opt.param_groups[1]["meta_lr"] = 0.5
    with pytest.raises(ValueError, match="share block 'x' but differ in 'meta_lr'"):
        steps(opt, a, 1)


def test_add_param_group_checks_a_bare_tensor_and_leaves_nothing_behind():
    opt = MetaOptimize(params(), lr=1e-2)
    with pytest.raises(ValueError, match="real floating-point parameters only"):
        opt.add_param_group({"params": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="invalid meta_lr"):
        opt.add_param_group({"params": torch.zeros(3, requires_grad=True), "meta_lr": -1.0})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------- non-finite steps are reported
def test_skipped_steps_warn_first_and_on_a_stall(caplog):
    a = params()
    opt = MetaOptimize(a, lr=1e-2)
    steps(opt, a, 3)
    assert opt.skipped_steps() == 0
    with caplog.at_level(logging.WARNING, logger="hf_metaoptimize"):
        for _ in range(25):
            steps(opt, a, 10, nan=True)
            opt.skipped_steps()
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_metaoptimize"]
    assert opt.skipped_steps() == 250
    assert len(warnings) == 3, warnings  # the first skip, then at 100 and 200 consecutive skipped steps
    assert "skipped 10 of the last 10 step(s)" in warnings[0]
    assert f"every step for {optimizer_module.STALL_STEPS} consecutive steps" in warnings[1]
    assert "for 200 consecutive steps" in warnings[2]
    steps(opt, a, 1)  # an applied step ends the streak
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_metaoptimize"):
        opt.skipped_steps()
        steps(opt, a, 50, nan=True)
        opt.skipped_steps()
    assert not [r for r in caplog.records if r.name == "hf_metaoptimize"]  # 50 < 100 consecutive


def test_the_trainer_logs_the_skip_count(tmp_path, caplog):
    from _tiny import make_trainer
    from transformers import TrainerCallback

    class PoisonGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    trainer = make_trainer(tmp_path, callbacks=[PoisonGrads()], max_steps=4, logging_steps=2)
    with caplog.at_level(logging.WARNING, logger="hf_metaoptimize"):
        trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["skipped_steps"] for e in logs] == [2, 4]
    assert any("skipped 2 of the last 2 step(s)" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- one spec
def test_the_reference_and_the_spec_name_the_same_rules():
    from hf_metaoptimize import reference

    assert reference._BASES == spec.BASES
    assert reference._METAS == spec.METAS
    assert reference._GRANULARITIES == spec.GRANULARITIES
    assert reference._BASES_WITH_EPS == spec.BASES_WITH_EPS
    assert set(reference._BLOCK_KEYS) == set(spec.BLOCK_KEYS)
    for key, bases in (("exp_avg", reference._BASES_WITH_EXP_AVG), ("exp_avg_sq", reference._BASES_WITH_EXP_AVG_SQ)):
        assert bases == tuple(b for b in spec.BASES if key in spec.BASE_MOMENTS[b])


def test_every_path_keeps_the_spec_moments():
    """The optimizer's state and the per-tensor function's slots hold each base's moments, from spec.BASE_MOMENTS."""
    import torch

    from hf_metaoptimize import MetaOptimize
    from hf_metaoptimize.rules import kernel_slots

    for base in spec.BASES:
        p = torch.nn.Parameter(torch.ones(3))
        opt = MetaOptimize([p], lr=1e-3, base=base)
        p.grad = torch.ones(3)
        opt.step()
        moments = {k for k in opt.state[p] if opt.state[p][k].shape == p.shape} - {"trace"}
        assert moments == set(spec.BASE_MOMENTS[base])
        assert set(kernel_slots(base, False, "lion")) == {"trace", *spec.BASE_MOMENTS[base]}


def test_one_default_everywhere():
    """The constructor, the reference and the --optim_args schema take their defaults from spec.DEFAULTS."""
    import inspect

    from hf_metaoptimize import MetaOptimize, reference
    from hf_metaoptimize.integrations.optim_args import OPTIM_ARGS

    for cls in (MetaOptimize, reference.MetaOptimizeReference):
        params = inspect.signature(cls).parameters
        for key, default in spec.DEFAULTS.items():
            if key in params and key not in ("fused",):
                assert params[key].default == default, (cls.__name__, key)
    for key in ("meta", "granularity", "meta_lr", "meta_asymmetry", "init_multiplier", "cooldown", "gamma"):
        assert OPTIM_ARGS[key].default == spec.DEFAULTS[key], key
    assert set(spec.PAPER_EXACT) <= set(OPTIM_ARGS) and set(spec.PAPER_EXACT) <= set(spec.DEFAULTS)


def test_resume_classes_cover_every_hyper_parameter():
    classes = set(spec.IDENTITY_KEYS) | set(spec.ARGUMENT_KEYS) | set(spec.SCHEDULE_KEYS)
    assert set(spec.DEFAULTS) <= classes
    assert not set(spec.IDENTITY_KEYS) & set(spec.ARGUMENT_KEYS)


def _kwargs_setting(key: str, value: float) -> dict:
    """MetaOptimize keyword arguments that set what the --optim_args key `key` sets, to `value`."""
    if key in ("meta_beta1", "meta_beta2"):
        betas = list(spec.DEFAULT_META_BETAS["lion"])
        betas[key == "meta_beta2"] = value
        return {"meta_betas": tuple(betas)}
    if key == "meta_eps":
        return {"meta": "adam", "meta_eps": value}  # the key only applies to meta=adam
    if key in ("log_step_min", "log_step_max"):
        bounds = [value, spec.DEFAULTS["log_step_bounds"][1]] if key == "log_step_min" else [-14.0, value]
        return {"log_step_bounds": tuple(bounds), "init_multiplier": 1.0}  # log 1 = 0 lies in any valid bounds
    return {key: value}


def _edges(arg) -> list[tuple[float, bool]]:
    """(value, inside?) just inside and just outside every finite end of the key's range, and non-finite values."""
    r, delta = arg.range, (1 if arg.kind == "int" else 1e-6)
    out = [(float("nan"), False), (float("inf"), False)]
    if r.lo != -float("inf"):
        out += [(r.lo + delta, True), (r.lo, False)] if r.lo_open else [(r.lo, True), (r.lo - delta, False)]
    if r.hi != float("inf"):
        out += [(r.hi - delta, True), (r.hi, False)] if r.hi_open else [(r.hi, True), (r.hi + delta, False)]
    return [(int(v) if arg.kind == "int" and v == v and abs(v) != float("inf") else v, ok) for v, ok in out]


def test_optim_args_ranges_are_the_spec_ranges():
    """Every numeric --optim_args key checks the spec's range (spec.RANGES): a value just inside / just outside each
    end is accepted / refused alike while parsing and by MetaOptimize itself."""
    from hf_metaoptimize.integrations.optim_args import OPTIM_ARGS, OptimArgsError, parse_value

    numeric = {k for k, a in OPTIM_ARGS.items() if a.kind in ("float", "int")}
    assert numeric == {k for k, a in OPTIM_ARGS.items() if a.range is not None}
    for key in sorted(numeric):
        arg = OPTIM_ARGS[key]
        assert arg.range in spec.RANGES.values(), key
        for value, inside in _edges(arg):
            try:
                parse_value(key, repr(value))
                parsed = True
            except OptimArgsError:
                parsed = False
            try:
                MetaOptimize(params(), lr=1e-3, **_kwargs_setting(key, value))
                built = True
            except ValueError:
                built = False
            assert parsed == built == inside, (key, value, arg.rule, parsed, built)

"""Mixed precision: fp16 GradScaler overflow skips, bf16 autocast, bf16 params keep float32 meta state."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_metaoptimize import MetaOptimize


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_optimizer_does_not_claim_amp_scaling_support():
    # GradScaler must unscale and check for inf itself, then skip step(): no fused-scaler protocol.
    assert not getattr(MetaOptimize, "_step_supports_amp_scaling", False)


@pytest.mark.parametrize("granularity", ["scalar", "element"])
def test_gradscaler_overflow_step_changes_no_metaoptimize_state(granularity):
    model = mlp()
    opt = MetaOptimize(model.parameters(), lr=1e-2, granularity=granularity)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = data()
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")  # injected overflow
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale  # the scaler saw the overflow
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = opt.state_dict()["state"]
    for i, st in state["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after[i][k]), k  # nonfinite_steps too: step() was not even called
    # and training goes on
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_bf16_autocast_training_keeps_float32_state_and_learns():
    model = mlp()
    opt = MetaOptimize(model.parameters(), lr=1e-3, meta_lr=1e-2)
    x, y = data(64)
    losses = []
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for st in opt.state.values():
        assert st["trace"].dtype == st["log_step"].dtype == torch.float32


def test_bf16_model_trains_with_float32_meta_state():
    model = mlp(torch.bfloat16)
    opt = MetaOptimize(model.parameters(), lr=1e-3, meta_lr=1e-2, weight_decay=0.1, init_multiplier=1.0)
    x, y = data(64)
    x = x.bfloat16()
    first = None
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    for p, st in opt.state.items():
        assert p.dtype == torch.bfloat16 and st["exp_avg"].dtype == torch.bfloat16
        for k in ("trace", "log_step", "meta_exp_avg"):
            assert st[k].dtype == torch.float32
    assert opt.step_sizes()[0][0].item() > 1e-3  # the learned step size moved up from alpha0

"""The float64 reference alone, against the special cases of paper Algorithm 3, and the shipped rule's additions.

The special cases run at the paper-exact setting (``Ref``: symmetric meta step, multiplier starting at 1, no
cooldown). Each test pins one closed-form consequence of paper Algorithm 3 (meta_lr = 0 is the base optimizer,
gamma = 1 and kappa = 0 make the trace the total displacement, gamma = 0 is hypergradient descent,
granularities that must coincide do, Lion meta moves by exactly +-eta, bounds hold) so that the
reference can serve as the ground truth for the fast implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_metaoptimize import spec
from hf_metaoptimize.reference import MetaOptimizeReference

# the paper-exact setting with each test's own meta_lr
PAPER = {k: v for k, v in spec.PAPER_EXACT.items() if k != "meta_lr"}


def Ref(*args, **kwargs) -> MetaOptimizeReference:
    """The reference at the paper-exact setting."""
    return MetaOptimizeReference(*args, **{**PAPER, **kwargs})


SHAPES = [(3, 4), (5,), (2, 3, 2)]
BASES = list(spec.BASES)
GRANULARITIES = ["scalar", "block", "tensor", "element"]
STEPS = 40


def make_params(seed: int = 0, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_grads(steps: int = STEPS, seed: int = 1, shapes=SHAPES, drift: float = 0.0) -> list[list[torch.Tensor]]:
    """Per step, per param: N(0, 1) noise plus an optional fixed per-param mean (drift)."""
    gen = torch.Generator().manual_seed(seed)
    means = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return [
        [drift * mean + torch.randn(s, generator=gen, dtype=torch.float64) for s, mean in zip(shapes, means)]
        for _ in range(steps)
    ]


def apply(opt: torch.optim.Optimizer, params, grads_t) -> None:
    for p, g in zip(params, grads_t):
        p.grad = None if g is None else g.clone()
    opt.step()


def assert_params_equal(a, b, rtol=1e-10, atol=1e-12) -> None:
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------
# meta_lr = 0: exactly the base optimizer with lr = alpha0
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_meta_lr_zero_is_torch_adamw(granularity):
    params = make_params()
    theirs = clone_params(params)
    ref = Ref(
        params,
        lr=1e-2,
        base="adamw",
        granularity=granularity,
        meta_lr=0.0,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.1,
    )
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for grads_t in make_grads():
        apply(ref, params, grads_t)
        apply(torch_opt, theirs, grads_t)
        assert_params_equal(params, theirs)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(ref.state[p]["exp_avg"], torch_opt.state[q]["exp_avg"], rtol=1e-12, atol=0)
        torch.testing.assert_close(ref.state[p]["exp_avg_sq"], torch_opt.state[q]["exp_avg_sq"], rtol=1e-12, atol=0)
        assert torch.all(ref.state[p]["log_step"] == 0)


@pytest.mark.parametrize("granularity", ["scalar", "element"])
def test_meta_lr_zero_sgd_is_torch_heavy_ball(granularity):
    # EMA momentum m = (1 - rho) * heavy-ball buffer, so lr_torch = alpha * (1 - rho).
    alpha, rho = 0.05, 0.9
    params = make_params()
    theirs = clone_params(params)
    ref = Ref(params, lr=alpha, base="sgd", granularity=granularity, meta_lr=0.0, betas=rho)
    torch_opt = torch.optim.SGD(theirs, lr=alpha * (1 - rho), momentum=rho, dampening=0.0)
    for grads_t in make_grads():
        apply(ref, params, grads_t)
        apply(torch_opt, theirs, grads_t)
        assert_params_equal(params, theirs)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(ref.state[p]["exp_avg"], (1 - rho) * torch_opt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("granularity", ["scalar", "element"])
def test_meta_lr_zero_rmsprop_is_torch_adamw_without_momentum(granularity):
    # Bias-corrected RMSProp == Adam with beta1 = 0 (m_hat = g), weight decay decoupled in both.
    params = make_params()
    theirs = clone_params(params)
    ref = Ref(
        params,
        lr=1e-2,
        base="rmsprop",
        granularity=granularity,
        meta_lr=0.0,
        betas=(0.95,),
        eps=1e-7,
        weight_decay=0.05,
    )
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.0, 0.95), eps=1e-7, weight_decay=0.05)
    for grads_t in make_grads():
        apply(ref, params, grads_t)
        apply(torch_opt, theirs, grads_t)
        assert_params_equal(params, theirs)


@pytest.mark.parametrize("granularity", ["scalar", "element"])
def test_meta_lr_zero_lion_is_hand_written_lion(granularity):
    lr, c, rho, kappa = 1e-2, 0.9, 0.99, 0.1
    params = make_params()
    ours = [p.detach().clone() for p in params]
    moments = [torch.zeros_like(p) for p in ours]
    ref = Ref(params, lr=lr, base="lion", granularity=granularity, meta_lr=0.0, weight_decay=kappa)
    for grads_t in make_grads():
        apply(ref, params, grads_t)
        for i, g in enumerate(grads_t):
            update = torch.sign(c * moments[i] + (1 - c) * g)
            ours[i] = ours[i] * (1 - lr * kappa) - lr * update
            moments[i] = rho * moments[i] + (1 - rho) * g
        assert_params_equal(params, ours)
    for p, m in zip(params, moments):
        torch.testing.assert_close(ref.state[p]["exp_avg"], m)


# ----------------------------------------------------------------------------------------------------
# gamma = 1, kappa = 0: the trace is the total displacement w_t - w_0
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["scalar", "element"])
@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("base", BASES)
def test_trace_is_total_displacement_when_gamma_one(base, meta, granularity):
    params = make_params()
    w0 = [p.detach().clone() for p in params]
    ref = Ref(params, lr=1e-2, base=base, meta=meta, granularity=granularity, meta_lr=1e-2, gamma=1.0, weight_decay=0.0)
    for grads_t in make_grads(drift=1.0):
        apply(ref, params, grads_t)
    for p, start in zip(params, w0):
        torch.testing.assert_close(ref.state[p]["trace"], p.detach() - start, rtol=1e-9, atol=1e-12)
    # meta_lr > 0 really moved the step sizes, so the identity is not the trivial meta_lr = 0 one.
    assert any(bool((ref.state[p]["log_step"] != 0).any()) for p in params)


# ----------------------------------------------------------------------------------------------------
# gamma = 0: hypergradient descent, z_t = dw_{t-1} . g_t, with the Lion sign rule on log_step
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", BASES)
def test_gamma_zero_is_hypergradient_descent_with_lion_meta(base):
    eta, c_bar, rho_bar = 0.01, 0.9, 0.99
    params = make_params()
    ref = Ref(params, lr=1e-2, base=base, meta="lion", granularity="scalar", meta_lr=eta, gamma=0.0, weight_decay=0.1)
    prev_dw = [torch.zeros_like(p) for p in params]
    log_step, m_bar = 0.0, 0.0
    moves = 0
    for grads_t in make_grads(drift=0.5):
        before = [p.detach().clone() for p in params]
        apply(ref, params, grads_t)
        z = sum(float(torch.sum(dw * g)) for dw, g in zip(prev_dw, grads_t))
        step = -eta * math.copysign(1.0, c_bar * m_bar + (1 - c_bar) * z) if c_bar * m_bar + (1 - c_bar) * z else 0.0
        log_step += step
        moves += step != 0.0
        m_bar = rho_bar * m_bar + (1 - rho_bar) * z
        prev_dw = [p.detach() - b for p, b in zip(params, before)]
        for p, dw in zip(params, prev_dw):
            torch.testing.assert_close(ref.state[p]["trace"], dw, rtol=1e-9, atol=1e-14)  # h_t = dw_{t-1}
            assert float(ref.state[p]["log_step"]) == pytest.approx(log_step, abs=1e-12)
            assert float(ref.state[p]["meta_exp_avg"]) == pytest.approx(m_bar, rel=1e-9, abs=1e-15)
    assert moves > STEPS // 2


# ----------------------------------------------------------------------------------------------------
# gamma < 1, kappa > 0: one step of the trace and of the Adam / Lion meta rule, by hand from observed values
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("granularity", ["scalar", "element"])
@pytest.mark.parametrize("base", BASES)
def test_trace_and_meta_recursions_by_hand(base, meta, granularity):
    lr, eta, gamma, kappa, b1, b2 = 1e-2, 1e-2, 0.9, 0.1, 0.8, 0.95
    params = make_params()
    ref = Ref(
        params,
        lr=lr,
        base=base,
        meta=meta,
        granularity=granularity,
        meta_lr=eta,
        gamma=gamma,
        weight_decay=kappa,
        meta_betas=(b1, b2),
        meta_eps=1e-7,
    )
    apply(ref, params, make_grads(steps=1, seed=7)[0])
    for s, grads_t in enumerate(make_grads(drift=0.5), start=2):
        w_old = [p.detach().clone() for p in params]
        old = [{k: v.clone() for k, v in ref.state[p].items()} for p in params]
        apply(ref, params, grads_t)
        if granularity == "scalar":
            z = [sum(torch.sum(o["trace"] * g) for o, g in zip(old, grads_t))] * len(params)  # Z = sum_p h_p . g_p
        else:
            z = [o["trace"] * g for o, g in zip(old, grads_t)]  # z_i = h_i g_i
        for p, w, o, zp in zip(params, w_old, old, z):
            state = ref.state[p]
            alpha = lr * torch.exp(o["log_step"])
            dw = p.detach() - w
            # h <- gamma (1 - kappa alpha) h + dw
            torch.testing.assert_close(
                state["trace"], gamma * (1 - kappa * alpha) * o["trace"] + dw, rtol=1e-9, atol=1e-15
            )
            if meta == "adam":
                m = b1 * o["meta_exp_avg"] + (1 - b1) * zp
                v = b2 * o["meta_exp_avg_sq"] + (1 - b2) * zp**2
                log_step = o["log_step"] - eta * (m / (1 - b1**s)) / (torch.sqrt(v / (1 - b2**s)) + 1e-7)
                assert float(state["meta_step"]) == s
                torch.testing.assert_close(state["meta_exp_avg_sq"], v, rtol=1e-9, atol=0)
            else:
                log_step = o["log_step"] - eta * torch.sign(b1 * o["meta_exp_avg"] + (1 - b1) * zp)
                m = b2 * o["meta_exp_avg"] + (1 - b2) * zp
            torch.testing.assert_close(state["meta_exp_avg"], m, rtol=1e-9, atol=1e-18)
            torch.testing.assert_close(state["log_step"], log_step, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------------------------------
# granularities that must coincide
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("base", BASES)
def test_scalar_equals_block_with_one_block(base, meta):
    kwargs = dict(base=base, meta=meta, meta_lr=1e-2, gamma=0.99, weight_decay=0.05)
    params_s = make_params()
    params_b = clone_params(params_s)
    params_n = clone_params(params_s)
    # Two groups with different lr: scalar granularity vs one shared "block" key.
    scalar = Ref(
        [{"params": params_s[:2], "lr": 1e-2}, {"params": params_s[2:], "lr": 3e-3}], granularity="scalar", **kwargs
    )
    block = Ref(
        [{"params": params_b[:2], "lr": 1e-2, "block": "all"}, {"params": params_b[2:], "lr": 3e-3, "block": "all"}],
        granularity="block",
        **kwargs,
    )
    # One group without a block key is one block too.
    single = Ref([{"params": params_n, "lr": 1e-2}], granularity="block", **kwargs)
    single_scalar_params = clone_params(params_s)
    single_scalar = Ref(single_scalar_params, lr=1e-2, granularity="scalar", **kwargs)
    for grads_t in make_grads(drift=0.5):
        runs = ((scalar, params_s), (block, params_b), (single, params_n), (single_scalar, single_scalar_params))
        for opt, ps in runs:
            apply(opt, ps, grads_t)
    assert_params_equal(params_s, params_b, rtol=0, atol=0)
    assert_params_equal(params_n, single_scalar_params, rtol=0, atol=0)
    for ps, opt in ((params_s, scalar), (params_b, block), (params_n, single)):
        values = {float(opt.state[p]["log_step"]) for p in ps}
        assert len(values) == 1 and values != {0.0}  # identical copies across the block, and it moved
    for p, q in zip(params_s, params_b):
        for key in scalar.state[p]:
            torch.testing.assert_close(scalar.state[p][key], block.state[q][key], rtol=0, atol=0)


@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("base", BASES)
def test_block_with_one_group_per_tensor_equals_tensor(base, meta):
    kwargs = dict(lr=1e-2, base=base, meta=meta, meta_lr=1e-2, gamma=0.99, weight_decay=0.05)
    params_t = make_params()
    params_b = clone_params(params_t)
    tensor = Ref(params_t, granularity="tensor", **kwargs)
    block = Ref([{"params": [p]} for p in params_b], granularity="block", **kwargs)
    for grads_t in make_grads(drift=0.5):
        apply(tensor, params_t, grads_t)
        apply(block, params_b, grads_t)
    assert_params_equal(params_t, params_b, rtol=0, atol=0)
    for p, q in zip(params_t, params_b):
        for key in tensor.state[p]:
            torch.testing.assert_close(tensor.state[p][key], block.state[q][key], rtol=0, atol=0)
    assert len({float(tensor.state[p]["log_step"]) for p in params_t}) > 1  # really one per tensor


# ----------------------------------------------------------------------------------------------------
# Lion meta: each log_step moves by exactly +-meta_lr or 0; bounds always hold
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("base", BASES)
def test_lion_meta_moves_log_step_by_exactly_meta_lr(base, granularity):
    eta = 0.01
    params = make_params()
    ref = Ref(
        params, lr=1e-2, base=base, meta="lion", granularity=granularity, meta_lr=eta, gamma=0.999, weight_decay=0.1
    )
    seen_move = False
    for grads_t in make_grads():
        before = [ref.state[p]["log_step"].clone() if ref.state[p] else torch.zeros(()) for p in params]
        apply(ref, params, grads_t)
        for p, b in zip(params, before):
            delta = (ref.state[p]["log_step"] - b).abs()
            ok = (delta < 1e-12) | ((delta - eta).abs() < 1e-12)
            assert bool(ok.all()), delta
            seen_move |= bool((delta > 0).any())
    assert seen_move


@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_log_step_stays_within_bounds(meta, granularity):
    lo, hi = -0.05, 0.03
    params = make_params()
    ref = Ref(params, lr=1e-2, base="adamw", meta=meta, granularity=granularity, meta_lr=0.02, log_step_bounds=(lo, hi))
    # Gradients with a fixed mean: z = h . g < 0, so the step sizes keep growing until the upper bound.
    for grads_t in make_grads(steps=30, drift=2.0):
        apply(ref, params, grads_t)
        for p in params:
            log_step = ref.state[p]["log_step"]
            assert bool(((log_step >= lo) & (log_step <= hi)).all())
    assert any(bool((ref.state[p]["log_step"] == hi).any()) for p in params)


# ----------------------------------------------------------------------------------------------------
# bookkeeping: lazy state, params without grads, non-finite skip, closure, step_sizes, state keys
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("granularity", ["scalar", "block"])
def test_late_param_copies_block_state_and_idle_members_follow(meta, granularity):
    lr = 1e-2
    params = make_params()
    groups = [{"params": params[:2], "block": "b"}, {"params": params[2:], "block": "b"}]
    ref = Ref(groups, lr=lr, base="adamw", meta=meta, granularity=granularity, meta_lr=1e-2)
    first, idle, late = params
    for t, grads_t in enumerate(make_grads(steps=12, drift=1.0)):
        grads_t = list(grads_t)
        if t < 6:
            grads_t[2] = None  # `late` has no grad (and so no state) for its first 6 steps
        if t >= 9:
            grads_t[1] = None  # `idle` has state but no grad from step 10 on
        block_log_step = float(ref.state[first]["log_step"]) if t else 0.0
        late_before = late.detach().clone()
        apply(ref, params, grads_t)
        if t < 6:
            assert len(ref.state[late]) == 0
            # a stateless member reports its block's current step size
            assert ref.step_sizes()[1][0].item() == pytest.approx(lr * math.exp(float(ref.state[first]["log_step"])))
        if t == 6:
            # `late` took its first AdamW step (m_hat / sqrt(v_hat) = g / |g|) with the block's log_step as it
            # was before this step's meta update, i.e. copied from the first member of the block.
            g = grads_t[2]
            expected_dw = -lr * math.exp(block_log_step) * g / (g.abs() + 1e-8)
            torch.testing.assert_close(late.detach() - late_before, expected_dw, rtol=1e-9, atol=1e-15)
            assert block_log_step != 0.0
        for p in params[1:]:  # every stateful member holds an identical copy of the block's meta state
            for key in ("log_step", "meta_exp_avg", "meta_exp_avg_sq", "meta_step"):
                if key in ref.state[p]:
                    assert torch.equal(ref.state[p][key], ref.state[first][key]), key
    assert [float(ref.state[p]["step"]) for p in params] == [12, 9, 6]
    if meta == "adam":
        assert float(ref.state[late]["meta_step"]) == 12  # copied counter, then one update per block step


def test_late_param_starts_from_zero_at_tensor_granularity():
    params = make_params()
    ref = Ref(params, lr=1e-2, granularity="tensor", meta_lr=1e-2)
    grads = make_grads(drift=1.0)
    for t, grads_t in enumerate(grads[:10]):
        apply(ref, params, [None if (t < 5 and i == 2) else g for i, g in enumerate(grads_t)])
    assert abs(float(ref.state[params[0]]["log_step"])) > 1e-2
    assert abs(float(ref.state[params[2]]["log_step"])) <= 5 * 1e-2 + 1e-12
    assert float(ref.state[params[2]]["step"]) == 5


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_step_is_skipped_entirely(bad):
    params = make_params()
    ref = Ref(params, lr=1e-2, meta="adam", granularity="element", meta_lr=1e-2)
    grads = make_grads(steps=6)
    for grads_t in grads[:5]:
        apply(ref, params, grads_t)
    before_params = [p.detach().clone() for p in params]
    before_state = {id(p): {k: v.clone() for k, v in ref.state[p].items()} for p in params}
    poisoned = [g.clone() for g in grads[5]]
    poisoned[1][0] = bad
    apply(ref, params, poisoned)
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
        for key, value in ref.state[p].items():
            expected = before_state[id(p)][key] + (1 if key == "nonfinite_steps" else 0)
            assert torch.equal(value, expected), key
    apply(ref, params, grads[5])  # the next finite step goes through
    assert all(float(ref.state[p]["step"]) == 6 for p in params)


def test_nonfinite_step_applied_when_skip_disabled():
    params = make_params()
    ref = Ref(params, lr=1e-2, skip_nonfinite=False)
    grads = make_grads(steps=2)
    apply(ref, params, grads[0])
    grads[1][0][0, 0] = math.inf
    apply(ref, params, grads[1])
    assert not bool(torch.isfinite(params[0]).all())
    assert all(float(ref.state[p]["nonfinite_steps"]) == 0 and float(ref.state[p]["step"]) == 2 for p in params)


def test_closure_is_called_and_its_loss_returned():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ref = Ref(model.parameters(), lr=1e-2)
    calls = []

    def closure():
        ref.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    first = ref.step(closure)
    for _ in range(20):
        last = ref.step(closure)
    assert len(calls) == 21 and float(first.detach()) == calls[0] and float(last.detach()) == calls[-1]
    assert calls[-1] < calls[0]


@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("base", BASES)
def test_state_keys_and_shapes_follow_design(base, meta, granularity):
    params = make_params()
    ref = Ref(params, lr=1e-2, base=base, meta=meta, granularity=granularity)
    apply(ref, params, make_grads(steps=1)[0])
    expected = {"step", "trace", "log_step", "meta_exp_avg", "block_step", "nonfinite_steps"}
    expected |= {"exp_avg"} if base in ("adamw", "lion", "sgd") else set()
    expected |= {"exp_avg_sq"} if base in ("adamw", "rmsprop") else set()
    expected |= {"meta_exp_avg_sq", "meta_step"} if meta == "adam" else set()
    log_step_shape = None
    for p in params:
        state = ref.state[p]
        assert set(state) == expected
        log_step_shape = p.shape if granularity == "element" else torch.Size([])
        for key in ("step", "nonfinite_steps", "meta_step", "block_step"):
            if key in state:
                assert state[key].shape == torch.Size([]) and state[key].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq", "trace"):
            if key in state:
                assert state[key].shape == p.shape
        for key in ("log_step", "meta_exp_avg", "meta_exp_avg_sq"):
            if key in state:
                assert state[key].shape == log_step_shape
    sizes = ref.step_sizes()
    assert len(sizes) == 1 and len(sizes[0]) == len(params)
    for p, size in zip(params, sizes[0]):
        assert size.dtype == torch.float32
        torch.testing.assert_close(size, (1e-2 * torch.exp(ref.state[p]["log_step"])).float())


def test_float32_params_stay_float32_and_track_float64_run():
    params64 = make_params()
    params32 = [torch.nn.Parameter(p.detach().float()) for p in params64]
    kwargs = dict(lr=1e-2, base="adamw", granularity="tensor", meta_lr=1e-2, weight_decay=0.1)
    ref64 = Ref(params64, **kwargs)
    ref32 = Ref(params32, **kwargs)
    for grads_t in make_grads(drift=0.5):
        apply(ref64, params64, grads_t)
        apply(ref32, params32, [g.float() for g in grads_t])
    for p, q in zip(params64, params32):
        assert q.dtype == torch.float32
        torch.testing.assert_close(q.detach().double(), p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base="adam"),
        dict(meta="sgd"),
        dict(granularity="layer"),
        dict(base="lion", eps=1e-8),
        dict(base="sgd", eps=1e-8),
        dict(gamma=1.5),
        dict(meta_lr=-1.0),
        dict(log_step_bounds=(0.5, 1.0)),
        dict(base="adamw", betas=(0.9,)),
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        Ref(make_params(), **kwargs)


def test_groups_sharing_a_block_must_agree_on_meta_settings():
    params = make_params()
    with pytest.raises(ValueError):
        Ref([{"params": params[:1], "meta_lr": 1e-2}, {"params": params[1:]}], granularity="scalar")
    # separate blocks may differ
    Ref([{"params": params[:1], "meta_lr": 1e-2}, {"params": params[1:]}], granularity="block")


# ----------------------------------------------------------------------------------------------------
# the shipped rule: asymmetric meta step, initial multiplier, cooldown (docs/design.md "The shipped rule")
# ----------------------------------------------------------------------------------------------------
def test_cooldown_factor_by_hand():
    """meta_lr = 0, SGD without momentum: w_t = w_{t-1} - lr * m0 * s(t) g_t with s = 1 up to T - n_c, then
    (T - t) / n_c, and 0 from t = T on (T = 10, cooldown 0.3: n_c = 3)."""
    params = make_params(shapes=[(4,)])
    lr, m0 = 0.1, 0.5
    ref = MetaOptimizeReference(
        params, lr=lr, base="sgd", betas=0.0, meta_lr=0.0, init_multiplier=m0, total_steps=10, cooldown=0.3
    )
    expected_s = [1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0, 0, 0]
    for t, grads_t in enumerate(make_grads(steps=len(expected_s), shapes=[(4,)]), start=1):
        size = ref.step_sizes()[0][0]
        torch.testing.assert_close(size, torch.tensor(lr * m0 * expected_s[t - 1], dtype=torch.float32))
        before = params[0].detach().clone()
        apply(ref, params, grads_t)
        torch.testing.assert_close(params[0].detach(), before - lr * m0 * expected_s[t - 1] * grads_t[0])
        assert int(ref.state[params[0]]["block_step"]) == t


@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_meta_state_frozen_during_cooldown(meta, granularity):
    """The meta step runs up to t = T - n_c and is frozen after it: log_step and the meta moments stay as they
    were after step T - n_c (T = 20, cooldown 0.25: frozen from step 16 on)."""
    params = make_params()
    ref = MetaOptimizeReference(
        params, lr=1e-2, meta=meta, granularity=granularity, meta_lr=3e-2, total_steps=20, cooldown=0.25
    )
    grads = make_grads(steps=24, drift=1.0)
    keys = ("log_step", "meta_exp_avg", "meta_exp_avg_sq", "meta_step")
    snap = None
    for t, grads_t in enumerate(grads, start=1):
        apply(ref, params, grads_t)
        if t == 14:
            before = [ref.state[p]["log_step"].clone() for p in params]
        if t == 15:
            assert any(not torch.equal(b, ref.state[p]["log_step"]) for b, p in zip(before, params))  # still learning
            snap = [{k: ref.state[p][k].clone() for k in keys if k in ref.state[p]} for p in params]
        if t > 15:
            for p, saved in zip(params, snap):
                for k, v in saved.items():
                    assert torch.equal(ref.state[p][k], v), (t, k)


@pytest.mark.parametrize("granularity", ["scalar", "tensor", "element"])
def test_asymmetric_lion_meta_falls_faster_than_it_grows(granularity):
    """Lion meta with meta_asymmetry = a: every change of log_step is +eta, -a * eta or 0 (a sign(0) step),
    and both signs occur (gradients whose mean flips sign)."""
    params = make_params()
    eta, a = 1e-2, 2.5
    ref = MetaOptimizeReference(params, lr=1e-2, granularity=granularity, meta_lr=eta, meta_asymmetry=a)
    grads = make_grads(steps=STEPS, drift=1.0)
    grads = grads[:20] + [[-g for g in step] for step in grads[20:]]
    seen_up = seen_down = False
    prev = None
    for grads_t in grads:
        apply(ref, params, grads_t)
        now = [ref.state[p]["log_step"].clone() for p in params]
        if prev is not None:
            for n, o in zip(now, prev):
                d = n - o
                ok = (
                    torch.isclose(d, torch.tensor(eta, dtype=d.dtype), atol=1e-12)
                    | torch.isclose(d, torch.tensor(-a * eta, dtype=d.dtype), atol=1e-12)
                    | (d == 0)
                )
                assert bool(ok.all())
                seen_up |= bool((d > 0).any())
                seen_down |= bool((d < 0).any())
        prev = now
    assert seen_up and seen_down


def test_init_multiplier_is_the_first_step_size():
    params = make_params()
    ref = MetaOptimizeReference(params, lr=1e-2, init_multiplier=0.1, granularity="element")
    for p, size in zip(params, ref.step_sizes()[0]):
        torch.testing.assert_close(size, torch.full(p.shape, 1e-3, dtype=torch.float32))
    apply(ref, params, make_grads(steps=1)[0])
    for p in params:
        assert ref.state[p]["log_step"].shape == p.shape
        assert torch.allclose(ref.state[p]["log_step"], torch.tensor(math.log(0.1), dtype=torch.float64), atol=0.02)


@pytest.mark.parametrize(("total", "cooldown", "n_c"), [(10, 0.3, 3), (3, 0.2, 0), (100, 0.0, 0), (5, 1.0, 5)])
def test_cooldown_length_is_the_floor(total, cooldown, n_c):
    """n_c = floor(cooldown * T); n_c = 0 means no cooldown (s = 1 everywhere, also at and past T)."""
    group = dict(spec.DEFAULTS, total_steps=total, cooldown=cooldown)
    assert spec.cooldown_steps(group) == n_c
    params = make_params(shapes=[(2,)])
    ref = MetaOptimizeReference(params, lr=0.1, meta_lr=0.0, total_steps=total, cooldown=cooldown)
    for grads_t in make_grads(steps=total + 2, shapes=[(2,)]):
        apply(ref, params, grads_t)
    s_next = float(ref.step_sizes()[0][0]) / (0.1 * ref.defaults["init_multiplier"])
    assert s_next == pytest.approx(1.0 if n_c == 0 else 0.0)

"""Behaviour of the fast MetaOptimize: special cases, robustness, checkpoints, learning on real data.

The contract that every configuration of the case table keeps (lr = 0, non-finite steps, bit-exact resume, no
host reads, refused inputs) is tests/test_contract.py.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from hf_metaoptimize import MetaOptimize
from hf_metaoptimize.optimizer import BASES, GRANULARITIES, METAS


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (4,), (3, 2, 2), (5,)]
    return [torch.randn(s, generator=gen, dtype=torch.float32).to(dtype).requires_grad_() for s in shapes]


def feed(params, gen, scale=1.0):
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale + 0.3 * p.detach().float()).to(p.dtype)


def run(opt, params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        feed(params, gen)
        opt.step()
    return gen


# ---------------------------------------------------------------- special cases on the fast path
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_meta_lr_zero_is_adamw(weight_decay):
    params = make_params(torch.float64)
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = MetaOptimize(params, lr=1e-2, meta_lr=0.0, weight_decay=weight_decay, init_multiplier=1.0)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        feed(params, gen)
        for p, q in zip(params, ref):
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    for p, q in zip(params, ref):
        torch.testing.assert_close(opt.state[p]["exp_avg"], torch_opt.state[q]["exp_avg"], rtol=1e-12, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch_opt.state[q]["exp_avg_sq"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("base", BASES)
def test_gamma_one_no_decay_trace_is_displacement(base):
    params = make_params(torch.float64)
    w0 = [p.detach().clone() for p in params]
    opt = MetaOptimize(params, lr=1e-2, base=base, gamma=1.0, weight_decay=0.0, meta_lr=1e-2)
    run(opt, params, 50)
    for p, p0 in zip(params, w0):
        torch.testing.assert_close(opt.state[p]["trace"], p.detach() - p0, rtol=1e-9, atol=1e-12)


def test_lion_meta_moves_log_step_by_exactly_eta():
    params = make_params(torch.float64)
    opt = MetaOptimize(params, lr=1e-2, granularity="element", meta_lr=1e-2, meta_asymmetry=1.0)
    prev = None
    for i in range(30):
        run(opt, params, 1, seed=i)
        cur = torch.cat([opt.state[p]["log_step"].flatten() for p in params])
        if prev is not None:
            d = (cur - prev).abs()
            assert torch.all((d < 1e-12) | ((d - 1e-2).abs() < 1e-12))
        prev = cur


def test_log_step_bounds_hold():
    params = make_params()
    opt = MetaOptimize(
        params, lr=1e-3, meta_lr=0.5, granularity="tensor", log_step_bounds=(-1.0, 0.5), init_multiplier=1.0
    )
    run(opt, params, 40)
    for p in params:
        assert -1.0 <= opt.state[p]["log_step"].item() <= 0.5


# ---------------------------------------------------------------- robustness
def test_nonfinite_first_step_leaves_no_trace():
    params = make_params()
    opt = MetaOptimize(params, lr=1e-2)
    w = [p.detach().clone() for p in params]
    feed(params, torch.Generator().manual_seed(0))
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(w, params))
    for p in params:
        assert opt.state[p]["step"].item() == 0 and not opt.state[p]["trace"].any()


@pytest.mark.parametrize("gran", GRANULARITIES)
def test_none_grads_are_skipped_without_state_or_side_effects(gran):
    params, others = make_params(), make_params()
    del others[1]
    frozen = params[1]
    opt = MetaOptimize(params, lr=1e-2, granularity=gran, meta_lr=1e-2)
    opt2 = MetaOptimize(others, lr=1e-2, granularity=gran, meta_lr=1e-2)  # as if the frozen one did not exist
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        frozen.grad = None
        for q, g in zip(others, grads[:1] + grads[2:]):
            q.grad = g.clone()
        opt.step()
        opt2.step()
    assert not opt.state.get(frozen)
    mine = opt.step_sizes()[0]
    del mine[1]
    for a, b in zip(mine, opt2.step_sizes()[0]):
        assert torch.equal(a, b)
    for p, q in zip(params[:1] + params[2:], others):
        assert torch.equal(p, q)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("gran", ["scalar", "element"])
def test_small_bucket_workspace_is_reused_bounded_and_changes_no_number(gran, groups):
    """The foreach path keeps one flat grad workspace per layout (rules._workspace) and the buffers behind its lists
    of per-tensor numbers (rules.slots): reusing them across steps and layouts (random subsets of params with a
    grad, more layouts than it keeps), and, with two groups of as many tensors (other lr and weight decay: two
    buckets whose lists share a buffer in one step), gives the same bits as fresh ones at every step, and never
    more than rules.WORKSPACES / rules.SLOTS of them are held."""
    from hf_metaoptimize import rules

    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (4,), (2, 2, 2), (5,), (1, 3), (7,)]
    a = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    b = [t.detach().clone().requires_grad_() for t in a]

    def make(ps):
        kw = dict(lr=1e-2, granularity=gran, meta_lr=1e-2, weight_decay=0.1, foreach=True)
        if groups == 1:
            return MetaOptimize(ps, **kw)
        return MetaOptimize([{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-2, "weight_decay": 0.0}], **kw)

    oa, ob = make(a), make(b)
    held = slots = 0
    for step in range(40):
        active = [i for i in range(len(shapes)) if torch.rand((), generator=gen) < 0.7] or [0]
        for i, (p, q) in enumerate(zip(a, b)):
            g = torch.randn(shapes[i], generator=gen) if i in active else None
            p.grad, q.grad = g, None if g is None else g.clone()
        if step == 20:
            a[active[0]].grad[0] = float("nan")  # a skipped step goes through the workspace too
            b[active[0]].grad[0] = float("nan")
        oa.step()
        ob._views = {}  # a fresh workspace and fresh number buffers every step
        ob.step()
        held = max(held, sum(1 for k in oa._views if isinstance(k, tuple) and k[0] == "workspace"))
        slots = max(slots, sum(1 for k in oa._views if isinstance(k, tuple) and k[0] == "slots"))
        for p, q in zip(a, b):
            assert torch.equal(p, q), step
            for k, v in oa.state.get(p, {}).items():
                assert torch.equal(v, ob.state[q][k]), (step, k)
    assert 1 <= held <= rules.WORKSPACES
    assert 1 <= slots <= rules.SLOTS
    assert oa.skipped_steps() == ob.skipped_steps() == 1


def test_slots_hand_out_the_values_through_views_made_once():
    """rules.slots: the list holds the values of the latest call with its key (the views were made at the first
    call), a list per key and length, and the views of the values themselves without a cache."""
    from hf_metaoptimize import rules

    cache: dict = {}
    first = rules.slots(cache, "x", torch.tensor([1.0, 2.0, 3.0]))
    assert [float(t) for t in first] == [1.0, 2.0, 3.0]
    again = rules.slots(cache, "x", torch.tensor([4.0, 5.0, 6.0]))
    assert again is first and [float(t) for t in first] == [4.0, 5.0, 6.0]
    other = rules.slots(cache, "y", torch.tensor([7.0, 8.0, 9.0]))
    assert other is not first and [float(t) for t in first] == [4.0, 5.0, 6.0]
    assert rules.slots(cache, "x", torch.tensor([1.0, 2.0])) is not first  # another length: a buffer of its own
    values = torch.tensor([1.0, 2.0])
    plain = rules.slots(None, "x", values)
    assert all(t._base is values for t in plain)


def test_late_param_joins_its_block_step_size():
    params = make_params()
    opt = MetaOptimize(params, lr=1e-2, granularity="scalar", meta_lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        feed(params, gen)
        params[3].grad = None
        opt.step()
    feed(params, gen)
    opt.step()
    ls = [opt.state[p]["log_step"] for p in params]
    assert all(torch.equal(ls[0], x) for x in ls)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("meta", METAS)
def test_bf16_params_keep_float32_meta_state_also_after_load(gran, meta):
    params = make_params(torch.bfloat16)
    opt = MetaOptimize(params, lr=1e-2, granularity=gran, meta=meta, weight_decay=0.1)
    run(opt, params, 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = MetaOptimize(params, lr=1e-2, granularity=gran, meta=meta, weight_decay=0.1)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for o in (opt, opt2):
        st = o.state[params[0]]
        assert st["exp_avg"].dtype == torch.bfloat16
        for k in ("trace", "log_step", "meta_exp_avg", "nonfinite_steps"):
            assert st[k].dtype == torch.float32, k
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, opt2.state[params[0]][k]), k
    assert all(torch.isfinite(p).all() for p in params)


# ---------------------------------------------------------------- checkpoints
def test_state_dict_is_weights_only_loadable_and_plain():
    params = make_params()
    opt = MetaOptimize(params, lr=1e-2, granularity="block")
    run(opt, params, 3)
    sd = opt.state_dict()
    for st in sd["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in st.values())
    for g in sd["param_groups"]:
        for k, v in g.items():
            assert isinstance(v, (int, float, str, bool, tuple, list, type(None), torch.Tensor)), (k, v)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_load_own_empty_state_dict_and_add_param_group():
    params = make_params()
    opt = MetaOptimize(params[:2], lr=1e-2)
    opt.load_state_dict(opt.state_dict())  # what accelerate's AcceleratedOptimizer does at once
    opt.add_param_group({"params": params[2:], "lr": 1e-3})
    run(opt, params, 3)
    assert len(opt.step_sizes()) == 2
    with pytest.raises(ValueError, match="same 'base'"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "base": "lion", "eps": None})


def test_param_groups_equal_separate_optimizers_for_tensor_granularity():
    params = make_params()
    copies = [p.detach().clone().requires_grad_() for p in params]
    opt = MetaOptimize([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}], lr=1e-2, granularity="tensor")
    o1 = MetaOptimize(copies[:2], lr=1e-2, granularity="tensor")
    o2 = MetaOptimize(copies[2:], lr=3e-3, granularity="tensor")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        feed(params, gen)
        for p, q in zip(params, copies):
            q.grad = p.grad.clone()
        opt.step()
        o1.step()
        o2.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_scheduler_multiplies_learned_step_size():
    params = make_params()
    opt = MetaOptimize(params, lr=1e-2, meta_lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    run(opt, params, 10)
    sched.step()
    ls = opt.state[params[0]]["log_step"]
    torch.testing.assert_close(opt.step_sizes()[0][0], (0.5e-2 * torch.exp(ls)).float())


@pytest.mark.parametrize("gran", ["scalar", "element"])
def test_step_size_multipliers_are_the_learned_part(gran):
    params = make_params()
    opt = MetaOptimize(params, lr=1e-2, meta_lr=1e-2, granularity=gran)
    run(opt, params, 10)
    for row, mrow in zip(opt.step_sizes(), opt.step_size_multipliers()):
        for s, m in zip(row, mrow):
            assert m.dtype == torch.float32 and m.shape == s.shape
            torch.testing.assert_close(s, 1e-2 * m)
    assert opt.step_size_multipliers()[0][0].ne(1.0).all()  # it learned something
    opt.param_groups[0]["lr"] = 0.0  # the end of a linear schedule: sizes are 0, the learned part is not
    assert all(s.eq(0).all() for row in opt.step_sizes() for s in row)
    assert all(m.gt(0).all() for row in opt.step_size_multipliers() for m in row)


def test_foreach_false_matches_foreach():
    a, b = make_params(), make_params()
    oa = MetaOptimize(a, lr=1e-2, granularity="tensor", weight_decay=0.1, foreach=True)
    ob = MetaOptimize(b, lr=1e-2, granularity="tensor", weight_decay=0.1, foreach=False)
    run(oa, a, 20)
    run(ob, b, 20)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- accepted inputs (refused ones: ERROR_INPUTS)
def test_sgd_and_rmsprop_accept_a_bare_float_beta():
    p = torch.zeros(2, requires_grad=True)
    assert MetaOptimize([p], base="sgd", betas=0.8).param_groups[0]["betas"] == (0.8,)
    assert MetaOptimize([p], base="rmsprop").param_groups[0]["betas"] == (0.99,)


# ---------------------------------------------------------------- learning on real data (digits)
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _train_digits(make_opt, steps=300, seed=0):
    x, y = _digits()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item(), opt


def test_step_size_rises_from_tiny_alpha0_and_loss_falls():
    start, _ = _train_digits(lambda p: MetaOptimize(p, lr=1e-6, meta_lr=0.03, init_multiplier=1.0), steps=1)
    fixed, _ = _train_digits(lambda p: torch.optim.AdamW(p, lr=1e-6))
    loss, opt = _train_digits(lambda p: MetaOptimize(p, lr=1e-6, meta_lr=0.03, init_multiplier=1.0))
    alpha = opt.step_sizes()[0][0].item()
    assert alpha > 1e-4, alpha  # rose by more than 100x
    assert loss < 0.5 * start and loss < 0.5 * fixed, (start, fixed, loss)


def test_step_size_comes_down_from_diverging_alpha0_and_training_recovers():
    chance = float(torch.log(torch.tensor(10.0)))
    diverged, _ = _train_digits(lambda p: torch.optim.AdamW(p, lr=1.0))
    loss, opt = _train_digits(lambda p: MetaOptimize(p, lr=1.0, meta_lr=0.01))
    alpha = opt.step_sizes()[0][0].item()
    assert diverged > chance, diverged  # plain AdamW at this step size is worse than guessing
    assert alpha < 0.1, alpha  # Lion meta: at most a factor e per 1/meta_lr = 100 steps, here e^-3
    assert loss < 0.7 * chance, (diverged, loss)


# ---------------------------------------------------------------- packaging
def test_import_is_light():
    code = (
        "import sys, hf_metaoptimize; "
        "bad = [m for m in ('transformers', 'deepspeed', 'accelerate', 'peft', 'datasets', 'matplotlib') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- the cooldown's clock
def test_stepping_past_total_steps_warns_once_and_stops(caplog):
    model = torch.nn.Linear(3, 2)
    opt = MetaOptimize(model.parameters(), lr=1e-2, total_steps=5, cooldown=0.4)
    with caplog.at_level("WARNING", logger="hf_metaoptimize"):
        for _ in range(8):
            model.weight.grad = torch.ones_like(model.weight)
            model.bias.grad = torch.ones_like(model.bias)
            before = model.weight.detach().clone()
            opt.step()
    assert torch.equal(model.weight, before)  # steps 5-8: s = 0
    msgs = [r.getMessage() for r in caplog.records if "past total_steps=5" in r.getMessage()]
    assert len(msgs) == 1 and "step 6" in msgs[0]
    assert float(opt.step_sizes()[0][0]) == 0.0


def test_resume_keeps_the_cooldown_clock():
    """block_step is saved and loaded: a resumed run is at the same point of its cooldown (bit for bit)."""
    torch.manual_seed(0)
    make = lambda m: MetaOptimize(m.parameters(), lr=1e-2, total_steps=12, cooldown=0.5)  # noqa: E731
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    oa, ob = make(a), make(b)
    grads = [torch.randn(3, 4) for _ in range(10)]

    def step(model, opt, g):
        model.weight.grad, model.bias.grad = g.clone(), g[:, 0].clone()
        opt.step()

    for g in grads[:4]:
        step(a, oa, g)
        step(b, ob, g)
    saved = ob.state_dict()
    ob = make(b)
    ob.load_state_dict(saved)
    for g in grads[4:]:
        step(a, oa, g)
        step(b, ob, g)
    assert torch.equal(a.weight, b.weight)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(oa.state[p]["block_step"], ob.state[q]["block_step"])
    assert ob._calls == 10


def test_checkpoint_without_block_step_gets_the_param_step():
    """A checkpoint from version 0.1 (no block_step) loads: the cooldown clock starts at each param's step."""
    model = torch.nn.Linear(3, 2)
    opt = MetaOptimize(model.parameters(), lr=1e-2)
    for _ in range(3):
        model.weight.grad, model.bias.grad = torch.ones(2, 3), torch.ones(2)
        opt.step()
    saved = opt.state_dict()
    for st in saved["state"].values():
        del st["block_step"]
    fresh = MetaOptimize(model.parameters(), lr=1e-2)
    fresh.load_state_dict(saved)
    assert all(float(fresh.state[p]["block_step"]) == 3.0 for p in model.parameters())


# ---------------------------------------------------------------- packed 0-d state
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


@pytest.mark.parametrize("gran", GRANULARITIES)
def test_zero_d_state_is_packed_and_checkpoints_hold_plain_copies(gran):
    """The 0-d per-param state is kept as one vector per key (one op per key per step instead of one per param);
    the state dict hands out plain copies, and a loaded optimizer packs its state again and continues exactly."""
    from hf_metaoptimize.rules import packed

    params = make_params()
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
    opt = MetaOptimize(groups, lr=1e-2, granularity=gran, meta="adam", total_steps=8)
    run(opt, params, 3)
    keys = ["step", "block_step", "nonfinite_steps", "meta_step"]
    keys += [] if gran == "element" else ["log_step", "meta_exp_avg", "meta_exp_avg_sq"]
    for k in keys:
        assert packed([opt.state[p][k] for p in params]), k
    sd = opt.state_dict()
    zero_d = {i: {k: v for k, v in st.items() if v.dim() == 0} for i, st in sd["state"].items()}
    assert all(v._base is None for st in zero_d.values() for v in st.values())  # copies, not views of the vector
    saved = {i: {k: v.clone() for k, v in st.items()} for i, st in zero_d.items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    run(opt, params, 1)  # the state dict is a snapshot of the 0-d state: stepping on does not change it
    assert all(torch.equal(saved[i][k], v) for i, st in zero_d.items() for k, v in st.items())

    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups2 = [{"params": clone[:2], "weight_decay": 0.1}, {"params": clone[2:], "weight_decay": 0.0}]
    opt2 = MetaOptimize(groups2, lr=1e-2, granularity=gran, meta="adam", total_steps=8)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    groups3 = [{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}]
    opt3 = MetaOptimize(groups3, lr=1e-2, granularity=gran, meta="adam", total_steps=8)
    opt3.load_state_dict(_roundtrip(opt.state_dict()))
    opt3._pack_0d = lambda: None  # never packed: the one-op-per-param fallback, which must give the same numbers
    run(opt, params, 3, seed=5)
    run(opt2, clone, 3, seed=5)
    run(opt3, ref, 3, seed=5)
    assert not packed([opt3.state[p]["step"] for p in ref])
    for a, b, c in zip(params, clone, ref):
        assert torch.equal(a, b) and torch.equal(a, c)
    for p, q in zip(params, clone):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k
    assert all(packed([opt2.state[p][k] for p in clone]) for k in keys)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert all(v._base is None for st in loaded["state"].values() for v in st.values() if v.dim() == 0)


def _edits():
    """What a user may do to an optimizer between steps; each is followed by the next step."""

    def clear(opt, params):
        opt.state.clear()

    def new_dict(opt, params):
        opt.state[params[1]] = {k: v.clone() for k, v in opt.state[params[1]].items()}

    def zero_d_entry(opt, params):
        for p in params:  # every member of the scalar step size, so they stay one block
            opt.state[p]["log_step"] = opt.state[p]["log_step"] + 0.5

    def meta_lr(opt, params):
        opt.param_groups[1]["meta_lr"] = 0.05

    def one_groups_lr(opt, params):  # the two groups no longer step as one merged bucket
        opt.param_groups[0]["lr"] = 3e-3

    def grads_come_and_go(opt, params):
        params[2].grad = None

    return [clear, new_dict, zero_d_entry, meta_lr, one_groups_lr, grads_come_and_go]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "compiled"])
def test_the_step_layout_kept_between_steps_follows_every_edit(edit, fused):
    """A step reuses the layout the previous step derived (which params step, their state dicts, buckets, meta-step
    members: ``MetaOptimize._layout``). Whatever a user changes between steps must be what the next step uses: the
    run equals one whose layout is derived anew at every step, bit for bit."""
    if fused:
        pytest.importorskip("torch._inductor")
    runs = []
    for fresh in (False, True):
        params = make_params()
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
        gran = "tensor" if edit.__name__ == "meta_lr" else "scalar"
        opt = MetaOptimize(groups, lr=1e-2, granularity=gran, meta_lr=1e-2, fused=fused or None)
        gen = torch.Generator().manual_seed(1)
        for t in range(6):
            feed(params, gen)
            if t == 3:
                edit(opt, params)
            if fresh:
                opt._plan = None
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        assert oa.state[p].keys() == ob.state[q].keys()
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k


@pytest.mark.parametrize("gran", ["scalar", "tensor"])
def test_groups_of_one_layout_keep_their_own_grads_through_the_guard(gran):
    """The guard's norms fill the foreach step's flat workspace of each bucket (the copy it makes anyway). Groups
    whose tensors have the same shapes share one workspace buffer; each must still step on its own grads, also on a
    skipped step: held to the float64 reference."""
    from hf_metaoptimize.reference import MetaOptimizeReference

    def groups(params):
        return [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}]

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(5, 3), (3,), (5, 3), (3,)]]
    fast = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = MetaOptimize(groups(fast), granularity=gran, meta_lr=1e-2, foreach=True)
    ref_opt = MetaOptimizeReference(groups(ref), granularity=gran, meta_lr=1e-2)
    for t in range(12):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in init]
        if t == 5:
            grads[3][1] = float("nan")
        for params, o in ((fast, opt), (ref, ref_opt)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    for p, q in zip(fast, ref):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        for k, v in ref_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][k].double(), v.double(), rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("bad", [None, "small", "large", "float64"])
def test_guard_norms_are_the_sum_of_the_grads_norms_in_every_grouping(bad):
    """The guard's input (``rules.grad_norms``) groups grads by (device, dtype) and, on CPU, norms the tensors under
    NORM_FLAT_MAX weights from one flat copy and the others one by one: whatever the grouping, the result is a sum of
    2-norms of parts of the grads (float64 where a grad is), so between the norm of all of them together and the sum
    of their norms, and not finite as soon as one entry of any grad is."""
    from hf_metaoptimize import rules

    gen = torch.Generator().manual_seed(0)
    sizes = [3, rules.NORM_FLAT_MAX - 1, 7, rules.NORM_FLAT_MAX, 2 * rules.NORM_FLAT_MAX]
    grads = [torch.randn(n, generator=gen) for n in sizes] + [torch.randn(5, 2, generator=gen, dtype=torch.float64)]
    layout = rules.norm_layout(grads)
    flat = [i for f, _ in layout for i in f]
    assert sorted(flat) == [0, 1, 2] and len(layout) == 2  # two small float32 tensors and more go flat
    where = {"small": 1, "large": 4, "float64": 5}.get(bad)
    if where is not None:
        grads[where].view(-1)[-1] = float("inf")
    got = rules.grad_norms(grads, layout)
    assert got.dtype == torch.float64
    if bad is None:
        each = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
        assert torch.linalg.vector_norm(each) * (1 - 1e-6) <= got <= each.sum() * (1 + 1e-6)
        assert got < each.sum() * (1 - 1e-3)  # the small ones were normed together
    else:
        assert not torch.isfinite(got)

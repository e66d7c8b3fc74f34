"""One contract over the whole case table (tests/optim_cases.py), as torch runs its OptimizerInfo rows.

Every case of ``CASES``, with its own param groups and gradient pattern (late params, grads that are None on
some steps, its own non-finite steps), on the fast class:

- lr = 0 is a strict no-op: params equal bit for bit (the meta state may move);
- a step with a non-finite gradient changes no param and no state but the nonfinite_steps counter, and training
  continues finite (``supports_nonfinite_skip``);
- a run resumed from a checkpoint (torch.save / weights-only load into a fresh optimizer on cloned params)
  continues bit for bit, from before the late params join and from the middle of the cooldown (``has_cooldown``);
- step() reads no tensor value on the host (a device sync on a GPU), through the cooldown and a skipped step;

and every row of ``ERROR_INPUTS`` is refused with the value and the fix named. The runs are short (a handful of
steps; the cooldown cases squeezed into :data:`SHORT_TOTAL_STEPS`): the properties hold at every step, the
fast-vs-reference tests run the long ones.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
from _host_reads import HostRead, ValueReads
from optim_cases import (
    CASES,
    ERROR_INPUTS,
    LATE_STEPS,
    fast_class,
    gradients,
    make_param_groups,
    make_params,
    set_grads,
)

from hf_metaoptimize.spec import cooldown_steps

# The cooldown cases run with total_steps = 8: cooldown = 0.3 gives n_c = 2, so steps 7 and 8 are the cooldown
# (step size halved, then 0; meta step frozen) and the steps after 8 run past its end.
SHORT_TOTAL_STEPS = 8
BAD = (math.nan, math.inf, -math.inf)
DTYPES = [torch.float32, torch.bfloat16]
# The compiled step for two cases only (each configuration compiles once; tests/test_fused.py holds it to the
# reference): a shared step size, and the element granularity whose meta step is in the kernel.
FUSED_HOST_READ = ("adamw-lion-scalar", "adamw-adam-element")

ids = lambda c: c.name  # noqa: E731


def build(case, dtype=torch.float32, **extra):
    params = make_params(dtype)
    return fast_class()(make_param_groups(case, params), **{**case.kwargs, **extra}), params


def state_copy(opt, params):
    return {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in params.items() if opt.state.get(p)}


def assert_params_equal(params, other, where=""):
    for name, p in params.items():
        q = other[name]
        assert p.dtype == q.dtype and torch.equal(p.detach(), q.detach()), f"{where}: param {name} differs"


def assert_states_equal(a, b, where=""):
    assert a.keys() == b.keys(), f"{where}: params with state {sorted(a)} != {sorted(b)}"
    for name in a:
        assert a[name].keys() == b[name].keys(), f"{where}: {name} state keys {sorted(a[name])} != {sorted(b[name])}"
        for k, v in a[name].items():
            w = b[name][k]
            assert v.dtype == w.dtype and torch.equal(v, w), f"{where}: state {name}.{k} differs"


# ---------------------------------------------------------------- lr = 0
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_lr_zero_is_a_strict_noop(case):
    """Also for a param that joins (gets its state) while lr = 0, and on the case's own non-finite steps."""
    opt, params = build(case)
    grads = gradients(case, LATE_STEPS + 2)
    for g in grads[:4]:
        set_grads(params, g, torch.float32)
        opt.step()
    before = {n: p.detach().clone() for n, p in params.items()}
    for group in opt.param_groups:
        group["lr"] = 0.0
    for g in grads[4:]:
        set_grads(params, g, torch.float32)
        opt.step()
    assert_params_equal(params, before, "lr = 0")


# ---------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_nonfinite_step_changes_nothing(case, dtype):
    """NaN, +inf and -inf in turn (the last one in two tensors at once); low-precision grads go through a float32
    copy that is sanitised, the other code path. Each skipped step adds 1 to nonfinite_steps of every param that
    had a grad, and nothing else moves; then the run goes on, finite."""
    if not case.supports_nonfinite_skip:
        pytest.skip("skip_nonfinite=False: a non-finite gradient goes through, as in torch's optimizers")
    opt, params = build(case, dtype)
    grads = gradients(case, LATE_STEPS + 3)
    for g in grads[:4]:
        set_grads(params, g, dtype)
        opt.step()
    for t, bad in zip(range(4, 4 + len(BAD)), BAD):  # steps 4-6: before the late params join
        w, st = {n: p.detach().clone() for n, p in params.items()}, state_copy(opt, params)
        set_grads(params, grads[t], dtype)
        poisoned = [n for n in ("conv.weight", "attn.out.weight", "mlp.up.weight") if params[n].grad is not None]
        for name in poisoned[: 2 if bad == -math.inf else 1]:
            params[name].grad.view(-1)[t % params[name].numel()] = bad
        opt.step()
        assert_params_equal(params, w, f"step {t} with {bad} in the grads")
        after = state_copy(opt, params)
        for name in after:
            if name in st and params[name].grad is not None:
                torch.testing.assert_close(after[name]["nonfinite_steps"], st[name]["nonfinite_steps"] + 1)
                after[name]["nonfinite_steps"] = st[name]["nonfinite_steps"]
        assert_states_equal(st, after, f"step {t} with {bad} in the grads")
    for g in grads[4 + len(BAD) :]:  # the late params join here
        set_grads(params, g, dtype)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(p, w[n]) for n, p in params.items()), "training did not continue"


# ---------------------------------------------------------------- checkpoints
RESUME_STEPS = SHORT_TOTAL_STEPS + 2
RESUME_AT = (3, SHORT_TOTAL_STEPS - 1)  # before the late params join; in the middle of the cooldown


def _checkpoint(opt, params):
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": {n: p.detach() for n, p in params.items()}}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_state_dict_resume_is_bit_identical(case):
    """The run and its resumptions from each checkpoint end with the same params and state, bit for bit."""
    case = case.in_short_run(SHORT_TOTAL_STEPS)
    opt, params = build(case)
    grads = gradients(case, RESUME_STEPS)
    saved = {}
    for t, g in enumerate(grads):
        if t in RESUME_AT:
            saved[t] = _checkpoint(opt, params)
        set_grads(params, g, torch.float32)
        opt.step()
    if case.has_cooldown:  # the second checkpoint is in the middle of the cooldown
        n_c, total = cooldown_steps(opt.param_groups[0]), case.kwargs["total_steps"]
        block_steps = [float(st["block_step"]) for st in saved[RESUME_AT[1]]["opt"]["state"].values()]
        assert n_c and all(total - n_c < s < total for s in block_steps), (n_c, total, block_steps)
    for t, ck in saved.items():
        resumed = {n: w.clone().requires_grad_() for n, w in ck["params"].items()}
        opt2 = fast_class()(make_param_groups(case, resumed), **case.kwargs)
        opt2.load_state_dict(ck["opt"])
        for g in grads[t:]:
            set_grads(resumed, g, torch.float32)
            opt2.step()
        assert_params_equal(params, resumed, f"resumed after {t} steps")
        assert_states_equal(state_copy(opt, params), state_copy(opt2, resumed), f"resumed after {t} steps")


# ---------------------------------------------------------------- no host reads in step()
@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Inside the `with` block, reading a tensor's value on the host (item, bool, float, tolist, numpy, ..., and the
    same reads made by C++, see tests/_host_reads.py) raises.

    On CPU nothing is a real device sync, but every such read in step() would be one on a GPU, and so would Python
    branching on a tensor value (it goes through __bool__)."""
    names = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu")

    def forbid(name):
        def raiser(self, *a, **k):
            raise HostRead(f"host read of a tensor value: Tensor.{name}")

        return raiser

    @contextlib.contextmanager
    def guard():
        with monkeypatch.context() as m, ValueReads(strict=True):
            for n in names:
                m.setattr(torch.Tensor, n, forbid(n))
            yield

    return guard


HOST_READ_CASES = [(c, d, False) for c in CASES for d in DTYPES]
HOST_READ_CASES += [(c, torch.float32, True) for c in CASES if c.name in FUSED_HOST_READ]


@pytest.mark.parametrize(
    "case,dtype,fused",
    HOST_READ_CASES,
    ids=[f"{c.name}-{str(d)[6:]}{'-fused' if f else ''}" for c, d, f in HOST_READ_CASES],
)
def test_step_reads_no_tensor_value_on_the_host(case, dtype, fused, forbid_host_reads):
    """Through lazy state (also of a param that joins late), the cooldown and past its end, and a skipped step."""
    case = case.in_short_run(SHORT_TOTAL_STEPS)
    opt, params = build(case, dtype, **({"fused": True} if fused else {}))
    nan_at = 4 if case.supports_nonfinite_skip else None
    for t, g in enumerate(gradients(case, SHORT_TOTAL_STEPS + 1)):
        set_grads(params, g, dtype)
        if t == nan_at:
            params["attn.out.weight"].grad[0, 0] = math.nan
        with forbid_host_reads():
            opt.step()
            opt.step_sizes()
            opt.step_size_multipliers()
    if nan_at is not None:
        assert float(opt.state[params["attn.out.weight"]]["nonfinite_steps"]) >= 1.0
    assert all(torch.isfinite(p).all() for p in params.values())


def test_host_read_guard_catches_a_read(forbid_host_reads):
    t = torch.ones(())
    with forbid_host_reads(), pytest.raises(HostRead):
        if t > 0:
            pass
    # made in C++: a 0-d tensor where the op takes a Scalar is converted with item()
    xs, ys = [torch.zeros(3), torch.zeros(2)], [torch.ones(3), torch.ones(2)]
    with forbid_host_reads(), pytest.raises(HostRead, match="_local_scalar_dense"):
        torch._foreach_lerp_(xs, ys, t * 0.5)
    with forbid_host_reads(), pytest.raises(HostRead, match="_local_scalar_dense"):
        torch._foreach_add_(xs, t)
    with forbid_host_reads():  # the forms the step uses: the weight as a list, the Tensor overload of add
        torch._foreach_lerp_(xs, ys, [t * 0.5] * 2)
        torch._foreach_add_(xs, t, alpha=1)


# ---------------------------------------------------------------- a noted grad norm
NOTED_CASES = [(c, False) for c in CASES if c.supports_nonfinite_skip]
NOTED_CASES += [(c, True) for c in CASES if c.name in FUSED_HOST_READ]


def _clip(params, max_norm=2.0):
    grads = [p for p in params.values() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)


@pytest.mark.parametrize("case,fused", NOTED_CASES, ids=[f"{c.name}{'-fused' if f else ''}" for c, f in NOTED_CASES])
def test_a_noted_norm_steps_as_the_guard_does(case, fused, guard_norms, forbid_host_reads):
    """The same grads, clipped by ``clip_grad_norm_`` in both runs: one hands the step the clipping's norm
    (note_grad_norm), the other lets the guard norm the grads. Params and state are the same bit for bit after
    every step, through the case's own non-finite steps and a NaN and an inf step added here (skipped in both,
    as the clipping spreads them); the noted run never norms the grads and reads nothing on the host."""
    case = case.in_short_run(SHORT_TOTAL_STEPS)
    extra = {"fused": True} if fused else {}
    noted, params = build(case, **extra)
    plain, twins = build(case, **extra)
    for t, g in enumerate(gradients(case, SHORT_TOTAL_STEPS + 2)):
        for ps in (params, twins):
            set_grads(ps, g, torch.float32)
            if t in (3, 5):
                ps["attn.out.weight"].grad[0, 1] = math.nan if t == 3 else math.inf
        before = guard_norms[0]
        norm = _clip(params)
        with forbid_host_reads():
            noted.note_grad_norm(norm)
            noted.step()
        assert guard_norms[0] == before, f"step {t}: the noted step normed the grads"
        _clip(twins)
        plain.step()
        assert guard_norms[0] == before + 1
        assert_params_equal(params, twins, f"step {t}")
        assert_states_equal(state_copy(plain, twins), state_copy(noted, params), f"step {t}")
    assert float(noted.state[params["attn.out.weight"]]["nonfinite_steps"]) >= 2


def test_a_note_serves_one_step_and_a_grad_changed_after_it_voids_it(guard_norms, caplog):
    case = CASES[0]
    opt, params = build(case)
    grads = gradients(case, 4)
    set_grads(params, grads[0], torch.float32)
    opt.note_grad_norm(_clip(params))
    opt.step()
    assert guard_norms[0] == 0
    set_grads(params, grads[1], torch.float32)
    opt.step()  # no note: the guard norms the grads
    assert guard_norms[0] == 1
    # a NaN written in place after a finite note: the step must not trust the note
    set_grads(params, grads[2], torch.float32)
    opt.note_grad_norm(_clip(params))
    params["attn.out.weight"].grad[0, 0] = math.nan
    w, st = {n: p.detach().clone() for n, p in params.items()}, state_copy(opt, params)
    with caplog.at_level("WARNING", logger="hf_metaoptimize"):
        opt.step()
    assert guard_norms[0] == 2
    assert_params_equal(params, w, "a step whose grads changed after the note")
    assert (
        float(opt.state[params["attn.out.weight"]]["nonfinite_steps"])
        == 1 + st["attn.out.weight"]["nonfinite_steps"].item()
    )
    assert "changed in place after note_grad_norm()" in caplog.text
    # a grad replaced after the note: voided too, and the warning is not repeated
    caplog.clear()
    set_grads(params, grads[3], torch.float32)
    opt.note_grad_norm(_clip(params))
    params["mlp.up.weight"].grad = params["mlp.up.weight"].grad.clone()
    with caplog.at_level("WARNING", logger="hf_metaoptimize"):
        opt.step()
    assert guard_norms[0] == 3 and "note_grad_norm" not in caplog.text


def test_a_noted_python_number_decides_the_guard(guard_norms):
    """A norm handed over as a Python number (a logged or reduced value): finite steps as the guard would, NaN
    skips; the grads are not normed either way."""
    case = CASES[0]
    noted, params = build(case)
    plain, twins = build(case)
    for t, g in enumerate(gradients(case, 3)):
        for ps in (params, twins):
            set_grads(ps, g, torch.float32)
        w, st = {n: p.detach().clone() for n, p in params.items()}, state_copy(noted, params)
        noted.note_grad_norm(float(_clip(params)) if t != 1 else math.nan)
        noted.step()
        if t == 1:  # finite grads, a NaN note: skipped, nothing but the counter moves
            assert_params_equal(params, w, "a NaN note")
            assert all(float(noted.state[p]["nonfinite_steps"]) == 1 for p in params.values() if p.grad is not None)
            assert st.keys() == state_copy(noted, params).keys()
            set_grads(params, g, torch.float32)  # the twin steps this one: put the runs back in line
            noted.note_grad_norm(float(_clip(params)))
            noted.step()
        _clip(twins)
        plain.step()
    assert guard_norms[0] == 3  # the plain run's three steps only
    assert_params_equal(params, twins, "noted numbers")


NOTE_ERRORS = [
    ("guard-off", dict(skip_nonfinite=False), 1.0, ValueError, r"skip_nonfinite=False.*leave the call out"),
    ("no-grads", {}, 1.0, ValueError, r"no param of this optimizer has a grad; call it after backward\(\)"),
    ("vector", {}, torch.ones(2), ValueError, r"shape \(2,\).*Pass what clip_grad_norm_ returns"),
    ("complex", {}, torch.ones((), dtype=torch.complex64), ValueError, r"dtype torch.complex64"),
    ("bool", {}, True, TypeError, r"got bool"),
    ("string", {}, "1.0", TypeError, r"got str"),
    ("negative", {}, -1.0, ValueError, r"total_norm=-1.0 is negative"),
]


@pytest.mark.parametrize("name,kwargs,value,error,match", NOTE_ERRORS, ids=[e[0] for e in NOTE_ERRORS])
def test_note_grad_norm_refuses_what_it_cannot_use(name, kwargs, value, error, match):
    case = CASES[0]
    opt, params = build(case, **kwargs)
    if name != "no-grads":
        set_grads(params, gradients(case, 1)[0], torch.float32)
    with pytest.raises(error, match=match):
        opt.note_grad_norm(value)
    assert "_noted_norm" not in opt.__dict__


# ---------------------------------------------------------------- refused inputs
@pytest.mark.parametrize("error_input", ERROR_INPUTS, ids=ids)
def test_error_inputs_name_the_value_and_the_fix(error_input):
    params = make_params(torch.float32)
    groups = make_param_groups(error_input, params)
    if error_input.edit is None:
        with pytest.raises(error_input.error, match=error_input.match):
            fast_class()(groups, **error_input.kwargs)
        return
    opt = fast_class()(groups, **error_input.kwargs)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy({n: p.detach() for n, p in params.items()})
    opt.param_groups[0].update(error_input.edit)
    with pytest.raises(error_input.error, match=error_input.match):
        opt.step()
    assert_params_equal(params, before, "a refused step")  # refused before anything moved


def test_error_inputs_cover_every_validated_hyper_parameter():
    from hf_metaoptimize.spec import DEFAULTS

    named = {key for e in ERROR_INPUTS for key in list(e.kwargs) + list(e.edit or {})}
    assert set(DEFAULTS) <= named, set(DEFAULTS) - named
    assert len({e.name for e in ERROR_INPUTS}) == len(ERROR_INPUTS)

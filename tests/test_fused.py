"""fused=True (the compiled chunk kernel, hf_metaoptimize/_fused.py) against the float64 reference and the foreach
path, and the automatic choice of the step's implementation.

Compiling costs seconds per kernel on this machine (the suite compiles chunks of 2 tensors, tests/conftest.py;
the packages are cached on disk), so the table is chosen by kernel: every base at
scalar / block / tensor granularity (one kernel per base: the meta rule of those runs outside the kernel,
in the foreach code the main table tests), every base x meta at element granularity (the meta step is in
the kernel), and the variants that exercise the kernel's special paths (weight decay with gamma < 1,
non-finite steps, missing and late grads, no guard, per-group hyper-parameters).
"""

from __future__ import annotations

import functools
import io
import zipfile

import pytest
import torch
from optim_cases import BASES, CASES, CORE_CASES, DEFAULT_LR, OptimCase, run_pair
from test_fast_vs_reference import assert_params_close, assert_state_close, assert_step_sizes_close

from hf_metaoptimize import MetaOptimize

pytestmark = pytest.mark.slow

FUSED = functools.partial(MetaOptimize, fused=True)
TABLE = [c for c in CORE_CASES if c.kwargs["granularity"] == "element" or c.kwargs["meta"] == "lion"]
NAMED = (
    "adamw-wd-gamma099-element",
    "lion-wd-gamma099-block",
    "sgd-wd-gamma099-scalar",
    "rmsprop-nonfinite-tensor",
    "rmsprop-nonfinite-element",
    "adamw-lion-grad-none-element",
    "lion-adam-grad-none-block",
    "adamw-per-group-block",
    "adamw-skip-nonfinite-off",
    "adamw-skip-nonfinite-off-element",
    "adamw-decay-split-tensor",
    "adamw-decay-split-element",
    "paper-adamw-lion-element",
    "paper-adamw-adam-element",
    "paper-lion-lion-scalar",
)
TABLE += [c for c in CASES if c.name in NAMED]


# Without the guard the kernel computes the meta-gradients itself (one more kernel per base): every base at a shared
# granularity, with params that join late and params without a grad on some steps (the kernel's z go back to the
# right params), and the decay / no-decay split (merged groups)
NOSKIP = [
    OptimCase(
        f"{base}-noskip-{gran}",
        dict(lr=DEFAULT_LR[base], base=base, granularity=gran, meta_lr=1e-2, weight_decay=0.1, skip_nonfinite=False),
        late=("attn.qkv.bias",),
        sometimes_none=("norm.weight",),
    )
    for base, gran in (("adamw", "tensor"), ("lion", "block"), ("sgd", "scalar"), ("rmsprop", "tensor"))
]
TABLE += NOSKIP


def test_table_is_what_it_says():
    assert {c.name for c in TABLE} >= set(NAMED)  # a renamed case is not dropped silently
    # per base: 4 lion-meta granularities + adam-meta element; then the named variants and the no-guard runs
    assert len(TABLE) == 5 * len(BASES) + len(NAMED) + len(NOSKIP)


@pytest.mark.parametrize("case", TABLE, ids=lambda c: c.name)
def test_fused_matches_reference_float64(case):
    pair = run_pair(case, steps=40, dtype=torch.float64, fast_cls=FUSED)
    assert_params_close(pair, rtol=1e-9, atol=1e-12)
    assert_state_close(pair, rtol=1e-9, atol=1e-12)
    assert_step_sizes_close(pair, rtol=1e-6)


@pytest.mark.parametrize(
    "case", [c for c in CORE_CASES if c.name in ("adamw-lion-element", "lion-lion-scalar")], ids=lambda c: c.name
)
def test_fused_matches_foreach_float32(case):
    fused = run_pair(case, steps=40, dtype=torch.float32, fast_cls=FUSED)
    plain = run_pair(case, steps=40, dtype=torch.float32)
    for name, p in fused.fast_params.items():
        torch.testing.assert_close(p, plain.fast_params[name], rtol=1e-5, atol=1e-6)
        for key, value in fused.fast.state[p].items():
            torch.testing.assert_close(value, plain.fast.state[plain.fast_params[name]][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip", [True, False], ids=["guard", "no-guard"])
@pytest.mark.parametrize("fused", [True, False], ids=["compiled", "per-tensor"])
def test_the_kernel_computes_the_meta_gradients(fused, skip, monkeypatch):
    """Nothing reads z before the update (the guard reads the grads alone), so the per-tensor kernel computes <h, g>
    from the OLD trace while it reads h and g for the update (no separate pass, no dot product outside it) and the
    meta step gets the z the pass before the step gives (the foreach path's, to round-off)."""
    from torch.profiler import ProfilerActivity, profile

    kw = dict(lr=1e-2, granularity="tensor", meta_lr=1e-2, weight_decay=0.1, skip_nonfinite=skip)
    runs = {}
    for name, extra in (("kernel", dict(fused=True) if fused else dict(foreach=False)), ("foreach", {})):
        model = _model(torch.float64)
        opt = MetaOptimize(model.parameters(), **kw, **extra)
        _train(model, opt, 5)
        runs[name] = (model, opt)
    model, opt = runs["kernel"]

    def refuse(*args, **kwargs):
        raise AssertionError("the meta-gradient pass before the update ran")

    monkeypatch.setattr(MetaOptimize, "_local_meta_grads", refuse)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train(model, opt, 1, seed=3)
    if fused:  # inside the compiled kernel
        assert not [e for e in prof.key_averages() if e.key == "aten::dot"]
    monkeypatch.undo()
    _train(runs["foreach"][0], runs["foreach"][1], 1, seed=3)
    for p, q in zip(model.parameters(), runs["foreach"][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        for k, v in opt.state[p].items():
            torch.testing.assert_close(v, runs["foreach"][1].state[q][k], rtol=1e-12, atol=1e-14, msg=k)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def _train(model, opt, steps, seed=1, bad_at=()):
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x = torch.randn(16, 6, generator=gen).to(next(model.parameters()).dtype)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if t in bad_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()


@pytest.mark.parametrize("granularity", ["scalar", "element"])
def test_fused_nonfinite_step_changes_nothing(granularity):
    model = _model()
    opt = MetaOptimize(
        model.parameters(), lr=1e-2, granularity=granularity, weight_decay=0.1, gamma=0.99, meta_lr=1e-2, fused=True
    )
    _train(model, opt, 5)
    before_p = [p.detach().clone() for p in model.parameters()]
    before_s = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    _train(model, opt, 1, seed=2, bad_at=(0,))
    for p, b, s in zip(model.parameters(), before_p, before_s):
        assert torch.equal(p, b)
        for k, v in opt.state[p].items():
            if k == "nonfinite_steps":
                assert v.item() == s[k].item() + 1
            else:
                assert torch.equal(v, s[k]), k


def test_fused_lr_zero_moves_nothing():
    model = _model()
    opt = MetaOptimize(model.parameters(), lr=0.0, weight_decay=0.5, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 3)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_fused_resume_is_bit_identical(granularity):
    kw = dict(lr=1e-2, granularity=granularity, meta="adam", weight_decay=0.1, meta_lr=1e-2, fused=True)
    straight = _model()
    opt = MetaOptimize(straight.parameters(), **kw)
    _train(straight, opt, 20)

    first = _model()
    opt1 = MetaOptimize(first.parameters(), **kw)
    _train(first, opt1, 10)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second = _model(seed=5)
    second.load_state_dict(ckpt["model"])
    opt2 = MetaOptimize(second.parameters(), **kw)
    opt2.load_state_dict(ckpt["opt"])
    # the data stream of steps 10..19 of the straight run
    gen = torch.Generator().manual_seed(1)
    for t in range(20):
        x = torch.randn(16, 6, generator=gen)
        if t < 10:
            continue
        loss = second(x).pow(2).mean()
        opt2.zero_grad()
        loss.backward()
        opt2.step()
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.parameters(), second.parameters()):
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k]), k


@pytest.mark.parametrize("granularity", ["element", "scalar"])
def test_fused_bf16_params_keep_float32_state(granularity):
    """bf16 params: the kernel (and the guard's dot products) read the bf16 grads as they are, widened as read; the
    foreach path computes on float32 copies. Same numbers, float32 state."""
    model = _model(torch.bfloat16)
    ref = _model(torch.bfloat16)
    opt = MetaOptimize(model.parameters(), lr=1e-2, granularity=granularity, meta_lr=1e-2, fused=True)
    ref_opt = MetaOptimize(ref.parameters(), lr=1e-2, granularity=granularity, meta_lr=1e-2)
    _train(model, opt, 10)
    _train(ref, ref_opt, 10)
    for p, q in zip(model.parameters(), ref.parameters()):
        st = opt.state[p]
        assert p.dtype == torch.bfloat16 and st["exp_avg"].dtype == torch.bfloat16
        assert st["trace"].dtype == st["log_step"].dtype == st["meta_exp_avg"].dtype == torch.float32
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(st["log_step"], ref_opt.state[q]["log_step"], rtol=0, atol=0.1)


@pytest.mark.parametrize("layout", ["transposed 2-D", "strided 1-D grad"])
def test_fused_non_contiguous_param_matches_foreach(layout):
    """Non-contiguous tensors reach the kernel as contiguous copies (written back for params and state), never as
    views it would misread: a transposed param with transposed grads, and a 1-D param whose grad is a strided view
    (a 1-D contiguous grad is passed as it is)."""

    def make():
        torch.manual_seed(0)
        if layout == "strided 1-D grad":
            return torch.nn.Parameter(torch.randn(9))
        w = torch.nn.Parameter(torch.randn(5, 7).t())  # a transposed (non-contiguous) param
        assert not w.is_contiguous()
        return w

    def grad(gen):
        if layout == "strided 1-D grad":
            g = torch.randn(18, generator=gen)[::2]
        else:
            g = torch.randn(5, 7, generator=gen).t()
        assert not g.is_contiguous()
        return g

    runs = []
    for fused in (True, False):
        w = make()
        opt = MetaOptimize([w], lr=1e-2, granularity="element", meta_lr=1e-2, weight_decay=0.1, fused=fused)
        gen = torch.Generator().manual_seed(3)
        for _ in range(8):
            w.grad = grad(gen)
            opt.step()
        runs.append((w, opt.state[w]))
    (a, sa), (b, sb) = runs
    assert not torch.equal(a, make())  # the params moved
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_fused_errors_name_the_fix():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="invalid fused='yes'"):
        MetaOptimize(p, fused="yes")
    with pytest.raises(ValueError, match="fused=True and foreach=False"):
        MetaOptimize(p, fused=True, foreach=False)


def test_fused_tiny_and_many_tensors_match_foreach():
    """Tensors of one element run uncompiled; an odd number of tensors pads the last chunk."""

    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s)) for s in [(), (1,), (3, 4), (5,), (2, 2, 2)]]

    runs = []
    for fused in (True, False):
        ps = make()
        opt = MetaOptimize(ps, lr=1e-2, granularity="tensor", weight_decay=0.1, total_steps=6, fused=fused)
        gen = torch.Generator().manual_seed(3)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append((ps, opt))
    (a, oa), (b, ob) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for k in oa.state[p]:
            torch.testing.assert_close(oa.state[p][k], ob.state[q][k], rtol=1e-5, atol=1e-6)


def test_fused_production_chunk(monkeypatch):
    from hf_metaoptimize import _fused

    monkeypatch.setattr(_fused, "CHUNK", 16)
    case = next(c for c in CORE_CASES if c.name == "adamw-lion-scalar")
    pair = run_pair(case, steps=20, dtype=torch.float64, fast_cls=FUSED)
    assert_params_close(pair, rtol=1e-9, atol=1e-12)
    assert_state_close(pair, rtol=1e-9, atol=1e-12)
    # and each tensor is ONE loop of the CPU kernel: its dot product summed in its update's loop (h and g read
    # once), its state writes not split from it (docs/design.md, where the meta-gradient dot products run)
    keys = [k for k in _fused._RUNNERS if k[0] != "meta" and k[3] == 16 and dict(k[0]).get("dots")]
    assert keys, "the production chunk's kernel (with its dot products) was not loaded"
    for key in keys:
        with zipfile.ZipFile(_fused.package_path(key)) as z:
            kernel = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("kernel.cpp"))
        assert kernel.count("for(int64_t x0=") == 16, key


def test_long_distance_fusion_guard_is_off_only_while_a_cpu_program_compiles():
    from torch._inductor.scheduler import Scheduler

    from hf_metaoptimize import _fused

    original = Scheduler.__dict__["are_long_distant_nodes"]
    with _fused._near_fusion_only_off(torch.device("cpu")):
        assert Scheduler.are_long_distant_nodes(None, None, None) is False
    assert Scheduler.__dict__["are_long_distant_nodes"] is original
    with pytest.raises(KeyError), _fused._near_fusion_only_off(torch.device("cpu")):
        raise KeyError("a failed compile")
    assert Scheduler.__dict__["are_long_distant_nodes"] is original  # restored on the way out of a failure
    with _fused._near_fusion_only_off(torch.device("cuda")):  # a GPU program compiles as Inductor has it
        assert Scheduler.__dict__["are_long_distant_nodes"] is original


def test_default_picks_the_compiled_step_for_large_models_and_says_why_not_otherwise(monkeypatch, caplog):
    from hf_metaoptimize import _fused, optimizer

    small = _model()
    opt = MetaOptimize(small.parameters(), lr=1e-2)
    _train(small, opt, 2)
    assert opt._auto_fused is False  # below AUTO_FUSED_MIN_WEIGHTS: the foreach path, nothing compiled

    monkeypatch.setattr(optimizer, "AUTO_FUSED_MIN_WEIGHTS", 10)
    runs = []
    for kw in ({}, {"foreach": True}):
        model = _model()
        o = MetaOptimize(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)
        with caplog.at_level("INFO", logger="hf_metaoptimize"):
            _train(model, o, 4)
        runs.append((model, o))
    assert runs[0][1]._auto_fused is True and runs[1][1]._auto_fused is False
    assert any("using the compiled (fused) step" in r.getMessage() for r in caplog.records)
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_fused, "_runner", broken)
    model = _model()
    o = MetaOptimize(model.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.warns(RuntimeWarning, match="compiled step is not available.*no compiler here"):
        _train(model, o, 4)
    assert o._auto_fused is False
    for p, q in zip(model.parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # exactly the foreach path


def test_default_prepares_the_kernel_the_step_runs_for_low_precision_params(monkeypatch):
    """bf16 params: the step hands the kernel the bf16 grads as they are (it widens them as it reads them: no float32
    copy); the automatic choice must load or compile that package, not another that no step runs (a second
    first-step compile). On CPU the guard's meta-gradient pass is BLAS dots: no package of its own."""
    from hf_metaoptimize import _fused, optimizer

    monkeypatch.setattr(optimizer, "AUTO_FUSED_MIN_WEIGHTS", 10)
    _fused.clear_cache()  # memory only: what this step loads is all that is in it afterwards
    model = _model(torch.bfloat16)
    opt = MetaOptimize(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    assert opt._auto_fused is True
    assert [k[1] for k in _fused._RUNNERS if k[0] != "meta"] == [
        ("torch.bfloat16", "torch.bfloat16", "torch.float32", "torch.bfloat16", "torch.bfloat16")
    ]


@pytest.mark.parametrize("replace", ["param data", "state tensor", "load_state_dict"])
def test_fused_kernel_follows_replaced_storage(replace):
    """The compiled step keeps flat views of params and state between steps: storage replaced under it (``p.data =
    ...``, a new state tensor, a load) is what the next step reads and writes, never the old one."""
    kw = dict(lr=1e-2, granularity="element", meta_lr=1e-2, weight_decay=0.1, fused=True)
    plain, edited = _model(), _model()
    opt_plain, opt_edit = MetaOptimize(plain.parameters(), **kw), MetaOptimize(edited.parameters(), **kw)
    _train(plain, opt_plain, 4)
    _train(edited, opt_edit, 4)
    if replace == "param data":
        for p in edited.parameters():
            p.data = p.data.clone()  # same values, new storage
    elif replace == "state tensor":
        for st in opt_edit.state.values():
            st["exp_avg"], st["trace"], st["log_step"] = (st[k].clone() for k in ("exp_avg", "trace", "log_step"))
    else:
        opt_edit.load_state_dict(io_roundtrip(opt_edit.state_dict()))
    _train(plain, opt_plain, 4, seed=2)
    _train(edited, opt_edit, 4, seed=2)
    for p, q in zip(plain.parameters(), edited.parameters()):
        assert torch.equal(p, q)
        for k, v in opt_plain.state[p].items():
            assert torch.equal(v, opt_edit.state[q][k]), k


def test_fused_bucket_inputs_are_reused_and_follow_grad_layouts(monkeypatch):
    """The compiled step keeps each bucket's kernel inputs whole between steps: a step whose tensors are where they
    were makes no per-tensor inputs. Grads that arrive in another layout are still read right: a transposed 2-D grad
    through a flat copy, a strided 1-D grad by gathering the bucket tensor by tensor for that step; the results are
    those of the foreach path."""
    from hf_metaoptimize import _fused

    kw = dict(lr=1e-2, granularity="tensor", meta_lr=1e-2, weight_decay=0.1)
    runs = {}
    for fused in (True, False):
        model = _model()
        opt = MetaOptimize(model.parameters(), fused=fused, foreach=None if fused else True, **kw)
        _train(model, opt, 2)
        runs[fused] = (model, opt)
    calls = []
    real = _fused._kernel_inputs
    monkeypatch.setattr(_fused, "_kernel_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    _train(runs[True][0], runs[True][1], 1, seed=2)
    assert calls == []  # every input came from the bucket's entry
    _train(runs[False][0], runs[False][1], 1, seed=2)
    for model, opt in runs.values():
        gen = torch.Generator().manual_seed(7)
        for t in range(3):
            for p in model.parameters():
                if t == 1 and p.dim() == 2:
                    p.grad = torch.randn(p.shape[::-1], generator=gen).t()  # transposed
                elif t == 2 and p.dim() == 1:
                    p.grad = torch.randn(2 * p.numel(), generator=gen)[::2]  # strided
                else:
                    p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        _train(model, opt, 2, seed=3)
    assert calls  # the strided grads' step was gathered tensor by tensor
    (a, oa), (b, ob) = runs[True], runs[False]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for k, v in oa.state[p].items():
            torch.testing.assert_close(v, ob.state[q][k], rtol=1e-5, atol=1e-6, msg=k)


def io_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_compiled_packages_are_keyed_by_thread_count_and_cpu(monkeypatch):
    """A package is specific to the intra-op thread count Inductor wrote into it and to the CPU it was compiled for
    (``-march=native``): either one changing selects (or compiles) another package, never a wrong one."""
    from hf_metaoptimize import _fused

    model = _model()
    opt = MetaOptimize(model.parameters(), lr=1e-2, fused=True)
    _train(model, opt, 1)
    p = next(model.parameters())
    config = _fused.config_of(opt.param_groups[0], True)

    def key():
        return _fused._layout(config, p, p.grad, opt.state[p])[2]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = key()
        torch.set_num_threads(2)
        two = key()
    finally:
        torch.set_num_threads(threads)
    assert one != two
    here = key()
    monkeypatch.setattr(_fused, "_cpu_identity", lambda: "another-cpu")
    assert key() != here


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="needs two cores")
def test_compiled_kernel_runs_on_the_intra_op_threads(tmp_path, monkeypatch):
    """Inductor sizes the kernel's parallelism by the example sizes it is traced with: the package compiled with two
    threads has OpenMP loops (with tiny examples it would be serial whatever the thread count)."""
    from hf_metaoptimize import _fused

    monkeypatch.setenv("HF_METAOPTIMIZE_CACHE", str(tmp_path))
    monkeypatch.setattr(_fused, "_RUNNERS", {})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model = _model()
        _train(model, MetaOptimize(model.parameters(), lr=1e-2, fused=True), 1)
    finally:
        torch.set_num_threads(threads)
    (key,) = [k for k in _fused._RUNNERS if k[0] != "meta"]  # the chunk kernel (the meta program is serial)
    with zipfile.ZipFile(_fused.package_path(key)) as z:
        kernel = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("kernel.cpp"))
    assert "#pragma omp" in kernel


# (dtype, guard): the meta program's variants a test compiles (~10 s each); the group's values are inputs, so each
# variant runs on several groups below without compiling again
META_VARIANTS = [(torch.float32, True), (torch.float32, False), (torch.float64, True)]
# (total_steps, cooldown, meta_asymmetry, meta_lr, meta_betas, log_step_bounds)
META_GROUPS = [
    (None, 0.2, 1.5, 0.02, (0.9, 0.99), (-14.0, 14.0)),
    (100, 0.3, 1.0, 0.0123, (0.95, 0.999), (-14.0, 14.0)),
    (75, 0.25, 2.0, 0.3, (0.0, 0.9), (-0.5, 0.7)),
]


@pytest.mark.parametrize("dtype,guard", META_VARIANTS)
def test_meta_program_gives_the_eager_bits(dtype, guard):
    """The compiled step runs the 0-d Lion meta step as one compiled program (``_fused.meta_program``), the group's
    numbers its inputs. It must give the same bits as ``rules.meta_update``, which runs in its place where the
    program does not compile: which one ran must change no number. A non-finite meta-gradient, a skipped step,
    members in the cooldown and members at the bounds are in it, and groups differing in every meta setting share
    the one program."""
    from hf_metaoptimize import _fused
    from hf_metaoptimize.rules import meta_update

    gen = torch.Generator().manual_seed(0)
    for total, cooldown, asym, eta, betas, bounds in META_GROUPS:
        group = dict(
            meta="lion",
            meta_betas=betas,
            meta_lr=eta,
            meta_asymmetry=asym,
            init_multiplier=0.1,
            log_step_bounds=bounds,
            meta_eps=1e-8,
            total_steps=total,
            cooldown=cooldown,
            skip_nonfinite=guard,
        )
        for okf in (1.0, 0.0):
            n = 37
            L, MB = torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype) * 1e-3
            C = torch.randint(50, 90, (n,), generator=gen).float()
            z = torch.randn(n, generator=gen, dtype=dtype) * 1e-3
            if guard:
                z[5] = float("nan")
            ok = torch.tensor(okf, dtype=dtype)
            eager = meta_update(L, MB, None, None, C, z, ok, group)
            compiled = _fused.meta_program(L, MB, None, None, C, z, ok, group)
            for a, b in zip(eager, compiled):
                assert (a is None and b is None) or torch.equal(a, b)
            if okf and bounds[0] > -1:  # the bounds bind: some members sit on them
                assert (eager[0] == bounds[0]).any() and (eager[0] == bounds[1]).any()
    programs = [k for k in _fused._RUNNERS if k[0] == "meta" and k[1] == guard and str(dtype) in k[2]]
    assert len(programs) == 1, programs


def test_meta_program_that_does_not_compile_runs_eagerly(monkeypatch, caplog):
    """A machine where the kernel compiles but the meta program does not: said once, the eager function runs, the
    step is the same."""
    from hf_metaoptimize import _fused

    def broken(*a, **k):
        raise RuntimeError("no compiler for this one")

    kw = dict(lr=1e-2, granularity="tensor", meta_lr=1e-2, weight_decay=0.1, fused=True)
    ref_model = _model()
    ref = MetaOptimize(ref_model.parameters(), **kw)
    _train(ref_model, ref, 4)
    monkeypatch.setattr(_fused, "_package", broken)
    monkeypatch.setattr(_fused, "_RUNNERS", {k: v for k, v in _fused._RUNNERS.items() if k[0] != "meta"})
    monkeypatch.setattr(_fused, "_META_FAILED", set())
    monkeypatch.setenv("HF_METAOPTIMIZE_CACHE", "/nonexistent-cache-for-this-test")
    model = _model()
    opt = MetaOptimize(model.parameters(), **kw)
    with caplog.at_level("WARNING", logger="hf_metaoptimize"):
        _train(model, opt, 4)
    assert sum("compiled meta step is not available" in r.getMessage() for r in caplog.records) == 1
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, ref.state[q][k]), k

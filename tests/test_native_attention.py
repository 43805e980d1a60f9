"""The compiled CPU kernel for attention with head statistics (avss_fast/native.py,
avss_fast/csrc/head_stats_attention.cpp) against a float64 materialised softmax: output,
entropy, max logit, sink mass and segment masses over dtypes, odd head sizes, several
query and key blocks (online rescaling), grouped and per-head values, padding with empty
rows, full and per-head masks, 1-4 segments; thread-count independence; the build cache
and the fallbacks of the loader."""

import os
import shutil
import subprocess
import warnings

import pytest
import torch

from avss_fast import native
from avss_fast.reference import masked_attention_outputs


@pytest.fixture(scope="module", params=["default", "8-wide"])
def fn(request):
    """The kernel as this machine builds it (16-wide vectors with AVX-512), and the 8-wide
    build that machines without AVX-512 get."""
    f = native.kernel() if request.param == "default" else native._load(defines=("AVSS_VL=8",))
    assert f is not None  # tests run with AVSS_FAST_NATIVE=1: a build failure raises above
    if request.param == "8-wide":
        assert f.vector_width == 8
    return f


def _inputs(B, Hq, Hk, Hv, Sq, Sk, D, dtype, seed, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hk, Sk, D, generator=g)
    # later keys get larger logits, so the running max moves between key blocks
    k = k * torch.linspace(0.5, spread, Sk)[None, None, :, None]
    v = torch.randn(B, Hv, Sk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _reference(q, k, v, *, scaling, causal, mask, starts):
    """float64 reference with k and v repeated to the query heads (v may have Hq heads)."""
    Hq = q.shape[1]
    kk = k.double().repeat_interleave(Hq // k.shape[1], 1)
    vv = v.double().repeat_interleave(Hq // v.shape[1], 1)
    return masked_attention_outputs(q.double(), kk, vv, scaling=scaling, causal=causal, attention_mask=mask,
                                    segment_starts=starts, compute_dtype=torch.float64)


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}  # inputs are exact in fp32


# name: (B, Hq, Hk, Hv, Sq, Sk, D, causal, mask kind, segment starts)
CASES = {
    "gqa_multiblock": (2, 4, 2, 2, 70, 70, 24, True, None, [0, 30, 65]),
    "odd_dim_chunked": (2, 4, 4, 4, 37, 200, 33, True, "keys", [0, 64, 128, 150]),
    "per_head_values": (1, 6, 2, 6, 40, 40, 20, True, "keys", [0, 10]),
    "noncausal_full": (2, 2, 1, 1, 45, 130, 64, False, "full", [0, 100]),
    "per_head_mask": (1, 4, 2, 2, 33, 80, 8, True, "heads", [0]),
    "one_row_blocks": (1, 2, 1, 1, 3, 300, 16, True, "keys", [5, 70, 140, 200]),
    "wide_head": (1, 2, 2, 2, 20, 20, 130, True, None, [0, 7]),
}


def _mask(kind, B, Hq, Sq, Sk, seed):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "keys":  # left padding: sample 0's first Sq // 3 causal rows see no key at all
        keys = torch.ones(B, Sk, dtype=torch.bool)
        keys[0, : Sk - Sq + Sq // 3] = False
        return keys[:, None, None, :].expand(B, 1, Sq, Sk)
    if kind == "full":
        m = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
        m[0, 0, 3] = False  # a row with no allowed key
        m[-1, 0, 5, :100] = False  # first allowed key past the first key block
        return m
    m = torch.rand(B, Hq, Sq, Sk, generator=g) > 0.5  # a different mask per head
    m[:, 1, 2] = False
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_against_float64_reference(fn, case, dtype):
    B, Hq, Hk, Hv, Sq, Sk, D, causal, kind, starts = CASES[case]
    q, k, v = _inputs(B, Hq, Hk, Hv, Sq, Sk, D, dtype, seed=len(case))
    mask = _mask(kind, B, Hq, Sq, Sk, seed=len(case))
    st = torch.tensor([starts] * B, dtype=torch.int32)
    scaling = D**-0.5
    out, stats, mass = native.head_stats_attention(fn, q, k, v, scaling=scaling, causal=causal, attn_mask=mask,
                                                   segment_starts=st, want_mass=True)
    ref = _reference(q, k, v, scaling=scaling, causal=causal, mask=mask, starts=st.long())
    assert out.shape == (B, Hq, Sq, D) and out.dtype == torch.float32
    assert stats.shape == (B, Hq, Sq, 3) and mass.shape == (B, Hq, Sq, len(starts))
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref["out"].transpose(1, 2), rtol=tol, atol=tol)
    torch.testing.assert_close(mass.double(), ref["mass"].double(), rtol=tol, atol=tol)
    rs = ref["stats"].double()
    empty = torch.isinf(rs[..., 1])
    assert torch.equal(torch.isinf(stats[..., 1]), empty)
    if kind is not None:
        assert empty.any()  # the case really has rows with no allowed key
    assert (stats[..., 1][empty] == float("-inf")).all()
    assert (stats[..., [0, 2]][empty] == 0).all() and (out[empty] == 0).all() and (mass[empty] == 0).all()
    for c, name in enumerate(("entropy", "max logit", "sink")):
        torch.testing.assert_close(stats[..., c][~empty].double(), rs[..., c][~empty], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_sharp_attention_and_large_logits(fn):
    """Logits of size ~1e3 (a very sharp softmax): the entropy accumulator, rescaled across
    key blocks, stays exact to fp32 rounding of the logits; the sink mass of a dominant first
    key is ~1."""
    q, k, v = _inputs(1, 2, 1, 1, 50, 150, 32, torch.float32, seed=5, spread=3.0)
    u = torch.nn.functional.normalize(torch.ones(32), dim=0)
    q = q + 5 * u  # every row leans towards u ...
    k[:, :, 0] = 150 * u  # ... so the first key dominates: logits ~ 450
    out, stats, _ = native.head_stats_attention(fn, q, k, v, scaling=1.0, causal=True)
    ref = _reference(q, k, v, scaling=1.0, causal=True, mask=None, starts=None)["stats"].double()
    assert stats[..., 1].median() > 300
    torch.testing.assert_close(stats[..., 1].double(), ref[..., 1], rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(stats[..., [0, 2]].double(), ref[..., [0, 2]], rtol=1e-4, atol=1e-4)
    assert (stats[..., 2] > 0.99).float().mean() > 0.5


def test_thread_count_does_not_change_results(fn):
    """Each query block is one thread's work from start to end: bitwise equal results."""
    q, k, v = _inputs(2, 4, 2, 2, 90, 90, 24, torch.float32, seed=3)
    st = torch.tensor([[0, 40]] * 2, dtype=torch.int32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.head_stats_attention(fn, q, k, v, scaling=0.2, causal=True, segment_starts=st, want_mass=True)
        torch.set_num_threads(max(2, n))
        many = native.head_stats_attention(fn, q, k, v, scaling=0.2, causal=True, segment_starts=st, want_mass=True)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_mass_without_segments_and_strided_query(fn):
    """No segment starts: one segment, mass 1 on rows with a key; a query in [B, S, H, D]
    memory (the model's layout, transposed) is read in place."""
    B, Hq, S, D = 2, 4, 21, 16
    q4 = torch.randn(B, S, Hq, D)
    q = q4.transpose(1, 2)
    _, k, v = _inputs(B, Hq, 2, 2, S, S, D, torch.float32, seed=9)
    out, stats, mass = native.head_stats_attention(fn, q, k, v, scaling=0.25, causal=True, want_mass=True)
    assert mass.shape == (B, Hq, S, 1)
    torch.testing.assert_close(mass, torch.ones_like(mass))
    out2, stats2, none = native.head_stats_attention(fn, q.contiguous(), k, v, scaling=0.25, causal=True)
    assert none is None and torch.equal(out, out2) and torch.equal(stats, stats2)


def test_bad_layout_is_refused(fn):
    q, k, v = _inputs(1, 3, 2, 2, 4, 4, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        native.head_stats_attention(fn, q, k, v, scaling=1.0, causal=True)
    q, k, v = _inputs(2, 4, 2, 2, 5, 7, 8, torch.float32, seed=0)
    for bad in (torch.ones(2, 3, 5, 7, dtype=torch.bool), torch.ones(2, 1, 5, 6, dtype=torch.bool),
                torch.ones(3, 1, 5, 7, dtype=torch.bool), torch.ones(5, 7, dtype=torch.bool)):
        with pytest.raises(ValueError, match="attn_mask must be"):
            native.head_stats_attention(fn, q, k, v, scaling=1.0, causal=True, attn_mask=bad)
    with pytest.raises(ValueError, match="segment_starts must be"):
        native.head_stats_attention(fn, q, k, v, scaling=1.0, causal=True, want_mass=True,
                                    segment_starts=torch.zeros(3, 2, dtype=torch.int32))


def test_broadcast_mask_and_starts(fn):
    """A mask of batch 1 (and one row for all rows) and segment starts of batch 1 apply to
    every sample: the kernel is given stride 0 and expanded ids, never reads past them."""
    B, Hq, Sq, Sk = 3, 4, 19, 41
    q, k, v = _inputs(B, Hq, 2, 2, Sq, Sk, 16, torch.float32, seed=4)
    big = torch.zeros(2, 1, Sq, Sk, dtype=torch.bool)  # a view whose neighbour memory says "masked"
    big[0] = torch.rand(1, Sq, Sk, generator=torch.Generator().manual_seed(0)) > 0.4
    starts = torch.tensor([[0, 11, 30]], dtype=torch.int32)
    for mask in (big[:1], big[:1, :, 4:5].expand(1, 1, 1, Sk)[:, :, :1]):
        out, stats, mass = native.head_stats_attention(fn, q, k, v, scaling=0.3, causal=False, attn_mask=mask,
                                                       segment_starts=starts, want_mass=True)
        ref = _reference(q, k, v, scaling=0.3, causal=False, mask=mask.expand(B, 1, Sq, Sk),
                         starts=starts.long().expand(B, 3))
        torch.testing.assert_close(out.double(), ref["out"].transpose(1, 2), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(mass.double(), ref["mass"].double(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(stats.double(), ref["stats"].double(), rtol=2e-5, atol=2e-5)


def test_nan_or_inf_logits_give_nan_rows(fn):
    """A NaN in a query row, or an infinite key, makes the rows that see it NaN in every
    output (not a silently finite or "no key" answer); other rows are unaffected."""
    q, k, v = _inputs(1, 2, 1, 1, 6, 6, 8, torch.float32, seed=2)
    clean = native.head_stats_attention(fn, q, k, v, scaling=0.3, causal=True, want_mass=True)
    q[0, 0, 3, 2] = float("nan")
    k[0, 0, 4, 0] = float("inf")
    out, stats, mass = native.head_stats_attention(fn, q, k, v, scaling=0.3, causal=True, want_mass=True)
    sees_inf = torch.zeros(2, 6, dtype=torch.bool)
    sees_inf[:, 4:] = (q[0, :, 4:, 0] * 0.3 > 0)  # +Inf logit where q_0 > 0 (-Inf is a zero weight)
    bad = sees_inf.clone()
    bad[0, 3] = True
    assert torch.isnan(stats[0][bad]).all() and torch.isnan(out[0][bad]).all() and torch.isnan(mass[0][bad]).all()
    ok = ~bad
    ok[:, 4:] = False  # rows that see the infinite key with a negative weight differ from the clean run
    assert torch.equal(stats[0][ok], clean[1][0][ok]) and torch.equal(out[0][ok], clean[0][0][ok])


def test_default_dtype_and_autograd(fn, monkeypatch):
    """The buffers are fp32 whatever torch's default dtype; with autograd recording, the
    forward-only kernel is not used (the output keeps its graph)."""
    from avss_fast.ops import masked_attention

    q, k, v = _inputs(1, 2, 1, 1, 7, 7, 8, torch.float32, seed=6)
    want = native.head_stats_attention(fn, q, k, v, scaling=0.3, causal=True)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = native.head_stats_attention(fn, q, k, v, scaling=0.3, causal=True)
    finally:
        torch.set_default_dtype(prev)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    calls = []
    real = native.head_stats_attention
    monkeypatch.setattr(native, "head_stats_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    qg = q.clone().requires_grad_()
    out, _, stats = masked_attention(qg, k, v, scaling=0.3, return_head_stats=True)
    assert not calls and out.grad_fn is not None
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    with torch.no_grad():
        masked_attention(qg, k, v, scaling=0.3, return_head_stats=True)
    assert calls


def test_dispatch_takes_the_compiled_kernel(monkeypatch):
    """masked_attention on CPU with head statistics runs the compiled kernel for fp32/bf16/fp16,
    and keeps the torch path for fp64 and for the rule on every row."""
    from avss_fast.ops import AttentionRule, masked_attention

    calls = []
    real = native.head_stats_attention
    monkeypatch.setattr(native, "head_stats_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _inputs(1, 4, 2, 2, 9, 9, 16, torch.float32, seed=1)
    masked_attention(q, k, v, scaling=0.25, return_head_stats=True)
    assert len(calls) == 1
    masked_attention(q.double(), k.double(), v.double(), scaling=0.25, return_head_stats=True)
    rule = AttentionRule(heads=(0,), segment=0, threshold=0.1, rows="all")
    masked_attention(q, k, v, scaling=0.25, return_head_stats=True, segment_starts=[0, 4], adaptive=rule)
    assert len(calls) == 1
    monkeypatch.setenv("AVSS_FAST_NATIVE", "0")
    masked_attention(q, k, v, scaling=0.25, return_head_stats=True)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- the loader


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("AVSS_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_build_is_cached(fresh_loader, monkeypatch):
    monkeypatch.setenv("AVSS_FAST_NATIVE", "1")
    assert native.kernel() is not None
    libs = list(fresh_loader.glob("head_stats_attention-*.so"))
    assert len(libs) == 1
    assert libs[0].stat().st_mode & 0o755 == 0o755  # other users of a shared cache can load it
    stamp = libs[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.kernel() is not None  # loaded again from the cache, not rebuilt
    assert [p.stat().st_mtime_ns for p in fresh_loader.glob("head_stats_attention-*.so")] == [stamp]
    assert not [p for p in fresh_loader.iterdir() if not p.name.startswith("head_stats_attention-")]


@pytest.mark.parametrize("cxx", ["/nonexistent/c++", "false"])
def test_unbuildable_kernel_warns_once_or_raises(fresh_loader, monkeypatch, cxx):
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("AVSS_FAST_NATIVE", "auto")
    with pytest.warns(RuntimeWarning, match="using the slower torch path"):
        assert native.kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.kernel() is None  # warned once
    assert ("names no program on PATH" if cxx.startswith("/") else "could not compile") in native.unavailable_reason()
    monkeypatch.setenv("AVSS_FAST_NATIVE", "1")
    with pytest.raises(native.NativeUnavailableError, match="compiled kernel is unavailable"):
        native.kernel()
    assert not fresh_loader.exists() or not list(fresh_loader.iterdir())  # no half-written library left


def test_switches(monkeypatch):
    monkeypatch.setenv("AVSS_FAST_NATIVE", "0")
    assert native.kernel() is None and native.unavailable_reason() == "AVSS_FAST_NATIVE=0"
    monkeypatch.setenv("AVSS_FAST_NATIVE", "yes")
    with pytest.raises(ValueError, match="AVSS_FAST_NATIVE"):
        native.kernel()
    assert os.path.exists(native.SOURCE)


def test_unwritable_cache_falls_back_to_a_private_temporary_folder(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("AVSS_FAST_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setenv("AVSS_FAST_NATIVE", "1")
    assert native.kernel() is not None
    assert list((tmp_path / "tmp").glob("avss_fast-*/head_stats_attention-*.so"))


def test_compiler_with_arguments_and_explicit_openmp_runtime(tmp_path, monkeypatch):
    """``CXX`` may carry a wrapper (``env g++``); an OpenMP runtime under another name than
    libgomp.so.1 (torch wheels that bundle a renamed copy) is linked by path."""
    monkeypatch.setenv("CXX", "env " + (shutil.which("g++") or shutil.which("c++") or "c++"))
    runtime = native.openmp_runtime()
    if runtime is None:  # torch without a visible OpenMP runtime: only the wrapper is tested
        f = native._load(dirs=[tmp_path])
    else:
        renamed = tmp_path / "rt" / "libgomp-renamed.so.1"
        renamed.parent.mkdir()
        shutil.copy(runtime, renamed)
        f = native._load(dirs=[tmp_path], runtime=str(renamed))
        lib = next(tmp_path.glob("head_stats_attention-*.so"))
        if shutil.which("readelf"):  # linked by path: its folder is on the run path
            dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
            assert str(renamed.parent) in dyn and "libgomp" in dyn
    q, k, v = _inputs(2, 4, 2, 2, 40, 40, 24, torch.float32, seed=8)
    want = native.head_stats_attention(native.kernel(), q, k, v, scaling=0.2, causal=True)
    got = native.head_stats_attention(f, q, k, v, scaling=0.2, causal=True)
    if f.vector_width == native.kernel().vector_width:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_required_kernel_that_cannot_be_built_is_a_one_line_cli_error(fresh_loader, monkeypatch, capsys):
    from avss_fast.cli import main

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("AVSS_FAST_NATIVE", "1")
    assert main(["bench", "--quick", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "AVSS_FAST_NATIVE=1 but the compiled kernel is unavailable" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

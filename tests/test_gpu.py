"""GPU twins of the kernel tests: the Triton kernels compiled for a real CUDA device.

Marked ``gpu``; they run only where CUDA is available, with ``AVSS_FAST_GPU_TESTS=1`` set
so that conftest leaves the Triton interpreter off:

    AVSS_FAST_GPU_TESTS=1 python -m pytest -m gpu tests/test_gpu.py

Every case here has a CPU twin in test_ops.py / test_scoring.py that runs the same
kernels under the interpreter.
"""

import pytest
import torch
from conftest import (
    assert_close_verbose,
    assert_moments_close,
    layer_moments_fast_kernel_only,
    nan_filled_empty,
    similarity_overflow_case,
)

from avss_fast import ops, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CPU twins: test_ops.py)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("AVSS_FAST_BACKEND", "triton")


def _act(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g) + 0.3
    h[torch.rand(shape, generator=g) < 0.05] = 0.0
    return h.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 123, 123), (2, 300, 4096), (3, 17, 4097), (1, 1, 5), (2, 2048, 4096)])
def test_layer_moments_cuda_matches_reference(dtype, shape):
    """With a padding mask (the span form) and without one (the "all" form where T and the
    split are multiples of 16, forced for T = 2048 by explicit tiles; else the span form), a
    NaN through the exact pass."""
    h = _act(shape, dtype)
    mask = torch.ones(shape[:2], dtype=torch.long)
    mask[0, shape[1] // 3 :] = 0
    if shape[1] > 3:
        h[-1, 2, 0] = float("nan")
    got = ops.layer_moments(h.cuda(), mask.cuda())
    assert got.device.type == "cuda"
    assert_moments_close(got.to("cpu"), reference.layer_moments(h, mask), rtol=2e-5, atol=1e-6)
    assert_moments_close(ops.layer_moments(h.cuda()).to("cpu"), reference.layer_moments(h), rtol=2e-5, atol=1e-6)
    if shape[1] % 16 == 0:  # the "all" form whatever the GPU's SM count: splits of 512 rows
        from avss_fast.kernels.layer_moments import layer_moments_packed
        from avss_fast.stats import Moments

        ints, flts = layer_moments_packed(h.cuda(), None, 1e-5, None, tiles=(8, 1024, 4, 4))
        assert_moments_close(Moments._unpack(ints, flts).to("cpu"), reference.layer_moments(h), rtol=2e-5, atol=1e-6)
    rel = ops.layer_moments(h.cuda(), mask.cuda(), sparsity_rel=0.05)
    assert rel.raw()["near_zero"] == reference.layer_moments(h, mask, sparsity_rel=0.05).raw()["near_zero"]


LAYOUTS = [(2, 1024, 4, 8), (4, 512, 8, 3), (16, 256, 8, 2), (8, 256, 4, 40), (1, 4096, 4, 7), (4, 1024, 4, 16),
           (2, 4096, 8, 33)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tiles", LAYOUTS, ids=str)
def test_layer_moments_cuda_layouts_and_exact_pass(tiles, dtype, monkeypatch):
    """GPU twin of test_ops' kernel-layout tests: tile layouts the sweep tries, in bf16 and
    fp32, a NaN that sends one program through the exact pass, a massive activation at a
    chunk start, padding (right padding read by the span of the valid rows; a hole, whose
    range the second launch reads with its mask, one tile ahead in fp32), the merge kernels
    with shrunk blocks (every loop more than once), and the relative threshold (the
    pre-pass, or in the one read for the 4096-unit layouts, whole rows of 2100 units)."""
    import avss_fast.kernels.layer_moments as lm
    from avss_fast.stats import Moments

    h = _act((3, 70, 2100), dtype, seed=5)
    h[0, :, 0] = 3000.0
    h[2, 40, 1500] = float("nan")
    mask = torch.ones(3, 70, dtype=torch.long)
    mask[1, 50:] = 0
    mask[0, 13] = 0
    ref = reference.layer_moments(h, mask)
    for blocks in (None, dict(tile=16, units=64, splits=2, reduce=8, warps=4)):
        if blocks:
            monkeypatch.setitem(lm._MERGE_BLOCKS, "gpu", blocks)
        ints, flts = lm.layer_moments_packed(h.cuda(), mask.cuda(), 1e-5, None, tiles=tiles)
        assert_moments_close(Moments._unpack(ints, flts).to("cpu"), ref, rtol=2e-5, atol=1e-6)
    ref_rel = reference.layer_moments(h, mask, sparsity_rel=0.05).raw()
    ints, flts = lm.layer_moments_packed(h.cuda(), mask.cuda(), 1e-5, 0.05, tiles=tiles)
    got_rel = Moments._unpack(ints, flts).to("cpu").raw()
    assert got_rel["near_zero"] == ref_rel["near_zero"] and got_rel["nonfinite"] == ref_rel["nonfinite"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tiles", [None, (8, 1024, 4, 3), (4, 1024, 4, 5)], ids=str)
def test_layer_moments_cuda_spans_and_holes(tiles, dtype, monkeypatch):
    """GPU twin of test_ops.test_kernel_padding_spans_and_holes: ranges read by the span of
    their valid rows (edges inside tiles, NaN under the padding never read), a range with
    holes through the second launch's mask pass and, after a NaN in it, the exact pass; the
    fast kernel's marks with the second launch switched off."""
    import avss_fast.kernels.layer_moments as lm
    from avss_fast.stats import Moments

    B, T, D = 4, 200, 2048
    h = _act((B, T, D), dtype, seed=7)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 101:] = 0
    mask[1, :37] = 0
    mask[2, 5] = 0
    h[0, 101:] = float("nan")
    h[1, :37] = 1e30
    h[2, 7, 3] = float("nan")
    ref = reference.layer_moments(h, mask)
    ints, flts = lm.layer_moments_packed(h.cuda(), mask.cuda(), 1e-5, None, tiles=tiles)
    got = Moments._unpack(ints, flts).to("cpu")
    assert got.raw()["nonfinite"] == 1
    assert_moments_close(got, ref, rtol=2e-5, atol=1e-6)

    layer_moments_fast_kernel_only(monkeypatch)  # the fast kernel's marks stay
    nan_filled_empty(monkeypatch)  # every slot read must be written
    parts = lm.layer_moments_partials(h.cuda(), mask.cuda(), 1e-5, None, tiles=tiles)
    monkeypatch.undo()
    marks = parts["cnt"][..., 1].cpu()
    assert (marks[2, :, 0] == -2).all()  # the hole at row 5 lies in the first split
    assert (marks[[0, 1, 3]] == 0).all() and (marks[2, :, 1:] == 0).all()
    rowpart = parts["rowpart"].cpu().view(B, T, -1, 3)
    assert (rowpart[mask == 0] == 0).all()  # padding stored as empty rows, skipped tiles too
    assert (rowpart[[0, 1, 3]][mask[[0, 1, 3]] != 0][..., 0] > 0).all()  # every valid row of a span read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_similarity_cuda_values_whose_squares_overflow_fp32(dtype):
    """GPU twin of test_ops.test_block_similarity_values_whose_squares_overflow_fp32: the
    rescaled second pass of a tile."""
    a, b, cos = similarity_overflow_case(dtype)
    got = ops.block_similarity(a.cuda(), b.cuda()).to("cpu")
    assert got.raw()["tokens"] == 10 and got.raw()["nonfinite"] == 0
    assert got.cos_sum == pytest.approx(float(cos.sum()), abs=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_similarity_cuda_matches_reference(dtype):
    a = _act((4, 257, 1024), dtype, 1)
    b = (a.float() + 0.7 * _act((4, 257, 1024), torch.float32, 2)).to(dtype)
    mask = torch.ones(4, 257, dtype=torch.bool)
    mask[1, 200:] = False
    got = ops.block_similarity(a.cuda(), b.cuda(), mask.cuda()).to("cpu")
    ref = reference.block_similarity(a, b, mask)
    assert got.raw()["tokens"] == ref.raw()["tokens"]
    assert_close_verbose(got.cos_sum, ref.cos_sum, rtol=1e-5, atol=1e-4, what="cos_sum")
    assert_close_verbose(got.angular_sum, ref.angular_sum, rtol=1e-4, atol=1e-4, what="angular_sum")


def test_deterministic_and_no_host_sync():
    """Same bits run to run; ops and merges never synchronise the host with the GPU."""
    h = _act((8, 512, 2048), torch.bfloat16).cuda()
    mask = torch.ones(8, 512, dtype=torch.long, device="cuda")
    ops.layer_moments(h, mask)  # compile outside the sync check
    ops.block_similarity(h, h, mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = ops.layer_moments(h, mask)
        for _ in range(3):
            total = total + ops.layer_moments(h, mask)
        sim = ops.block_similarity(h, h.roll(1, 1), mask)
        sim = sim + sim
    finally:
        torch.cuda.set_sync_debug_mode("default")
    a, b = ops.layer_moments(h, mask).raw(), ops.layer_moments(h, mask).raw()
    assert a == b
    assert total.raw()["elements"] == 4 * 8 * 512 * 2048
    assert sim.raw()["tokens"] == 2 * 8 * 512


def test_scorer_on_cuda_tiny_llama(monkeypatch):
    from tiny_models import make_tiny, random_batch

    from avss_fast.scoring import score_layers

    model = make_tiny("llama", num_layers=3)
    batches = [random_batch(model, batch=3, seq=16, seed=s, pad_last=5) for s in range(2)]
    monkeypatch.setenv("AVSS_FAST_BACKEND", "torch")
    cpu = score_layers(model, batches, progress=False)
    monkeypatch.setenv("AVSS_FAST_BACKEND", "triton")
    gpu = score_layers(model.cuda(), batches, progress=False)
    for i in range(3):
        assert_moments_close(gpu.moments[i], cpu.moments[i], rtol=1e-4, atol=1e-6)
        assert gpu.layers[i]["block_influence"] == pytest.approx(cpu.layers[i]["block_influence"], abs=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Sq,Sk", [(300, 300), (1, 777), (64, 500)], ids=["prefill", "decode", "chunked"])
@pytest.mark.parametrize("D", [64, 128, 80])
def test_masked_attention_cuda_matches_reference(dtype, Sq, Sk, D):
    from avss_fast.ops import AttentionRule, masked_attention

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv = 2, 8, 2
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    km = torch.ones(B, Sk, dtype=torch.bool)
    km[1, :5] = False  # left padding
    starts = torch.tensor([[0, Sk // 4, Sk // 2], [0, Sk // 3, 2 * Sk // 3]])
    kw = dict(scaling=D**-0.5, causal=True, head_gate=torch.tensor([[1.0] * 7 + [0.0], [0.5] * 8]),
              segment_starts=starts, segment_scale=torch.rand(Hq, 3, generator=g) + 0.5,
              adaptive=AttentionRule((1, 3, 5), 2, 0.2, 0.0, "last"), return_segment_mass=True)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    out, mass = masked_attention(q.cuda(), k.cuda(), v.cuda(), attention_mask=km.cuda(),
                                 **{n: cuda(x) for n, x in kw.items()})
    ref_kw = dict(kw, attention_mask=km[:, None, None, :])
    ref64, m64 = reference.masked_attention(q, k, v, compute_dtype=torch.float64, **ref_kw)
    ref_lp, _ = reference.masked_attention(q, k, v, compute_dtype=dtype, **ref_kw)
    err = (out.cpu().double() - ref64).abs().max().item()
    bound = 2 * (ref_lp.double() - ref64).abs().max().item() + (1e-4 if dtype == torch.float32 else 1e-2)
    assert err <= bound, f"{err:.3g} > {bound:.3g}"
    assert (mass.cpu().double() - m64).abs().max() < 1e-3


def test_masked_attention_does_not_synchronise():
    """Lists and CPU tensors for gates, segments and the rule are copied without blocking."""
    from avss_fast.ops import AttentionRule, masked_attention

    q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kw = dict(scaling=0.125, segment_starts=[0, 35, 211], head_gate=[1.0] * 7 + [0.0],
              segment_scale=torch.ones(8, 3), adaptive=AttentionRule((1, 2), 2, 0.4, 0.0, "last"))
    masked_attention(q, k, v, **kw)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = masked_attention(q, k, v, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (1, 1, 8, 64) and bool((out[:, :, 7] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Sq,Sk", [(300, 300), (1, 777), (64, 500)], ids=["prefill", "decode", "chunked"])
def test_head_stats_and_rule_fired_cuda(dtype, Sq, Sk):
    """Twin of test_attention.py::test_head_stats_against_reference / test_rule_fired and of
    tests/test_attention_stats_kernel.py: entropy, max logit, sink mass and the rule's
    decisions from the compiled kernel."""
    from avss_fast.ops import AttentionRule, masked_attention_prepared, prepare_attention_args

    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, D = 2, 8, 2, 64
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    km = torch.ones(B, Sk, dtype=torch.bool)
    km[1, :7] = False
    rule = AttentionRule((0, 5), 1, 0.5, 0.0, "all")
    starts = torch.tensor([[0, Sk // 2]] * B)
    args = prepare_attention_args(B, Hq, "cuda", segment_starts=starts.cuda(), adaptive=rule,
                                  return_segment_mass=True, return_head_stats=True, return_rule_fired=True)
    res = masked_attention_prepared(q.cuda(), k.cuda(), v.cuda(), args, scaling=D**-0.5, causal=True,
                                    attention_mask=km.cuda())
    ref = reference.masked_attention_outputs(q, k, v, scaling=D**-0.5, causal=True,
                                             attention_mask=km[:, None, None, :], segment_starts=starts,
                                             adaptive=rule, compute_dtype=torch.float64)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    st, rs = res.stats.cpu().double(), ref["stats"].double()
    fin = torch.isfinite(rs[..., 1])
    assert torch.equal(torch.isfinite(st[..., 1]), fin)
    assert (st[..., 0] - rs[..., 0]).abs().max() < 10 * tol
    assert (st[..., 1][fin] - rs[..., 1][fin]).abs().max() < 10 * tol
    assert (st[..., 2] - rs[..., 2]).abs().max() < tol
    clear = ((ref["mass"][..., 1] - 0.5).abs() > 1e-2)
    assert torch.equal(res.fired.cpu()[clear], ref["fired"][clear])


def test_intervene_generate_and_head_scorer_on_cuda():
    """Twin of test_heads.py / test_head_stats.py on the GPU: greedy generation under an
    adaptive rule equals the torch path's tokens, the rule report and HeadScorer work with
    device tensors, and the model is restored."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import make_tiny

    from avss_fast import AdaptiveRule, HeadIntervention, HeadScorer, intervene

    model = make_tiny("llama", num_layers=3, heads=4, kv_heads=2, vocab=100).cuda()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    am = torch.ones_like(ids)
    am[0, :3] = 0
    iv = HeadIntervention(gates={(0, 1): 0.0}, adaptive=AdaptiveRule(heads=[(1, 0), (2, 3)], segment=1),
                          segment_starts=[[3, 7], [0, 5]])
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), intervene(model, iv) as run:
        gpu = model.generate(**kw)
    rep = run.rule_report()
    assert all(r["checked"] == 2 * 6 for r in rep.values())
    cpu_model = model.cpu()
    import os

    os.environ["AVSS_FAST_BACKEND"] = "torch"
    try:
        with torch.no_grad(), intervene(cpu_model, iv):
            ref = cpu_model.generate(**{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    finally:
        os.environ["AVSS_FAST_BACKEND"] = "triton"
    assert torch.equal(gpu.cpu(), ref)
    model = cpu_model.cuda()
    with torch.no_grad(), HeadScorer(model, segment_starts=[0, 6]) as scorer:
        model(input_ids=ids, attention_mask=am)
    hr = scorer.report()
    assert hr.rows[0][0] == int(am.sum())
    assert model.config._attn_implementation == "sdpa"

"""layer_moments / block_similarity: reference against hand-computed cases, and both fast
backends (fused torch path, Triton kernels under the interpreter) against the reference."""

import math

import numpy as np
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
from avss_fast.stats import Moments

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are compared against the float64 reference on the *same* low-precision values
# (upcast exactly), so only fp32 accumulation error remains, whatever the input dtype.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


# ----------------------------------------------------------------------------- reference by hand


def test_reference_hand_computed():
    h = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]])
    m = reference.layer_moments(h, sparsity_eps=1e-5)
    # per-sample token mean [2, 3, 4] -> unbiased variance 1
    assert m.raw() == dict(
        samples=1, tokens=2, elements=6, pooled_var_sum=1.0, token_var_sum=2.0,
        mean=3.0, m2=10.0, near_zero=0, nonfinite=0,
    )
    assert m.pooled_variance == 1.0 and m.variance == 2.0 and m.sparsity == 0.0


def test_reference_hand_computed_mask_nan_and_zeros():
    h = torch.tensor(
        [
            [[0.0, 2.0, 4.0], [1.0, float("nan"), 1.0], [9.0, 9.0, 9.0]],  # third token is padding
            [[5.0, 5.0, 5.0], [7.0, 7.0, 7.0], [0.0, 0.0, 0.0]],  # whole sample is padding
        ]
    )
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    m = reference.layer_moments(h, mask)
    r = m.raw()
    # sample 0: column means over finite valid values: [0.5, 2.0, 2.5], mean 5/3
    # -> unbiased variance ((7/6)^2 + (1/3)^2 + (5/6)^2) / 2 = 13/12
    assert r["samples"] == 1 and r["pooled_var_sum"] == pytest.approx(13 / 12)
    # token vars: [0,2,4] -> 4 ; [1,1] -> 0
    assert r["tokens"] == 2 and r["token_var_sum"] == pytest.approx(4.0)
    # elements 0,2,4,1,1 -> mean 1.6, m2 = 2.56+0.16+5.76+0.36+0.36 = 9.2
    assert r["elements"] == 5 and r["mean"] == pytest.approx(1.6) and r["m2"] == pytest.approx(9.2)
    assert r["near_zero"] == 1 and r["nonfinite"] == 1


def test_reference_relative_threshold_by_hand():
    h = torch.tensor([[[0.01, 1.0, -1.0, 1.0]]])  # rms ~ 0.866
    assert reference.layer_moments(h, sparsity_rel=0.1).raw()["near_zero"] == 1
    assert reference.layer_moments(h, sparsity_rel=1.2).raw()["near_zero"] == 4
    assert reference.layer_moments(h, sparsity_eps=1e-5).raw()["near_zero"] == 0


def test_reference_similarity_by_hand():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 3.0], [2.0, 2.0], [-1.0, -2.0], [1.0, 1.0]]])
    s = reference.block_similarity(a, b)
    # cos: 0, 1, -1, 0 (zero vector) ; angles/pi: .5, 0, 1, .5
    assert s.raw() == dict(tokens=4, cos_sum=0.0, angular_sum=2.0, nonfinite=0)
    assert s.block_influence == 1.0 and s.angular_distance == 0.5


def test_published_avss_equals_pooled_statistics():
    torch.manual_seed(1)
    batches = [torch.randn(4, 9, 33) * (i + 1) for i in range(3)]
    for b in batches:
        b[b.abs() < 0.05] = 0.0  # some exact zeros so sparsity is not 0
    var_pub, spa_pub = reference.avss_published(batches)
    total = sum(ops.layer_moments(b) for b in batches)
    assert total.pooled_variance == pytest.approx(var_pub, rel=1e-6)
    assert total.sparsity == pytest.approx(spa_pub, rel=1e-12)


# ----------------------------------------------------------------------------- fast paths vs reference


def _activations(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g) * scale + 0.3
    h[torch.rand(shape, generator=g) < 0.05] = 0.0
    return h.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 123, 123), (1, 1, 7), (3, 70, 1100), (2, 5, 1)])
def test_layer_moments_matches_reference(backend, dtype, shape):
    h = _activations(shape, dtype)
    got = ops.layer_moments(h)
    ref = reference.layer_moments(h)
    assert got.elements.dtype == torch.int64 and got.pooled_var_sum.dtype == torch.float64
    assert_moments_close(got, ref, rtol=RTOL[dtype], atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_moments_masks_padding_and_nonfinite(backend, dtype):
    h = _activations((4, 37, 65), dtype, seed=3)
    mask = torch.ones(4, 37, dtype=torch.long)
    mask[0, 30:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    mask[2] = 0  # all-padding row
    h[0, 31:] = 1e4 if dtype != torch.float16 else 6e4  # garbage under padding
    h[1, 10, 3] = float("nan")
    h[1, 12, :] = float("inf")  # a whole token non-finite
    h[3, 0, 0] = -float("inf")
    h[0, 35, 0] = float("nan")  # under padding: not counted
    got = ops.layer_moments(h, mask)
    ref = reference.layer_moments(h, mask)
    assert_moments_close(got, ref, rtol=RTOL[dtype], atol=1e-7)
    assert got.raw()["nonfinite"] == 1 + 65 + 1
    assert got.raw()["samples"] == 3


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32])
def test_mask_dtypes_agree(backend, mask_dtype):
    h = _activations((2, 9, 20), torch.float32)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    ref = reference.layer_moments(h, mask)
    assert_moments_close(ops.layer_moments(h, mask.to(mask_dtype)), ref)


def test_fp16_large_magnitudes(backend):
    h = (_activations((2, 40, 300), torch.float32, seed=5) * 2e4).clamp(-65000, 65000).to(torch.float16)
    got, ref = ops.layer_moments(h), reference.layer_moments(h)
    assert math.isfinite(float(got.m2))
    assert_moments_close(got, ref, rtol=2e-5, atol=1e-3)
    h2 = h.flip(1)
    s, sref = ops.block_similarity(h, h2), reference.block_similarity(h, h2)
    assert_close_verbose(s.cos_sum, sref.cos_sum, rtol=1e-5, atol=1e-5, what="cos_sum")


def test_relative_sparsity(backend):
    h = _activations((3, 20, 64), torch.float32, seed=7)
    ref = reference.layer_moments(h, sparsity_rel=0.05)
    got = ops.layer_moments(h, sparsity_rel=0.05)
    assert got.raw()["near_zero"] == ref.raw()["near_zero"] > 0
    mask = torch.ones(3, 20)
    mask[1, 15:] = 0
    assert ops.layer_moments(h, mask, sparsity_rel=0.05).raw()["near_zero"] == reference.layer_moments(
        h, mask, sparsity_rel=0.05).raw()["near_zero"]


def test_non_contiguous_input(backend):
    base = _activations((3, 50, 40), torch.float32)
    strided = base[:, ::3, :]  # rows skipped: last dim still contiguous
    transposed = base.transpose(1, 2).contiguous().transpose(1, 2)  # last dim not contiguous
    assert not strided.is_contiguous() and transposed.stride(-1) != 1
    for h in (strided, transposed):
        assert_moments_close(ops.layer_moments(h), reference.layer_moments(h))
        got, ref = ops.block_similarity(h, h.flip(1)), reference.block_similarity(h, h.flip(1))
        assert_moments_close(got, ref, fields=["tokens", "nonfinite", "cos_sum"])
        # arccos near cos = 1 turns the fp32 cosine's ~1e-7 error into ~4e-4 per token
        assert_close_verbose(got.angular_sum, ref.angular_sum, rtol=0, atol=1e-3, what="angular_sum")


def test_deterministic_run_to_run(backend):
    h = _activations((3, 90, 257), torch.bfloat16, seed=11)
    a, b = ops.layer_moments(h).raw(), ops.layer_moments(h).raw()
    assert a == b
    s1 = ops.block_similarity(h, h.roll(1, 1)).raw()
    s2 = ops.block_similarity(h, h.roll(1, 1)).raw()
    assert s1 == s2


def test_batches_merge_to_whole(backend):
    h = _activations((6, 31, 50), torch.float32, seed=2)
    whole = ops.layer_moments(h)
    parts = ops.layer_moments(h[:1]) + ops.layer_moments(h[1:4]) + ops.layer_moments(h[4:])
    assert_moments_close(parts, whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_near_zero_at_the_threshold_itself(backend, dtype):
    """Values equal to the stored form of sparsity_eps (fp32(1e-5) < 1e-5) are below 1e-5 and
    count, in ordinary rows and in a row with a NaN (the CPU path's slow rows); values one
    step above it do not. The oracle compares in float64."""
    at = torch.tensor(1e-5, dtype=dtype)
    up = torch.nextafter(at.float(), torch.tensor(1.0)).to(dtype) if dtype == torch.float32 else at * 1.01
    h = torch.ones(2, 3, 8, dtype=dtype)
    h[0, 0, :3] = at
    h[0, 1, :2] = -at
    h[1, 2, :2] = up
    h[1, 0, :4] = at
    h[1, 0, 5] = float("nan")
    want = int(((h.double().abs() < 1e-5) & h.isfinite()).sum())
    assert want == (9 if float(at) < 1e-5 else 0)
    assert int(ops.layer_moments(h).near_zero) == int(reference.layer_moments(h).near_zero) == want


def test_empty_inputs(backend):
    m = ops.layer_moments(torch.zeros(0, 5, 8))
    assert m.raw()["elements"] == 0 and math.isnan(m.pooled_variance)
    s = ops.block_similarity(torch.zeros(2, 0, 8), torch.zeros(2, 0, 8))
    assert s.raw()["tokens"] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 123, 123), (2, 3, 1500), (1, 4, 1)])
def test_block_similarity_matches_reference(backend, dtype, shape):
    a = _activations(shape, dtype, seed=1)
    b = (a.float() + 0.5 * _activations(shape, torch.float32, seed=2)).to(dtype)
    mask = torch.ones(shape[:2], dtype=torch.long)
    mask[0, shape[1] // 2 :] = 0
    if shape[1] > 2:
        b[-1, 1, 0] = float("nan")
    got, ref = ops.block_similarity(a, b, mask), reference.block_similarity(a, b, mask)
    assert got.raw()["tokens"] == ref.raw()["tokens"]
    assert got.raw()["nonfinite"] == ref.raw()["nonfinite"]
    assert_close_verbose(got.cos_sum, ref.cos_sum, rtol=1e-5, atol=1e-5, what="cos_sum")
    assert_close_verbose(got.angular_sum, ref.angular_sum, rtol=1e-4, atol=1e-4, what="angular_sum")


def test_block_similarity_extremes(backend):
    a = torch.randn(2, 6, 32)
    s = ops.block_similarity(a, a * 3.0)
    assert s.block_influence == pytest.approx(0.0, abs=1e-6)
    s = ops.block_similarity(a, -a)
    assert s.mean_cos == pytest.approx(-1.0, abs=1e-6) and s.angular_distance == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_similarity_values_whose_squares_overflow_fp32(backend, dtype):
    """Finite values past sqrt(FLT_MAX) (~1.8e19) in one or both vectors, beside ordinary
    rows in the same tile: each row's cosine as in float64, nothing counted non-finite."""
    a, b, cos = similarity_overflow_case(dtype)
    got = ops.block_similarity(a, b)
    assert got.raw()["tokens"] == 10 and got.raw()["nonfinite"] == 0
    assert got.cos_sum == pytest.approx(float(cos.sum()), abs=1e-5)
    assert got.angular_sum == pytest.approx(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).sum()), abs=1e-3)
    s = ops.block_similarity(a[:1, 3:4], a[:1, 3:4].clone())  # identical huge vectors: cos 1
    assert s.mean_cos == pytest.approx(1.0, abs=1e-6)


def test_float64_input(backend):
    h = torch.randn(2, 8, 16, dtype=torch.float64)
    assert_moments_close(ops.layer_moments(h), reference.layer_moments(h), rtol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_give_clear_errors():
    h = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="floating-point"):
        ops.layer_moments(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, tokens, hidden\]"):
        ops.layer_moments(torch.randn(3, 4))
    with pytest.raises(ValueError, match="does not match"):
        ops.layer_moments(h, torch.ones(2, 4))
    with pytest.raises(ValueError, match="sparsity_eps"):
        ops.layer_moments(h, sparsity_eps=-1.0)
    with pytest.raises(ValueError, match="sparsity_rel"):
        ops.layer_moments(h, sparsity_rel=0.0)
    with pytest.raises(ValueError, match="same shape"):
        ops.block_similarity(h, torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.layer_moments([[1.0]])
    with pytest.raises(ValueError, match="sparsity_eps"):
        ops.layer_moments(h, sparsity_eps=True)  # not 1.0
    with pytest.raises(ValueError, match="sparsity_rel"):
        ops.layer_moments(h, sparsity_rel="0.1")
    ref = ops.layer_moments(h, sparsity_eps=0.5, sparsity_rel=0.25).raw()
    assert ops.layer_moments(h, sparsity_eps=np.float32(0.5), sparsity_rel=np.float64(0.25)).raw() == ref


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("AVSS_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="AVSS_FAST_BACKEND"):
        ops.layer_moments(torch.randn(1, 2, 3))


def test_reference_backend_dispatch(monkeypatch):
    monkeypatch.setenv("AVSS_FAST_BACKEND", "reference")
    h = _activations((2, 5, 9), torch.float32)
    assert ops.layer_moments(h).raw() == reference.layer_moments(h).raw()


# ----------------------------------------------------------------------------- custom op / compile


def test_custom_ops_pass_opcheck():
    h = _activations((2, 6, 10), torch.float32)
    mask = torch.ones(2, 6, dtype=torch.long)
    torch.library.opcheck(torch.ops.avss_fast.layer_moments.default, (h, mask, 1e-5, None, "torch"))
    torch.library.opcheck(torch.ops.avss_fast.block_similarity.default, (h, h + 1, None, 1e-8, "torch"))


def test_ops_survive_torch_compile():
    h = _activations((2, 6, 10), torch.float32)

    def f(x):
        return ops.layer_moments(x * 2.0).m2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert float(compiled(h)) == pytest.approx(float(f(h)))


def test_moments_field_types():
    m = ops.layer_moments(_activations((1, 3, 4), torch.float32))
    assert isinstance(m, Moments)
    for k in ("samples", "tokens", "elements", "near_zero", "nonfinite"):
        assert getattr(m, k).dtype == torch.int64


# ----------------------------------------------------------------------------- Triton layer_moments layouts


def _triton_moments(h, mask=None, *, tiles, sparsity_rel=None):
    from avss_fast.kernels.layer_moments import layer_moments_packed

    ints, flts = layer_moments_packed(h, mask, 1e-5, sparsity_rel, tiles=tiles)
    return Moments._unpack(ints, flts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tiles", [(4, 16, 1, 3), (8, 32, 1, 1), (2, 64, 1, 5), (4, 128, 1, 3)], ids=str)
def test_kernel_layouts_match_reference(tiles, dtype):
    """Several hidden chunks (one ragged), token splits and padding (a hole inside a tile),
    with tiles small enough that every program runs several tiles: the fast pass on finite
    data, padded ranges read by the span of their valid rows and the range with the hole by
    the second launch's mask pass (the mask a tile ahead in fp32, with its tile in bf16). The relative
    threshold from the pre-pass (several chunks) or in the one read (whole-row tiles, the
    last layout)."""
    h = _activations((3, 29, 70), dtype, seed=21)
    mask = torch.ones(3, 29)
    mask[0, 20:] = 0
    mask[2, :7] = 0
    mask[1, 9] = 0  # a hole inside a tile
    h[0, 22:] = 1e30  # garbage under padding is never read
    ref = reference.layer_moments(h, mask)
    assert_moments_close(_triton_moments(h, mask, tiles=tiles), ref, rtol=2e-5, atol=1e-7)
    ref_rel = reference.layer_moments(h, mask, sparsity_rel=0.05)
    got_rel = _triton_moments(h, mask, tiles=tiles, sparsity_rel=0.05)
    assert got_rel.raw()["near_zero"] == ref_rel.raw()["near_zero"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tiles", [(4, 16, 1, 4), (4, 64, 1, 4)], ids=["prepass", "whole_rows"])
def test_kernel_relative_threshold_exact_pass(tiles, dtype):
    """A NaN and an Inf in rows under the relative threshold, with padding and a ragged
    hidden size: the exact pass takes each token's rms over its finite values, from the
    pre-pass or computed in the one read."""
    h = _activations((2, 40, 60), dtype, seed=25)
    h[1, 17, 33] = float("nan")
    h[0, 3, 5] = float("inf")
    h[1, 35, 7] = float("nan")  # under padding: neither counted nor marked
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    mask[0, 9] = 0
    ref = reference.layer_moments(h, mask, sparsity_rel=0.05)
    got = _triton_moments(h, mask, tiles=tiles, sparsity_rel=0.05)
    assert got.raw()["nonfinite"] == 2
    assert got.raw()["near_zero"] == ref.raw()["near_zero"] > 0
    assert_moments_close(got, ref, rtol=2e-5, atol=1e-7)


def test_kernel_relative_threshold_reads_once_for_whole_rows(monkeypatch):
    """The row pre-pass (a second read) runs only when a tile does not hold whole rows."""
    import avss_fast.kernels.layer_moments as lm

    launches = []
    real = lm._row_sumsq_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(lm, "_row_sumsq_kernel", Spy())
    h = _activations((2, 12, 64), torch.float32, seed=26)
    for tiles, prepass in (((4, 64, 1, 2), False), ((4, 128, 1, 2), False), ((4, 32, 1, 2), True)):
        launches.clear()
        got = _triton_moments(h, tiles=tiles, sparsity_rel=0.05)
        assert bool(launches) == prepass, tiles
        assert got.raw()["near_zero"] == reference.layer_moments(h, sparsity_rel=0.05).raw()["near_zero"]


def test_kernel_relative_threshold_from_moments_in_both_passes():
    """Whole-row tiles take a row's rms from its moments (M2 / n + mean^2) in the fast and
    in the exact pass alike: a row whose sum h^2 passes fp32's range (values ~2e18 with a
    spread) keeps the reference's near-zero count, with or without a NaN elsewhere in its
    program's range (which sends the range through the exact pass)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 4, 256, generator=g)
    h[0, 0] = 2e18 + torch.arange(256) * 1e16  # sum h^2 ~ 1e39 overflows fp32; mean^2 ~ 5e36 does not
    h_nan = h.clone()
    h_nan[0, 3, 7] = float("nan")
    for x in (h, h_nan):
        ref = reference.layer_moments(x, sparsity_rel=0.5).raw()
        got = _triton_moments(x, tiles=(4, 256, 1, 1), sparsity_rel=0.5).raw()
        assert (got["near_zero"], got["nonfinite"]) == (ref["near_zero"], ref["nonfinite"])


@pytest.mark.parametrize("itemsize", [2, 4])
def test_gpu_whole_row_layouts(itemsize):
    """The GPU layout of the relative threshold's one read: one chunk holds the row, the
    tile stays within the usual values, and 8 warps only where a row still lies within
    each thread (wider rows than WHOLE_ROW_MAX take the pre-pass; narrow rows get the
    usual tile)."""
    import triton

    from avss_fast.kernels.layer_moments import WHOLE_ROW_MAX, _gpu_layout

    cpu = torch.device("cpu")
    for D in (5, 64, 768, 1024, 1500, 2048, 3000, WHOLE_ROW_MAX):
        bt, bd, nw, _ = _gpu_layout(4, 512, D, cpu, itemsize, relative=True)
        usual = _gpu_layout(4, 512, D, cpu, itemsize, relative=False)
        assert bd >= D and bd == triton.next_power_of_2(max(D, 16))
        assert bt * bd <= max(usual[0] * usual[1], 8192 // itemsize * 2)
        assert nw == 4 or bd >= 32 * nw * (16 // itemsize)
        if D <= 1024:
            assert (bt, bd, nw) == usual[:3]
    wider = WHOLE_ROW_MAX + 1  # the pre-pass: the usual chunked layout
    assert _gpu_layout(4, 512, wider, cpu, itemsize, relative=True) == _gpu_layout(
        4, 512, wider, cpu, itemsize, relative=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_padding_spans_and_holes(monkeypatch, dtype):
    """The fast kernel reads a range by the span of its valid rows (edges inside tiles,
    garbage under the padding never read) and hands a range with holes to the second
    launch (mark -2), which reads it with its mask and, after a NaN, exactly (-1). With
    the second launch switched off the marks show the classification; with it, every
    range equals the reference."""
    import avss_fast.kernels.layer_moments as lm

    T, tiles = 48, (4, 32, 1, 3)  # splits of 16 rows: [0, 16), [16, 32), [32, 48)
    h = _activations((4, T, 40), dtype, seed=27)
    mask = torch.ones(4, T, dtype=torch.long)
    mask[0, 21:] = 0  # right padding: split 1 keeps [16, 21) (an edge inside a tile), split 2 is all padding
    mask[1, :13] = 0  # left padding: split 0 keeps [13, 16)
    mask[2, 5] = 0  # a hole: split 0 of sample 2 goes to the second launch
    mask[2, 40:42] = 0  # and one in split 2
    h[0, 21:] = float("nan")  # under padding: never read, never counted
    h[1, :13] = 1e30
    h[2, 7, 3] = float("nan")  # in a range with holes: the mask pass, then the exact pass
    h[3, 30, 1] = float("inf")  # in a range without padding: the exact pass
    ref = reference.layer_moments(h, mask)
    got = _triton_moments(h, mask, tiles=tiles)
    assert got.raw()["nonfinite"] == 2
    assert_moments_close(got, ref, rtol=2e-5, atol=1e-7)

    layer_moments_fast_kernel_only(monkeypatch)  # the fast kernel's marks stay
    nan_filled_empty(monkeypatch)  # every slot read must be written
    parts = lm.layer_moments_partials(h, mask, 1e-5, None, tiles=tiles)
    monkeypatch.undo()
    rowpart = parts["rowpart"].view(4, T, -1, 3)  # (count, mean, M2) of each row in each chunk
    assert (rowpart[mask == 0] == 0).all()  # padding stored as empty rows, also in ranges left to the mask pass
    assert (rowpart[:2][mask[:2] != 0][..., 0] > 0).all()  # the valid rows of the spans were read
    marks = parts["cnt"][..., 1]  # [B, C, S]
    expected = torch.zeros(4, 2, 3, dtype=torch.int32)  # [B, hidden chunks of 32, splits]
    expected[2, :, 0] = expected[2, :, 2] = -2  # holes: every chunk of the range
    expected[3, 0, 1] = -1  # the Inf lies in unit 1, in the first chunk only
    assert torch.equal(marks, expected), marks


def test_kernel_skips_tiles_without_valid_rows(monkeypatch):
    """The fast kernel does no tile work where nothing is to be read: a range with holes
    (left to the second launch) and a sample with no valid row call no tile at all; a
    right-padded range calls only its tiles that hold a valid row."""
    import avss_fast.kernels.layer_moments as lm

    calls = []
    real = lm._tile

    class Spy:  # the interpreter looks _tile up when the kernel runs
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *args, **kwargs):  # args[3], args[7]: sample b, first row t0
            value = lambda t: int(t.handle.data.reshape(-1)[0]) if hasattr(t, "handle") else int(t)  # noqa: E731
            calls.append((value(args[3]), value(args[7])))
            return real(*args, **kwargs)

    monkeypatch.setattr(lm, "_tile", Spy())
    layer_moments_fast_kernel_only(monkeypatch)
    h = _activations((3, 14, 16), torch.float32, seed=29)
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[0, :6] = 0
    mask[0, 9] = 0  # holes: first valid row 6, inside the tile [4, 8)
    mask[1] = 0  # no valid row
    mask[2, 5:] = 0  # right padding: tiles [0, 4) and [4, 8) hold valid rows, [8, 12) and [12, 14) do not
    lm.layer_moments_partials(h, mask, 1e-5, None, tiles=(4, 16, 1, 1))
    assert sorted(calls) == [(2, 0), (2, 4)], calls


def test_kernel_row_forms(monkeypatch):
    """Without a mask the fast kernel reads rows "all" (no range test a tile) only where T
    and the split are multiples of 16, else by the span of the range; both equal the
    reference."""
    import avss_fast.kernels.layer_moments as lm

    seen = []
    real = lm._layer_moments_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["ROWS"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(lm, "_layer_moments_kernel", Spy())
    for T, tiles, rows in ((32, (8, 32, 1, 2), "all"), (37, (8, 32, 1, 2), "span"), (48, (8, 32, 1, 2), "span")):
        h = _activations((2, T, 40), torch.float32, seed=28)
        seen.clear()
        assert_moments_close(_triton_moments(h, tiles=tiles), reference.layer_moments(h), rtol=2e-5, atol=1e-7)
        assert seen == [rows], (T, tiles)


@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
def test_kernel_exact_pass_on_nonfinite(bad):
    """A non-finite value (or finite values whose squares pass fp32's range) sends its
    program through the exact pass, which alone counts non-finite values; the result
    equals the reference."""
    h = _activations((2, 40, 64), torch.float32, seed=22)
    if bad == "overflow":  # finite values whose squared deviations are past FLT_MAX
        h[1, 0:4, 5] = 3e38
    else:
        h[1, 17, 33] = float(bad)
    ref = reference.layer_moments(h)
    got = _triton_moments(h, tiles=(4, 16, 1, 4))
    fields = ["samples", "tokens", "elements", "near_zero", "nonfinite", "pooled_var_sum", "token_var_sum", "mean", "m2"]
    if bad == "overflow":  # the fp32 kernel cannot hold these sums; the counts stay exact
        fields = ["samples", "tokens", "elements", "near_zero", "nonfinite"]
    assert_moments_close(got, ref, rtol=2e-5, atol=1e-7, fields=fields)
    assert got.raw()["nonfinite"] == (0 if bad == "overflow" else 1)
    # the fast kernel marks the range (non-finite count -1) and the exact launch consumes it:
    # one program redone, no mark left behind
    from avss_fast.kernels.layer_moments import layer_moments_partials

    cnt = layer_moments_partials(h, None, 1e-5, None, tiles=(4, 16, 1, 4))["cnt"]
    assert (cnt[..., 1] >= 0).all() and int(cnt[..., 1].sum()) == (0 if bad == "overflow" else 1)


def test_kernel_outliers_and_offsets_stay_accurate():
    """Per-token M2 in the fast pass: a massive activation in every token, tokens whose mean
    is far from 0, and a token of huge values (sums of squares near fp32's limit) stay
    within fp32 accumulation error of the float64 reference; so do the relative threshold's
    near-zero counts."""
    g = torch.Generator().manual_seed(23)
    h = torch.randn(3, 16, 256, generator=g)
    h[0, :, 0] = 3000.0  # massive activation at a chunk's first unit
    h[1] += 1000.0  # mean >> std
    h[2, 0, 0] = 0.0
    h[2, 0, 1:] = 1e18  # (sum h)^2 overflows fp32, sum (h - mean)^2 does not
    ref = reference.layer_moments(h)
    ref_rel = reference.layer_moments(h, sparsity_rel=0.5).raw()["near_zero"]
    for tiles in [(4, 64, 1, 1), (16, 256, 1, 1)]:
        assert_moments_close(_triton_moments(h, tiles=tiles), ref, rtol=2e-5, atol=1e-7)
        # the relative threshold: from the pre-pass (chunks), or from each row's moments in
        # the one read (whole rows: sum h^2 / n = M2 / n + mean^2, offsets and outliers too)
        assert _triton_moments(h, tiles=tiles, sparsity_rel=0.5).raw()["near_zero"] == ref_rel


def test_kernel_merge_loops(monkeypatch):
    """The float64 merge kernels with blocks shrunk so that every loop (token blocks,
    unit blocks, splits, samples, counts) runs several times."""
    import avss_fast.kernels.layer_moments as lm

    monkeypatch.setitem(lm._MERGE_BLOCKS, "cpu", dict(tile=16, units=8, splits=2, reduce=4, warps=1))
    h = _activations((7, 23, 37), torch.float32, seed=24)
    mask = torch.ones(7, 23)
    mask[3, 5:] = 0
    mask[5] = 0
    ref = reference.layer_moments(h, mask)
    assert_moments_close(_triton_moments(h, mask, tiles=(2, 16, 1, 5)), ref, rtol=2e-5, atol=1e-7)


def test_block_similarity_eps_must_be_positive_and_finite():
    """eps = 0 gave 0/0: NaN on the torch path and cos -1 on the Triton one; NaN was ignored."""
    z = torch.zeros(1, 2, 4)
    for eps in (0.0, -1e-8, float("nan"), float("inf"), True, "1e-8"):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            ops.block_similarity(z, z, eps=eps)
    assert ops.block_similarity(z, z, eps=1e-6).raw()["tokens"] == 2

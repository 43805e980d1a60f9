"""masked_attention: the Triton kernel (interpreter) and the torch path against the
materialised eager reference, over dtypes, GQA, causal/decode/chunked prefill, padding,
segments, gates, reweighting and the adaptive rule."""

import pytest
import torch

from avss_fast import reference
from avss_fast.ops import AttentionRule, masked_attention

# flash-attention's rule: low-precision error bounded by twice the same-dtype eager error
# against a float64 reference (plus a small floor).
def _check(out, q, k, v, kw, dtype):
    ref64 = reference.masked_attention(q, k, v, compute_dtype=torch.float64, **kw)
    ref_lp = reference.masked_attention(q, k, v, compute_dtype=dtype, **kw)
    if isinstance(ref64, tuple):
        (ref64, m64), (ref_lp, _), (out, mass) = ref64, ref_lp, out
        assert (mass.double() - m64).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * (ref_lp.double() - ref64).abs().max().item() + (1e-5 if dtype == torch.float32 else 1e-2)
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(B, Hq, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, D)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Sq,Sk", [(37, 37), (1, 45), (7, 30)], ids=["prefill", "decode", "chunked"])
def test_plain_attention(backend, dtype, causal, Sq, Sk):
    q, k, v = _qkv(2, 4, 2, Sq, Sk, 32, dtype)
    kw = dict(scaling=32**-0.5, causal=causal)
    _check(masked_attention(q, k, v, **kw), q, k, v, kw, dtype)


@pytest.mark.parametrize("D", [64, 80, 96, 128, 24])
def test_head_dims(backend, D):
    q, k, v = _qkv(1, 2, 1, 19, 19, D, torch.float32)
    kw = dict(scaling=D**-0.5, causal=True)
    _check(masked_attention(q, k, v, **kw), q, k, v, kw, torch.float32)


def test_plain_equals_sdpa(backend):
    q, k, v = _qkv(2, 4, 4, 33, 33, 32, torch.float32)
    out = masked_attention(q, k, v, scaling=0.2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2).transpose(1, 2)
    assert torch.allclose(out, sdpa, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["key", "full", "left_pad"])
def test_padding_masks(backend, mask_kind):
    B, Sq, Sk = 3, 9, 9
    q, k, v = _qkv(B, 4, 2, Sq, Sk, 16, torch.float32)
    km = torch.ones(B, Sk, dtype=torch.bool)
    if mask_kind == "left_pad":
        km[1, :4] = False
        km[2, :8] = False
        mask = km
    elif mask_kind == "key":
        km[0, 6:] = False
        mask = km
    else:
        mask = torch.rand(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(3)) > 0.3
    kw = dict(scaling=0.25, causal=True, attention_mask=mask if mask.dim() == 4 else mask[:, None, None, :])
    out = masked_attention(q, k, v, scaling=0.25, causal=True, attention_mask=mask)
    _check(out, q, k, v, kw, torch.float32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("nseg", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_segments_reweight_adaptive_and_mass(backend, nseg, rows):
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 6, 40
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 16, torch.float32, seed=nseg)
    starts = torch.tensor([[0, 8, 20, 33][:nseg], [0, 3, 15, 30][:nseg]])
    scale = torch.rand(B, Hq, nseg, generator=torch.Generator().manual_seed(1)) + 0.2
    gate = torch.tensor([[1.0, 0.0, 0.5, 1.0], [1.0, 1.0, 2.0, 0.0]])  # per batch row
    rule = AttentionRule(heads=(0, 2, 3), segment=nseg - 1, threshold=0.15, scale=0.0, rows=rows)
    kw = dict(scaling=0.3, causal=True, head_gate=gate, segment_starts=starts, segment_scale=scale,
              adaptive=rule, return_segment_mass=True)
    out = masked_attention(q, k, v, **kw)
    _check(out, q, k, v, kw, torch.float32)
    mass = out[1]
    assert torch.allclose(mass.sum(-1), torch.ones(B, Hq, Sq), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adaptive_low_precision(backend, dtype):
    q, k, v = _qkv(1, 4, 2, 12, 12, 32, dtype, seed=5)
    kw = dict(scaling=32**-0.5, segment_starts=[0, 4], adaptive=AttentionRule((1, 2), 1, 0.3, 0.0, "all"))
    out = masked_attention(q, k, v, **kw)
    ref_kw = dict(kw, segment_starts=torch.tensor([[0, 4]]))
    # decisions near the threshold may flip in low precision; compare rows that are clear
    mass = reference.masked_attention(q, k, v, compute_dtype=torch.float64, return_segment_mass=True,
                                      **{**ref_kw, "adaptive": None})[1]
    clear = ((mass[..., 1] - 0.3).abs() > 0.02).transpose(1, 2)[..., None]  # [B, Sq, Hq, 1]
    ref = reference.masked_attention(q, k, v, compute_dtype=torch.float64, **ref_kw)
    assert ((out.double() - ref).abs() * clear).max() < 3e-2


def test_gate_zero_equals_zeroed_head(backend):
    q, k, v = _qkv(2, 4, 2, 10, 10, 16, torch.float32)
    base = masked_attention(q, k, v, scaling=0.25)
    gated = masked_attention(q, k, v, scaling=0.25, head_gate=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    expect = base.clone()
    expect[:, :, 1] = 0
    assert torch.allclose(gated, expect, atol=1e-6)


def test_empty_intervention_fields_are_noops(backend):
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, torch.float32)
    base = masked_attention(q, k, v, scaling=0.25)
    ones = masked_attention(q, k, v, scaling=0.25, segment_starts=[0, 3], segment_scale=torch.ones(2, 2),
                            head_gate=torch.ones(2), adaptive=AttentionRule((), 1, 0.0, 0.0))
    assert torch.allclose(base, ones, atol=1e-6)


def test_input_errors():
    q, k, v = _qkv(1, 3, 2, 4, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        masked_attention(q, k, v, scaling=1.0)
    q, k, v = _qkv(1, 4, 2, 4, 4, 8, torch.float32)
    with pytest.raises(TypeError, match="additive"):
        masked_attention(q, k, v, scaling=1.0, attention_mask=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="out of range"):
        masked_attention(q, k, v, scaling=1.0, segment_starts=[0, 2], adaptive=AttentionRule((7,), 1))
    with pytest.raises(ValueError, match="at most 4"):
        masked_attention(q, k, v, scaling=1.0, segment_starts=[0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="non-decreasing"):
        masked_attention(q, k, v, scaling=1.0, segment_starts=[0, 3, 2])
    with pytest.raises(ValueError, match="needs segment_starts"):
        masked_attention(q, k, v, scaling=1.0, segment_scale=torch.ones(4, 1))
    with pytest.raises(ValueError, match="head_gate"):
        masked_attention(q, k, v, scaling=1.0, head_gate=torch.ones(3))
    with pytest.raises(ValueError, match="head_gate"):
        masked_attention(q, k, v, scaling=1.0, head_gate=[1.0, 0.0])  # a list: still a clear error
    with pytest.raises(ValueError, match="segment_scale"):
        masked_attention(q, k, v, scaling=1.0, segment_starts=[0, 2], segment_scale=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="non-decreasing"):
        masked_attention(q, k, v, scaling=1.0, segment_starts=torch.tensor([[0, 1], [0, 3]])[[1]].flip(1))


def test_masked_attention_op_passes_opcheck():
    q, k, v = _qkv(2, 4, 2, 5, 9, 8, torch.float32)
    starts = torch.tensor([[0, 3], [0, 6]], dtype=torch.int32)
    gate = torch.rand(2, 4)
    rule = torch.tensor([1, 0, 0, 1], dtype=torch.int8)
    args = (q, k, v, None, None, gate, starts, None, rule, 0.3, True, 1, 0.4, 0.0, False, True, True, True, "torch")
    torch.library.opcheck(torch.ops.avss_fast.masked_attention.default, args)


def test_masked_attention_under_torch_compile():
    """Compiled, the op runs through the registered custom op (eager calls skip its dispatch);
    both give the same numbers."""
    q, k, v = _qkv(1, 4, 2, 6, 6, 8, torch.float32)
    rule = AttentionRule((0, 2), 1, 0.3, 0.0, "all")
    starts = torch.tensor([[0, 2]])

    def f(q, k, v):
        return masked_attention(q * 1.0, k, v, scaling=0.35, segment_starts=starts, adaptive=rule)

    compiled = torch.compile(f, backend="eager")
    assert torch.allclose(compiled(q, k, v), f(q, k, v), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "keys", "full"])
@pytest.mark.parametrize("nseg", [1, 3])
def test_decode_row_with_every_feature(backend, dtype, mask_kind, nseg):
    """One query row (KV-cache decoding; the torch path computes it explicitly): gates,
    reweighting, the rule and masses over GQA heads, with key or full masks."""
    B, Hq, Hkv, Sk = 3, 8, 2, 29
    q, k, v = _qkv(B, Hq, Hkv, 1, Sk, 24, dtype, seed=11 + nseg)
    keys = torch.ones(B, Sk, dtype=torch.bool)
    keys[0, :5] = False  # left padding
    keys[2, 10:13] = False
    mask = {"none": None, "keys": keys, "full": keys[:, None, None, :]}[mask_kind]
    starts = torch.tensor([[0, 9, 20][:nseg], [0, 4, 11][:nseg], [0, 15, 16][:nseg]])
    scale = torch.rand(Hq, nseg, generator=torch.Generator().manual_seed(3)) + 0.3
    gate = torch.rand(B, Hq, generator=torch.Generator().manual_seed(4))
    rule = AttentionRule(heads=(0, 3, 5, 6), segment=nseg - 1, threshold=0.2, scale=0.1, rows="last")
    kw = dict(scaling=24**-0.5, causal=True, attention_mask=mask, head_gate=gate, segment_starts=starts,
              segment_scale=scale, adaptive=rule, return_segment_mass=True)
    out = masked_attention(q, k, v, **kw)
    ref_kw = dict(kw, attention_mask=None if mask is None else keys[:, None, None, :])  # the reference takes 4-D
    if dtype == torch.float32:
        _check(out, q, k, v, ref_kw, dtype)
    else:  # away from the rule's threshold, within low-precision error
        ref, mass = reference.masked_attention(q, k, v, compute_dtype=torch.float64, **ref_kw)
        clear = ((mass[..., nseg - 1] - 0.2).abs() > 0.02).transpose(1, 2)[..., None]
        assert ((out[0].double() - ref).abs() * clear).max() < 3e-2
        assert (out[1].double() - mass).abs().max() < 2e-2


# ----------------------------------------------------------------------------- per-row head statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "Sq,Sk,causal,mask_kind",
    [(37, 37, True, "none"), (37, 37, True, "keys"), (1, 45, True, "keys"), (7, 30, True, "full"),
     (20, 20, False, "keys"), (9, 300, True, "none")],
    ids=["prefill", "prefill-pad", "decode-pad", "chunked-full", "bidirectional-pad", "long"],
)
def test_head_stats_against_reference(backend, dtype, Sq, Sk, causal, mask_kind):
    """Entropy, max logit and first-key mass of every row (and the rule's decisions) equal a
    materialised softmax's; the attention output is unchanged by asking for them."""
    B, Hq, Hkv = 2, 4, 2
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 16, dtype, seed=Sk)
    keys = torch.ones(B, Sk, dtype=torch.bool)
    keys[0, : Sk // 3] = False  # left padding: early causal rows see nothing
    mask = {"none": None, "keys": keys, "full": keys[:, None, None, :].expand(B, 1, Sq, Sk)}[mask_kind]
    rule = AttentionRule(heads=(1, 2), segment=1, threshold=0.3, scale=0.0, rows="all")
    kw = dict(scaling=0.4, causal=causal, attention_mask=mask, segment_starts=[0, Sk // 2], adaptive=rule)
    out, mass, stats = masked_attention(q, k, v, return_head_stats=True, **kw)
    assert mass is None and stats.shape == (B, Hq, Sq, 3) and stats.dtype == torch.float32
    ref_mask = None if mask is None else (keys[:, None, None, :] if mask_kind != "full" else mask)
    ref = reference.masked_attention_outputs(
        q, k, v, scaling=0.4, causal=causal, attention_mask=ref_mask, segment_starts=torch.tensor([[0, Sk // 2]] * B),
        adaptive=rule, compute_dtype=torch.float64)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    st, rs = stats.double(), ref["stats"].double()
    finite = torch.isfinite(rs[..., 1])
    assert torch.equal(torch.isfinite(st[..., 1]), finite)  # rows with no allowed key: -inf
    assert (st[..., 0] - rs[..., 0]).abs().max() < tol * 10, "entropy"
    assert (st[..., 1][finite] - rs[..., 1][finite]).abs().max() < tol * 10, "max logit"
    assert (st[..., 2] - rs[..., 2]).abs().max() < tol, "sink mass"
    assert (st[~finite][:, [0, 2]] == 0).all()
    plain = masked_attention(q, k, v, **kw)
    if dtype == torch.float32:
        assert torch.equal(out, plain)
    else:  # the CPU statistics path computes bf16 in fp32 (more accurate): within rounding
        assert (out.float() - plain.float()).abs().max() < 2e-2


def test_rule_fired_matches_reference(backend):
    from avss_fast.ops import masked_attention_prepared, prepare_attention_args

    q, k, v = _qkv(2, 4, 2, 6, 25, 16, torch.float32, seed=3)
    for rows in ("last", "all"):
        rule = AttentionRule(heads=(0, 3), segment=1, threshold=0.35, scale=0.0, rows=rows)
        args = prepare_attention_args(2, 4, q.device, segment_starts=[0, 10], adaptive=rule, return_rule_fired=True)
        res = masked_attention_prepared(q, k, v, args, scaling=0.3)
        ref = reference.masked_attention_outputs(q, k, v, scaling=0.3, segment_starts=torch.tensor([[0, 10]] * 2),
                                                 adaptive=rule)
        assert torch.equal(res.fired, ref["fired"])
        assert int(res.fired.sum()) > 0
        if rows == "all":
            assert int(res.fired.sum()) < 2 * 2 * 6  # some rows fire, some do not
        else:
            assert int(res.fired[..., :-1].sum()) == 0  # only the last row is ever checked


def test_head_stats_low_precision_entropy_is_accurate(backend):
    """Sharp bf16 attention: the entropy (a difference of two large numbers on the CPU path)
    stays within 1e-3 nats of float64."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 4, 64, 32, generator=g) * 3).bfloat16()
    k = (torch.randn(2, 2, 64, 32, generator=g) * 3).bfloat16()
    v = torch.randn(2, 2, 64, 32, generator=g).bfloat16()
    _, _, stats = masked_attention(q, k, v, scaling=32**-0.5, return_head_stats=True)
    ref = reference.masked_attention_outputs(q, k, v, scaling=32**-0.5, compute_dtype=torch.float64)["stats"]
    assert (stats[..., 0].double() - ref[..., 0]).abs().max() < 1e-3

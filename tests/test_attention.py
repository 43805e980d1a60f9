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
    with pytest.raises(ValueError, match=">= 0"):
        masked_attention(q, k, v, scaling=1.0, segment_starts=[-3, 2])
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


@pytest.mark.parametrize("rows", ["last", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "Sq,Sk,causal,mask_kind",
    [(37, 37, True, "none"), (37, 37, True, "keys"), (1, 45, True, "keys"), (7, 30, True, "full"),
     (20, 20, False, "keys"), (9, 300, True, "none")],
    ids=["prefill", "prefill-pad", "decode-pad", "chunked-full", "bidirectional-pad", "long"],
)
def test_head_stats_against_reference(stats_backend, dtype, Sq, Sk, causal, mask_kind, rows):
    """Entropy, max logit and first-key mass of every row (and the rule's decisions) equal a
    materialised softmax's; the attention output is unchanged by asking for them (the rule
    on the last row only: what the compiled CPU kernel takes; on every row: the torch path)."""
    B, Hq, Hkv = 2, 4, 2
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 16, dtype, seed=Sk)
    keys = torch.ones(B, Sk, dtype=torch.bool)
    keys[0, : Sk // 3] = False  # left padding: early causal rows see nothing
    mask = {"none": None, "keys": keys, "full": keys[:, None, None, :].expand(B, 1, Sq, Sk)}[mask_kind]
    rule = AttentionRule(heads=(1, 2), segment=1, threshold=0.3, scale=0.0, rows=rows)
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
    native = stats_backend == "torch-native" and Sq > 1  # decode rows take the explicit one-row path
    if dtype == torch.float32 and not native:
        assert torch.equal(out, plain)
    else:  # fp32 arithmetic in another order (the compiled kernel; bf16 in fp32 on the CPU statistics paths)
        assert (out.float() - plain.float()).abs().max() < (2e-5 if dtype == torch.float32 else 2e-2)
    assert (out.double() - ref["out"].double()).abs().max() < (2e-5 if dtype == torch.float32 else 2e-2)


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


def test_head_stats_low_precision_entropy_is_accurate(stats_backend):
    """Sharp bf16 attention: the entropy (a difference of two large numbers on the CPU path)
    stays within 1e-3 nats of float64."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 4, 64, 32, generator=g) * 3).bfloat16()
    k = (torch.randn(2, 2, 64, 32, generator=g) * 3).bfloat16()
    v = torch.randn(2, 2, 64, 32, generator=g).bfloat16()
    _, _, stats = masked_attention(q, k, v, scaling=32**-0.5, return_head_stats=True)
    ref = reference.masked_attention_outputs(q, k, v, scaling=32**-0.5, compute_dtype=torch.float64)["stats"]
    assert (stats[..., 0].double() - ref[..., 0]).abs().max() < 1e-3


# ----------------------------------------------------------------------------- kernel work layout
# The Triton kernel splits each query block's keys into an unmasked phase (blocks inside Sk and
# at or below the causal diagonal for every row) and a masked one, keeps segment masses only
# when needed, and with the rule on the last row runs the block holding row Sq - 1 as a second
# launch (or a branch of one launch). Small tiles put several blocks through both phases; every
# output is checked against the float64 materialised reference.

# name: (Sq, Sk, causal, mask)
LAYOUT_CASES = {
    "prefill": (50, 50, True, None),
    "prefill_ragged": (37, 37, True, None),  # Sq not a multiple of BLOCK_M
    "chunked": (21, 50, True, None),  # bottom-right causal, Sq != Sk
    "chunked_keys": (27, 61, True, "keys"),
    "prefill_keys": (50, 50, True, "keys"),  # left padding past the first key block: empty rows
    "full_mask": (45, 50, True, "full"),
    "noncausal_tail": (19, 50, False, None),  # Sk tail block
    "decode": (1, 50, True, None),
    "more_queries_than_keys": (40, 30, True, None),  # early rows see no key
}
LAYOUT_TILES = [(16, 16, 1, 1), (32, 16, 1, 1), (16, 32, 1, 1)]


def _layout_inputs(Sq, Sk, causal, mask, *, rows, nseg=3, rule_segment=None, seed=0):
    B, Hq, Hkv, D = 2, 4, 2, 16
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g) * torch.linspace(0.5, 2.0, Sk)[None, None, :, None]
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    key_mask = full_mask = ref_mask = None
    if mask == "keys":
        key_mask = torch.ones(B, Sk, dtype=torch.int8)
        key_mask[1, :21] = 0
        key_mask[0, Sk - 5 : Sk - 2] = 0
        ref_mask = key_mask.bool()[:, None, None, :]
    elif mask == "full":
        full_mask = (torch.rand(B, 1, Sq, Sk, generator=g) > 0.3).to(torch.int8)
        full_mask[0, 0, 3] = 0  # a row with no allowed key
        full_mask[1, 0, 5, :35] = 0  # first allowed key past the first key blocks
        ref_mask = full_mask.bool()
    starts = torch.tensor([[0, Sk // 5, Sk // 2, Sk - 4][:nseg], [0, 3, 2 * Sk // 3, Sk - 9][:nseg]], dtype=torch.int32)
    scale = torch.rand(B, Hq, nseg, generator=g) + 0.5
    gate = torch.rand(B, Hq, generator=g) + 0.5
    heads = (0, 3)
    r = nseg - 1 if rule_segment is None else rule_segment
    common = dict(scaling=0.3, causal=causal, segment_starts=starts, segment_scale=scale, head_gate=gate)
    # a threshold midway between two covered rule-segment masses: some fire, some do not
    mass_r = reference.masked_attention_outputs(q, k, v, attention_mask=ref_mask, compute_dtype=torch.float64,
                                                **common)["mass"][..., r]
    covered = mass_r[:, list(heads)]
    if rows == "last":
        covered = covered[..., -1]
    vals = torch.sort(covered.flatten().unique()).values
    mid = max(1, vals.numel() // 2)
    threshold = float((vals[mid - 1] + vals[min(mid, vals.numel() - 1)]) / 2)
    if nseg == 1:  # the one segment holds all the mass (1 up to rounding): a clear threshold
        threshold = 0.5
    rule = AttentionRule(heads, r, threshold, 0.25, rows)
    ref = reference.masked_attention_outputs(q, k, v, attention_mask=ref_mask, adaptive=rule,
                                             compute_dtype=torch.float64, **common)
    kw = dict(common, key_mask=key_mask, full_mask=full_mask,
              rule_heads=torch.tensor([1 if h in heads else 0 for h in range(Hq)], dtype=torch.int8),
              rule_segment=r, threshold=threshold, rule_scale=0.25, last_row_only=rows == "last")
    return q, k, v, kw, ref


def _check_layout(res, ref, *, with_mass=True, with_stats=True):
    out, mass, stats, fired = res
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref["out"].double(), rtol=1e-5, atol=2e-5)
    assert torch.equal(fired, ref["fired"])
    if with_mass:
        torch.testing.assert_close(mass.double(), ref["mass"].double(), rtol=1e-5, atol=1e-5)
    if with_stats:
        st, rs = stats.double(), ref["stats"].double()
        torch.testing.assert_close(st[..., 0], rs[..., 0], rtol=1e-4, atol=1e-4, msg=lambda m: "entropy: " + m)
        torch.testing.assert_close(st[..., 1], rs[..., 1], rtol=1e-5, atol=1e-4, msg=lambda m: "max logit: " + m)
        torch.testing.assert_close(st[..., 2], rs[..., 2], rtol=1e-5, atol=1e-5, msg=lambda m: "sink: " + m)


@pytest.mark.parametrize("tiles", LAYOUT_TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("rows", ["last", "all"])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_kernel_phase_split_against_reference(case, rows, tiles):
    """Every output of the kernel, with tiles small enough that several key blocks run the
    unmasked phase and several the masked one (two launches with rows='last')."""
    from avss_fast.kernels.masked_attention import masked_attention_fwd

    Sq, Sk, causal, mask = LAYOUT_CASES[case]
    q, k, v, kw, ref = _layout_inputs(Sq, Sk, causal, mask, rows=rows)
    res = masked_attention_fwd(q, k, v, tiles=tiles, return_segment_mass=True, return_head_stats=True,
                               return_rule_fired=True, **kw)
    _check_layout(res, ref)
    assert ref["fired"].any()
    if case in ("prefill_keys", "full_mask", "more_queries_than_keys"):
        assert torch.isinf(ref["stats"][..., 1]).any()  # the case really has rows with no allowed key
    # the default (interpreter) tiles agree
    out_default = masked_attention_fwd(q, k, v, return_segment_mass=False, **kw)[0]
    torch.testing.assert_close(out_default, res[0], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("nseg,rule_segment", [(1, 0), (2, 0), (3, 1), (4, 3)])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_kernel_rule_without_mass_output(nseg, rule_segment, rows):
    """The rule alone keeps only its segment's running mass (one segment: l itself); with and
    without the other outputs the attention output and decisions are the same."""
    from avss_fast.kernels.masked_attention import masked_attention_fwd

    q, k, v, kw, ref = _layout_inputs(50, 50, True, None, rows=rows, nseg=nseg, rule_segment=rule_segment, seed=4)
    res = masked_attention_fwd(q, k, v, tiles=(16, 16, 1, 1), return_segment_mass=False, return_rule_fired=True, **kw)
    assert res[1] is None and res[2] is None
    _check_layout(res, ref, with_mass=False, with_stats=False)
    full = masked_attention_fwd(q, k, v, tiles=(16, 16, 1, 1), return_segment_mass=True, return_head_stats=True,
                                return_rule_fired=True, **kw)
    assert torch.equal(full[0], res[0]) and torch.equal(full[3], res[3])
    assert ref["fired"].any()


def test_kernel_tiles_override_and_default(monkeypatch):
    """``tiles=`` reaches the kernel (several query blocks: the rule's block runs alone), bad
    tiles are refused, and the GPU default lives in one function."""
    import avss_fast.kernels.masked_attention as km

    q, k, v, kw, ref = _layout_inputs(50, 50, True, "keys", rows="last", seed=2)
    calls = []
    real = km._masked_attention_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kwargs):
                calls.append((grid, kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["ADAPTIVE"], kwargs["M_OFFSET"]))
                return real[grid](*a, **kwargs)
            return launch

    monkeypatch.setattr(km, "_masked_attention_fwd", Spy())
    res = km.masked_attention_fwd(q, k, v, tiles=(16, 16, 1, 1), return_segment_mass=True, return_head_stats=True,
                                  return_rule_fired=True, **kw)
    _check_layout(res, ref)
    assert calls == [((3, 8), 16, 16, False, 0), ((1, 8), 16, 16, True, 3)]
    with pytest.raises(ValueError, match="powers of two"):
        km.masked_attention_fwd(q, k, v, tiles=(24, 16, 1, 1), return_segment_mass=False, **kw)
    bm, bn, nw, ns = km._gpu_tiles(4096, 128, torch.bfloat16)
    assert bm >= 16 and bn >= 16 and nw in (1, 2, 4, 8, 16) and ns >= 1
    # fp32 and wide heads keep 2 stages (3 would not fit an A100's / Ada card's shared memory)
    assert km._gpu_tiles(4096, 128, torch.float32)[3] == 2 and km._gpu_tiles(4096, 256, torch.bfloat16)[3] == 2
    assert km._gpu_tiles(1, 128, torch.bfloat16)[0] == 16  # decoding: one row


@pytest.mark.parametrize("rows", ["last", "all"])
def test_kernel_fold_and_order_give_identical_results(monkeypatch, rows):
    """The folded grid (with the rule's block launched on its own) and the order of the
    query blocks change no output."""
    import avss_fast.kernels.masked_attention as km

    q, k, v, kw, ref = _layout_inputs(45, 50, True, "full", rows=rows, seed=3)
    kw = dict(kw, tiles=(16, 16, 1, 1), return_segment_mass=True, return_head_stats=True, return_rule_fired=True)
    base = km.masked_attention_fwd(q, k, v, **kw)
    _check_layout(base, ref)
    variants = {"fold": {"_force_fold": True}, "forward_order": {"_reverse_m": False},
                "fold_forward": {"_force_fold": True, "_reverse_m": False}}
    for name, settings in variants.items():
        with monkeypatch.context() as m:
            for attr, value in settings.items():
                m.setattr(km, attr, value)
            got = km.masked_attention_fwd(q, k, v, **kw)
        for a, b in zip(base, got):
            assert torch.equal(a, b), name


def test_kernel_unmasked_phase_rows_past_sq_and_low_precision():
    """bf16 inputs through both phases with the last query block mostly past Sq (its rows
    compute from zero queries and are never stored): finite, and within bf16 error of
    float64. (The interpreter computes in fp32; the bf16 dot path runs in tests/test_gpu.py.)"""
    from avss_fast.kernels.masked_attention import masked_attention_fwd

    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 33, 32, generator=g).bfloat16()
    k = torch.randn(1, 2, 33, 32, generator=g).bfloat16()
    v = torch.randn(1, 2, 33, 32, generator=g).bfloat16()
    kw = dict(scaling=32**-0.5, causal=True, key_mask=None, full_mask=None, head_gate=None, segment_starts=None,
              segment_scale=None, rule_heads=None, rule_segment=0, threshold=0.5, rule_scale=0.0,
              last_row_only=False, return_segment_mass=False, return_head_stats=True)
    out, _, stats, _ = masked_attention_fwd(q, k, v, tiles=(32, 16, 1, 1), **kw)
    ref = reference.masked_attention_outputs(q, k, v, scaling=32**-0.5, compute_dtype=torch.float64)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    assert (out.double() - ref["out"].double()).abs().max() < 2e-2
    assert (stats.double() - ref["stats"].double()).abs().max() < 2e-2


@pytest.mark.parametrize("case", ["mask", "gate", "rule_last", "rule_all", "scale", "stats"])
def test_gradients_flow_on_every_backend(backend, case):
    """With autograd recording, backward works and equals the float64 reference's gradient:
    the torch path updated SDPA's saved output in place (a RuntimeError in backward), and
    the forward-only Triton kernel returned an output with no gradient at all."""
    q, k, v = _qkv(2, 4, 2, 6, 9, 8, torch.float32, seed=3)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :2] = False
    kw = dict(scaling=8**-0.5, causal=True, attention_mask=mask[:, None, None, :].expand(2, 1, 6, 9))
    if case == "gate":
        kw["head_gate"] = torch.tensor([[1.0, 0.5, 0.0, 2.0]] * 2)
    if case in ("rule_last", "rule_all", "scale"):
        kw["segment_starts"] = torch.tensor([[0, 4], [0, 3]])
    if case == "scale":
        kw["segment_scale"] = torch.tensor([[[1.0, 0.5]] * 4] * 2)
    if case.startswith("rule"):
        kw["adaptive"] = AttentionRule(heads=[0, 2], segment=0, threshold=0.2, scale=0.0,
                                       rows="last" if case == "rule_last" else "all")
    def grads_of(fn, dtype):
        leaves = [t.clone().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.double().mul(torch.linspace(-1, 1, out.numel()).view_as(out).double()).sum().backward()
        return [t.grad.double() for t in leaves]

    grads = [grads_of(lambda *a: masked_attention(*a, return_head_stats=case == "stats", **kw), torch.float32),
             grads_of(lambda *a: reference.masked_attention(*a, compute_dtype=torch.float64, **kw), torch.float64)]
    for got, want in zip(*grads):
        assert (got - want).abs().max() < 1e-5
    assert grads[1][0].abs().max() > 1e-3


def test_no_keys_and_non_finite_rule_values(monkeypatch):
    """Every backend (the reference included) returns zeros and the empty-row statistics
    (0, -inf, 0) when there are no keys at all; a NaN rule threshold (a rule that can never
    fire) or scale is refused."""
    q = torch.randn(1, 2, 3, 4)
    empty = torch.zeros(1, 1, 0, 4)
    for name in ("reference", "torch"):
        monkeypatch.setenv("AVSS_FAST_BACKEND", name)
        out, _, stats = masked_attention(q, empty, empty, scaling=0.5, causal=False, return_head_stats=True)
        assert out.shape == (1, 3, 2, 4) and not out.any()
        assert stats[..., 0].abs().max() == 0 and (stats[..., 1] == float("-inf")).all() and not stats[..., 2].any()
    k = torch.randn(1, 1, 5, 4)
    for bad in (dict(threshold=float("nan")), dict(scale=float("inf"))):
        with pytest.raises(ValueError, match="must be finite"):
            masked_attention(q, k, k, scaling=0.5, segment_starts=[0, 2], adaptive=AttentionRule(heads=[0], segment=0, **bad))

"""masked_attention_fwd's optional per-(row, head) outputs, checked against an eager float64
materialisation: head statistics of the plain softmax (entropy, max logit, sink mass at the
row's first allowed key) and where the adaptive rule fired. Covers fp32/bf16, GQA, causal
prefill, decode, chunked prefill, non-causal, left padding (rows with no allowed key), a
full [B, 1, Sq, Sk] mask, several key blocks (online rescaling of the entropy accumulator)
and 1-4 segments. Turning the new outputs on must not change ``out`` or ``mass``."""

import pytest
import torch

from avss_fast.kernels.masked_attention import masked_attention_fwd

B, HQ, HKV, D = 2, 4, 2, 16


def _qkv(Sq, Sk, dtype, seed, sink_boost):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, Sq, D, generator=g)
    k = torch.randn(B, HKV, Sk, D, generator=g)
    v = torch.randn(B, HKV, Sk, D, generator=g)
    # later keys get larger logits, so the running max moves between key blocks
    k = k * torch.linspace(0.5, 2.5, Sk)[None, None, :, None]
    if sink_boost:  # a strong attention sink at each sample's first real key
        G = HQ // HKV
        qdir = q.view(B, HKV, G, Sq, D).mean((2, 3))
        for b, j in enumerate(sink_boost):
            k[b, :, j] = 8.0 * qdir[b] / qdir[b].norm(dim=-1, keepdim=True)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _segments(starts, Sk):
    pos = torch.arange(Sk)
    seg = torch.zeros(starts.shape[0], Sk, dtype=torch.long)
    for s in range(1, starts.shape[1]):
        seg = torch.where(pos[None, :] >= starts[:, s : s + 1].long(), s, seg)
    return seg  # [B, Sk]


def _eager(q, k, v, *, scaling, causal, key_mask, full_mask, segment_starts, rule_heads, rule_segment,
           threshold, last_row_only):
    """float64, materialised: (stats [B,Hq,Sq,3], mass [B,Hq,Sq,S], rule mass [B,Hq,Sq], covered)."""
    Bq, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hkv, 1)
    s = scaling * (q.double() @ kk.transpose(-1, -2))  # [B, Hq, Sq, Sk]
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    allowed = torch.ones(Bq, 1, Sq, Sk, dtype=torch.bool)
    if causal:
        allowed = allowed & (j <= i + (Sk - Sq))[None, None]
    if key_mask is not None:
        allowed = allowed & (key_mask != 0)[:, None, None, :]
    if full_mask is not None:
        allowed = allowed & (full_mask != 0)
    allowed = allowed.expand(Bq, Hq, Sq, Sk)
    sm = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(sm, -1), nan=0.0)
    any_ok = allowed.any(-1)
    ent = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)
    mx = sm.amax(-1)
    first = allowed.to(torch.int8).argmax(-1)  # lowest allowed key index (0 when none)
    sink = torch.where(any_ok, p.gather(-1, first[..., None])[..., 0], 0.0)
    stats = torch.stack([ent, mx, sink], -1)
    seg = _segments(segment_starts, Sk)
    S = segment_starts.shape[1]
    mass = torch.stack([(p * (seg == sg)[:, None, None, :]).sum(-1) for sg in range(S)], -1)
    covered = torch.zeros(Bq, Hq, Sq, dtype=torch.bool)
    if rule_heads is not None:
        covered[:, rule_heads.bool()] = True
        if last_row_only:
            covered[:, :, : Sq - 1] = False
    return stats, mass, covered


# name: (Sq, Sk, causal, padding, nseg, last_row_only, extras)
CASES = {
    "prefill_causal_leftpad": (260, 260, True, "left", 3, False, ("gate",)),
    "decode_leftpad": (1, 300, True, "left", 2, True, ()),
    "chunked_prefill": (7, 300, True, "left", 4, False, ("scale",)),
    "noncausal_allpad": (5, 300, False, "allpad", 2, False, ("gate", "scale")),
    "causal_leftpad_empty_rows": (40, 40, True, "left_long", 2, False, ()),
    "full_mask": (9, 300, True, "full", 3, False, ()),
    "no_rule": (7, 140, True, None, 1, False, ("norule",)),
}


def _make(case, dtype, seed=0, nseg=None, last_row_only=None):
    Sq, Sk, causal, padding, S, lro, extras = CASES[case]
    S = S if nseg is None else nseg
    lro = lro if last_row_only is None else last_row_only
    key_mask = full_mask = None
    first_real = [0] * B
    km = torch.ones(B, Sk, dtype=torch.int8)
    if padding == "left":
        km[1, :37] = 0
        first_real[1] = 37
        key_mask = km
    elif padding == "left_long":  # causal rows 0..14 of sample 1 see only padding
        km[1, :15] = 0
        first_real[1] = 15
        key_mask = km
    elif padding == "allpad":  # sample 1 is all padding: no row has an allowed key
        km[0, :150] = 0
        km[1, :] = 0
        first_real[0] = 150
        key_mask = km
    elif padding == "full":
        g = torch.Generator().manual_seed(seed + 11)
        full_mask = (torch.rand(B, 1, Sq, Sk, generator=g) > 0.3).to(torch.int8)
        full_mask[0, 0, 3] = 0  # a row with no allowed key
        full_mask[1, 0, 5, :200] = 0  # first allowed key past the first key block
    q, k, v = _qkv(Sq, Sk, dtype, seed, sink_boost=first_real if padding != "full" else None)
    g = torch.Generator().manual_seed(seed + 7)
    starts = torch.zeros(B, S, dtype=torch.int32)
    for b in range(B):
        if S > 1:
            starts[b, 1:] = torch.sort(torch.randperm(Sk - 1, generator=g)[: S - 1] + 1).values.to(torch.int32)
    kw = dict(
        scaling=D**-0.5, causal=causal, key_mask=key_mask, full_mask=full_mask,
        head_gate=torch.rand(B, HQ, generator=g) + 0.5 if "gate" in extras else None,
        segment_starts=starts,
        segment_scale=torch.rand(B, HQ, S, generator=g) * 2 if "scale" in extras else None,
        rule_heads=None if "norule" in extras else torch.tensor([1, 0, 0, 1], dtype=torch.int8),
        rule_segment=S - 1, threshold=0.0, rule_scale=0.25, last_row_only=lro,
    )
    return q, k, v, kw


def _pick_threshold(mass_r, covered):
    """A threshold midway between two neighbouring covered masses, so some fire and some do not."""
    vals = torch.sort(mass_r[covered].unique()).values
    if vals.numel() < 2:
        return 0.5
    mid = vals.numel() // 2
    return float((vals[mid - 1] + vals[mid]) / 2)


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-3, atol=2e-3)}


def _check(q, k, v, kw, dtype):
    ekw = {n: kw[n] for n in ("scaling", "causal", "key_mask", "full_mask", "segment_starts", "rule_heads",
                               "rule_segment", "last_row_only")}
    stats_ref, mass_ref, covered = _eager(q, k, v, threshold=None, **ekw)
    mass_r = mass_ref[..., kw["rule_segment"]]
    kw = dict(kw, threshold=_pick_threshold(mass_r, covered))
    fired_ref = covered & (mass_r >= kw["threshold"])

    out0, mass0, st0, fi0 = masked_attention_fwd(q, k, v, return_segment_mass=True, **kw)
    assert st0 is None and fi0 is None
    out, mass, stats, fired = masked_attention_fwd(
        q, k, v, return_segment_mass=True, return_head_stats=True, return_rule_fired=True, **kw)
    # the new outputs leave the existing ones untouched
    assert torch.equal(out, out0) and torch.equal(mass, mass0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(mass.double(), mass_ref, rtol=0, atol=TOL[dtype]["atol"])

    Sq = q.shape[2]
    assert stats.shape == (B, HQ, Sq, 3) and stats.dtype == torch.float32
    assert fired.shape == (B, HQ, Sq) and fired.dtype == torch.int8
    tol = TOL[dtype]
    torch.testing.assert_close(stats[..., 0].double(), stats_ref[..., 0], **tol, msg=lambda m: "entropy: " + m)
    torch.testing.assert_close(stats[..., 1].double(), stats_ref[..., 1], **tol, msg=lambda m: "max logit: " + m)
    torch.testing.assert_close(stats[..., 2].double(), stats_ref[..., 2], **tol, msg=lambda m: "sink: " + m)
    # rows with no allowed key: entropy 0, max logit -inf, sink 0
    empty = torch.isinf(stats_ref[..., 1])
    assert torch.equal(torch.isinf(stats[..., 1]), empty)
    assert (stats[..., 0][empty] == 0).all() and (stats[..., 2][empty] == 0).all()
    assert (stats[..., 1][empty] == float("-inf")).all()
    assert set(fired.unique().tolist()) <= {0, 1}
    # a decision within rounding of the threshold may go either way
    decided = (mass_r - kw["threshold"]).abs() > 1e-4
    assert torch.equal(fired.bool()[decided], fired_ref[decided])
    assert not fired.bool()[~covered].any()
    return stats_ref, empty, fired_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_head_stats_and_fired(case, dtype):
    q, k, v, kw = _make(case, dtype)
    stats_ref, empty, fired_ref = _check(q, k, v, kw, dtype)
    if case in ("noncausal_allpad", "causal_leftpad_empty_rows", "full_mask"):
        assert empty.any()  # the case really has rows with no allowed key
    if case == "no_rule":
        assert not fired_ref.any()
    elif q.shape[2] > 1 or kw["last_row_only"]:
        assert fired_ref.any()
    if case == "decode_leftpad":  # the boosted first real key is a visible sink
        assert (stats_ref[..., 2] > 0.05).any()


@pytest.mark.parametrize("nseg", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", ["last", "all"])
def test_segments_rule_fired(nseg, rows):
    q, k, v, kw = _make("chunked_prefill", torch.float32, seed=nseg, nseg=nseg, last_row_only=rows == "last")
    _, _, fired_ref = _check(q, k, v, kw, torch.float32)
    assert fired_ref.any()
    if rows == "last":
        assert not fired_ref[:, :, :-1].any()


def test_single_block_matches_multi_block_rescaling():
    """A peaked row whose max moves late: entropy stays exact through the rescaling of t."""
    Sq, Sk = 1, 300
    q = torch.zeros(1, 2, Sq, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, Sk, D)
    k[0, 0, :, 0] = torch.linspace(-2.0, 30.0, Sk)  # max logit only in the last key block
    v = torch.randn(1, 1, Sk, D, generator=torch.Generator().manual_seed(1))
    kw = dict(scaling=1.0, causal=True, key_mask=None, full_mask=None, head_gate=None, segment_starts=None,
              segment_scale=None, rule_heads=None, rule_segment=0, threshold=0.5, rule_scale=0.0,
              last_row_only=False, return_segment_mass=False)
    out, mass, stats, fired = masked_attention_fwd(q, k, v, return_head_stats=True, return_rule_fired=True, **kw)
    assert mass is None
    s = (q.double() @ k.double().transpose(-1, -2))[0, 0, 0]
    p = torch.softmax(s, -1)
    torch.testing.assert_close(stats[0, 0, 0, 0].double(), -(p * p.log()).sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats[0, 0, 0, 1].double(), s.max(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats[0, 0, 0, 2].double(), p[0], rtol=1e-3, atol=1e-12)
    assert not fired.any()


def test_folded_grid_gives_the_same_results(monkeypatch):
    """Past 65,535 (batch x heads) programs on the grid's second axis the launcher folds
    everything onto axis 0; forced here at a small size, every output must be identical."""
    import avss_fast.kernels.masked_attention as km

    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 70, 16, generator=g)
    k = torch.randn(2, 2, 70, 16, generator=g)
    v = torch.randn(2, 2, 70, 16, generator=g)
    kw = dict(scaling=0.25, causal=True, key_mask=None, full_mask=None, head_gate=None,
              segment_starts=torch.tensor([[0, 30], [0, 40]], dtype=torch.int32), segment_scale=None,
              rule_heads=torch.tensor([1, 0, 0, 1], dtype=torch.int8), rule_segment=1, threshold=0.3,
              rule_scale=0.0, last_row_only=False, return_segment_mass=True, return_head_stats=True,
              return_rule_fired=True)
    plain = km.masked_attention_fwd(q, k, v, **kw)
    monkeypatch.setattr(km, "_force_fold", True)
    folded = km.masked_attention_fwd(q, k, v, **kw)
    for a, b in zip(plain, folded):
        assert torch.equal(a, b)

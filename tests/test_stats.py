"""Moments / Similarity accumulators: merge algebra (property tests), int64 counts past
2**31, Chan's rule against exact rational arithmetic, construction / round-trip / errors,
and derived values.

Precision note for the "merge of per-batch == whole batch" property: the fused torch path
reduces every sample (and, within a sample, every token row) on its own, in fp32, and only
combines the per-sample results in float64 (closed-form Chan reduction / chan_merge). The
fp32 partials of a sample do not depend on which other samples share its batch, so the
two sides differ only by float64 rounding of the merge, and a 1e-9 relative tolerance
holds for fp32 (and fp16/bf16) inputs; fp64 inputs would not help anyway, as the fused
path computes in fp32. Observed differences are ~1e-15 relative (600 random examples
with no absolute floor at all passed); a 1e-8 relative perturbation of chan_merge's M2
fails these tests. The absolute floor added to each tolerance is a few float64 ulps of
the data's magnitude, for fields that could cancel to ~0 (a mean near zero, an M2 of
near-constant data).
"""

import itertools
import math
from fractions import Fraction
from functools import reduce

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avss_fast.ops import block_similarity, layer_moments
from avss_fast.stats import Moments, Similarity, chan_merge, chan_reduce

RTOL = 1e-9
FLOOR = 1e-15  # times |data|**k * (counts + 1): a few float64 ulps, for fields that cancel to ~0
PROPS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----------------------------------------------------------------------------- helpers


def _hidden(seed, B, T, D, *, scale, offset, dtype, masked, nan, zeros):
    """Seeded activations [B, T, D] (and an optional 0/1 padding mask)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64) * scale + offset
    if zeros:  # exact zeros and tiny values for near_zero
        pick = torch.rand(B, T, D, generator=g) < 0.25
        h = torch.where(pick, h * 1e-9, h)
    if nan:
        pick = torch.rand(B, T, D, generator=g) < 0.1
        h = torch.where(pick, torch.full_like(h, float("nan")), h)
        if B * T * D:
            h.view(-1)[0] = float("inf")
    h = h.to(dtype)
    mask = None
    if masked:
        mask = (torch.rand(B, T, generator=g) < 0.7).to(torch.int64)
        if B > 1:
            mask[-1] = 0  # a sample that is all padding
    return h, mask


@st.composite
def activations(draw, T=None, D=None, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 6)) if T is None else T
    D = draw(st.integers(1, 9)) if D is None else D
    return _hidden(
        draw(st.integers(0, 2**31 - 1)),
        B,
        T,
        D,
        scale=draw(st.sampled_from([1e-3, 1.0, 37.0])),
        offset=draw(st.sampled_from([0.0, 1.0, -250.0])),
        dtype=draw(st.sampled_from(dtypes)),
        masked=draw(st.booleans()),
        nan=draw(st.booleans()),
        zeros=draw(st.booleans()),
    )


def _amax(*tensors) -> float:
    vals = [t.double()[torch.isfinite(t.double())].abs().max().item() for t in tensors if torch.isfinite(t.double()).any()]
    return max(vals, default=0.0) + 1.0


def assert_raw_close(got, ref, *, amax=1.0, rtol=RTOL, what=""):
    """Counts (ints) exactly; floats within rtol plus a float64-rounding floor."""
    g, r = got.raw(), ref.raw()
    assert g.keys() == r.keys()
    n = sum(v for v in r.values() if isinstance(v, int)) + 1
    for k, e in r.items():
        a = g[k]
        if isinstance(e, int):
            assert isinstance(a, int) and a == e, f"{what}{k}: got {a}, expected {e} (counts must match exactly)"
            continue
        unit = amax if k in ("mean", "cos_sum", "angular_sum") else amax * amax
        bound = rtol * abs(e) + FLOOR * unit * n
        assert abs(a - e) <= bound, f"{what}{k}: got {a!r}, expected {e!r}, |diff| {abs(a - e):.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------- merge algebra (Moments)


@PROPS
@given(parts=st.lists(activations(), min_size=3, max_size=5), eps=st.sampled_from([1e-5, 1e-3]), rel=st.sampled_from([None, 0.5]))
def test_moments_merge_associative_and_order_independent(parts, eps, rel):
    ms = [layer_moments(h, m, sparsity_eps=eps, sparsity_rel=rel) for h, m in parts]
    amax = _amax(*(h for h, _ in parts))
    a, b, c = ms[:3]
    assert_raw_close((a + b) + c, a + (b + c), amax=amax, what="assoc: ")
    left = reduce(lambda x, y: x + y, ms)
    total = sum(ms)  # 0 + ms[0] goes through __radd__
    assert isinstance(total, Moments)
    assert_raw_close(total, left, amax=amax, what="sum(): ")
    for perm in itertools.islice(itertools.permutations(ms), 24):
        assert_raw_close(sum(perm), left, amax=amax, what="perm: ")
    # inputs are untouched (frozen, functional merge)
    assert_raw_close(ms[0], layer_moments(*parts[0], sparsity_eps=eps, sparsity_rel=rel), amax=amax, rtol=0)


@PROPS
@given(data=st.data())
def test_moments_merge_of_batches_equals_concatenated_batch(data):
    T = data.draw(st.integers(1, 6), label="T")
    D = data.draw(st.integers(1, 9), label="D")
    masked = data.draw(st.booleans(), label="masked")
    rel = data.draw(st.sampled_from([None, 0.5]), label="sparsity_rel")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    parts = data.draw(st.lists(activations(T=T, D=D, dtypes=(dtype,)), min_size=1, max_size=4), label="parts")
    hs = [h for h, _ in parts]
    masks = [m if m is not None else torch.ones(h.shape[:2], dtype=torch.int64) for h, m in parts]
    merged = sum(layer_moments(h, m if masked else None, sparsity_rel=rel) for h, m in zip(hs, masks))
    whole = layer_moments(torch.cat(hs), torch.cat(masks) if masked else None, sparsity_rel=rel)
    assert_raw_close(merged, whole, amax=_amax(*hs), what="merged vs whole: ")


def test_moments_merge_is_exactly_what_a_single_pass_gives_by_hand():
    h = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], [[-2.0, 0.0, 2.0], [10.0, 10.0, 10.0]]])
    whole = layer_moments(h)
    merged = layer_moments(h[:1]) + layer_moments(h[1:])
    vals = h.flatten().double()
    assert merged.raw()["elements"] == whole.raw()["elements"] == 12
    assert merged.mean.item() == pytest.approx(vals.mean().item(), rel=1e-15)
    assert merged.m2.item() == pytest.approx(((vals - vals.mean()) ** 2).sum().item(), rel=1e-14)
    assert merged.raw()["samples"] == 2 and merged.raw()["tokens"] == 4


# ----------------------------------------------------------------------------- merge algebra (Similarity)


@st.composite
def similarity_inputs(draw):
    h_in, mask = draw(activations())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    noise = draw(st.sampled_from([0.0, 0.1, 1.0, 10.0]))
    h_out = (h_in.double() + noise * torch.randn(h_in.shape, generator=g, dtype=torch.float64)).to(h_in.dtype)
    return h_in, h_out, mask


@PROPS
@given(parts=st.lists(similarity_inputs(), min_size=3, max_size=5))
def test_similarity_merge_associative_and_order_independent(parts):
    ss = [block_similarity(a, b, m) for a, b, m in parts]
    x, y, z = ss[:3]
    assert_raw_close((x + y) + z, x + (y + z), what="assoc: ")
    left = reduce(lambda p, q: p + q, ss)
    total = sum(ss)
    assert isinstance(total, Similarity)
    assert_raw_close(total, left, what="sum(): ")
    for perm in itertools.islice(itertools.permutations(ss), 24):
        assert_raw_close(sum(perm), left, what="perm: ")


@PROPS
@given(data=st.data())
def test_similarity_merge_of_batches_equals_concatenated_batch(data):
    T = data.draw(st.integers(1, 6), label="T")
    D = data.draw(st.integers(1, 9), label="D")
    parts = data.draw(st.lists(activations(T=T, D=D, dtypes=(torch.float32,)), min_size=1, max_size=4), label="parts")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    hs = [h for h, _ in parts]
    outs = [h + 0.5 * torch.randn(h.shape, generator=g) for h in hs]
    masks = [m if m is not None else torch.ones(h.shape[:2], dtype=torch.int64) for h, m in parts]
    merged = sum(block_similarity(a, b, m) for a, b, m in zip(hs, outs, masks))
    whole = block_similarity(torch.cat(hs), torch.cat(outs), torch.cat(masks))
    assert_raw_close(merged, whole, what="merged vs whole: ")


# ----------------------------------------------------------------------------- radd / type errors


def test_radd_accepts_zero_only():
    m = Moments.from_raw(dict(samples=1, tokens=2, elements=6, pooled_var_sum=1.0, token_var_sum=2.0, mean=3.0, m2=10.0, near_zero=0, nonfinite=0))
    assert (0 + m) is m
    assert sum([m]) is m
    with pytest.raises(TypeError):
        1 + m
    with pytest.raises(TypeError):
        m + 0
    s = Similarity.from_raw(dict(tokens=2, cos_sum=1.5, angular_sum=0.2, nonfinite=1))
    assert (0 + s) is s
    with pytest.raises(TypeError):
        m + s
    with pytest.raises(TypeError):
        s + m


# ----------------------------------------------------------------------------- counts past 2**31


def _moments(**kw):
    base = dict(samples=0, tokens=0, elements=0, pooled_var_sum=0.0, token_var_sum=0.0, mean=0.0, m2=0.0, near_zero=0, nonfinite=0)
    base.update(kw)
    return Moments(**base)


def test_counts_past_int32_construct_exactly():
    m = _moments(samples=3, tokens=2**31 + 1, elements=2**31 + 7, near_zero=2**31 + 5, nonfinite=2**32 + 9, m2=6.0, mean=0.5)
    for name in Moments._counts:
        assert getattr(m, name).dtype == torch.int64
    r = m.raw()
    assert r["elements"] == 2**31 + 7 and r["tokens"] == 2**31 + 1
    assert r["near_zero"] == 2**31 + 5 and r["nonfinite"] == 2**32 + 9
    assert m.sparsity == (2**31 + 5) / (2**31 + 7)
    assert m.variance == 6.0 / (2**31 + 6)
    # int32 / float32 tensors are widened, not kept narrow
    m32 = _moments(elements=torch.tensor(7, dtype=torch.int32), m2=torch.tensor(1.5, dtype=torch.float32))
    assert m32.elements.dtype == torch.int64 and m32.m2.dtype == torch.float64


def test_counts_past_int32_merge_exactly():
    a = _moments(samples=2**31 - 1, tokens=2**31 - 1, elements=2**31 - 1, near_zero=2**31 - 3, nonfinite=2**31 - 1,
                 mean=1.0, m2=4.0, pooled_var_sum=2.0, token_var_sum=8.0)
    b = _moments(samples=2**31 - 1, tokens=2**31 - 1, elements=2**31 - 1, near_zero=2**31 - 2, nonfinite=1,
                 mean=1.0, m2=6.0, pooled_var_sum=3.0, token_var_sum=1.0)
    m = a + b
    r = m.raw()
    assert r["samples"] == r["tokens"] == r["elements"] == 2**32 - 2
    assert r["near_zero"] == 2**32 - 5 and r["nonfinite"] == 2**31
    assert r["mean"] == 1.0 and r["m2"] == 10.0  # equal means: no between-group term
    assert m.sparsity == (2**32 - 5) / (2**32 - 2)
    assert m.variance == 10.0 / (2**32 - 3)
    assert m.pooled_variance == 5.0 / (2**32 - 2) and m.token_variance == 9.0 / (2**32 - 2)
    # many accumulators: 2**31 - 1 each, five times, stays exact
    many = sum([a] * 5)
    assert many.raw()["elements"] == 5 * (2**31 - 1)
    assert many.raw()["near_zero"] == 5 * (2**31 - 3)
    assert many.raw()["m2"] == 20.0


def test_counts_past_2_pow_53_stay_exact_in_int64():
    # float64 cannot hold these counts, the int64 fields must
    a = _moments(elements=2**53 + 1, near_zero=2**53 + 1)
    b = _moments(elements=2**53 + 3, near_zero=1)
    r = (a + b).raw()
    assert r["elements"] == 2**54 + 4 and r["near_zero"] == 2**53 + 2


def _chan_exact(n_a, mu_a, m2_a, n_b, mu_b, m2_b):
    """Textbook pooled mean / M2 in exact rational arithmetic of the float64 inputs."""
    n_a, n_b = Fraction(n_a), Fraction(n_b)
    mu_a, mu_b, m2_a, m2_b = map(Fraction, (mu_a, mu_b, m2_a, m2_b))
    n = n_a + n_b
    mu = (n_a * mu_a + n_b * mu_b) / n
    m2 = m2_a + m2_b + (mu_b - mu_a) ** 2 * n_a * n_b / n
    return int(n), float(mu), float(m2)


@pytest.mark.parametrize(
    "n_a,mu_a,m2_a,n_b,mu_b,m2_b",
    [
        (2**31 - 1, 0.5, 1.25e9, 2**31 + 7, -1.75, 3.5e9),
        (2**33 + 3, 1e3, 7.0, 5, -1e3, 0.0),
        (1, 0.1, 0.0, 2**40 + 1, 0.3, 2.0**41),
        (3, -2.5, 1.0, 4, 7.25, 2.0),
        (0, 0.0, 0.0, 2**31 + 7, 3.0, 9.0),  # empty side
        (2**31 + 7, 3.0, 9.0, 0, 0.0, 0.0),
    ],
)
def test_chan_merge_matches_exact_textbook_result(n_a, mu_a, m2_a, n_b, mu_b, m2_b):
    n, mu, m2 = _chan_exact(n_a, mu_a, m2_a, n_b, mu_b, m2_b)
    a = _moments(elements=n_a, mean=mu_a, m2=m2_a)
    b = _moments(elements=n_b, mean=mu_b, m2=m2_b)
    for got in (a + b, b + a):
        r = got.raw()
        assert r["elements"] == n
        assert r["mean"] == pytest.approx(mu, rel=1e-14, abs=1e-300)
        assert r["m2"] == pytest.approx(m2, rel=1e-14, abs=1e-300)
        assert got.variance == pytest.approx(m2 / (n - 1), rel=1e-14)
    # the closed-form vector reduction agrees with the pairwise rule
    t, tm, tm2 = chan_reduce(torch.tensor([n_a, n_b]), torch.tensor([mu_a, mu_b], dtype=torch.float64),
                             torch.tensor([m2_a, m2_b], dtype=torch.float64))
    assert int(t) == n
    assert float(tm) == pytest.approx(mu, rel=1e-14, abs=1e-300)
    assert float(tm2) == pytest.approx(m2, rel=1e-14, abs=1e-300)


def test_chan_merge_both_empty_is_zero_not_nan():
    z = torch.zeros((), dtype=torch.int64)
    n, mu, m2 = chan_merge(z, torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                           z, torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert int(n) == 0 and float(mu) == 0.0 and float(m2) == 0.0
    t, tm, tm2 = chan_reduce(torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.zeros(3))
    assert int(t) == 0 and float(tm) == 0.0 and float(tm2) == 0.0


# ----------------------------------------------------------------------------- construction, round-trip, errors


def test_from_raw_roundtrip_to_and_zeros():
    h, mask = _hidden(7, 3, 5, 6, scale=2.0, offset=0.5, dtype=torch.float32, masked=True, nan=True, zeros=True)
    m = layer_moments(h, mask)
    r = m.raw()
    assert list(r) == ["samples", "tokens", "elements", "pooled_var_sum", "token_var_sum", "mean", "m2", "near_zero", "nonfinite"]
    assert all(isinstance(r[k], int) for k in Moments._counts)
    assert all(isinstance(r[k], float) for k in Moments._sums)
    back = Moments.from_raw(r)
    assert back.raw() == r
    assert Moments.from_raw({**r, "tokens": float(r["tokens"])}).raw() == r  # 7.0 from a float-only JSON reader
    assert Moments.from_raw({**r, "tokens": np.float32(r["tokens"])}).raw() == r
    for bad in (1.7, -1, -1.0, True, "3"):
        with pytest.raises(ValueError, match="count 'samples'"):
            Moments.from_raw({**r, "samples": bad})
    assert Moments.from_raw(r, device="cpu").device == torch.device("cpu")
    moved = m.to("cpu")
    assert moved.device == torch.device("cpu") and moved.raw() == r and moved is not m

    s = block_similarity(h, h * 2.0 + 1.0, mask)
    assert Similarity.from_raw(s.raw()).raw() == s.raw()
    assert s.to("cpu").raw() == s.raw()

    for cls in (Moments, Similarity):
        z = cls.zeros()
        rz = z.raw()
        assert all(v == 0 for v in rz.values())
        assert all(getattr(z, k).dtype == torch.int64 for k in cls._counts)
        assert all(getattr(z, k).dtype == torch.float64 for k in cls._sums)
        assert all(getattr(z, k).dim() == 0 for k in cls._names())
    # zeros() is the identity of the merge
    assert (Moments.zeros() + m).raw() == r
    assert (m + Moments.zeros()).raw() == r
    assert (Similarity.zeros() + s).raw() == s.raw()
    # extra keys in a raw dict are ignored
    assert Moments.from_raw({**r, "extra": 1}).raw() == r


def test_frozen():
    m = Moments.zeros()
    with pytest.raises(Exception):
        m.elements = torch.tensor(1)


def test_non_scalar_field_is_an_error():
    with pytest.raises(ValueError, match=r"Moments\.m2 must be a scalar, got shape \(2,\)"):
        _moments(m2=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"Moments\.elements must be a scalar"):
        _moments(elements=[1, 2])
    with pytest.raises(ValueError, match=r"Similarity\.tokens must be a scalar, got shape \(1,\)"):
        Similarity(tokens=torch.tensor([1]), cos_sum=0.0, angular_sum=0.0, nonfinite=0)


def test_from_raw_missing_field_is_an_error():
    r = Moments.zeros().raw()
    del r["m2"]
    with pytest.raises(ValueError, match=r"Moments\.from_raw: missing fields \['m2'\]"):
        Moments.from_raw(r)
    with pytest.raises(ValueError, match=r"missing fields \['tokens', 'angular_sum'\]"):
        Similarity.from_raw({"cos_sum": 1.0, "nonfinite": 0})


# ----------------------------------------------------------------------------- derived values


def test_moments_derived_values_nan_on_empty():
    z = Moments.zeros()
    for name in ("pooled_variance", "token_variance", "variance", "sparsity"):
        assert math.isnan(getattr(z, name)), name
    one = _moments(elements=1, mean=2.0, m2=0.0, near_zero=1)
    assert math.isnan(one.variance) and one.sparsity == 1.0
    # an empty batch (everything padding) merges as the identity
    h = torch.randn(2, 3, 4)
    empty = layer_moments(h, torch.zeros(2, 3, dtype=torch.int64))
    assert all(v == 0 for v in empty.raw().values())
    assert math.isnan(empty.pooled_variance)


def test_moments_derived_values_by_hand():
    m = _moments(samples=4, tokens=10, elements=50, pooled_var_sum=6.0, token_var_sum=25.0, mean=1.5, m2=98.0, near_zero=5)
    assert m.pooled_variance == 1.5
    assert m.token_variance == 2.5
    assert m.variance == 2.0
    assert m.sparsity == 0.1
    h = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]])
    lm = layer_moments(h)
    assert lm.pooled_variance == pytest.approx(1.0) and lm.token_variance == pytest.approx(1.0)
    assert lm.variance == pytest.approx(2.0) and lm.sparsity == 0.0


def test_similarity_derived_values():
    z = Similarity.zeros()
    assert math.isnan(z.mean_cos) and math.isnan(z.block_influence) and math.isnan(z.angular_distance)
    s = Similarity.from_raw(dict(tokens=4, cos_sum=3.0, angular_sum=0.5, nonfinite=2))
    assert s.mean_cos == 0.75 and s.block_influence == 0.25 and s.angular_distance == 0.125
    # identical vectors: influence 0, distance 0; opposite: influence 2, distance 1;
    # orthogonal: influence 1, distance 1/2
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    assert block_similarity(a, a).block_influence == pytest.approx(0.0, abs=1e-7)
    assert block_similarity(a, a).angular_distance == pytest.approx(0.0, abs=2e-4)  # arccos near 1 is steep
    assert block_similarity(a, -a).block_influence == pytest.approx(2.0)
    assert block_similarity(a, -a).angular_distance == pytest.approx(1.0)
    orth = torch.stack([-a[..., 1], a[..., 0]], dim=-1)
    assert block_similarity(a, orth).block_influence == pytest.approx(1.0)
    assert block_similarity(a, orth).angular_distance == pytest.approx(0.5)
    # 45 degrees
    b = torch.tensor([[[1.0, 0.0]]])
    c = torch.tensor([[[1.0, 1.0]]])
    s45 = block_similarity(b, c)
    assert s45.block_influence == pytest.approx(1 - math.sqrt(0.5), rel=1e-6)
    assert s45.angular_distance == pytest.approx(0.25, rel=1e-6)

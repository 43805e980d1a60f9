"""HeadScorer against statistics of a materialised softmax (an eager attention function
that records every row), over padding, decode steps and several segments; the adaptive
rule's checked/fired report."""

import eager_rule
import pytest
import torch
from tiny_models import make_tiny
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from avss_fast import reference
from avss_fast.demo import demo_model_path, demo_texts
from avss_fast.head_stats import HeadReport, HeadScorer
from avss_fast.heads import AdaptiveRule, HeadIntervention, intervene

RECORD = {"rows": {}, "starts": None}


def _recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Eager attention that materialises the softmax (reference.masked_attention_outputs)
    and records (stats, mass) of every valid query row, per layer."""
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    starts = RECORD["starts"]
    st = None if starts is None else torch.as_tensor(starts)
    if st is not None and st.dim() == 1:
        st = st[None].expand(B, -1)
    causal = attention_mask is None and Sq > 1
    res = reference.masked_attention_outputs(query, key, value, scaling=scaling, causal=causal,
                                             attention_mask=attention_mask, segment_starts=st,
                                             compute_dtype=torch.float64)
    if attention_mask is None:
        valid = torch.ones(B, Sq, dtype=torch.bool)
    else:
        rows = torch.arange(Sq)
        valid = attention_mask[:, 0, rows, rows + Sk - Sq]
    vals = torch.cat([res["mass"].double(), res["stats"].double()], -1)  # [B, Hq, Sq, S + 3]
    RECORD["rows"].setdefault(module.layer_idx, []).append(vals.permute(0, 2, 1, 3)[valid])  # [N, Hq, K]
    return res["out"], None


def _register():
    AttentionInterface.register("avss_test_record", _recording_attention)
    AttentionMaskInterface.register("avss_test_record", sdpa_mask)


def _expected(model, run, starts):
    """Per layer: (count, mean [Hq, K], var [Hq, K]) from the recording attention."""
    _register()
    RECORD.update(rows={}, starts=starts)
    before = model.config._attn_implementation
    model.set_attn_implementation("avss_test_record")
    try:
        with torch.no_grad():
            run()
    finally:
        model.set_attn_implementation(before)
    out = {}
    for layer, chunks in RECORD["rows"].items():
        v = torch.cat(chunks)
        out[layer] = (v.shape[0], v.mean(0), v.var(0, unbiased=True))
    return out


def _check(report: HeadReport, expected, S):
    names = (["segment_mass"] if S else []) + ["entropy", "max_logit", "sink_mass"]
    for li, layer in enumerate(report.layers):
        n, mean, var = expected[layer]
        assert all(r == n for r in report.rows[li]), f"layer {layer}: rows {report.rows[li]} != {n}"
        for name in names:
            got_m = torch.tensor(report.stats[name]["mean"][li], dtype=torch.float64)
            got_v = torch.tensor(report.stats[name]["var"][li], dtype=torch.float64)
            off = max(S, 1)  # the recording always has at least the one-segment mass column
            i = ["entropy", "max_logit", "sink_mass"].index(name) if name != "segment_mass" else None
            cols = slice(0, S) if i is None else slice(off + i, off + i + 1)
            exp_m, exp_v = mean[:, cols], var[:, cols]
            if name != "segment_mass":
                exp_m, exp_v = exp_m[:, 0], exp_v[:, 0]
            assert (got_m - exp_m).abs().max() < 2e-5, f"layer {layer} {name} mean"
            assert (got_v - exp_v).abs().max() < 2e-5, f"layer {layer} {name} var"


@pytest.mark.parametrize("family,pad_all", [("llama", False), ("qwen2", False), ("llama", True)])
def test_forward_with_padding_and_segments(family, pad_all, stats_backend):
    """pad_all: every sample ends in padding (a batch padded to a fixed length), so no
    sample's last row is real."""
    model = make_tiny(family, num_layers=2, heads=4, kv_heads=2, vocab=100)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 11), generator=g)
    am = torch.ones_like(ids)
    am[0, :4] = 0  # left padding
    am[2, 8:] = 0  # right padding
    if pad_all:
        am[:, 9:] = 0
    starts = [0, 3, 7]
    with torch.no_grad(), HeadScorer(model, segment_starts=starts) as scorer:
        model(input_ids=ids, attention_mask=am)
    report = scorer.report()
    expected = _expected(model, lambda: model(input_ids=ids, attention_mask=am), starts)
    _check(report, expected, 3)
    assert report.rows[0][0] == int(am.sum())  # padding rows excluded


def test_generate_steps_are_streamed():
    """Prefill rows plus one row per generated token, with left padding and the KV cache."""
    model = make_tiny("llama", num_layers=2, vocab=100)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), HeadScorer(model, segment_starts=[0, 4]) as scorer:
        model.generate(**kw)
    report = scorer.report()
    expected = _expected(model, lambda: model.generate(**kw), [0, 4])
    _check(report, expected, 2)
    assert report.rows[0][0] == int(am.sum()) + 2 * 3  # 3 decode calls (the 4th token needs none)


def test_demo_model_without_segments():
    path = demo_model_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    enc = tok([t[:60] for t in demo_texts("heldout")[:3]], return_tensors="pt", padding=True)
    with torch.no_grad(), HeadScorer(model) as scorer:
        model(**enc)
    report = scorer.report()
    assert "segment_mass" not in report.stats
    expected = _expected(model, lambda: model(**enc), None)
    _check(report, expected, 0)
    top = report.ranking("sink_mass")[0]
    assert report.mean("sink_mass")[top] == report.mean("sink_mass").max()


def test_report_round_trip_and_plots(tmp_path):
    model = make_tiny("llama", num_layers=2, vocab=100)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), HeadScorer(model, segment_starts=[0, 5], stats=("segment_mass", "entropy")) as scorer:
        model(input_ids=ids)
        model(input_ids=ids[:, :5])
    rep = scorer.report()
    assert set(rep.stats) == {"segment_mass", "entropy"} and rep.rows[0][0] == 2 * 9 + 2 * 5
    back = HeadReport.from_json(rep.to_json(tmp_path / "r.json"))
    assert back.stats == rep.stats and back.layers == rep.layers
    paths = rep.plot(tmp_path / "plots")
    assert len(paths) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert "rank" in rep.table("entropy")


def test_scorer_errors_and_restore():
    model = make_tiny("llama", num_layers=2)
    with pytest.raises(ValueError, match="subset"):
        HeadScorer(model, stats=("attention",))
    with pytest.raises(ValueError, match="segment_mass needs segment_starts"):
        HeadScorer(model, stats=("segment_mass",))
    scorer = HeadScorer(model)
    with scorer:
        pass
    with pytest.raises(ValueError, match="saw no attention call"):
        scorer.report()
    assert model.config._attn_implementation == "sdpa"


def test_intervene_reports_checked_and_fired_rows():
    """The rule's counts equal the eager implementation's; a rule that cannot fire shows 0."""
    model = make_tiny("llama", num_layers=3, heads=4, kv_heads=2, vocab=100)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(4))
    iv = HeadIntervention(adaptive=AdaptiveRule(heads=[(1, 0), (2, 3)], segment=1, threshold=0.4),
                          segment_starts=[0, 3])
    kw = dict(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with intervene(model, iv) as run:
            model.generate(**kw)
        eager_rule.register()
        eager_rule.STATE.update(iv=iv, fired=0, checked=0)
        model.set_attn_implementation(eager_rule.NAME)
        try:
            model.generate(**kw)
        finally:
            model.set_attn_implementation("sdpa")
    rep = run.rule_report()
    assert set(rep) == {(1, 0), (2, 3)}
    assert all(r["checked"] == 2 * 5 for r in rep.values())  # last row of 5 calls, 2 samples
    assert sum(r["checked"] for r in rep.values()) == eager_rule.STATE["checked"]
    assert sum(r["fired"] for r in rep.values()) == eager_rule.STATE["fired"] > 0
    never = HeadIntervention(adaptive=AdaptiveRule(heads=[(0, 1)], segment=1, threshold=1.0), segment_starts=[0, 3])
    with torch.no_grad(), intervene(model, never) as run2:
        model(input_ids=ids)
    assert run2.rule_report() == {(0, 1): {"checked": 2, "fired": 0}}


def _causal_padded_mask(am: torch.Tensor, Sq: int, Sk: int, offset: int) -> torch.Tensor:
    """[B, 1, Sq, Sk] bool as transformers builds it: query row i (position offset + i) sees
    the real keys at positions <= offset + i; keys past the written cache are empty slots."""
    B = am.shape[0]
    pos = torch.arange(Sk)
    written = torch.zeros(B, Sk, dtype=torch.bool)
    written[:, : am.shape[1]] = am.bool()
    causal = pos[None, :] <= (offset + torch.arange(Sq))[:, None]  # [Sq, Sk]
    return (causal[None] & written[:, None, :])[:, None]


@pytest.mark.parametrize("case", ["no_cache", "dynamic_chunk", "static_prefill", "static_chunk", "all_right_padded"])
def test_valid_query_rows_finds_the_diagonal(case):
    """The real query rows of a call, from the mask alone, with and without a cache, when
    the last row is padding in every sample (right padding of the whole batch), and with
    empty static-cache slots past the written keys."""
    from avss_fast.heads import valid_query_rows

    am = torch.ones(3, 12, dtype=torch.long)
    am[0, :3] = 0  # left padding
    am[1, 9:] = 0  # right padding
    if case == "all_right_padded":
        am[:, 10:] = 0
    Sq, offset, Sk = {
        "no_cache": (12, 0, 12), "all_right_padded": (12, 0, 12), "dynamic_chunk": (5, 7, 12),
        "static_prefill": (12, 0, 20), "static_chunk": (5, 7, 20),
    }[case]
    mask = _causal_padded_mask(am, Sq, Sk, offset)
    got = valid_query_rows(mask, 3, Sq, Sk)
    assert torch.equal(got, am[:, offset: offset + Sq].bool())
    if case == "static_chunk":  # and a chunk whose every last row is padding
        am2 = am.clone()
        am2[:, 10:] = 0
        got = valid_query_rows(_causal_padded_mask(am2, Sq, Sk, offset), 3, Sq, Sk)
        assert torch.equal(got, am2[:, offset: offset + Sq].bool())


def test_valid_query_rows_does_not_index_past_a_cross_attention_mask():
    """Under cross-attention (decoder rows, encoder keys: no diagonal) the rows cannot be
    read off the mask; the offset is clamped so that it never indexes past the keys."""
    from avss_fast.heads import valid_query_rows

    enc = torch.ones(2, 10, dtype=torch.bool)
    enc[1, 7:] = False
    mask = enc[:, None, None, :].expand(2, 1, 4, 10)
    assert valid_query_rows(mask, 2, 4, 10).shape == (2, 4)


def test_valid_query_rows_bidirectional_mask():
    """An encoder's mask (padding rows still see every real key) with every sample padded
    at the end: the rows are the real tokens, not shifted."""
    from avss_fast.heads import valid_query_rows

    am = torch.ones(2, 6, dtype=torch.bool)
    am[0, 4:] = False
    am[1, 5:] = False
    mask = am[:, None, None, :].expand(2, 1, 6, 6)
    assert torch.equal(valid_query_rows(mask, 2, 6, 6), am)


def test_static_cache_rows_and_intervention_segments():
    """With a static cache (keys = the whole cache) the valid rows are still found; segment
    starts given through the intervention feed segment_mass."""
    model = make_tiny("llama", num_layers=2, vocab=100)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(5))
    am = torch.ones_like(ids)
    am[0, :3] = 0
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
    counts = {}
    for cache in ("dynamic", "static"):
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        iv = HeadIntervention(gates={(0, 0): 0.5}, segment_starts=[0, 4])
        with torch.no_grad(), HeadScorer(model, intervention=iv) as scorer:
            model.generate(**kw, **extra)
        rep = scorer.report()
        assert "segment_mass" in rep.stats
        counts[cache] = rep.rows[0][0]
    assert counts["dynamic"] == counts["static"] == int(am.sum()) + 2 * 3


def test_rule_report_counts_only_real_rows_for_rows_all():
    model = make_tiny("llama", num_layers=2, vocab=100)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(6))
    am = torch.ones_like(ids)
    am[0, 5:] = 0  # right padding
    am[1, :2] = 0  # left padding
    iv = HeadIntervention(adaptive=AdaptiveRule(heads=[(1, 1)], segment=0, threshold=0.0, rows="all"),
                          segment_starts=[0, 4])
    with torch.no_grad(), intervene(model, iv) as run:
        model(input_ids=ids, attention_mask=am)
    rep = run.rule_report()[(1, 1)]
    assert rep["checked"] == int(am.sum()) == rep["fired"]  # threshold 0: every real row fires


def test_report_ranking_puts_heads_without_a_mean_last():
    rep = HeadReport(layers=[0], rows=[[3, 3, 0]], num_segments=0,
                     stats={"entropy": {"mean": [[0.5, 2.0, float("nan")]], "var": [[0.1, 0.1, float("nan")]]}})
    assert rep.ranking("entropy") == [(0, 1), (0, 0), (0, 2)]
    assert rep.ranking("entropy", descending=False) == [(0, 0), (0, 1), (0, 2)]

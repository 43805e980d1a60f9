"""CPU: fused torch path (``AVSS_FAST_BACKEND=torch``) vs the eager float64 reference.

Shape [8, 512, 4096] (64 MiB in fp32, 32 MiB in bf16). Each group holds the fused op and
the reference on the same tensor; the session summary prints reference / fused.
GB/s = bytes of the activation(s) read once / mean time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import record

from avss_fast import block_similarity, layer_moments, reference

SHAPE = (8, 512, 4096)
FUSED_ROUNDS = 12
REF_ROUNDS = 3  # the reference takes ~1 s a call on 2 cores: keep the suite short

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _activation(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g) + 0.3).to(dtype)


def _padding_mask() -> torch.Tensor:
    # right padding, lengths from 1/4 to all of T (a typical padded batch)
    B, T = SHAPE[:2]
    lengths = torch.linspace(T // 4, T, B).long()
    return (torch.arange(T)[None, :] < lengths[:, None]).long()


@pytest.fixture(scope="module")
def acts():
    cache: dict = {}

    def get(name: str, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)
        if key not in cache:
            if name == "h":
                cache[key] = _activation(0, dtype)
            else:  # a block output: the input plus an update
                h = _activation(0, torch.float32)
                cache[key] = (h + 0.5 * _activation(1, torch.float32)).to(dtype)
        return cache[key]

    return get


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------- layer_moments


def _lm_case(benchmark, use_backend, acts, dtype_name, masked, impl):
    dtype = DTYPES[dtype_name]
    h = acts("h", dtype)
    mask = _padding_mask() if masked else None
    group = f"layer_moments-{dtype_name}" + ("-mask" if masked else "")
    benchmark.group = group
    if impl == "fused":
        use_backend("torch")
        fn, rounds = (lambda: layer_moments(h, mask)), FUSED_ROUNDS
    else:
        use_backend("reference")  # not consulted by the direct call; set for the record
        fn, rounds = (lambda: reference.layer_moments(h, mask)), REF_ROUNDS
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, group, impl, nbytes=_nbytes(h))
    benchmark.extra_info["shape"] = list(SHAPE)
    benchmark.extra_info["dtype"] = dtype_name
    benchmark.extra_info["mask"] = masked
    return result


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_layer_moments(benchmark, use_backend, acts, dtype_name, masked, impl):
    _lm_case(benchmark, use_backend, acts, dtype_name, masked, impl)


# ----------------------------------------------------------------------------- block_similarity


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_block_similarity(benchmark, use_backend, acts, dtype_name, impl):
    dtype = DTYPES[dtype_name]
    a, b = acts("h", dtype), acts("h_out", dtype)
    group = f"block_similarity-{dtype_name}"
    benchmark.group = group
    if impl == "fused":
        use_backend("torch")
        fn, rounds = (lambda: block_similarity(a, b)), FUSED_ROUNDS
    else:
        use_backend("reference")
        fn, rounds = (lambda: reference.block_similarity(a, b)), REF_ROUNDS
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, group, impl, nbytes=_nbytes(a, b))
    benchmark.extra_info["shape"] = list(SHAPE)
    benchmark.extra_info["dtype"] = dtype_name


# ----------------------------------------------------------------------------- sanity


def test_fused_agrees_with_reference(benchmark, use_backend, acts):
    """Not a timing: the benchmarked fused result equals the reference (counts exactly)."""
    use_backend("torch")
    h = acts("h", torch.bfloat16)
    mask = _padding_mask()
    got = benchmark.pedantic(lambda: layer_moments(h, mask), rounds=1, iterations=1).raw()
    ref = reference.layer_moments(h, mask).raw()
    for k, v in ref.items():
        if isinstance(v, int):
            assert got[k] == v, k
        else:
            assert abs(got[k] - v) <= 1e-6 + 2e-5 * abs(v), (k, got[k], v)
    benchmark.group = "sanity"

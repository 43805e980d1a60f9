"""Peak extra memory of one attention call, measured in this (fresh) process.

    python bench/peak_memory.py {sdpa|adaptive|eager} SEQ_LEN

Prints one number: MiB by which the resident set's high-water mark rose during the call
(the peak is reset through /proc/self/clear_refs just before it, once the inputs exist and
a small warm-up call has loaded every code path). CPU torch allocations bypass Python's
tracemalloc, so the resident set is the honest measure. Linux only.

The shapes are those of the attention benchmark: B=1, H=8 query and key/value heads,
head dim 64, causal prefill (Sq = Sk), fp32. ``adaptive`` is ``masked_attention`` with the
ADHH rule (all heads, rows "last", segment 1 from Sk/4); ``sdpa`` is what transformers'
SDPA integration runs (SDPA with is_causal, then the [B, S, H, D] layout); ``eager`` is the
materialised reference with the same rule.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("AVSS_FAST_BACKEND", "torch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from avss_fast import reference  # noqa: E402
from avss_fast.ops import AttentionRule, masked_attention  # noqa: E402

B, H, D = 1, 8, 64


def inputs(S: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g) for _ in range(3))


def rule_args(S: int) -> dict:
    return dict(segment_starts=[0, S // 4], adaptive=AttentionRule(tuple(range(H)), 1, 0.4, 0.0, "last"))


def run(method: str, q, k, v):
    S = q.shape[2]
    scaling = D**-0.5
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(1, 2).contiguous()
    if method == "adaptive":
        return masked_attention(q, k, v, scaling=scaling, causal=True, **rule_args(S))
    if method == "eager":
        kw = rule_args(S)
        return reference.masked_attention(q, k, v, scaling=scaling, causal=True, adaptive=kw["adaptive"],
                                          segment_starts=torch.tensor([kw["segment_starts"]]))
    raise SystemExit(f"unknown method {method!r}")


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_extra_mib(method: str, S: int) -> float:
    run(method, *inputs(64))  # warm-up: load every code path at a small size
    q, k, v = inputs(S)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark to the current resident set
    before = _status("VmRSS")
    out = run(method, q, k, v)
    peak = _status("VmHWM")
    del out
    return (peak - before) / 2**20


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("AVSS_BENCH_THREADS", torch.get_num_threads())))
    print(f"{peak_extra_mib(sys.argv[1], int(sys.argv[2])):.2f}")

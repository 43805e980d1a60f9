#!/usr/bin/env python3
"""GPU benchmark of masked_attention (Triton) against SDPA (flash) and the eager
materialised reference. Run on a CUDA machine from the repo root:

    python bench/gpu_bench_attention.py [--out results.json]

Prints time, TFLOP/s (4 * B * Hq * Sq * Sk * D / 2 for causal) and peak memory per case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import setup  # noqa: E402


def main() -> int:
    args = setup(__doc__.splitlines()[0])
    import torch
    import triton

    from avss_fast import reference
    from avss_fast.ops import AttentionRule, masked_attention, masked_attention_prepared, prepare_attention_args

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    results = {"device": name, "cases": []}
    B, Hq, Hkv, D = 4, 32, 8, 128
    for Sk in (512, 2048, 8192):
        Sq = Sk
        dt = torch.bfloat16
        q = torch.randn(B, Hq, Sq, D, device=dev, dtype=dt)
        k = torch.randn(B, Hkv, Sk, D, device=dev, dtype=dt)
        v = torch.randn(B, Hkv, Sk, D, device=dev, dtype=dt)
        starts = torch.tensor([0, Sk // 8, Sk // 2], device=dev)
        rule = AttentionRule(tuple(range(0, Hq, 2)), 2, 0.4, 0.0, "last")
        flops = 4 * B * Hq * Sq * Sk * D / 2
        prepared = prepare_attention_args(B, Hq, dev, segment_starts=starts, adaptive=rule)  # once, as intervene does
        cases = {
            "sdpa_flash": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=D**-0.5, enable_gqa=True),
            "masked_plain": lambda: masked_attention(q, k, v, scaling=D**-0.5),
            "masked_adaptive": lambda: masked_attention(q, k, v, scaling=D**-0.5, segment_starts=starts, adaptive=rule),
            "masked_adaptive_prepared": lambda: masked_attention_prepared(q, k, v, prepared, scaling=D**-0.5).out,
            "masked_head_stats": lambda: masked_attention(q, k, v, scaling=D**-0.5, return_head_stats=True),
            "masked_reweight_mass": lambda: masked_attention(
                q, k, v, scaling=D**-0.5, segment_starts=starts, segment_scale=torch.ones(Hq, 3, device=dev) * 0.5,
                return_segment_mass=True),
        }
        if Sk <= 2048:
            cases["eager_materialised"] = lambda: reference.masked_attention(
                q, k, v, scaling=D**-0.5, segment_starts=starts[None].expand(B, -1), adaptive=rule,
                compute_dtype=torch.bfloat16)
        row = {"B": B, "Hq": Hq, "Hkv": Hkv, "S": Sk, "D": D}
        for cname, fn in cases.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = triton.testing.do_bench(fn, warmup=10, rep=50)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            row[cname] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "peak_extra_mib": round(peak, 1)}
        row["adaptive_vs_flash"] = round(row["sdpa_flash"]["ms"] / row["masked_adaptive"]["ms"], 3)
        row["adaptive_prepared_vs_flash"] = round(row["sdpa_flash"]["ms"] / row["masked_adaptive_prepared"]["ms"], 3)
        row["plain_vs_flash"] = round(row["sdpa_flash"]["ms"] / row["masked_plain"]["ms"], 3)
        row["head_stats_vs_plain"] = round(row["masked_head_stats"]["ms"] / row["masked_plain"]["ms"], 3)
        print(json.dumps(row))
        results["cases"].append(row)
        del q, k, v
    # correctness spot check against the reference at a small size
    q = torch.randn(1, 8, 256, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 256, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 256, 128, device=dev, dtype=torch.bfloat16)
    st = torch.tensor([[0, 64, 128]], device=dev)
    rule = AttentionRule((1, 2), 2, 0.3, 0.0, "all")
    out = masked_attention(q, k, v, scaling=128**-0.5, segment_starts=st, adaptive=rule)
    ref = reference.masked_attention(q, k, v, scaling=128**-0.5, segment_starts=st, adaptive=rule, compute_dtype=torch.float64)
    results["max_abs_err_vs_fp64"] = (out.double() - ref).abs().max().item()
    print(json.dumps({"device": name, "max_abs_err_vs_fp64": results["max_abs_err_vs_fp64"]}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

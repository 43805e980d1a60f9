#!/usr/bin/env python3
"""Tile sweep of the layer_moments kernels on a CUDA device, to pick the GPU tiling:
the one-read kernel (with the exact-pass launch, which only reads its marks on finite
data) over (BLOCK_T, BLOCK_D, num_warps, splits), then the whole
device op (kernel + the float64 merge kernels) for the best few and for the default
layout, next to a read-only torch reduction of the same tensor. From the repo root:

    AVSS_SWEEP_CASES="plain mask rel" python bench/gpu_sweep_stats.py [--out sweep.json]

Cases (default "plain"): no mask; "mask", right padding of samples of T/2..T tokens;
"rel", the relative threshold (tiles with BLOCK_D >= D read once, narrower ones take the
pre-pass). ``AVSS_SWEEP_BUDGET_S`` bounds the whole sweep (split evenly over dtypes and
cases; layouts past a run's share are skipped and counted).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import padding_masks, setup  # noqa: E402

BUDGET_S = float(os.environ.get("AVSS_SWEEP_BUDGET_S", "140"))  # whole sweep; later configs are skipped (and said so)


def main() -> int:
    args = setup(__doc__.splitlines()[0])
    import torch
    import triton
    from avss_fast import ops, reference
    from avss_fast.kernels.layer_moments import _gpu_layout, layer_moments_packed, layer_moments_partials

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    B, T, D = 16, 4096, 4096
    t_start = time.time()
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # as it goes: a sweep stopped by its time limit keeps what it measured
            Path(args.out).write_text(json.dumps(rows, indent=2))

    cases = os.environ.get("AVSS_SWEEP_CASES", "plain").split()
    for dt in (torch.bfloat16, torch.float32):  # one activation a dtype, every case on it
        h = torch.randn(B, T, D, device=dev, dtype=dt)
        nbytes = h.numel() * h.element_size()
        gbps = lambda ms: round(nbytes / ms / 1e6, 1)  # noqa: E731
        read_ms = triton.testing.do_bench(lambda: h.sum(dtype=torch.float32), warmup=3, rep=20)
        for case in cases:
            # "mask": right padding of samples of T/2..T tokens (GB/s still counts every row);
            # "rel": the relative threshold (whole-row tiles, BLOCK_D >= D, read once)
            mask = padding_masks(torch, B, T, dev)["ragged"] if case == "mask" else None
            rel = 0.01 if case == "rel" else None
            emit({"dtype": str(dt), "case": case, "torch_sum_read_ms": round(read_ms, 4),
                  "torch_sum_GBps": gbps(read_ms)})
            results, seen = [], set()
            skipped = 0
            per_run = BUDGET_S / (2 * len(cases))
            t_dtype = time.time()
            for nw, bd, bt, waves in itertools.product((4, 8), (512, 1024, 2048, 4096), (1, 2, 4, 8), (1, 2, 4)):
                if bt * bd > 16384 or bt * bd < 32 * nw * 8:
                    continue
                if time.time() - t_dtype > per_run:
                    skipped += 1
                    continue
                splits = max(1, min(triton.cdiv(T, bt), (waves * 4 * sms) // (B * triton.cdiv(D, bd))))
                tiles = (bt, bd, nw, splits)
                if tiles in seen:  # waves that give the same splits
                    continue
                seen.add(tiles)
                try:
                    ms = triton.testing.do_bench(lambda: layer_moments_partials(h, mask, 1e-5, rel, tiles=tiles),
                                                 warmup=3, rep=15)
                except Exception as e:  # noqa: BLE001 - out of resources for a tile: skip it
                    emit({"dtype": str(dt), "case": case, "tiles": list(tiles),
                          "error": f"{type(e).__name__}: {str(e)[:120]}"})
                    continue
                results.append((ms, tiles))
                emit({"dtype": str(dt), "case": case, "tiles": list(tiles), "kernel_ms": round(ms, 4),
                      "kernel_GBps": gbps(ms)})
            if skipped:
                emit({"dtype": str(dt), "case": case, "skipped_configs_over_time_budget": skipped})
            results.sort()
            default = _gpu_layout(B, T, D, dev, h.element_size(), rel is not None)
            for ms_k, tiles in results[:3] + [(None, default)]:
                ms = triton.testing.do_bench(lambda: layer_moments_packed(h, mask, 1e-5, rel, tiles=tiles),
                                             warmup=3, rep=20)
                emit({"dtype": str(dt), "case": case, "tiles": list(tiles), "default": tiles == default,
                      "whole_device_op_ms": round(ms, 4), "whole_device_op_GBps": gbps(ms)})
            ms = triton.testing.do_bench(lambda: ops.layer_moments(h, mask, sparsity_rel=rel), warmup=3, rep=20)
            emit({"dtype": str(dt), "case": case, "ops.layer_moments_ms(default tiles, with Python)": round(ms, 4),
                  "GBps": gbps(ms), "torch_sum_GBps": gbps(read_ms)})
            if results:  # correctness of the best tiles on a slice against the float64 reference
                hs = h[:2, :512]
                ms_ = None if mask is None else mask[:2, :512]
                ints, flts = layer_moments_packed(hs, ms_, 1e-5, rel, tiles=results[0][1])
                got = type(reference.layer_moments(hs[:1, :1]))._unpack(ints, flts).to("cpu").raw()
                ref = reference.layer_moments(hs, ms_, sparsity_rel=rel).raw()
                diff = {k: abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-30) for k in ref}
                emit({"dtype": str(dt), "case": case, "best_tiles": list(results[0][1]),
                      "max_rel_diff_vs_reference": max(diff.values())})
        del h
    emit({"sweep_seconds": round(time.time() - t_start, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

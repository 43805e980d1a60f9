#!/usr/bin/env python3
"""Tile sweep of the layer_moments kernel on a CUDA device (kernel alone, then the whole
op with the float64 merge of partials), to pick the GPU tiling. From the repo root:

    python bench/gpu_sweep_stats.py [--out sweep.json]
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import setup  # noqa: E402


def main() -> int:
    args = setup(__doc__.splitlines()[0])
    import torch
    import triton
    from avss_fast import ops
    from avss_fast.kernels.layer_moments import layer_moments_partials

    dev = torch.device("cuda")
    B, T, D = 16, 4096, 4096
    rows = []
    for dt in (torch.bfloat16, torch.float32):
        h = torch.randn(B, T, D, device=dev, dtype=dt)
        nbytes = h.numel() * h.element_size()
        best = None
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        for bt, bd, nw, waves in itertools.product((4, 8, 16), (128, 256, 512), (2, 4, 8), (2, 8)):
            if bt * bd > 8192:
                continue
            splits = max(1, (waves * sms) // (B * triton.cdiv(D, bd)))
            tiles = (bt, bd, nw, splits)
            try:
                ms = triton.testing.do_bench(lambda: layer_moments_partials(h, None, 1e-5, None, tiles=tiles),
                                             warmup=3, rep=15)
            except Exception as e:  # noqa: BLE001 - out of resources for a tile: skip it
                print(json.dumps({"tiles": list(tiles), "error": type(e).__name__}))
                continue
            row = {"dtype": str(dt), "tiles": list(tiles), "kernel_ms": round(ms, 4),
                   "kernel_GBps": round(nbytes / ms / 1e6, 1)}
            rows.append(row)
            print(json.dumps(row))
            if best is None or ms < best[0]:
                best = (ms, tiles)
        full = triton.testing.do_bench(lambda: ops.layer_moments(h), warmup=3, rep=20)
        import avss_fast.kernels.layer_moments as lm

        default_layout = lm._gpu_layout
        lm._gpu_layout = lambda *a, _t=best[1]: _t  # the whole op with the best tiles
        try:
            full_best = triton.testing.do_bench(lambda: ops.layer_moments(h), warmup=3, rep=20)
        finally:
            lm._gpu_layout = default_layout
        summary = {"dtype": str(dt), "default_tiles": list(default_layout(B, T, D, dev)),
                   "best_tiles": best[1], "best_kernel_ms": round(best[0], 4),
                   "best_kernel_GBps": round(nbytes / best[0] / 1e6, 1), "default_full_op_ms": round(full, 4),
                   "default_full_op_GBps": round(nbytes / full / 1e6, 1),
                   "best_full_op_ms": round(full_best, 4), "best_full_op_GBps": round(nbytes / full_best / 1e6, 1)}
        print(json.dumps(summary))
        rows.append(summary)
        del h
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

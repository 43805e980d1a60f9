#!/usr/bin/env python3
"""GPU benchmark of the stats kernels (layer_moments, block_similarity) against the
measured device-to-device copy bandwidth and the eager reference. From the repo root:

    python bench/gpu_bench_stats.py [--out results.json]

GB/s counts the activation bytes read once (B*T*D*itemsize; two tensors for similarity;
the valid rows' bytes for the ``*_valid_bytes`` cases). ``layer_moments_T-6`` reads
[16, 4090, 4096] (T not a multiple of 16), ``layer_moments_holes_valid_bytes`` a mask with
a hole every 7 tokens (every range through the second launch's mask pass).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import padding_masks, setup  # noqa: E402


def main() -> int:
    args = setup(__doc__.splitlines()[0])
    import torch
    import triton
    from avss_fast import ops, reference

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    datasheet = {"H100": 3.35e12, "H200": 4.8e12}
    peak_ds = next((v for k, v in datasheet.items() if k in name), None)
    res = {"device": name, "cases": []}

    # measured ceiling: a copy of 4 GiB (read + write)
    src = torch.empty(2**30, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=30)
    copy_bw = 2 * src.numel() * 4 / (ms * 1e-3)
    res["copy_GBps"] = round(copy_bw / 1e9, 1)
    del src, dst
    print(json.dumps({"device": name, "copy_GBps(read+write)": res["copy_GBps"]}))

    B, T, D = 16, 4096, 4096
    for dt in (torch.bfloat16, torch.float32):
        h = torch.randn(B, T, D, device=dev, dtype=dt)
        h2 = torch.randn(B, T, D, device=dev, dtype=dt)
        masks = padding_masks(torch, B, T, dev)
        mask, ragged, holes = masks["light"], masks["ragged"], masks["holes"]
        nbytes = h.numel() * h.element_size()
        h_odd = h[:, : T - 6]  # T not a multiple of 16: the span form's loop without a mask
        for cname, fn, nb in (
            ("layer_moments", lambda: ops.layer_moments(h), nbytes),
            ("layer_moments_mask", lambda: ops.layer_moments(h, mask), nbytes),
            ("layer_moments_ragged_valid_bytes", lambda: ops.layer_moments(h, ragged),
             int(ragged.sum()) * D * h.element_size()),
            ("layer_moments_T-6", lambda: ops.layer_moments(h_odd), nbytes * (T - 6) // T),
            ("layer_moments_holes_valid_bytes", lambda: ops.layer_moments(h, holes),
             int(holes.sum()) * D * h.element_size()),
            ("layer_moments_rel_mask", lambda: ops.layer_moments(h, mask, sparsity_rel=0.01), nbytes),
            ("layer_moments_rel", lambda: ops.layer_moments(h, sparsity_rel=0.01), nbytes),
            ("block_similarity", lambda: ops.block_similarity(h, h2, mask), 2 * nbytes),
        ):
            ms = triton.testing.do_bench(fn, warmup=5, rep=40)
            bw = nb / (ms * 1e-3)
            row = {"op": cname, "dtype": str(dt), "shape": [B, T, D], "ms": round(ms, 4), "GBps": round(bw / 1e9, 1),
                   "pct_of_copy": round(100 * bw / copy_bw, 1),
                   "pct_of_datasheet": round(100 * bw / peak_ds, 1) if peak_ds else None}
            print(json.dumps(row))
            res["cases"].append(row)
        # eager reference on a slice (float64 oracle is slow): ratio per byte
        hs = h[:2, :1024]
        ms_ref = triton.testing.do_bench(lambda: reference.layer_moments(hs), warmup=1, rep=10)
        ms_fast = triton.testing.do_bench(lambda: ops.layer_moments(hs), warmup=3, rep=20)
        res["cases"].append({"op": "reference_vs_triton_slice", "dtype": str(dt), "shape": list(hs.shape),
                             "ms_reference": round(ms_ref, 3), "ms_triton": round(ms_fast, 4),
                             "speedup": round(ms_ref / ms_fast, 1)})
        print(json.dumps(res["cases"][-1]))
        # correctness on the slice
        got, ref = ops.layer_moments(hs).to("cpu").raw(), reference.layer_moments(hs).raw()
        rel = {k: abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-30) for k in ref}
        print(json.dumps({"dtype": str(dt), "max_rel_diff_vs_reference": max(rel.values())}))
        del h, h2
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

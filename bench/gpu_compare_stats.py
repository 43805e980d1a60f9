#!/usr/bin/env python3
"""Time the working layer_moments kernel against an earlier version of it, in one process
on one GPU: interleaved rounds, the median of ``triton.testing.do_bench`` per case, the
whole device op (``layer_moments_packed``), and both versions' packed fields compared.

The earlier version is a copy of ``kernels/layer_moments.py`` from a commit, loaded as a
second module beside the working one (its ``._common`` imports resolve to the working
``kernels/_common.py``, so a baseline must be one whose helpers that file still has).
``bench/baseline/`` is ignored by git; write the copy there and carry it to the device:

    mkdir -p bench/baseline
    git show 79b0ec6:kernels/layer_moments.py > bench/baseline/layer_moments.py
    python bench/gpu_compare_stats.py --baseline bench/baseline/layer_moments.py --out compare.json

Cases at [16, 4096, 4096] (``T-6``: [16, 4090, 4096], T not a multiple of 16), bf16 and
fp32: no mask, one sample half padded ("light"), right padding of mixed lengths T/2..T
("ragged", % of copy over the valid rows' bytes), a hole every 7 tokens ("holes", valid
bytes), the relative threshold with and without the light mask.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import padding_masks, setup  # noqa: E402


def _load_baseline(path: str):
    """The file at ``path`` as module ``avss_fast.kernels._baseline_layer_moments``."""
    spec = importlib.util.spec_from_file_location("avss_fast.kernels._baseline_layer_moments", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cases(torch, B, T, D, dt, dev):
    """(name, activation, mask, relative threshold, bytes counted) of each case."""
    h = torch.randn(B, T, D, device=dev, dtype=dt)
    masks = padding_masks(torch, B, T, dev)
    light, ragged, holes = masks["light"], masks["ragged"], masks["holes"]
    row = D * h.element_size()
    full = B * T * row
    return [
        ("plain", h, None, None, full),
        ("T-6", h[:, : T - 6], None, None, B * (T - 6) * row),
        ("light", h, light, None, full),
        ("ragged_valid_bytes", h, ragged, None, int(ragged.sum()) * row),
        ("holes_valid_bytes", h, holes, None, int(holes.sum()) * row),
        ("rel", h, None, 0.01, full),
        ("rel_light", h, light, 0.01, full),
    ]


def main() -> int:
    args = setup(__doc__.splitlines()[0], extra=lambda ap: (
        ap.add_argument("--baseline", required=True, help="an earlier kernels/layer_moments.py"),
        ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)"),
        ap.add_argument("--dtypes", default="bf16,fp32"),
    ))
    import torch
    import triton

    from avss_fast.kernels import layer_moments as new

    old = _load_baseline(args.baseline)
    dev = torch.device("cuda")
    src = torch.empty(2**30, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 4 / (triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=30) * 1e-3)
    del src, dst
    res = {"device": torch.cuda.get_device_name(0), "copy_GBps": round(copy_bw / 1e9, 1), "baseline": args.baseline,
           "rows": []}
    print(json.dumps({k: res[k] for k in ("device", "copy_GBps")}), flush=True)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for dname in args.dtypes.split(","):
        for name, h, mask, rel, nbytes in _cases(torch, 16, 4096, 4096, dtypes[dname], dev):
            fns = {"old": lambda: old.layer_moments_packed(h, mask, 1e-5, rel),
                   "new": lambda: new.layer_moments_packed(h, mask, 1e-5, rel)}
            (oi, of), (ni, nf) = fns["old"](), fns["new"]()
            same_ints = bool(torch.equal(oi, ni))
            flt_rel = float(((nf - of).abs() / of.abs().clamp_min(1e-30)).max())
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    times[k].append(triton.testing.do_bench(fn, warmup=3, rep=20))
            for k in fns:
                ms = statistics.median(times[k])
                row = {"dtype": dname, "case": name, "kernel": k, "ms": round(ms, 4), "min_ms": round(min(times[k]), 4),
                       "pct_copy": round(100 * nbytes / (ms * 1e-3) / copy_bw, 1), "ints_equal": same_ints,
                       "flts_max_rel": flt_rel}
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
            if args.out:  # as it goes: a device call that runs out of time keeps what it measured
                Path(args.out).write_text(json.dumps(res, indent=1))
        del h
    return 0


if __name__ == "__main__":
    sys.exit(main())

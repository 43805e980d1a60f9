"""``avss-fast bench``: time the ops on this machine (CPU or GPU) against their eager
baselines, as a quick check of an installation: ``layer_moments`` and ``block_similarity``
against the eager float64 reference (GB/s = bytes read once / time), and ``masked_attention``
with the adaptive rule against plain SDPA and the materialised eager path (TFLOP/s), and
attention with every head statistic (what ``HeadScorer`` runs) against plain SDPA. The
full suites with pytest-benchmark are in ``bench/`` of the source tree.
"""

from __future__ import annotations

import json
import time

from .cli import CLIError, _pick_device

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _timer(device):
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn, rounds: int) -> float:
        fn()  # warm-up (and Triton compilation)
        sync()
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    return measure


def run_bench(device, dtype, *, quick: bool) -> list[dict]:
    """Rows of {op, shape, fast_ms, baseline, baseline_ms, speedup, GB/s or TFLOP/s}."""
    import torch
    import torch.nn.functional as F

    from . import ops, reference

    measure = _timer(device)
    rounds = 3 if quick else 10
    B, T, D = (2, 256, 1024) if quick else (8, 512, 4096)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g).to(dtype).to(device)
    h2 = (h.float() + 0.1 * torch.randn(B, T, D, generator=g).to(device)).to(dtype)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    rows = []
    nbytes = h.numel() * h.element_size()
    fast = measure(lambda: ops.layer_moments(h, mask).raw(), rounds)
    ref = measure(lambda: reference.layer_moments(h, mask), 1 if quick else 2)
    rows.append(dict(op="layer_moments", shape=f"{B}x{T}x{D}", fast_ms=fast * 1e3, baseline="eager float64",
                     baseline_ms=ref * 1e3, speedup=ref / fast, rate=f"{nbytes / fast / 1e9:.1f} GB/s"))
    fast = measure(lambda: ops.block_similarity(h, h2, mask).raw(), rounds)
    ref = measure(lambda: reference.block_similarity(h, h2, mask), 1 if quick else 2)
    rows.append(dict(op="block_similarity", shape=f"{B}x{T}x{D}", fast_ms=fast * 1e3, baseline="eager float64",
                     baseline_ms=ref * 1e3, speedup=ref / fast, rate=f"{2 * nbytes / fast / 1e9:.1f} GB/s"))
    S, H, Dh = (512, 8, 64) if quick else (2048, 8, 64)
    q, k, v = (torch.randn(1, H, S, Dh, generator=g).to(dtype).to(device) for _ in range(3))
    rule = ops.AttentionRule(tuple(range(H)), 1, 0.4, 0.0, "last")
    flops = 4 * H * S * S * Dh / 2  # causal

    def adaptive():
        return ops.masked_attention(q, k, v, scaling=Dh**-0.5, segment_starts=[0, S // 4], adaptive=rule)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=Dh**-0.5).transpose(1, 2).contiguous()

    def eager():
        return reference.masked_attention(q, k, v, scaling=Dh**-0.5, segment_starts=torch.tensor([[0, S // 4]],
                                          device=device), adaptive=rule)

    def head_stats():  # what HeadScorer runs: the output plus entropy, max logit, sink and segment masses
        return ops.masked_attention(q, k, v, scaling=Dh**-0.5, segment_starts=[0, S // 4], return_segment_mass=True,
                                    return_head_stats=True)

    fast = measure(adaptive, rounds)
    sdpa_ms = None
    for name, fn in (("SDPA", sdpa), ("eager materialised", eager)):
        base = measure(fn, rounds if name == "SDPA" else 2)
        sdpa_ms = base if name == "SDPA" else sdpa_ms
        rows.append(dict(op="masked_attention (ADHH rule)", shape=f"1x{H}x{S}x{Dh} causal", fast_ms=fast * 1e3,
                         baseline=name, baseline_ms=base * 1e3, speedup=base / fast,
                         rate=f"{flops / fast / 1e12:.3f} TFLOP/s"))
    fast = measure(head_stats, rounds)
    rows.append(dict(op="attention + head statistics", shape=f"1x{H}x{S}x{Dh} causal", fast_ms=fast * 1e3,
                     baseline="SDPA (no statistics)", baseline_ms=sdpa_ms * 1e3, speedup=sdpa_ms / fast,
                     rate=f"{flops / fast / 1e12:.3f} TFLOP/s"))
    return rows


def head_stats_path(device) -> str:
    """Which implementation computes head statistics here (the compiled CPU kernel, its
    torch fallback, or the Triton kernel)."""
    import torch

    from . import native
    from .ops import backend_for

    backend = backend_for(torch.empty(0, device=device))
    if backend != "torch":
        return f"{backend} backend"
    if device.type != "cpu":
        return "torch path (SDPA and blocked passes)"
    try:
        fn = native.kernel()
    except RuntimeError as e:
        return f"torch path ({e})"
    if fn is None:
        return f"torch path ({(native.unavailable_reason() or '?')[:120]})"
    return f"compiled CPU kernel ({fn.vector_width}-float vectors)"


def cmd_bench(args) -> int:
    import torch

    from .ops import backend_for

    dev = _pick_device(args.device)
    name = ("bfloat16" if dev.type == "cuda" else "float32") if args.dtype == "auto" else _DTYPES.get(args.dtype)
    if name is None:
        raise CLIError(f"--dtype {args.dtype!r}: choose one of auto, {', '.join(_DTYPES)}")
    dtype = getattr(torch, name)
    rows = run_bench(dev, dtype, quick=args.quick)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    info = dict(device=where, dtype=name, backend=backend_for(torch.empty(0, device=dev)),
                threads=torch.get_num_threads(), torch=torch.__version__, head_stats=head_stats_path(dev), rows=rows)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"device: {where}   dtype: {name}   backend: {info['backend']}   torch {torch.__version__}"
          f"   threads: {info['threads']}")
    print(f"head statistics: {info['head_stats']}")
    print(f"{'op':<30} {'shape':<20} {'ms':>9} {'vs':<20} {'ms':>10} {'speed-up':>9}  rate")
    for r in rows:
        print(f"{r['op']:<30} {r['shape']:<20} {r['fast_ms']:>9.2f} {r['baseline']:<20} {r['baseline_ms']:>10.2f} "
              f"{r['speedup']:>8.2f}x  {r['rate']}")
    return 0


def register(sub) -> None:
    b = sub.add_parser("bench", help="time the ops on this machine against their eager baselines",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    b.add_argument("--dtype", default="float32",
                   help="float32 (default), bfloat16, float16, or auto (bf16 on GPU, fp32 on CPU)")
    b.add_argument("--quick", action="store_true", help="small shapes, few rounds (seconds on a CPU)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=cmd_bench)

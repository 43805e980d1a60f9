#!/usr/bin/env python3
"""Offline look at the layer_moments one-read kernel's machine code, no GPU needed: compile
``_layer_moments_kernel`` for an NVIDIA target (default sm_90) with the ptxas/nvdisasm that
ship with Triton, for each candidate tile layout, and count the SASS instructions of its
hot loop (the fast pass over one [BLOCK_T, BLOCK_D] tile) per activation value, with the
loop's local-memory traffic (register spills), its barriers and its shuffles.

Why: the kernel is instruction-bound on an H200 in bf16 (bench/README.md). At ~2e12
bf16 values/s (copy bandwidth) a GPU issuing one warp instruction per scheduler per cycle
has ~16 thread instructions per value to spend (132 SMs x 4 x 1.98 GHz x 32 lanes / 2.15e12
values/s on an H200), less what stalls cost. A layout with fewer instructions per value
and no spills is the one to time first on a GPU (``bench/gpu_sweep_stats.py``). From the
repo root:

    python bench/gpu_sass_stats.py [--arch 90] [--dtype bf16 fp32] [--json out.json]

Arguments are specialised as a real launch on [16, 4096, 4096] would be (pointers and
sizes divisible by 16, EVEN_D; no padding mask and the absolute threshold unless ``--mask``
or ``--threshold`` say otherwise; ``--ragged-t``: T not a multiple of 16).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYOUTS = list(itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048, 4096), (4, 8)))  # BLOCK_T, BLOCK_D, warps


def _layouts(spec: str | None):
    """``--layouts 8x1024x4,4x1024x4`` (BLOCK_T x BLOCK_D x warps), default: all of LAYOUTS."""
    if not spec:
        return LAYOUTS
    return [tuple(int(x) for x in item.split("x")) for item in spec.split(",")]


#: Types of the kernels' runtime arguments (``x_ptr`` takes the dtype asked for); every other
#: parameter is a constexpr, and ``stride_mt`` = 1 too (Triton specialises an integer
#: argument equal to 1: a contiguous mask).
ARG_TYPES = {
    "mask_ptr": "*i64", "thr_ptr": "*fp32", "colsum_ptr": "*fp32", "colcnt_ptr": "*i32",
    "rowpart_ptr": "*fp32", "cnt_ptr": "*i32", "T": "i32", "D": "i32", "rows_per_split": "i32",
    "stride_xb": "i64", "stride_xt": "i64", "stride_mb": "i64", "eps": "fp32",
    # block_similarity
    "cos_ptr": "*fp32", "status_ptr": "*i8", "stride_ab": "i64", "stride_at": "i64", "stride_bb": "i64",
    "stride_bt": "i64",
}
#: Pointer parameters that take the activation dtype.
DATA_PTRS = ("x_ptr", "a_ptr", "b_ptr")


def signature(kernel, dtype: str) -> dict[str, str]:
    """The compile signature of ``kernel`` (a ``triton.jit`` function), its parameters in
    order, read from the kernel itself so that it cannot drift from the launcher."""
    return {p.name: "constexpr" if p.is_constexpr or p.name == "stride_mt"
            else f"*{dtype}" if p.name in DATA_PTRS else ARG_TYPES[p.name] for p in kernel.params}


DIVISIBLE = ("x_ptr", "mask_ptr", "thr_ptr", "colsum_ptr", "colcnt_ptr", "rowpart_ptr", "cnt_ptr", "T", "D",
             "rows_per_split", "stride_xb", "stride_xt", "stride_mb",
             "a_ptr", "b_ptr", "cos_ptr", "status_ptr", "stride_ab", "stride_at", "stride_bb", "stride_bt")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def compile_sass(dtype: str, block_t: int, block_d: int, warps: int, arch: int, mask: bool = False,
                 threshold: str = "abs", ragged_t: bool = False, second: bool = False,
                 kernel_name: str = "layer_moments") -> tuple[str, int, int]:
    """(SASS text, registers per thread, stack bytes per thread) of one layout; ``mask``: with
    a padding mask; ``threshold``: "abs" (eps), "rel" (whole-row tiles, in-kernel rms) or
    "rel-prepass" (the pre-pass's thresholds); ``ragged_t``: T and the split not multiples
    of 16 (rows read by the span form, as a launch decides); ``second``: the second launch
    (``_layer_moments_exact_kernel``: with a mask, the mask pass of ranges with holes);
    ``kernel_name`` "block_similarity": ``_block_similarity_kernel`` instead (``mask`` and
    the layout apply, the other options do not)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.block_similarity import _block_similarity_kernel
    from kernels.layer_moments import _layer_moments_exact_kernel, _layer_moments_kernel

    if kernel_name == "block_similarity":
        kernel = _block_similarity_kernel
    else:
        kernel = _layer_moments_exact_kernel if second else _layer_moments_kernel
    sig = signature(kernel, dtype)
    names = list(sig)
    itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    # as layer_moments_partials decides; stride_mt = 1: a contiguous mask (Triton specialises
    # integer arguments equal to 1)
    consts = {"stride_mt": 1, "HAS_MASK": mask, "BLOCK_T": block_t, "BLOCK_D": block_d}
    if kernel_name == "block_similarity":
        pass
    elif second:
        consts.update(USE_THR=threshold != "abs", ROW_THR=threshold == "rel", EVEN_D=True,
                      ROWS_IN_THREAD=block_d >= 32 * warps * (16 // itemsize),
                      PREFETCH_MASK=itemsize >= 4, EXACT_BLOCK_T=max(1, block_t // 4))
    else:
        consts.update(USE_THR=threshold != "abs", ROW_THR=threshold == "rel", EVEN_D=True,
                      ROWS_IN_THREAD=block_d >= 32 * warps * (16 // itemsize),
                      ROWS="span" if mask or ragged_t else "all", SPAN_BLOCK=512 if mask else 1)  # as a launch
    divisible = [a for a in DIVISIBLE if a in sig and not (ragged_t and a in ("T", "rows_per_split"))]
    src = ASTSource(
        fn=kernel, signature=sig,
        constexprs={(names.index(k),): v for k, v in consts.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in divisible},
    )
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([str(tools / "nvdisasm"), "-c", "-g", f.name], capture_output=True, text=True, check=True)
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return res.stdout, int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def hot_loop(sass: str, which: str = "largest") -> tuple[dict[str, int], list[int]]:
    """Opcode counts of the largest loop (``which="largest"``: layer_moments' fast pass over
    the tiles; with a mask, after the loop that reads the range's mask) or of the first
    loop of more than 16 instructions (``"first"``: block_similarity's pass, before the rare
    rescaled one); and the positions of its global loads in the loop's instructions. A loop
    is a backward branch's range, merged with the ranges it overlaps (ptxas may lay one
    loop out as two overlapping back edges)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := _LABEL.match(ln))}
    ranges = sorted((labels[m.group(1)], i) for i, ln in enumerate(lines)
                    if (m := _BRANCH.search(ln)) and labels.get(m.group(1), i) < i)
    loops: list[list[int]] = []
    for start, end in ranges:
        if loops and start <= loops[-1][1]:
            loops[-1][1] = max(loops[-1][1], end)
        else:
            loops.append([start, end])
    if not loops:
        raise RuntimeError("no loop found in the SASS")
    if which == "first":
        best = next((r for r in loops if r[1] - r[0] > 16), loops[0])
    else:
        best = max(loops, key=lambda r: r[1] - r[0])
    ops: dict[str, int] = {}
    loads = []
    for body in lines[best[0] : best[1] + 1]:
        if im := _INSTR.match(body):
            if im.group(1) == "LDG":
                loads.append(sum(ops.values()))
            ops[im.group(1)] = ops.get(im.group(1), 0) + 1
    return ops, loads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--layouts", help="BLOCK_TxBLOCK_DxWARPS,... (default: a grid of 60, those with 8 to 256 "
                                      "values a thread)")
    ap.add_argument("--mask", action="store_true", help="with a padding mask")
    ap.add_argument("--threshold", default="abs", choices=["abs", "rel", "rel-prepass"],
                    help="near-zero threshold: eps, relative in one read (whole rows: layouts with "
                         "BLOCK_D >= 4096 only), relative from the pre-pass")
    ap.add_argument("--ragged-t", action="store_true",
                    help="T and the split not multiples of 16 (the span form's loop, as a launch takes it)")
    ap.add_argument("--second", action="store_true",
                    help="the second launch (with --mask: the mask pass of ranges with holes; its largest loop)")
    ap.add_argument("--kernel", default="layer_moments", choices=["layer_moments", "block_similarity"],
                    help="the kernel to compile (block_similarity: --mask and the layouts apply; its first loop)")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    rows = []
    loop = "first loop of _block_similarity_kernel" if args.kernel == "block_similarity" else \
        "fast-pass loop of _layer_moments_kernel"
    print(f"sm_{args.arch}: {loop}, per activation value (thread instructions;"
          " with a mask or --ragged-t the loop holds two forms of the tile's loads, whole and partial tiles);"
          " ld spread: instructions from the first to the last of a tile's loads (small: back to back)")
    print(f"{'dtype':>5} {'T':>3} {'D':>5} {'warps':>5} {'regs':>4} {'stack':>5} {'prog/SM':>7} {'instr/value':>11}"
          f" {'spill ld+st':>11} {'bar':>4} {'shfl':>5} {'ld spread':>9}")
    for dtype in args.dtype:
        for block_t, block_d, warps in _layouts(args.layouts):
            values_per_thread = block_t * block_d / (32 * warps)
            if values_per_thread < 8 or values_per_thread > 256:
                continue  # under one 16-byte load a thread, or more registers than exist
            if args.threshold == "rel" and block_d < 4096:
                continue  # a real launch takes the in-kernel threshold only when a chunk holds whole rows
            try:
                sass, regs, stack = compile_sass(dtype, block_t, block_d, warps, args.arch, args.mask, args.threshold,
                                                 args.ragged_t, args.second, args.kernel)
                ops, loads = hot_loop(sass, "first" if args.kernel == "block_similarity" else "largest")
            except Exception as e:  # noqa: BLE001 - a layout that does not compile is reported, not fatal
                print(f"{dtype:>5} {block_t:>3} {block_d:>5} {warps:>5}  failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            total = sum(ops.values())
            per_tile = max(1, int(values_per_thread * {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]) // 16)  # 16-byte loads
            spread = loads[min(per_tile, len(loads)) - 1] - loads[0] if loads else -1
            # resident programs per SM by registers alone (64K registers; allocation granularity ignored)
            progs = 65536 // max(1, regs * 32 * warps)
            row = dict(dtype=dtype, block_t=block_t, block_d=block_d, warps=warps, registers=regs, stack=stack,
                       programs_per_sm=progs, loop_instructions=total,
                       per_value=total / values_per_thread, spills=ops.get("LDL", 0) + ops.get("STL", 0),
                       barriers=ops.get("BAR", 0), shuffles=ops.get("SHFL", 0), load_spread=spread, ops=ops)
            rows.append(row)
            print(f"{dtype:>5} {block_t:>3} {block_d:>5} {warps:>5} {regs:>4} {stack:>5} {progs:>7}"
                  f" {row['per_value']:>11.2f} {row['spills']:>11}"
                  f" {row['barriers']:>4} {row['shuffles']:>5} {spread:>9}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

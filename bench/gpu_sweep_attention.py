#!/usr/bin/env python3
"""Tile sweep of the masked_attention kernel on a CUDA device, against SDPA flash.

Picks the GPU tiling (``_gpu_tiles`` in kernels/masked_attention.py). From the repo root:

    python bench/gpu_sweep_attention.py [--out sweep.json]

bf16, causal, B=4, Hq=32, Hkv=8, D=128, S = Sq = Sk. Three cases, each through
``masked_attention_fwd`` with prepared arguments (as ``avss_fast.ops`` passes them): ``plain``;
``adaptive``, the rule on the last row (every 2nd head, segments [0, S/8, S/2], rule segment 2,
threshold 0.4, scale 0); ``head_stats`` (plain with the per-row statistics). Every tiling
(BLOCK_M, BLOCK_N, num_warps, num_stages) that fits runs at S = 2048, likeliest first; the
best few per case and the current default also at S = 8192; then the kernel's switch of the
causal block order (``_reverse_m``) on the best tiling, and a
float64 check of the best tilings on a small case. Each result is one JSON line with
ratio = sdpa_ms / ms (SDPA measured in the same run); a summary per case at the end, all of
it also in ``--out``. Time is capped (AVSS_SWEEP_BUDGET_S, default 150 s): tilings left when
it runs out are skipped and listed. AVSS_SWEEP_CPU_SMOKE=1 runs the same steps on tiny
shapes under the Triton interpreter (a check of the script, not a measurement).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import setup  # noqa: E402

CASES = ("plain", "adaptive", "head_stats")
# likeliest first (Hopper, D = 128; from ptxas register counts of an offline sm_90a build:
# BLOCK_M=128 wants 8 warps, (128, 64, 4, *) and (128, 128, 4, *) spill); the current
# default is measured first, as the baseline
PRIORITY = [
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3),
    (128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 2), (64, 32, 4, 3),
    (64, 64, 4, 4), (64, 128, 4, 2), (128, 64, 4, 3),
]
ALL = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))


def main() -> int:
    smoke = os.environ.get("AVSS_SWEEP_CPU_SMOKE") == "1"
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    args = setup(__doc__.splitlines()[0])
    import torch
    import triton

    import avss_fast.kernels.masked_attention as km
    from avss_fast import reference
    from avss_fast.ops import AttentionRule

    t0 = time.time()
    budget = float(os.environ.get("AVSS_SWEEP_BUDGET_S", "150"))
    # phase ends, as fractions of the budget: sweep at the small S, large S, switches, check
    end_sweep, end_large, end_switch = 0.60 * budget, 0.72 * budget, 0.84 * budget

    def elapsed() -> float:
        return time.time() - t0

    if smoke:
        dev = torch.device("cpu")
        B, Hq, Hkv, D = 1, 4, 2, 32
        S_SMALL, S_LARGE = 64, 96
        configs_all = [(16, 16, 1, 1), (32, 16, 1, 1), (16, 32, 1, 1), (32, 32, 1, 1)]
        priority = [(32, 16, 1, 1)]
    else:
        if not torch.cuda.is_available():
            print(json.dumps({"error": "no CUDA device (AVSS_SWEEP_CPU_SMOKE=1 checks the script on CPU)"}))
            return 1
        dev = torch.device("cuda")
        B, Hq, Hkv, D = 4, 32, 8, 128
        S_SMALL, S_LARGE = 2048, 8192
        configs_all, priority = ALL, PRIORITY
    dtype = torch.bfloat16
    scaling = D**-0.5
    BLOCK_D = max(16, triton.next_power_of_2(D))
    default_tiles = tuple(km._gpu_tiles(S_SMALL, BLOCK_D, dtype))

    if smoke:
        smem_limit = 1 << 30

        def sync():
            pass

        def bench(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    else:
        props = torch.cuda.get_device_properties(dev)
        smem_limit = getattr(props, "shared_memory_per_block_optin", 0) or 232448  # H100/H200: 227 KiB

        def sync():
            torch.cuda.synchronize()

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=25)

    def fits(t) -> bool:
        bm, bn, nw, ns = t
        smem = (bm * BLOCK_D + ns * 2 * bn * BLOCK_D) * 2  # q tile + K and V per stage, bf16
        return smem <= smem_limit and not (bm * bn >= 128 * 128 and nw == 4)  # S tile alone: 128 regs/thread

    order = [t for t in [default_tiles] + priority + configs_all if fits(t)]
    order = list(dict.fromkeys(order))  # unique, in order
    unfit = [list(t) for t in configs_all if not fits(t)]

    results = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter smoke run)",
        "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": str(dtype), "causal": True},
        "budget_s": budget, "default_tiles": list(default_tiles), "unfit_tiles": unfit,
        "rows": [], "sdpa": {}, "summary": {}, "switches": [], "correctness": [], "skipped": [], "notes": [],
    }
    fatal = []  # a CUDA error leaves the context unusable: stop measuring

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    def save() -> None:  # after every step: a run killed by an outer time limit keeps what it measured
        if args.out:
            results["elapsed_s"] = round(elapsed(), 1)
            Path(args.out).write_text(json.dumps(results, indent=2))

    def err_text(e: BaseException) -> str:
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"

    def check_fatal(text: str) -> None:
        if "CUDA error" in text or "illegal" in text or "unspecified launch failure" in text:
            fatal.append(text)

    # ------------------------------------------------------------------ inputs (prepared as ops does)
    def make_inputs(S: int) -> dict:
        g = torch.Generator(device=dev).manual_seed(S)
        q = torch.randn(B, Hq, S, D, generator=g, device=dev, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, generator=g, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, generator=g, device=dev, dtype=dtype)
        starts = torch.tensor([0, S // 8, S // 2], dtype=torch.int32).expand(B, 3).contiguous().to(dev)
        rule_heads = torch.zeros(Hq, dtype=torch.int8)
        rule_heads[0::2] = 1
        return {"q": q, "k": k, "v": v, "starts": starts, "rule_heads": rule_heads.to(dev)}

    def case_kwargs(case: str, inp: dict) -> dict:
        kw = dict(scaling=scaling, causal=True, key_mask=None, full_mask=None, head_gate=None,
                  segment_starts=None, segment_scale=None, rule_heads=None, rule_segment=0, threshold=0.0,
                  rule_scale=0.0, last_row_only=False, return_segment_mass=False, return_head_stats=False,
                  return_rule_fired=False)
        if case == "adaptive":
            kw.update(segment_starts=inp["starts"], rule_heads=inp["rule_heads"], rule_segment=2, threshold=0.4,
                      rule_scale=0.0, last_row_only=True)
        elif case == "head_stats":
            kw.update(return_head_stats=True)
        return kw

    flops = {}
    sdpa_ms = {}

    def measure_sdpa(S: int, inp: dict) -> None:
        q, k, v = inp["q"], inp["k"], inp["v"]
        entry = {"S": S}
        try:
            entry["sdpa_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=True))
        except Exception as e:  # noqa: BLE001
            entry["sdpa_error"] = err_text(e)
        if dev.type == "cuda":
            try:  # the same call held to the flash backend, for the record
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    entry["sdpa_forced_flash_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, scale=scaling, enable_gqa=True))
            except Exception as e:  # noqa: BLE001
                entry["sdpa_forced_flash_error"] = err_text(e)
        fl = 4 * B * Hq * S * S * D / 2
        flops[S] = fl
        if "sdpa_ms" in entry:
            sdpa_ms[S] = entry["sdpa_ms"]
            entry["sdpa_tflops"] = round(fl / entry["sdpa_ms"] / 1e9, 1)
        entry = {k2: (round(x, 4) if isinstance(x, float) else x) for k2, x in entry.items()}
        results["sdpa"][str(S)] = entry
        emit({"sdpa": entry})

    def measure(case: str, S: int, inp: dict, tiles, tag: str = "") -> dict:
        kw = case_kwargs(case, inp)
        q, k, v = inp["q"], inp["k"], inp["v"]

        def fn():
            return km.masked_attention_fwd(q, k, v, tiles=tiles, **kw)

        row = {"case": case, "S": S, "tiles": list(tiles)}
        if tag:
            row["variant"] = tag
        try:
            t = time.time()
            fn()
            sync()
            row["first_call_s"] = round(time.time() - t, 2)
            ms = bench(fn)
        except Exception as e:  # noqa: BLE001 - out of resources for a tiling, a compile error: record, go on
            row["error"] = err_text(e)
            check_fatal(row["error"])
            emit(row)
            results["rows"].append(row)
            return row
        row["ms"] = round(ms, 4)
        row["tflops"] = round(flops[S] / ms / 1e9, 1)
        if S in sdpa_ms:
            row["ratio"] = round(sdpa_ms[S] / ms, 3)  # sdpa_ms / ours: >= 0.70 is the target
        emit(row)
        results["rows"].append(row)
        return row

    def precompile(tile_list, S: int, inp: dict) -> None:
        """Compile the kernels of several tilings in parallel threads (Triton's AsyncCompileMode),
        without launching; anything that fails here is compiled (and reported) at its first call."""
        if smoke or not hasattr(triton, "AsyncCompileMode"):
            return
        from concurrent.futures import ThreadPoolExecutor

        real = km._masked_attention_fwd

        class _Warm:
            def __getitem__(self, grid):
                return lambda *a, **kw: real.warmup(*a, grid=grid, **kw)

        t = time.time()
        try:
            with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as ex:
                with triton.AsyncCompileMode(ex, ignore_errors=True):
                    km._masked_attention_fwd = _Warm()
                    try:
                        for tiles in tile_list:
                            for case in CASES:
                                try:
                                    km.masked_attention_fwd(inp["q"], inp["k"], inp["v"], tiles=tiles,
                                                            **case_kwargs(case, inp))
                                except Exception:  # noqa: BLE001
                                    pass
                    finally:
                        km._masked_attention_fwd = real
        except Exception as e:  # noqa: BLE001 - precompiling is an optimisation only
            results["notes"].append(f"precompile failed ({err_text(e)}); compiling at first call")
        finally:
            km._masked_attention_fwd = real
        emit({"precompiled": [list(x) for x in tile_list], "seconds": round(time.time() - t, 1)})

    # ------------------------------------------------------------------ 1. every tiling at the small S
    inp_small = make_inputs(S_SMALL)
    measure_sdpa(S_SMALL, inp_small)
    chunk = 6
    done = []
    for i in range(0, len(order), chunk):
        part = order[i:i + chunk]
        if fatal or elapsed() > end_sweep:
            results["skipped"].extend([{"S": S_SMALL, "tiles": list(t)} for t in part])
            continue
        precompile(part, S_SMALL, inp_small)
        for tiles in part:
            if fatal or elapsed() > end_sweep:
                results["skipped"].append({"S": S_SMALL, "tiles": list(tiles)})
                continue
            for case in CASES:
                measure(case, S_SMALL, inp_small, tiles)
            done.append(tiles)
    save()
    if results["skipped"]:
        msg = f"time budget: {len(results['skipped'])} tilings skipped at S={S_SMALL}"
        results["notes"].append(msg)
        emit({"note": msg, "skipped": [s["tiles"] for s in results["skipped"]]})

    def best_of(case: str, S: int, n: int = 1, variant: str = ""):
        rows = [r for r in results["rows"] if r["case"] == case and r["S"] == S and "ms" in r
                and r.get("variant", "") == variant]
        rows.sort(key=lambda r: r["ms"])
        return [tuple(r["tiles"]) for r in rows[:n]]

    # ------------------------------------------------------------------ 2. the best few at the large S
    large = []
    for case in CASES:
        for t in best_of(case, S_SMALL, 2):
            if t not in large:
                large.append(t)
    if default_tiles in done and default_tiles not in large:
        large.append(default_tiles)
    inp_large = None
    if not fatal and large:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        inp_large = make_inputs(S_LARGE)
        measure_sdpa(S_LARGE, inp_large)
        skipped_large = []
        for tiles in large:
            if fatal or elapsed() > end_large:
                skipped_large.append(list(tiles))
                continue
            for case in CASES:
                measure(case, S_LARGE, inp_large, tiles)
        if skipped_large:
            msg = f"time budget: {len(skipped_large)} tilings skipped at S={S_LARGE}"
            results["notes"].append(msg)
            emit({"note": msg, "skipped": skipped_large})
            results["skipped"].extend([{"S": S_LARGE, "tiles": t} for t in skipped_large])
        save()

    # ------------------------------------------------------------------ 3. kernel switches, best tiling
    # (module flags of kernels/masked_attention.py; none changes a result)
    switches = [("_reverse_m", False, "plain")]
    for attr, value, case in switches:
        best = best_of(case, S_LARGE) or best_of(case, S_SMALL)
        if fatal or not best or elapsed() > end_switch:
            results["notes"].append(f"switch {attr}={value} ({case}) not measured (time or no result)")
            continue
        tiles = best[0]
        old = getattr(km, attr)
        setattr(km, attr, value)
        try:
            for S, inp in ((S_SMALL, inp_small), (S_LARGE, inp_large)):
                base = [r for r in results["rows"] if r["case"] == case and r["S"] == S and "ms" in r
                        and tuple(r["tiles"]) == tiles and not r.get("variant")]
                if inp is None or not base or fatal:
                    continue
                row = measure(case, S, inp, tiles, tag=f"{attr}={value}")
                if "ms" in row:
                    entry = {"switch": f"{attr}={value}", "case": case, "S": S, "tiles": list(tiles),
                             "ms_default": base[0]["ms"], "ms_switched": row["ms"],
                             "speedup": round(base[0]["ms"] / row["ms"], 3), "ratio_switched": row.get("ratio")}
                    results["switches"].append(entry)
                    emit(entry)
        finally:
            setattr(km, attr, old)
    save()
    del inp_small, inp_large

    # ------------------------------------------------------------------ 4. float64 check of the best tilings
    check_tiles = []
    for case in ("plain", "adaptive"):
        for t in best_of(case, S_LARGE) + best_of(case, S_SMALL):
            if t not in check_tiles:
                check_tiles.append(t)
                break
    if not fatal:
        Bc, Hc, Hkc, Sc = 2, 8, 2, (77 if smoke else 300)  # Sq not a multiple of BLOCK_M: a ragged last block
        g = torch.Generator(device="cpu").manual_seed(0)
        qc = torch.randn(Bc, Hc, Sc, D, generator=g).to(dtype)
        kc = torch.randn(Bc, Hkc, Sc, D, generator=g).to(dtype)
        vc = torch.randn(Bc, Hkc, Sc, D, generator=g).to(dtype)
        st = torch.tensor([[0, Sc // 8, Sc // 2], [0, Sc // 3, 3 * Sc // 4]], dtype=torch.int32)
        heads = (0, 3, 5, 6)
        rh = torch.zeros(Hc, dtype=torch.int8)
        rh[list(heads)] = 1
        for n_checked, tiles in enumerate(check_tiles):
            if n_checked and elapsed() > budget:
                results["notes"].append(f"time budget: float64 check of {list(tiles)} skipped")
                continue
            for rows in ("last", "all"):
                thr = 0.3
                rule = AttentionRule(heads, 2, thr, 0.0, rows)
                ref = reference.masked_attention_outputs(qc, kc, vc, scaling=scaling, causal=True, segment_starts=st,
                                                         adaptive=rule, compute_dtype=torch.float64)
                ref_lp = reference.masked_attention_outputs(qc, kc, vc, scaling=scaling, causal=True,
                                                            segment_starts=st, adaptive=rule, compute_dtype=dtype)
                entry = {"check": "vs float64 reference", "tiles": list(tiles), "rows": rows,
                         "shape": [Bc, Hc, Hkc, Sc, D]}
                def call():
                    res = km.masked_attention_fwd(
                        qc.to(dev), kc.to(dev), vc.to(dev), scaling=scaling, causal=True, key_mask=None,
                        full_mask=None, head_gate=None, segment_starts=st.to(dev), segment_scale=None,
                        rule_heads=rh.to(dev), rule_segment=2, threshold=thr, rule_scale=0.0,
                        last_row_only=rows == "last", return_segment_mass=True, return_head_stats=True,
                        return_rule_fired=True, tiles=tiles)
                    sync()
                    return [x.cpu() for x in res]

                try:
                    out, mass, stats, fired = call()
                    mass_r = ref["mass"][..., 2].double()
                    clear = (mass_r - thr).abs() > 1e-2  # decisions near the threshold may flip in bf16
                    clear_rows = clear.transpose(1, 2)[..., None]  # [B, Sq, Hq, 1]
                    err = ((out.double() - ref["out"].double()).abs() * clear_rows).max().item()
                    bound = 2 * (ref_lp["out"].double() - ref["out"].double()).abs().max().item() + 1e-2
                    fin = torch.isfinite(ref["stats"][..., 1])
                    entry.update(
                        max_abs_err_out=err, bound_out=bound,
                        max_abs_err_mass=(mass.double() - ref["mass"].double()).abs().max().item(),
                        max_abs_err_entropy=(stats[..., 0].double() - ref["stats"][..., 0].double()).abs().max().item(),
                        max_abs_err_max_logit=(stats[..., 1][fin].double()
                                               - ref["stats"][..., 1][fin].double()).abs().max().item(),
                        max_abs_err_sink=(stats[..., 2].double() - ref["stats"][..., 2].double()).abs().max().item(),
                        fired_total=int(ref["fired"].sum()),
                        fired_mismatch_clear=int(((fired != ref["fired"]) & clear).sum()),
                        finite=bool(torch.isfinite(out).all()),
                    )
                    entry["ok"] = bool(entry["finite"] and err <= bound and entry["max_abs_err_mass"] < 2e-2
                                       and entry["fired_mismatch_clear"] == 0 and entry["max_abs_err_sink"] < 2e-2)
                except Exception as e:  # noqa: BLE001
                    entry["error"] = err_text(e)
                    entry["trace"] = traceback.format_exc(limit=3)[-600:]
                    check_fatal(entry["error"])
                results["correctness"].append(entry)
                emit(entry)
                if fatal:
                    break

    # ------------------------------------------------------------------ summary per case
    for case in CASES:
        summ = {"case": case}
        for S in (S_SMALL, S_LARGE):
            rows = sorted((r for r in results["rows"] if r["case"] == case and r["S"] == S and "ms" in r
                           and not r.get("variant")), key=lambda r: r["ms"])
            if not rows:
                continue
            dflt = [r for r in rows if tuple(r["tiles"]) == default_tiles]
            summ[str(S)] = {
                "best_tiles": rows[0]["tiles"], "best_ms": rows[0]["ms"], "best_ratio": rows[0].get("ratio"),
                "best_tflops": rows[0]["tflops"],
                "default_tiles": list(default_tiles), "default_ms": dflt[0]["ms"] if dflt else None,
                "default_ratio": dflt[0].get("ratio") if dflt else None,
                "top5": [[r["tiles"], r["ms"], r.get("ratio")] for r in rows[:5]],
                "measured": len(rows),
            }
        results["summary"][case] = summ
        emit({"summary": summ})
    if fatal:
        results["notes"].append(f"stopped after a CUDA error: {fatal[0]}")
    save()
    emit({"done": True, "elapsed_s": round(elapsed(), 1), "notes": results["notes"]})
    # one compact line last: best tiling and ratio (sdpa_ms / ms) per case and S, the default's ratio
    emit({"best": {case: {S: [v["best_tiles"], v["best_ratio"], "default", v["default_ratio"]]
                          for S, v in summ.items() if S != "case"}
                   for case, summ in results["summary"].items()},
          "switches": [[e["switch"], e["case"], e["S"], e["speedup"]] for e in results["switches"]],
          "checks_ok": [e.get("ok") for e in results["correctness"]]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

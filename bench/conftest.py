"""pytest-benchmark set-up for the CPU benchmarks of avss_fast.

Run from the repository root (``bench/`` is not in the default testpaths)::

    python -m pytest bench/ --benchmark-only -p no:logging

* Every benchmark sets ``AVSS_FAST_BACKEND`` itself (``use_backend`` fixture); nothing
  relies on the default backend choice.
* ``TRITON_INTERPRET`` is never set here: on CPU the fused torch path is what users get,
  and the interpreter would only make the Triton kernels slow. (``tests/conftest.py``
  sets it, but pytest does not load that file when only ``bench/`` is collected.)
* ``AVSS_BENCH_THREADS=N`` pins torch's intra-op threads (default: torch's own choice, the
  number of cores). On a small machine shared with other jobs, ``1`` gives steadier
  numbers: a parallel region waits for its slowest thread, and a thread whose core is
  busy elsewhere costs a scheduler tick per op.
* Each benchmark records itself with :func:`record` under a ``group`` and a role; at the
  end of the session a table of the ratios per group is printed
  (reference / fused for the ops, scoring / plain forward for the scoring overhead), and
  written as JSON to ``$AVSS_BENCH_SUMMARY`` when that is set.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError(
        "bench/: unset TRITON_INTERPRET; the CPU benchmarks measure the fused torch path, not interpreted kernels"
    )

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("AVSS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["AVSS_BENCH_THREADS"]))

#: group -> role -> {"mean": s, "min": s, "median": s, "gbps": GB/s or None}
RESULTS: dict[str, dict[str, dict]] = {}

#: (numerator role, denominator role, label, target, "max"|"min") per kind of group.
RATIOS = {
    "ops": ("reference", "fused", "reference / fused (speed-up)", 8.0, "min"),
    "scoring": ("score_layers", "plain_forward", "score_layers / plain forward (overhead)", 1.15, "max"),
    "attention": ("adaptive", "sdpa", "adaptive masked_attention / plain SDPA (time)", 1.5, "max"),
    "attention-eager": ("eager", "adaptive", "eager materialised / adaptive (speed-up)", 3.0, "min"),
    "generate": ("adaptive", "plain", "generate with ADHH / plain generate (time; 1/x = tokens/s ratio)", 1.25, "max"),
    "pruning": ("pruned", "original", "pruned / original forward (time)", 0.8, "max"),
    "attention-eager-info": ("eager", "adaptive", "eager materialised / adaptive (speed-up)", None, "min"),
    "head-stats": ("head_scorer", "plain_forward", "HeadScorer forward / plain SDPA forward (time)", 1.3, "max"),
    "head-stats-info": ("head_scorer", "plain_forward", "HeadScorer forward / plain SDPA forward (time)", None, "max"),
    "attribution": ("loop", "batched", "one-head loop / batched attribute_heads (speed-up)", 4.0, "min"),
}

#: group -> role -> peak extra memory in MiB (measured in a fresh process, see bench/peak_memory.py)
MEMORY: dict[str, dict[str, float]] = {}

#: (numerator role, denominator role, target max ratio) per memory group prefix
MEMORY_RATIOS = {
    "attention-memory": ("adaptive", "sdpa", 1.10),
    "head-stats-memory": ("head_scorer", "output_attentions", 0.10),  # "far below" eager maps
}
MEMORY_RATIO = MEMORY_RATIOS["attention-memory"]


def record_memory(group: str, role: str, mib: float) -> None:
    MEMORY.setdefault(group, {})[role] = mib


@pytest.fixture
def use_backend(monkeypatch):
    """``use_backend("torch")``: force ``AVSS_FAST_BACKEND`` for this benchmark only."""

    def _set(name: str) -> None:
        monkeypatch.setenv("AVSS_FAST_BACKEND", name)

    return _set


def _stats(benchmark):
    s = benchmark.stats.stats
    return dict(mean=s.mean, min=s.min, median=s.median, rounds=s.rounds)


def attach_gbps(benchmark, nbytes: int) -> float:
    """Record the bytes read (the activation once) and GB/s = bytes / mean time (1e9 B/s)."""
    s = _stats(benchmark)
    gbps = nbytes / s["mean"] / 1e9
    benchmark.extra_info["bytes"] = int(nbytes)
    benchmark.extra_info["GB/s"] = round(gbps, 3)
    benchmark.extra_info["GB/s (min time)"] = round(nbytes / s["min"] / 1e9, 3)
    return gbps


def record(benchmark, group: str, role: str, *, kind: str = "ops", nbytes: int | None = None) -> None:
    """File this benchmark's timings under ``group``/``role`` (after it ran) and attach GB/s
    when ``nbytes`` is given; once both roles of a group ran, the ratio goes into
    ``extra_info`` too."""
    s = _stats(benchmark)
    if nbytes is not None:
        s["gbps"] = attach_gbps(benchmark, nbytes)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["backend"] = os.environ.get("AVSS_FAST_BACKEND")
    g = RESULTS.setdefault(group, {"kind": kind})
    g[role] = s
    num, den, label, _, _ = RATIOS[kind]
    if num in g and den in g:
        benchmark.extra_info["ratio (" + label + ", mean)"] = round(g[num]["mean"] / g[den]["mean"], 3)
        benchmark.extra_info["ratio (" + label + ", min)"] = round(g[num]["min"] / g[den]["min"], 3)


def record_times(group: str, role: str, times: list[float], *, kind: str = "ops") -> None:
    """File timings measured by hand (seconds per round) under ``group``/``role``."""
    ts = sorted(times)
    RESULTS.setdefault(group, {"kind": kind})[role] = dict(
        mean=sum(ts) / len(ts), min=ts[0], median=ts[len(ts) // 2], rounds=len(ts)
    )


def summary_rows() -> list[dict]:
    rows = []
    for group, g in RESULTS.items():
        kind = g["kind"]
        num, den, label, target, sense = RATIOS[kind]
        if num not in g or den not in g:
            continue
        r_mean = g[num]["mean"] / g[den]["mean"]
        r_min = g[num]["min"] / g[den]["min"]
        if target is None:  # reported beside a target that applies to another size
            ok, target_text = None, "none"
        else:
            ok = r_min >= target if sense == "min" else r_min <= target
            target_text = "%s %g" % (">=" if sense == "min" else "<=", target)
        row = dict(
            group=group, ratio=label, mean_ratio=round(r_mean, 3), min_ratio=round(r_min, 3),
            target=target_text, meets_target=ok,
            **{f"{num}_mean_ms": round(g[num]["mean"] * 1e3, 2), f"{den}_mean_ms": round(g[den]["mean"] * 1e3, 2)},
        )
        for role in (num, den):
            if g[role].get("gbps") is not None:
                row[f"{role}_GB/s"] = round(g[role]["gbps"], 3)
        for role, s in g.items():  # extra (diagnostic) roles, e.g. hooks-only scoring
            if role not in ("kind", num, den):
                row[f"{role}/{den} (mean)"] = round(s["mean"] / g[den]["mean"], 3)
                row[f"{role}/{den} (min)"] = round(s["min"] / g[den]["min"], 3)
        rows.append(row)
    return rows


def memory_rows() -> list[dict]:
    rows = []
    for group, g in MEMORY.items():
        num, den, target = next((v for k, v in MEMORY_RATIOS.items() if group.startswith(k)), MEMORY_RATIO)
        row = dict(group=group, **{f"{role}_MiB": round(v, 1) for role, v in g.items()})
        if num in g and den in g and g[den] > 0:
            row["ratio"] = round(g[num] / g[den], 3)
            row["ratio_of"] = f"{num}/{den}"
            row["target"] = f"<= {target:g}"
            row["meets_target"] = g[num] / g[den] <= target
        rows.append(row)
    return rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = summary_rows()
    mem = memory_rows()
    if not rows and not mem:
        return
    tr = terminalreporter
    tr.section("avss_fast benchmark ratios")
    tr.write_line(f"torch threads: {torch.get_num_threads()}  (ratios from one run; 'min' = fastest round, least disturbed)")
    for r in rows:
        extra = "  ".join(f"{k}={v}" for k, v in r.items() if "GB/s" in k or "/" in k and "(" in k)
        tr.write_line(
            f"{r['group']:<28} {r['ratio']}: mean {r['mean_ratio']:.2f}x  min {r['min_ratio']:.2f}x  "
            f"target {r['target']} -> {'-' if r['meets_target'] is None else 'OK' if r['meets_target'] else 'MISSED'}  {extra}"
        )
    if mem:
        tr.write_line("peak extra memory (fresh process per entry, MiB):")
        for r in mem:
            extra = "  ".join(f"{k}={v}" for k, v in r.items() if k.endswith("_MiB"))
            verdict = ""
            if "ratio" in r:
                verdict = f"  {r['ratio_of']} {r['ratio']:.2f}x target {r['target']} -> " + (
                    "OK" if r["meets_target"] else "MISSED")
            tr.write_line(f"{r['group']:<28} {extra}{verdict}")
    path = os.environ.get("AVSS_BENCH_SUMMARY")
    if path:
        with open(path, "w") as fh:
            json.dump(dict(threads=torch.get_num_threads(), rows=rows, memory=mem), fh, indent=2)
        tr.write_line(f"summary written to {path}")

"""``avss-fast prune``: score the layers, prune by each strategy, compare retention.

::

    avss-fast prune [--model PATH] [--ratio 0.25] [--metric avss|block_influence|
        angular_distance|reverse|random|all ...] [--rule lowest|cumulative] [--data FILE]
        [--eval FILE [--eval FILE ...]] [--no-save-model] [--out DIR]

Steps: ``score_layers`` on the calibration texts; for each strategy ``select_layers`` and
``prune_layers``; ``evaluate_retention`` of every pruned model against the original on
each evaluation set (the original is evaluated once); a side-by-side table on stdout;
in ``--out``: the pruned model of the first strategy (``pruned_model/``, with its
tokenizer; ``avss`` when ``--metric all``), ``prune.json`` (selections and every
retention number), ``prune.png`` (per-layer AVSS with the removed layers marked, and
retention by strategy) and ``report.json`` (the layer report).

Defaults: no ``--model`` runs the shipped demo language model; its default texts are the
held-out Shakespeare passages (``demo_texts("heldout")``), for other models the built-in
English corpus. Without ``--data`` every 4th default text calibrates (texts 0, 4, 8, ...);
without ``--eval`` the other three quarters are the evaluation set, so calibration and
evaluation never share a text. What is measured follows the model and the file (see
:func:`avss_fast.pruning.measure`): perplexity for causal LMs, embedding agreement for
encoders such as the bundled MiniLM, multiple-choice accuracy for a JSONL of
``{question, choices, answer}``, accuracy of a sequence classifier on ``{text, label}``.
With ``--rule cumulative`` the baselines drop as many layers as the first score metric's
cumulative selection.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

ALL_METRICS = ("avss", "block_influence", "angular_distance", "reverse", "random")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``prune`` subcommand to an ``argparse`` subparsers object; returns its parser
    (``func`` default: :func:`run`)."""
    p = subparsers.add_parser(
        "prune", help="prune the least important layers by AVSS (and baselines) and compare retention",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("--model", help="model directory or hub name (default: the shipped demo language model)")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of layers to prune, in (0, 1) (default 0.25)")
    p.add_argument("--metric", nargs="+", action="extend", choices=ALL_METRICS + ("all",), metavar="METRIC",
                   help="avss, block_influence, angular_distance, reverse, random or all (several allowed; "
                        "the first is the one saved; default all: every strategy side by side, avss saved)")
    p.add_argument("--rule", choices=("lowest", "cumulative"), default="lowest",
                   help="lowest: the round(ratio * L) lowest-scoring layers, at least 1; cumulative: the paper's "
                        "cumulative normalised score <= ratio (default lowest)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default 0)")
    p.add_argument("--data", help="calibration .txt/.jsonl (default: every 4th default text)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--eval", action="append", metavar="FILE",
                   help="evaluation .txt/.jsonl: text (perplexity / embeddings), {question, choices, answer} "
                        "or {text, label}; repeat for several (default: the held-out default texts)")
    p.add_argument("--out", default="avss_fast_prune", help="output directory (default: ./avss_fast_prune)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text, longer ones truncated (default 128)")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--sparsity-eps", type=float, default=1e-5, help="AVSS near-zero threshold |h| < eps (default 1e-5)")
    sp.add_argument("--sparsity-rel", type=float, default=None,
                    help="AVSS near-zero threshold relative to each token's rms, e.g. 0.01 (instead of --sparsity-eps)")
    p.add_argument("--layers-path", help="dotted path to the model's ModuleList of blocks, for unknown layouts")
    p.add_argument("--no-save-model", action="store_true", help="do not write the pruned model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, out_kind="dir")
    return p


# ------------------------------------------------------------------------------ inputs


def _metrics(args) -> list[str]:
    given = args.metric or ["all"]
    out: list[str] = []
    for m in given:
        for name in (ALL_METRICS if m == "all" else (m,)):
            if name not in out:
                out.append(name)
    return out


def _check_args(args) -> None:
    from .cli import CLIError

    if args.batch_size < 1 or args.max_length < 1:
        raise CLIError("--batch-size and --max-length must be >= 1")
    if not (0.0 < args.ratio < 1.0):
        raise CLIError(f"--ratio must be in (0, 1), got {args.ratio}")
    for flag, path in [("--data", args.data)] + [("--eval", e) for e in args.eval or []]:
        if path and not Path(path).is_file():
            raise CLIError(f"{flag} {path!r}: no such file")
    _check_eval_files(args.eval or [])


def _load(path: str, device: str, dtype: str):
    """``cli.load_model``, a sequence classifier with its classification head."""
    from .cli import load_model

    return load_model(path, device=device, dtype=dtype, classifier=True)


def _default_texts(model_path: str) -> tuple[list[str], str]:
    from . import demo_model_path, demo_texts
    from .data import default_corpus

    if Path(model_path).resolve() == Path(demo_model_path()).resolve():
        return demo_texts("heldout"), "demo held-out passages"
    return default_corpus(), "built-in English corpus"


def _data_sources(args, model_path: str) -> tuple[Any, str, list[tuple[Any, str]]]:
    """(calibration data, its description, [(evaluation data, name)])."""
    texts, what = _default_texts(model_path)
    if args.data:
        calib, calib_name = args.data, args.data
    else:
        calib, calib_name = texts[0::4], f"{what}, every 4th ({len(texts[0::4])} texts)"
    if args.eval:
        evals = [(e, Path(e).name) for e in args.eval]
    else:
        rest = [t for i, t in enumerate(texts) if i % 4]
        evals = [(rest, "heldout")]
        calib_name += f"; evaluation 'heldout': the other {len(rest)} texts"
    return calib, calib_name, evals


def _check_eval_files(paths: list[str]) -> None:
    """Read every multiple-choice --eval file before the scoring starts, so that a bad record
    stops the run at once (the evaluation's own checks, naming the file and line).""" 
    from .pruning import _check_choice_record, _first_record, _load_records

    for e in paths:
        first = _first_record(e)
        if first is not None and "question" in first and "choices" in first:
            for where, rec in _load_records(e):
                _check_choice_record(rec, where)


# ------------------------------------------------------------------------------ strategies


def _selections(report, metrics: list[str], args) -> dict[str, list[int]]:
    """Layers removed by each strategy. Under ``--rule cumulative`` the baselines remove as
    many layers as the first score metric's selection (none at all when it selects none)."""
    from .pruning import SCORE_METRICS, select_layers

    sel: dict[str, list[int]] = {}
    n = len(report)
    kw = dict(ratio=args.ratio, seed=args.seed)
    for m in metrics:
        if args.rule == "cumulative" and m not in SCORE_METRICS:
            ref = next((x for x in metrics if x in SCORE_METRICS), "avss")
            k = len(sel[ref]) if ref in sel else len(select_layers(report, metric=ref, rule="cumulative", **kw))
            sel[m] = [] if k == 0 else select_layers(n, metric=m, ratio=k / n, seed=args.seed)
        else:
            sel[m] = select_layers(report, metric=m, rule=args.rule, **kw)
    return sel


def _evaluate(model, tokenizer, selections, evals, args) -> tuple[list, dict, Any]:
    """Base measurements, {metric: [Retention per eval set]}, and the first strategy's model."""
    from .pruning import measure, prune_layers

    kw = dict(batch_size=args.batch_size, max_length=args.max_length, field=args.field, progress=not args.quiet)
    bases = [measure(model, data, tokenizer, **kw) for data, _ in evals]
    results, keep = {}, None
    for i, (metric, layers) in enumerate(selections.items()):
        pruned = prune_layers(model, layers, layers_path=args.layers_path)
        results[metric] = [_retention(base, pruned, data, tokenizer, kw) for base, (data, _) in zip(bases, evals)]
        if i == 0:
            keep = pruned
        else:
            del pruned
    return bases, results, keep


def _retention(base, pruned, data, tokenizer, kw):
    from .pruning import evaluate_retention

    return evaluate_retention(base, pruned, data, tokenizer, task=base.task, **kw)


# ------------------------------------------------------------------------------ output


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def _table(selections, results, bases, evals, n_layers: int) -> str:
    header = ["strategy", "removed", "layers"]
    for (_, name), base in zip(evals, bases):
        label = {"perplexity": "ppl", "embedding": "cos"}.get(base.task, "acc")
        header += [f"{label} [{name}]", "retention"]
        if base.task == "embedding":
            header.append("spearman")
    rows = [header]
    orig = ["original", "-", str(n_layers)]
    for base in bases:
        orig += [_fmt(1.0 if base.task == "embedding" else base.value), "1"]
        if base.task == "embedding":
            orig.append("1")
    rows.append(orig)
    for metric, layers in selections.items():
        row = [metric, ",".join(map(str, layers)) or "(none)", str(n_layers - len(layers))]
        for r in results[metric]:
            row += [_fmt(r.pruned), _fmt(r.retention, 3)]
            if r.task == "embedding":
                row.append(_fmt(r.details.get("spearman"), 3))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_pruning(summary: dict, path) -> Path:
    """Two panels: the layer scores (AVSS) with the first strategy's removed layers
    highlighted, and the retention of every strategy on every evaluation set (bars; the
    dashed line is 1 = nothing lost, the dotted one 0.9)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .report import fit_suptitle

    layers = summary["report"]["layers"]
    chosen = set(summary["strategies"][summary["saved_strategy"]]["removed"])
    strategies = list(summary["strategies"])
    evals = summary["evaluations"]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(7.0, 0.3 * len(layers) + 4), 7.5))
    try:
        xs = [r["layer"] for r in layers]
        ys = [r["avss"] if r["avss"] is not None else math.nan for r in layers]
        ax1.bar(xs, ys, color=["#DD5555" if x in chosen else "#4C72B0" for x in xs])
        pos = [v for v in ys if math.isfinite(v) and v > 0]
        if len(pos) >= 2 and max(pos) / min(pos) > 1e3:
            ax1.set_yscale("log")
        ax1.set_title(f"AVSS per layer; red: removed by {summary['saved_strategy']}", fontsize=10, loc="left")
        ax1.set_xlabel("layer")
        ax1.set_xticks(xs)
        width = 0.8 / max(1, len(evals))
        for j, ev in enumerate(evals):
            vals = [summary["strategies"][s]["retention"][j]["retention"] for s in strategies]
            vals = [v if v is not None else math.nan for v in vals]
            ax2.bar([i + (j - (len(evals) - 1) / 2) * width for i in range(len(strategies))], vals,
                    width=width, label=f"{ev['name']} ({ev['metric']})")
        ax2.axhline(1.0, ls="--", color="0.4", lw=1)
        ax2.axhline(0.9, ls=":", color="0.4", lw=1)
        for container in ax2.containers:
            ax2.bar_label(container, fmt="%.3f", fontsize=7)
        ax2.set_xticks(range(len(strategies)))
        ax2.set_xticklabels(strategies, rotation=15, ha="right", fontsize=9)
        ax2.set_ylabel("retention (pruned / original)")
        ax2.set_title(f"Retention after removing {summary['ratio']:.0%} of layers", fontsize=10, loc="left")
        ax2.legend(fontsize=8, loc="lower right")
        fit_suptitle(fig, "{model}", str(summary.get("model")), fontsize=11)
        fig.tight_layout()
        fig.savefig(p, dpi=100)
    finally:
        plt.close(fig)
    return p


def _summary(args, model_path, report, selections, bases, results, evals, calib_name, metrics) -> dict:
    return {
        "format": "avss_fast.PruneRun/1",
        "model": model_path,
        "layers_path": report.layers_path,
        "num_layers": len(report),
        "ratio": args.ratio,
        "rule": args.rule,
        "seed": args.seed,
        "calibration": calib_name,
        "evaluations": [
            {"name": name, "task": b.task, "metric": b.metric if b.task != "embedding" else "mean_cosine",
             "original": None if b.task == "embedding" else b.value, "examples": b.examples}
            for (_, name), b in zip(evals, bases)
        ],
        "strategies": {
            m: {"removed": selections[m], "kept": len(report) - len(selections[m]),
                "retention": [r.to_dict() for r in results[m]]}
            for m in metrics
        },
        "saved_strategy": metrics[0],
        "report": report.to_dict(),
    }


def run(args) -> int:
    """The ``prune`` command (``args`` from the parser :func:`register` builds)."""
    from . import demo_model_path
    from .report import write_json
    from .scoring import score_layers

    _check_args(args)
    metrics = _metrics(args)
    model_path = args.model or demo_model_path()
    model, tokenizer = _load(model_path, args.device, args.dtype)
    calib, calib_name, evals = _data_sources(args, model_path)
    report = score_layers(
        model, calib, tokenizer, batch_size=args.batch_size, max_length=args.max_length, field=args.field,
        layers_path=args.layers_path, sparsity_eps=args.sparsity_eps, sparsity_rel=args.sparsity_rel,
        progress=not args.quiet, model_name=model_path,
    )
    selections = _selections(report, metrics, args)
    bases, results, first = _evaluate(model, tokenizer, selections, evals, args)

    out = Path(args.out)
    summary = _summary(args, model_path, report, selections, bases, results, evals, calib_name, metrics)
    json_path = write_json(summary, out / "prune.json")
    report.to_json(out / "report.json")
    png_path = plot_pruning(summary, out / "prune.png")
    saved = None
    if not args.no_save_model:
        saved = out / "pruned_model"
        first.save_pretrained(saved)
        tokenizer.save_pretrained(saved)

    print(f"model: {model_path}")
    print(f"layers: {len(report)} at {report.layers_path}   calibration: {calib_name}")
    print(f"ratio {args.ratio:g}, rule {args.rule}: retention = how much of the original's quality the pruned "
          f"model keeps (1 = all): perplexity ppl_original / ppl_pruned, accuracy pruned / original, "
          f"embeddings mean cosine to the original's")
    print()
    print(_table(selections, results, bases, evals, len(report)))
    print()
    if "avss" in selections and all(r["near_zero"] == 0 for r in report.layers):
        print("note: no activation fell below the sparsity threshold in any layer, so AVSS ranks layers by "
              "variance alone (avss_guard in report.json); --sparsity-rel 0.01 gives a scale-free sparsity.")
    elif "avss" in selections and min(r["near_zero"] for r in report.layers) < 30:
        few = min(r["near_zero"] for r in report.layers)
        held = "no value" if few == 0 else f"as few as {few} values"
        print(f"note: some layers have {held} below the sparsity threshold, so their sparsity (and AVSS) rests "
              "on a handful of values (or on the 1/elements guard); compare with the baselines above, or try "
              "--sparsity-rel 0.01.")
    empty = [m for m in metrics if not selections[m]]
    if empty:
        print(f"note: {', '.join(empty)} selected no layer at ratio {args.ratio:g} (rule {args.rule}): "
              "nothing was removed there; raise --ratio")
    if saved is not None:
        what = "unpruned (nothing selected)" if not selections[metrics[0]] else f"{metrics[0]}-pruned"
        print(f"saved the {what} model ({len(report) - len(selections[metrics[0]])} layers) to {saved}")
    print(f"wrote {json_path}, {png_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone ``avss-fast`` parser holding only ``prune`` (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="avss-fast")
    register(parser.add_subparsers(dest="command", required=True))
    return parser

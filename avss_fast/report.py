"""Render layer-scoring reports: ranked text tables, figures, CSV and strict JSON.

Everything here works on plain dicts, namely the output of ``LayerReport.to_dict()``
(format ``"avss_fast.LayerReport/1"``), so a report can be rendered long after the model
that produced it is gone, and without torch or transformers installed. matplotlib is
imported lazily, inside :func:`plot_layer_report`, with the non-interactive Agg backend.

A report looks like::

    {"format": "avss_fast.LayerReport/1", "model": "...", "layers_path": "model.layers",
     "num_layers": 6, "sparsity_eps": 1e-05, "sparsity_rel": None, "avss_guard": "...",
     "layers": [{"layer": 0, "module": "model.layers.0", "pooled_variance": ..., ...}, ...]}

``block_influence`` / ``angular_distance`` are ``None`` when similarity was not collected,
and any float may be NaN.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Any, Iterable

__all__ = [
    "METRICS",
    "COUNTS",
    "format_table",
    "plot_layer_report",
    "write_csv",
    "write_json",
    "read_json",
]

#: Per-layer float metrics, in report order.
METRICS: tuple[str, ...] = (
    "pooled_variance",
    "token_variance",
    "variance",
    "sparsity",
    "avss",
    "navss",
    "cavss",
    "block_influence",
    "angular_distance",
)

#: Per-layer integer counters, in report order.
COUNTS: tuple[str, ...] = ("tokens", "samples", "elements", "near_zero", "nonfinite")

#: Fraction of layers (lowest AVSS) highlighted as prune candidates in the figure.
PRUNE_FRACTION = 0.25

# (header, key, kind) for the text table.
_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("rank", "", "rank"),
    ("layer", "layer", "int"),
    ("avss", "avss", "float"),
    ("navss", "navss", "float"),
    ("cavss", "cavss", "float"),
    ("pooled_var", "pooled_variance", "float"),
    ("sparsity", "sparsity", "float"),
    ("block_infl", "block_influence", "float"),
    ("ang_dist", "angular_distance", "float"),
    ("tokens", "tokens", "int"),
)


# --------------------------------------------------------------------------- helpers


def _as_float(x: Any) -> float:
    """``x`` as a float; ``None`` and unparseable values become NaN."""
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _is_missing(x: Any) -> bool:
    """True for ``None`` and NaN (infinities are values, and are shown)."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt_float(x: Any) -> str:
    """Compact number: ``0.4512`` in [0.01, 1000), ``1.23e-04`` otherwise, ``-`` if missing."""
    if _is_missing(x):
        return "-"
    v = _as_float(x)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if 1e-2 <= abs(v) < 1e3:
        return f"{v:.4f}"
    return f"{v:.2e}"


def _fmt_int(x: Any) -> str:
    """Integer cell, ``-`` when missing."""
    if _is_missing(x):
        return "-"
    try:
        return str(int(x))
    except (TypeError, ValueError, OverflowError):
        return "-"


def _layers(report: dict) -> list[dict]:
    """The report's per-layer rows (a list of dicts), with a clear error if absent."""
    if not isinstance(report, dict) or "layers" not in report:
        raise ValueError("report must be a dict with a 'layers' list (LayerReport.to_dict())")
    layers = report["layers"]
    if not isinstance(layers, list):
        raise ValueError("report['layers'] must be a list of per-layer dicts")
    return layers


def _layer_index(row: dict, position: int) -> int:
    """A row's layer index, falling back to its position in the list."""
    v = row.get("layer")
    try:
        return int(v)
    except (TypeError, ValueError):
        return position


def _sorted_rows(layers: list[dict], key: str, ascending: bool) -> list[dict]:
    """Rows ordered by ``key``; missing (null/NaN) values always go last, ties by layer."""
    indexed = list(enumerate(layers))

    def k(item):
        pos, row = item
        v = _as_float(row.get(key))
        missing = math.isnan(v)
        val = 0.0 if missing else (v if ascending else -v)
        return (missing, val, _layer_index(row, pos))

    return [row for _, row in sorted(indexed, key=k)]


def fit_suptitle(fig, template: str, model: str, *, fontsize: float = 12) -> None:
    """``fig.suptitle(template.format(model=name))`` with ``name`` the model name shortened
    (:func:`_short_model_name`, then cut from the left behind ``...``) until the drawn
    title fits the figure's width."""
    renderer = fig.canvas.get_renderer()
    limit = 0.98 * fig.bbox.width
    width = len(model)
    while True:
        name = _short_model_name(model, width)
        if len(name) > width:
            name = "..." + name[-max(1, width - 3):]
        title = fig.suptitle(template.format(model=name), fontsize=fontsize)
        if title.get_window_extent(renderer).width <= limit or width <= 8:
            return
        width = max(8, min(width, len(name)) - 4)


def _short_model_name(name: str, width: int = 60) -> str:
    """A model name for a figure title: a hub name (``org/model``) as it is; a longer local
    path by its last two components (the model's folder and the one above, which usually
    names it), then as many more as fit in ``width``, behind ``.../``."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if len(name) <= width or len(parts) <= 2:
        return name
    out = "/".join(parts[-2:])
    for part in reversed(parts[:-2]):
        if len(out) + len(part) + 5 > width:
            break
        out = f"{part}/{out}"
    return f".../{out}"


def layers_for_ratio(num_layers: int, ratio: float) -> int:
    """How many of ``num_layers`` layers a pruning ratio selects: ``ratio * num_layers``
    rounded to the nearest integer (halves up), at least 1."""
    return max(1, int(ratio * num_layers + 0.5))


def _prune_candidates(report: dict, fraction: float = PRUNE_FRACTION) -> set[int]:
    """Layer indices in the lowest ``fraction`` of the AVSS ranking.

    Uses ``report["ranking"]`` when present (a list of layer indices, or of dicts with a
    ``"layer"`` key, least important first); otherwise ranks layers by ascending finite
    AVSS. At least one layer is chosen when any is rankable.
    """
    layers = _layers(report)
    order: list[int] = []
    ranking = report.get("ranking")
    if isinstance(ranking, dict):  # LayerReport.to_dict(): {"avss": [...], "block_influence": [...]}
        ranking = ranking.get("avss")
    if isinstance(ranking, (list, tuple)) and ranking:
        for item in ranking:
            if isinstance(item, dict):
                item = item.get("layer")
            try:
                order.append(int(item))
            except (TypeError, ValueError):
                order = []
                break
    if not order:
        rows = [
            (pos, r) for pos, r in enumerate(layers) if math.isfinite(_as_float(r.get("avss")))
        ]
        rows.sort(key=lambda pr: (_as_float(pr[1].get("avss")), _layer_index(pr[1], pr[0])))
        order = [_layer_index(r, pos) for pos, r in rows]
    if not order:
        return set()
    return set(order[: layers_for_ratio(len(layers), fraction)])


def _mark_missing(ax, xs: list[int], values: list[float]) -> None:
    """Write a grey "n/a" at the bottom of ``ax`` above each x whose value is not finite."""
    import matplotlib.transforms as mtransforms

    trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for x, v in zip(xs, values):
        if not math.isfinite(v):
            ax.text(x, 0.03, "n/a", transform=trans, ha="center", va="bottom",
                    fontsize=8, color="0.45")


def _use_log(values: list[float], span: float = 1e3) -> bool:
    """Log scale for a positive series whose largest value is more than ``span`` times its
    smallest (bars use 100: a bar under 1% of the axis is a pixel or two, invisible)."""
    pos = [v for v in values if math.isfinite(v) and v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) > span


def _total_tokens(report: dict) -> int | None:
    """Token count for titles: top-level ``tokens`` if present, else the per-layer maximum."""
    for key in ("tokens", "total_tokens"):
        v = report.get(key)
        if isinstance(v, (int, float)) and not _is_missing(v):
            return int(v)
    vals = [r.get("tokens") for r in _layers(report)]
    vals = [int(v) for v in vals if isinstance(v, (int, float)) and not _is_missing(v)]
    return max(vals) if vals else None


def _to_strict_json(obj: Any) -> Any:
    """Recursively replace NaN/inf floats with ``None`` (tuples become lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_strict_json(v) for v in obj]
    # numpy scalars and the like: convert through float/int when possible
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            return _to_strict_json(obj.item())
        except (TypeError, ValueError):
            pass
    return obj


def _prepare(path) -> pathlib.Path:
    """``path`` as a Path, with its parent directories created."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------- table


def format_table(
    report: dict,
    *,
    sort_by: str = "avss",
    ascending: bool = True,
    max_rows: int | None = None,
) -> str:
    """A ranked, column-aligned plain-text table of a report's layers.

    Columns: rank, layer, avss, navss, cavss, pooled variance, sparsity, block influence,
    angular distance, tokens. Rows are ordered by ``sort_by`` (any name in :data:`METRICS`),
    ascending by default, so rank 1 is the lowest AVSS, i.e. the least important layer.
    Layers whose sort value is null/NaN are listed last. Numbers use compact notation
    (``0.4512``, ``1.23e-04``); null and NaN print as ``-``. ``max_rows`` keeps only the
    first rows of the ranking (``None``: all).

    Raises:
        ValueError: ``sort_by`` is not one of :data:`METRICS`, or ``max_rows`` is negative.
    """
    if sort_by not in METRICS:
        raise ValueError(f"unknown sort_by {sort_by!r}; valid metrics: {', '.join(METRICS)}")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
    layers = _layers(report)
    rows = _sorted_rows(layers, sort_by, ascending)
    if max_rows is not None:
        rows = rows[:max_rows]

    header = [h for h, _, _ in _TABLE_COLUMNS]
    body: list[list[str]] = []
    for rank, row in enumerate(rows, 1):
        cells = []
        for _, key, kind in _TABLE_COLUMNS:
            if kind == "rank":
                cells.append(str(rank))
            elif kind == "int":
                cells.append(_fmt_int(row.get(key)))
            else:
                cells.append(_fmt_float(row.get(key)))
        body.append(cells)

    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    # rank/layer left-aligned, numbers right-aligned
    def line(cells: Iterable[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(c.ljust(w) if i < 2 else c.rjust(w))
        return "  ".join(out).rstrip()

    direction = "ascending" if ascending else "descending"
    lines = [
        f"# {report.get('model') or '(unnamed model)'}: {len(layers)} layers, "
        f"sorted by {sort_by} ({direction})",
        line(header),
        line("-" * w for w in widths),
    ]
    lines.extend(line(cells) for cells in body)
    return "\n".join(lines)


# --------------------------------------------------------------------------- figure


def plot_layer_report(report: dict, path) -> pathlib.Path:
    """Save a 4-panel figure of a report and return its path.

    Panels (stacked, shared x-axis = layer index):

    1. AVSS as bars; the lowest 25% of the AVSS ranking are drawn in another colour and
       labelled "lowest 25% (prune candidates)".
    2. Pooled variance.
    3. Sparsity; when every layer's sparsity is 0, a note "sparsity is 0 at eps=..." says so.
    4. Block Influence and angular distance as two lines; "not collected" when both null.

    The format follows the suffix of ``path`` (PNG by default when it has none). Parent
    directories are created; the Agg backend is used and the figure is closed afterwards.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = _layers(report)
    p = pathlib.Path(path)
    if not p.suffix:
        p = p.with_suffix(".png")
    p = _prepare(p)

    xs = [_layer_index(r, i) for i, r in enumerate(layers)]

    def series(key: str) -> list[float]:
        return [_as_float(r.get(key)) for r in layers]

    avss = series("avss")
    pooled = series("pooled_variance")
    sparsity = series("sparsity")
    bi = series("block_influence")
    ad = series("angular_distance")
    candidates = _prune_candidates(report)

    n = len(layers)
    width = min(16.0, max(7.0, 0.28 * n + 4.0))
    fig, axes = plt.subplots(4, 1, figsize=(width, 10.0), sharex=True)
    try:
        ax_avss, ax_var, ax_sp, ax_bi = axes

        legend_kw = dict(
            loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8,
            frameon=False, borderaxespad=0.2, handlelength=1.6,
        )

        # 1. AVSS bars, prune candidates highlighted
        base_c, hi_c = "#4C72B0", "#DD5555"
        log_avss = _use_log(avss, span=1e2)
        bar_h = [v if math.isfinite(v) and (v > 0 or not log_avss) else math.nan for v in avss]
        colours = [hi_c if x in candidates else base_c for x in xs]
        ax_avss.bar(xs, bar_h, color=colours, width=0.8)
        from matplotlib.patches import Patch

        handles = [Patch(color=base_c, label="AVSS")]
        if candidates:
            handles.append(Patch(color=hi_c, label="lowest 25% (prune candidates)"))
        ax_avss.legend(handles=handles, **legend_kw)
        title = "AVSS (variance / sparsity)"
        if log_avss:
            ax_avss.set_yscale("log")
            title = "AVSS (variance / sparsity, log scale)"
        ax_avss.set_ylabel("AVSS")
        ax_avss.set_title(title, fontsize=10, loc="left")
        if not any(math.isfinite(v) for v in avss):
            ax_avss.set_ylim(0, 1)

        # 2. pooled variance
        ax_var.plot(xs, pooled, marker="o", ms=3, color="#55A868")
        title = "Pooled variance"
        if _use_log(pooled):
            ax_var.set_yscale("log")
            title += " (log scale)"
        ax_var.set_ylabel("pooled variance")
        ax_var.set_title(title, fontsize=10, loc="left")

        # 3. sparsity
        ax_sp.plot(xs, sparsity, marker="o", ms=3, color="#8172B2")
        ax_sp.set_ylabel("sparsity")
        ax_sp.set_title("Sparsity (fraction of near-zero activations)", fontsize=10, loc="left")
        finite_sp = [v for v in sparsity if math.isfinite(v)]
        if finite_sp and all(v == 0 for v in finite_sp):
            eps = report.get("sparsity_eps")
            rel = report.get("sparsity_rel")
            note = f"sparsity is 0 at eps={eps:g}" if isinstance(eps, (int, float)) else (
                f"sparsity is 0 at eps={eps}"
            )
            if rel is not None:
                note += f" (rel={rel})"
            ax_sp.set_ylim(-0.05, 1.0)
            ax_sp.text(
                0.5, 0.6, note, transform=ax_sp.transAxes, ha="center", va="center",
                fontsize=10, color="0.3",
                bbox=dict(boxstyle="round", fc="white", ec="0.7"),
            )
        elif finite_sp:
            ax_sp.set_ylim(0, min(1.05, max(finite_sp) * 1.2) or 1.0)

        # non-finite values: a small "n/a" at the foot of the panel
        for ax, vals in ((ax_avss, avss), (ax_var, pooled), (ax_sp, sparsity)):
            _mark_missing(ax, xs, vals)

        # 4. block influence + angular distance
        have_bi = any(math.isfinite(v) for v in bi)
        have_ad = any(math.isfinite(v) for v in ad)
        ax_bi.set_title("Block Influence / angular distance", fontsize=10, loc="left")
        if have_bi or have_ad:
            if have_bi:
                ax_bi.plot(xs, bi, marker="o", ms=3, color="#C44E52", label="Block Influence")
            if have_ad:
                ax_bi.plot(
                    xs, ad, marker="s", ms=3, ls="--", color="#DD8452", label="angular distance"
                )
            ax_bi.legend(**legend_kw)
        else:
            ax_bi.set_ylim(0, 1)
            ax_bi.set_yticks([])
            ax_bi.text(
                0.5, 0.5, "not collected", transform=ax_bi.transAxes,
                ha="center", va="center", fontsize=11, color="0.4",
            )
        ax_bi.set_ylabel("BI / angle")
        ax_bi.set_xlabel("layer index")

        for ax in axes:
            ax.grid(True, axis="y", alpha=0.3)
        if xs:
            step = max(1, math.ceil(n / 32))
            ax_bi.set_xticks(xs[::step])
            ax_bi.set_xlim(min(xs) - 0.6, max(xs) + 0.6)

        model = report.get("model") or "(unnamed model)"
        tokens = _total_tokens(report)
        tok = f"{tokens:,} tokens" if tokens is not None else "tokens: unknown"
        fit_suptitle(fig, f"Layer report: {{model}}  ({n} layers, {tok})", model)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(p, dpi=100)
    finally:
        plt.close(fig)
    return p


# --------------------------------------------------------------------------- files


def write_csv(report: dict, path) -> pathlib.Path:
    """Write one row per layer and return the path.

    Header: ``layer``, ``module``, then :data:`METRICS`, then :data:`COUNTS`, then any
    further per-layer keys (in first-seen order). Null values are written as empty cells;
    NaN as ``nan`` (which ``float()`` reads back). Parent directories are created.
    """
    layers = _layers(report)
    fields = ["layer", "module", *METRICS, *COUNTS]
    for row in layers:
        for k in row:
            if k not in fields:
                fields.append(k)
    p = _prepare(path)
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for row in layers:
            cells = []
            for k in fields:
                v = row.get(k)
                if v is None:
                    cells.append("")
                elif isinstance(v, float):
                    cells.append(repr(v))
                elif isinstance(v, (dict, list)):
                    cells.append(json.dumps(_to_strict_json(v)))
                else:
                    cells.append(v)
            w.writerow(cells)
    return p


def write_json(obj: dict, path) -> pathlib.Path:
    """Write ``obj`` as strict, pretty JSON (indent 2) and return the path.

    NaN and +/-inf floats become ``null`` (at any depth), so the file is valid JSON that any
    strict parser accepts. Parent directories are created.
    """
    p = _prepare(path)
    text = json.dumps(_to_strict_json(obj), indent=2, allow_nan=False)
    p.write_text(text + "\n", encoding="utf-8")
    return p


def read_json(path) -> dict:
    """Read a JSON file (e.g. one written by :func:`write_json`) into a dict."""
    with pathlib.Path(path).open("r", encoding="utf-8") as f:
        return json.load(f)


def plot_head_heatmap(scores, path, *, title: str = "head scores", label: str = "score") -> pathlib.Path:
    """Save a layer x head heatmap of ``scores`` ([L][H] nested lists or a 2-D tensor):
    rows are layers (0 at the top), columns query heads; a diverging colour map centred on
    0 when the scores take both signs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [[_as_float(x) for x in row] for row in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    if not rows or not rows[0]:
        raise ValueError("plot_head_heatmap: no scores to plot")
    L, H = len(rows), len(rows[0])
    p = pathlib.Path(path)
    p = _prepare(p if p.suffix else p.with_suffix(".png"))
    finite = [x for row in rows for x in row if math.isfinite(x)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    kw = {"cmap": "viridis"}
    if lo < 0 < hi:
        m = max(-lo, hi)
        kw = {"cmap": "RdBu_r", "vmin": -m, "vmax": m}
    fig, ax = plt.subplots(figsize=(min(16.0, 2.0 + 0.45 * H), min(14.0, 1.5 + 0.4 * L)))
    im = ax.imshow(rows, aspect="auto", interpolation="nearest", **kw)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p

"""EAVSS: which layers' activation variance and sparsity change when the model hallucinates.

:func:`score_hallucination` runs the model on two labelled sets of (prompt, answer) texts,
*truthful* and *hallucinated* answers, and keeps the per-layer statistics of the block
outputs over **answer tokens only**: the model reads the whole ``prompt + answer`` (it
attends to the prompt as usual), but prompt tokens and padding are left out of every
statistic (:meth:`LayerScorer.token_mask`).

The EAVSS paper's exact formulas are not public. **The definitions below are this
project's.** For layer ``l`` and set ``s`` in {T (truthful), H (hallucinated)}, with
``h[b, t, :]`` the block output at answer token ``t`` of answer ``b`` (D hidden units):

* variance (the AVSS paper's pooled variance, over answer tokens):
  ``V_s = mean_b Var_d( mean_{t in answer b} h[b, t, d] )`` (unbiased over d);
* sparsity: ``S_s = #{|h| < eps} / N_s`` over the ``N_s`` answer-token values of the set
  (``eps = sparsity_eps``, or ``|h| < sparsity_rel * rms(h[b, t, :])`` when
  ``sparsity_rel`` is given);
* ``AVSS_s = V_s / max(S_s, 1 / N_s)`` (exactly :class:`LayerReport`'s AVSS of that set);
* ``hsav = V_H / V_T`` (hallucination/truth variance ratio);
* ``hss = max(S_H, 1/N) / max(S_T, 1/N)`` with ``N = min(N_H, N_T)`` (hallucination/truth
  sparsity ratio). The guard is AVSS's: a sparsity of 0 (common at ``eps = 1e-5`` on
  residual streams) is replaced by ``1/N``, the smallest non-zero sparsity the data could
  show. One common ``N`` for both sets, so that two sets without near-zero values give
  ``hss = 1`` (no observed change) instead of the ratio of their sizes; nothing is ever inf
  or NaN while both sets have values;
* ``eavss = hsav / hss``: the relative change of variance-over-sparsity when the model
  produces hallucinated rather than truthful text (1 = no change);
* ``neavss = eavss / sum_k eavss_k`` (over layers with a finite eavss);
* ``log_eavss = ln(eavss)`` (0 = no change; its sign says the direction).

**Ranking.** ``ranking()`` lists layers from most to least hallucination-prone by
*descending* ``eavss``: a layer ranks high when, on hallucinated answers, its activations
spread more (higher variance) and/or are denser (lower sparsity) than on truthful answers
to the same prompts. This follows AVSS, where a high variance-to-sparsity ratio marks a
layer that is doing work: a high EAVSS marks a layer that does *more* of that work when
the model goes wrong, the layers one would inspect or intervene on first. ``neavss`` (a
share of the total) orders layers the same way. For a direction-free ranking (any change,
up or down), use ``ranking("log_eavss", absolute=True)``.

Caveats: the pooled variance is taken over each answer's token mean, so it shrinks as
answers get longer; compare sets whose answers have similar lengths (the shipped demo
data does), or look at ``token_variance_*`` (mean over tokens of Var_d), which does not
depend on length. Hidden states are those *at* answer-token positions (the states that
read each answer token), not the states one position earlier that predict them.

The prompt and the answer are concatenated with no separator (``prompt + answer``): put
any space or newline at the end of the prompt or the start of the answer. With a fast
tokenizer, answer tokens are the tokens whose character span ends inside the answer (a
token straddling the boundary counts as an answer token; special tokens do not);
otherwise prompt (with special tokens) and answer (without) are tokenised separately and
joined. Sequences longer than ``max_length`` lose prompt tokens from the left; an answer
longer than ``max_length`` keeps its first ``max_length`` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from .stats import Moments

__all__ = [
    "HallucinationReport",
    "score_hallucination",
    "load_hallucination_jsonl",
    "demo_hallucination_path",
]

REPORT_FORMAT = "avss_fast.HallucinationReport/1"
FIELDS = ("prompt", "truthful", "hallucinated")
DEFINITIONS = {
    "note": "these definitions are avss_fast's; the EAVSS paper's exact formulas are not public",
    "variance": "V_s = mean over answers b of Var_d(mean over answer tokens t of h[b, t, d]) (unbiased over d)",
    "sparsity": "S_s = #{|h| < eps} / N_s over the answer-token values of set s",
    "avss": "AVSS_s = V_s / max(S_s, 1/N_s)",
    "hsav": "V_hallucinated / V_truthful",
    "hss": "max(S_hallucinated, 1/N) / max(S_truthful, 1/N), N = min(N_hallucinated, N_truthful)",
    "eavss": "hsav / hss",
    "neavss": "eavss / sum over layers of eavss",
    "log_eavss": "ln(eavss)",
    "ranking": "descending eavss: most hallucination-prone layer first",
}
HSS_GUARD = (
    "hss = max(S_H, 1/N) / max(S_T, 1/N) with N = min(N_H, N_T): a sparsity of 0 is replaced by 1/N, "
    "the smallest non-zero sparsity the smaller set could show, so two sets without near-zero values give hss = 1"
)
#: Per-layer float metrics of a :class:`HallucinationReport`.
METRICS = (
    "eavss", "neavss", "log_eavss", "hsav", "hss",
    "variance_truthful", "variance_hallucinated", "token_variance_truthful", "token_variance_hallucinated",
    "sparsity_truthful", "sparsity_hallucinated", "avss_truthful", "avss_hallucinated",
)

_SETS = ("truthful", "hallucinated")


def demo_hallucination_path() -> str:
    """Path of the built-in example data (``assets/hallucination_demo.jsonl``): held-out
    Shakespeare prompts of the demo model, the text's own continuation as ``truthful`` and a
    hand-written wrong one as ``hallucinated`` (``scripts/make_hallucination_demo.py``)."""
    path = Path(str(resources.files("avss_fast") / "assets" / "hallucination_demo.jsonl"))
    if not path.is_file():
        raise FileNotFoundError(
            f"the built-in hallucination data is missing from {path}: reinstall avss_fast, "
            "or run scripts/make_hallucination_demo.py"
        )
    return str(path)


# ----------------------------------------------------------------------------- inputs


def load_hallucination_jsonl(path: str | os.PathLike) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Read a JSONL file of ``{"prompt", "truthful", "hallucinated"}`` records (other keys
    are ignored) into ``(truthful_pairs, hallucinated_pairs)``, two lists of
    ``(prompt, answer)`` in file order. Blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"hallucination data file not found: {os.fspath(path)!r}")
    from .data import read_jsonl

    truthful, hallucinated = [], []
    for lineno, obj in read_jsonl(p, expect=f"fields {', '.join(FIELDS)}"):
        missing = [f for f in FIELDS if f not in obj]
        if missing:
            raise ValueError(
                f"{p}: line {lineno} lacks field(s) {', '.join(missing)}; every record needs "
                f"{', '.join(FIELDS)} (keys present: {sorted(obj)})"
            )
        for f in FIELDS:
            if not isinstance(obj[f], str):
                raise ValueError(f"{p}: line {lineno}: field {f!r} must be a string, got {type(obj[f]).__name__}")
        truthful.append((obj["prompt"], obj["truthful"]))
        hallucinated.append((obj["prompt"], obj["hallucinated"]))
    if not truthful:
        raise ValueError(f"{p}: no records (expected one JSON object per line with {', '.join(FIELDS)})")
    return truthful, hallucinated


def _check_pairs(name: str, pairs: Any) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes, os.PathLike)) or not isinstance(pairs, Sequence):
        raise TypeError(f"{name} must be a list of (prompt, answer) pairs, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError(f"the {name} set is empty: give at least one (prompt, answer) pair")
    out = []
    for i, item in enumerate(pairs):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"{name}[{i}] must be a (prompt, answer) pair, got {item!r:.80}")
        prompt, answer = item
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise ValueError(
                f"{name}[{i}]: prompt and answer must be strings, got {type(prompt).__name__} and "
                f"{type(answer).__name__}"
            )
        out.append((prompt, answer))
    return out


def _resolve_inputs(truthful, hallucinated):
    if isinstance(truthful, (str, os.PathLike)):
        if hallucinated is not None:
            raise ValueError(
                "truthful is a file path: pass hallucinated=None (the JSONL holds both sets), or pass two "
                "lists of (prompt, answer) pairs"
            )
        return load_hallucination_jsonl(truthful)
    if hallucinated is None:
        raise ValueError(
            "hallucinated is None: pass two lists of (prompt, answer) pairs, or a JSONL path of "
            "{prompt, truthful, hallucinated} records as truthful"
        )
    t = _check_pairs("truthful", truthful)
    h = _check_pairs("hallucinated", hallucinated)
    if len(t) != len(h):
        raise ValueError(
            f"mismatched lengths: {len(t)} truthful and {len(h)} hallucinated pairs; give one hallucinated "
            "answer for each truthful one (same prompts, same order)"
        )
    return t, h


def _encode(tokenizer, prompt: str, answer: str, max_length: int, what: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + answer`` and a 0/1 list marking the answer tokens, truncated to
    ``max_length``: the leading special tokens (BOS, [CLS]) stay, then prompt tokens are
    dropped from the left, then the answer's tail."""
    ids = amask = None
    if answer and getattr(tokenizer, "is_fast", False):
        try:
            enc = tokenizer(prompt + answer, add_special_tokens=True, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            ids = list(enc["input_ids"])
        except (NotImplementedError, KeyError, TypeError, ValueError):
            ids = None
        if ids is not None:
            cut = len(prompt)
            amask = [1 if (e > cut and e > s) else 0 for s, e in (tuple(o) for o in offsets)]
    if ids is None:
        p_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
        a_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) if answer else []
        ids, amask = p_ids + a_ids, [0] * len(p_ids) + [1] * len(a_ids)
    if not any(amask):
        raise ValueError(f"{what}: the answer {answer!r:.60} tokenises to nothing (no answer tokens)")
    if len(ids) <= max_length:
        return ids, amask
    first = amask.index(1)
    specials = set(getattr(tokenizer, "all_special_ids", None) or ())
    lead = 0  # the special tokens the tokenizer put first (BOS, [CLS]) are kept
    while lead < first and ids[lead] in specials:
        lead += 1
    if lead >= max_length:
        lead = 0
    room = max_length - lead
    end = min(len(ids), first + room)  # the answer's first tokens
    start = max(lead, end - room)  # then as much of the prompt's end as fits
    keep = list(range(lead)) + list(range(start, end))
    return [ids[i] for i in keep], [amask[i] for i in keep]


# ----------------------------------------------------------------------------- report


def _nan_to_none(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


@dataclasses.dataclass
class HallucinationReport:
    """Per-layer EAVSS report (formulas in the module docstring).

    ``truthful`` / ``hallucinated`` hold each layer's :class:`Moments` over the answer tokens
    of that set. ``layers`` holds one dict per block: ``variance_*`` (pooled), ``token_variance_*``,
    ``sparsity_*``, ``avss_*``, ``tokens_*``, ``elements_*``, ``near_zero_*`` for both sets, and
    ``hsav``, ``hss``, ``eavss``, ``neavss``, ``log_eavss``. ``ranking()`` = most
    hallucination-prone layer first (descending eavss).
    """

    truthful: list[Moments]
    hallucinated: list[Moments]
    layers_path: str
    model: str | None = None
    sparsity_eps: float = 1e-5
    sparsity_rel: float | None = None
    num_pairs: int | None = None

    def __post_init__(self):
        if len(self.truthful) != len(self.hallucinated):
            raise ValueError("truthful and hallucinated must have one Moments per layer")
        self.layers = self._compute()

    def _compute(self) -> list[dict[str, Any]]:
        rows = []
        for i, (mt, mh) in enumerate(zip(self.truthful, self.hallucinated)):
            rt, rh = mt.raw(), mh.raw()
            row: dict[str, Any] = {"layer": i, "module": f"{self.layers_path}.{i}"}
            for name, m, r in (("truthful", mt, rt), ("hallucinated", mh, rh)):
                row[f"variance_{name}"] = m.pooled_variance
                row[f"token_variance_{name}"] = m.token_variance
                row[f"sparsity_{name}"] = m.sparsity
                row[f"avss_{name}"] = m.avss
                for k in ("tokens", "samples", "elements", "near_zero", "nonfinite"):
                    row[f"{k}_{name}"] = r[k]
            vt, vh = row["variance_truthful"], row["variance_hallucinated"]
            hsav = vh / vt if math.isfinite(vt) and math.isfinite(vh) and vt > 0 else math.nan
            n = min(rt["elements"], rh["elements"])
            if n > 0:
                floor = 1.0 / n
                hss = max(row["sparsity_hallucinated"], floor) / max(row["sparsity_truthful"], floor)
            else:
                hss = math.nan
            eavss = hsav / hss if math.isfinite(hsav) and math.isfinite(hss) else math.nan
            row.update(hsav=hsav, hss=hss, eavss=eavss,
                       log_eavss=math.log(eavss) if math.isfinite(eavss) and eavss > 0 else math.nan)
            rows.append(row)
        total = sum(r["eavss"] for r in rows if math.isfinite(r["eavss"]))
        for r in rows:
            r["neavss"] = r["eavss"] / total if total > 0 and math.isfinite(r["eavss"]) else math.nan
        return rows

    def __len__(self) -> int:
        return len(self.layers)

    def metric(self, name: str) -> list[float]:
        """One metric for every layer, in layer order (NaN where unavailable)."""
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
        return [r[name] for r in self.layers]

    def ranking(self, metric: str = "eavss", *, ascending: bool = False, absolute: bool = False) -> list[int]:
        """Layer indices sorted by ``metric``; by default descending eavss, i.e. the most
        hallucination-prone layer first. ``absolute=True`` sorts by ``|value|`` (with
        ``log_eavss``: the largest change in either direction first). Missing values go last."""
        vals = self.metric(metric)

        def key(i):
            v = vals[i]
            if v is None or not math.isfinite(v):
                return (True, 0.0, i)
            v = abs(v) if absolute else v
            return (False, v if ascending else -v, i)

        return sorted(range(len(vals)), key=key)

    def set_report(self, which: str):
        """The :class:`LayerReport` (AVSS etc.) of one set, ``"truthful"`` or ``"hallucinated"``."""
        from .scoring import LayerReport

        if which not in _SETS:
            raise ValueError(f"which must be one of {_SETS}, got {which!r}")
        moments = self.truthful if which == "truthful" else self.hallucinated
        return LayerReport(moments=list(moments), similarity=[None] * len(moments), layers_path=self.layers_path,
                           model=self.model, sparsity_eps=self.sparsity_eps, sparsity_rel=self.sparsity_rel)

    # -- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        layers = [{k: _nan_to_none(v) for k, v in r.items()} for r in self.layers]
        return {
            "format": REPORT_FORMAT,
            "model": self.model,
            "layers_path": self.layers_path,
            "num_layers": len(self.layers),
            "num_pairs": self.num_pairs,
            "sparsity_eps": self.sparsity_eps,
            "sparsity_rel": self.sparsity_rel,
            "definitions": dict(DEFINITIONS),
            "hss_guard": HSS_GUARD,
            "ranking": {"eavss": self.ranking("eavss"), "abs_log_eavss": self.ranking("log_eavss", absolute=True)},
            "layers": layers,
            "moments": {"truthful": [m.raw() for m in self.truthful],
                        "hallucinated": [m.raw() for m in self.hallucinated]},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HallucinationReport":
        if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a HallucinationReport (format {got!r}, expected {REPORT_FORMAT!r})")
        mom = d["moments"]
        return cls(
            truthful=[Moments.from_raw(m) for m in mom["truthful"]],
            hallucinated=[Moments.from_raw(m) for m in mom["hallucinated"]],
            layers_path=d["layers_path"],
            model=d.get("model"),
            sparsity_eps=d.get("sparsity_eps", 1e-5),
            sparsity_rel=d.get("sparsity_rel"),
            num_pairs=d.get("num_pairs"),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the report as strict JSON (NaN -> null); :meth:`from_json` reads it back."""
        from .report import write_json

        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "HallucinationReport":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """One row per layer with every per-layer field (empty cell = missing value)."""
        import csv

        from .report import _prepare

        p = _prepare(path)
        fields = list(self.layers[0]) if self.layers else ["layer"]
        with p.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(fields)
            for r in self.layers:
                w.writerow(["" if _nan_to_none(r[k]) is None else (repr(r[k]) if isinstance(r[k], float) else r[k])
                            for k in fields])
        return p

    # -- rendering -------------------------------------------------------------------

    def table(self, metric: str = "eavss", *, ascending: bool = False, max_rows: int | None = None) -> str:
        """A ranked text table (default: descending eavss, most hallucination-prone first)."""
        from .report import _fmt_float, _fmt_int

        order = self.ranking(metric, ascending=ascending)
        if max_rows is not None:
            if max_rows < 0:
                raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
            order = order[:max_rows]
        cols = (
            ("rank", None, "rank"), ("layer", "layer", "int"), ("eavss", "eavss", "f"), ("neavss", "neavss", "f"),
            ("hsav", "hsav", "f"), ("hss", "hss", "f"), ("var_T", "variance_truthful", "f"),
            ("var_H", "variance_hallucinated", "f"), ("spars_T", "sparsity_truthful", "f"),
            ("spars_H", "sparsity_hallucinated", "f"), ("avss_T", "avss_truthful", "f"),
            ("avss_H", "avss_hallucinated", "f"), ("tok_T", "tokens_truthful", "int"),
            ("tok_H", "tokens_hallucinated", "int"),
        )
        body = []
        for rank, i in enumerate(order, 1):
            r = self.layers[i]
            body.append([str(rank) if kind == "rank" else _fmt_int(r[key]) if kind == "int" else _fmt_float(r[key])
                         for _, key, kind in cols])
        header = [c[0] for c in cols]
        widths = [max(len(c) for c in col) for col in zip(header, *body)]

        def line(cells):
            return "  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))).rstrip()

        direction = "ascending" if ascending else "descending"
        out = [f"# {self.model or '(unnamed model)'}: {len(self.layers)} layers, sorted by {metric} ({direction}); "
               "T = truthful, H = hallucinated answers", line(header), line("-" * w for w in widths)]
        out.extend(line(cells) for cells in body)
        return "\n".join(out)

    def plot(self, path: str | os.PathLike, *, top_fraction: float = 0.25) -> Path:
        """Save a 3-panel figure (PNG unless ``path`` has another suffix): per-layer hsav,
        hss and eavss as bars around the no-change line 1; in the eavss panel the top
        ``top_fraction`` of the ranking (most hallucination-prone) is highlighted."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        from .report import _mark_missing, _prepare, fit_suptitle, layers_for_ratio

        p = Path(path)
        p = _prepare(p if p.suffix else p.with_suffix(".png"))
        xs = [r["layer"] for r in self.layers]
        n = len(xs)
        top = set(self.ranking("eavss")[: layers_for_ratio(n, top_fraction)]) if n else set()
        fig, axes = plt.subplots(3, 1, figsize=(min(16.0, max(7.0, 0.28 * n + 4.0)), 8.5), sharex=True)
        try:
            panels = (
                ("hsav", "hsav = Var(hallucinated) / Var(truthful)", "#4C72B0"),
                ("hss", "hss = Sparsity(hallucinated) / Sparsity(truthful) (guarded)", "#8172B2"),
                ("eavss", "eavss = hsav / hss", "#4C72B0"),
            )
            for ax, (key, title, colour) in zip(axes, panels):
                vals = [r[key] for r in self.layers]
                heights = [v if math.isfinite(v) else math.nan for v in vals]
                colours = [("#DD5555" if key == "eavss" and x in top else colour) for x in xs]
                ax.bar(xs, heights, color=colours, width=0.8)
                ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
                ax.set_ylabel(key)
                ax.set_title(title, fontsize=10, loc="left")
                ax.grid(True, axis="y", alpha=0.3)
                _mark_missing(ax, xs, vals)
                finite = [v for v in vals if math.isfinite(v)]
                if finite:
                    lo, hi = min(finite + [1.0]), max(finite + [1.0])
                    pad = 0.1 * (hi - lo) if hi > lo else 0.1
                    ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
            if all(r["near_zero_truthful"] == 0 and r["near_zero_hallucinated"] == 0 for r in self.layers):
                thr = f"rel={self.sparsity_rel}" if self.sparsity_rel is not None else f"eps={self.sparsity_eps:g}"
                axes[1].text(0.5, 0.5, f"no near-zero values at {thr}: hss = 1, eavss = hsav",
                             transform=axes[1].transAxes, ha="center", va="center", fontsize=10, color="0.3",
                             bbox=dict(boxstyle="round", fc="white", ec="0.7"))
            if top:
                axes[2].legend(handles=[Patch(color="#4C72B0", label="eavss"),
                                        Patch(color="#DD5555", label=f"top {top_fraction:.0%} (hallucination-prone)")],
                               loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
            axes[-1].set_xlabel("layer index")
            if xs:
                step = max(1, math.ceil(n / 32))
                axes[-1].set_xticks(xs[::step])
                axes[-1].set_xlim(min(xs) - 0.6, max(xs) + 0.6)
            pairs = f", {self.num_pairs} pairs" if self.num_pairs is not None else ""
            fit_suptitle(fig, f"EAVSS: {{model}} ({n} layers{pairs})", self.model or "(unnamed model)")
            fig.tight_layout(rect=(0, 0, 1, 0.97))
            fig.savefig(p, dpi=100)
        finally:
            plt.close(fig)
        return p


# ----------------------------------------------------------------------------- scoring


def score_hallucination(
    model: torch.nn.Module,
    truthful: Any,
    hallucinated: Any = None,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    sparsity_eps: float = 1e-5,
    sparsity_rel: float | None = None,
    layers_path: str | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> HallucinationReport:
    """Score every block of ``model`` on truthful vs hallucinated answers (EAVSS).

    Inputs: two equally long lists of ``(prompt, answer)`` pairs (the i-th hallucinated
    answer is the wrong answer to the i-th truthful one's prompt), or ``truthful`` a path to
    a JSONL file of ``{"prompt", "truthful", "hallucinated"}`` records and ``hallucinated``
    None. Each ``prompt + answer`` is tokenised with ``tokenizer``; the model reads the
    whole text (right-padded batches of ``batch_size``, at most ``max_length`` tokens each)
    but only answer tokens enter the statistics. Per layer and set: pooled variance
    ``V``, sparsity ``S``, ``AVSS = V / max(S, 1/N)``; then ``hsav = V_H / V_T``,
    ``hss = max(S_H, 1/N) / max(S_T, 1/N)`` (``N = min(N_H, N_T)``), ``eavss = hsav / hss``
    and ``neavss = eavss / sum eavss``: this project's definitions (the EAVSS paper's
    formulas are not public); see the module docstring.

    The model runs in eval mode under ``inference_mode`` (training flags restored after).

    Raises:
        ValueError: an empty set, sets of different lengths, an item that is not a
            (prompt, answer) pair of strings, a JSONL record without prompt/truthful/
            hallucinated, an answer that tokenises to nothing, no tokenizer.
        FileNotFoundError: the JSONL path does not exist.
    """
    from tqdm.auto import tqdm

    from . import ops
    from .models import fit_max_length, model_device
    from .scoring import LayerScorer, _accepts, _eval_no_grad

    if not isinstance(batch_size, int) or not isinstance(max_length, int) or batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be integers >= 1, got {batch_size!r} and {max_length!r}")
    ops.check_sparsity_thresholds(sparsity_eps, sparsity_rel)
    max_length = fit_max_length(model, max_length)
    t_pairs, h_pairs = _resolve_inputs(truthful, hallucinated)
    if tokenizer is None:
        raise ValueError("score_hallucination needs a tokenizer to turn (prompt, answer) texts into tokens")
    encoded = {
        name: [_encode(tokenizer, p, a, max_length, f"{name} answer of record {i} (0-based; prompt {p[:40]!r})")
               for i, (p, a) in enumerate(pairs)]
        for name, pairs in (("truthful", t_pairs), ("hallucinated", h_pairs))
    }
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)

    device = model_device(model)
    extra: dict[str, Any] = {}
    if _accepts(model.forward, "use_cache"):
        extra["use_cache"] = False
    if _accepts(model.forward, "logits_to_keep"):
        extra["logits_to_keep"] = 1  # hidden states are needed, not the vocabulary projection

    def batches(items):
        for k in range(0, len(items), batch_size):
            chunk = items[k : k + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            amask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, (row, arow) in enumerate(chunk):
                ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
                attn[b, : len(row)] = 1
                amask[b, : len(row)] = torch.tensor(arow, dtype=torch.long)
            yield ids.to(device), attn.to(device), amask.to(device)

    n_batches = sum(math.ceil(len(v) / batch_size) for v in encoded.values())
    scorer = LayerScorer(model, layers_path=layers_path, sparsity_eps=sparsity_eps, sparsity_rel=sparsity_rel,
                         similarity=False)
    if model_name is None:
        model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    moments: dict[str, list[Moments]] = {}
    with tqdm(total=n_batches, desc="eavss", unit="batch", disable=not progress) as bar, \
            _eval_no_grad(model), scorer:
        for name in _SETS:
            scorer.reset()
            bar.set_postfix_str(name)
            for ids, attn, amask in batches(encoded[name]):
                with scorer.token_mask(amask):
                    model(input_ids=ids, attention_mask=attn, **extra)
                bar.update(1)
            moments[name] = scorer.report(model_name=model_name).moments
    return HallucinationReport(
        truthful=moments["truthful"],
        hallucinated=moments["hallucinated"],
        layers_path=scorer.layers_path,
        model=model_name,
        sparsity_eps=float(sparsity_eps),
        sparsity_rel=None if sparsity_rel is None else float(sparsity_rel),
        num_pairs=len(t_pairs),
    )

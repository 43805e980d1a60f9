"""Per-head attention statistics under fast attention, streamed like layer statistics.

While a :class:`HeadScorer` is active the model runs the ``avss_fast`` attention, whose one
pass also emits, for every (batch row, query head, query row), from the plain softmax
``p_j = softmax_j(scaling q_i . k_j)`` over the row's allowed keys:

* ``segment_mass``: ``sum_{j in segment s} p_j`` for each segment (``segment_starts``);
* ``entropy``: ``-sum_j p_j ln p_j`` (nats; ln of the number of keys for uniform attention);
* ``max_logit``: ``max_j scaling q_i . k_j`` (the largest pre-softmax logit);
* ``sink_mass``: ``p_j0`` at the row's first allowed key j0 (the first real token: the
  "attention sink"; on a sliding-window layer, the oldest key still in the window).

The scorer keeps, per (layer, head[, segment]), the count, mean and M2 (Chan) of each
statistic over all valid query rows, in float64 on the model's device: across batches,
across ``generate`` steps (each new row is added once), excluding padding rows (a query
row is valid when its token is: the mask transformers passes has it on the diagonal), and
across ``torch.distributed`` ranks with ``report(all_reduce=True)``. Nothing of size
Sq x Sk is ever stored, and the GPU is never synchronised per batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .heads import HeadIntervention, intervene, valid_query_rows
from .models import model_device
from .stats import chan_merge

STATS = ("segment_mass", "entropy", "max_logit", "sink_mass")
_F64 = torch.float64


class _Running:
    """count [Hq], mean/M2 [Hq, K] in float64 on one device; merged with Chan's rule."""

    def __init__(self, Hq: int, K: int, device):
        self.n = torch.zeros(Hq, dtype=torch.int64, device=device)
        self.mean = torch.zeros(Hq, K, dtype=_F64, device=device)
        self.m2 = torch.zeros(Hq, K, dtype=_F64, device=device)

    def update(self, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """values [B, Hq, Sq, K]; valid [B, Sq] bool or None (all rows)."""
        B, Hq, Sq, K = values.shape
        v = values.to(_F64).permute(0, 2, 1, 3).reshape(B * Sq, Hq, K)
        if valid is None:
            w = torch.ones(B * Sq, dtype=_F64, device=v.device)
        else:
            w = valid.reshape(B * Sq).to(_F64)
        n_b = w.sum()
        safe = torch.where(n_b > 0, n_b, torch.ones_like(n_b))
        v = torch.where(w[:, None, None] > 0, v, torch.zeros((), dtype=_F64, device=v.device))  # -inf of padding
        mean_b = (v * w[:, None, None]).sum(0) / safe
        m2_b = (((v - mean_b) ** 2) * w[:, None, None]).sum(0)
        n_bi = n_b.to(torch.int64).expand(Hq)
        self.n, self.mean, self.m2 = chan_merge(self.n[:, None], self.mean, self.m2, n_bi[:, None], mean_b, m2_b)
        self.n = self.n[:, 0]


class HeadScorer:
    """Stream per-head attention statistics over every forward (and ``generate`` step) run
    inside the ``with`` block. ``segment_starts`` ([S] or per sample [B, S], key positions)
    defines the segments of ``segment_mass``; ``intervention`` optionally runs a
    :class:`HeadIntervention` at the same time (statistics are those of the plain softmax,
    i.e. what the heads looked at before the intervention changed their output).

    >>> with HeadScorer(model) as scorer:           # doctest: +SKIP
    ...     model(**batch)
    >>> scorer.report().ranking("entropy")          # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, segment_starts=None, stats=STATS, layers_path: str | None = None,
                 intervention: HeadIntervention | None = None):
        stats = tuple(stats)
        bad = [s for s in stats if s not in STATS]
        if bad or not stats:
            raise ValueError(f"stats must be a non-empty subset of {STATS}, got {stats!r}")
        has_starts = segment_starts is not None or (intervention is not None and intervention.segment_starts is not None)
        if "segment_mass" in stats and not has_starts:
            stats = tuple(s for s in stats if s != "segment_mass")  # one segment: always 1
            if not stats:
                raise ValueError("segment_mass needs segment_starts")
        if intervention is not None and segment_starts is not None and intervention.segment_starts is not None:
            raise ValueError("give segment_starts once: in the intervention or to the scorer")
        self.model = model
        self.stats = stats
        self.layers_path = layers_path
        base = intervention if intervention is not None else HeadIntervention()
        if segment_starts is not None:
            base = HeadIntervention(gates=base.gates, reweight=base.reweight, adaptive=base.adaptive,
                                    segment_starts=segment_starts)
        self.intervention = base
        self.num_segments = 0 if base.segment_starts is None else int(torch.as_tensor(base.segment_starts).shape[-1])
        self._acc: dict[int, _Running] = {}
        self._ctx = None
        self.run = None

    # -- collection

    def _columns(self) -> dict[str, slice]:
        cols, c = {}, 0
        if "segment_mass" in self.stats:
            cols["segment_mass"] = slice(0, self.num_segments)
            c = self.num_segments
        for i, name in enumerate(("entropy", "max_logit", "sink_mass")):
            if name in self.stats:
                cols[name] = slice(c, c + 1)
                c += 1
        return cols

    def _collect(self, layer: int, res, mask, B: int, Sq: int, Sk: int) -> None:
        parts = []
        if "segment_mass" in self.stats:
            parts.append(res.mass)
        for i, name in enumerate(("entropy", "max_logit", "sink_mass")):
            if name in self.stats:
                parts.append(res.stats[..., i : i + 1])
        values = torch.cat(parts, -1)
        acc = self._acc.get(layer)
        if acc is None:
            acc = self._acc[layer] = _Running(values.shape[1], values.shape[-1], values.device)
        acc.update(values, valid_query_rows(mask, B, Sq, Sk))

    def __enter__(self) -> "HeadScorer":
        self._ctx = intervene(self.model, self.intervention, layers_path=self.layers_path)
        self.run = self._ctx.__enter__()
        self.run.collector = self
        return self

    def __exit__(self, *exc) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(*exc)

    def reset(self) -> None:
        self._acc.clear()

    # -- results

    def report(self, *, all_reduce: bool | None = None, model_name: str | None = None) -> "HeadReport":
        """The statistics so far (one host transfer). With ``torch.distributed`` initialised
        (or ``all_reduce=True``), every rank's accumulators are merged first; every rank must
        call it then, also a rank that saw no data (its layers and head counts are taken
        from the others before the merge, so no rank waits on one that raised)."""
        import torch.distributed as dist

        no_data = ValueError("HeadScorer saw no attention call: run the model inside the `with` block first")
        if all_reduce is None:
            all_reduce = dist.is_available() and dist.is_initialized()
        all_reduce = all_reduce and dist.is_available() and dist.is_initialized()
        acc = dict(self._acc)
        if all_reduce:
            world = dist.get_world_size()
            heads = [None] * world
            dist.all_gather_object(heads, {layer: int(a.n.shape[0]) for layer, a in acc.items()})
            union: dict[int, int] = {}
            for rank_heads in heads:
                for layer, hq in rank_heads.items():
                    if union.setdefault(layer, hq) != hq:
                        raise ValueError(f"layer {layer} has {union[layer]} heads on one rank and {hq} on another")
            if not union:
                raise no_data  # on every rank alike: no rank saw anything
            K = max(sl.stop for sl in self._columns().values())
            dev = next(iter(acc.values())).n.device if acc else model_device(self.model)
            for layer, hq in union.items():
                if layer not in acc:
                    acc[layer] = _Running(hq, K, dev)  # this rank's empty share
        if not acc:
            raise no_data
        layers = sorted(acc)
        n = torch.stack([acc[i].n for i in layers])  # [L, Hq]
        mean = torch.stack([acc[i].mean for i in layers])  # [L, Hq, K]
        m2 = torch.stack([acc[i].m2 for i in layers])
        if all_reduce:
            gathered = [[torch.empty_like(t) for _ in range(world)] for t in (n, mean, m2)]
            for out, t in zip(gathered, (n, mean, m2)):
                dist.all_gather(out, t.contiguous())
            n, mean, m2 = gathered[0][0], gathered[1][0], gathered[2][0]
            for r in range(1, world):
                n2, mean, m2 = chan_merge(n[..., None], mean, m2, gathered[0][r][..., None], gathered[1][r],
                                          gathered[2][r])
                n = n2[..., 0]
        n, mean, m2 = n.cpu(), mean.cpu(), m2.cpu()
        var = torch.where(n[..., None] > 1, m2 / (n[..., None] - 1).clamp_min(1).to(_F64), torch.nan)
        stats = {}
        for name, sl in self._columns().items():
            m, v = mean[..., sl], var[..., sl]
            if name != "segment_mass":
                m, v = m[..., 0], v[..., 0]
            stats[name] = {"mean": m.tolist(), "var": v.tolist()}
        return HeadReport(layers=layers, rows=n.tolist(), stats=stats, num_segments=self.num_segments,
                          model=model_name or getattr(getattr(self.model, "config", None), "_name_or_path", None))


@dataclass
class HeadReport:
    """Per (layer, head[, segment]) mean and variance of each statistic over valid query
    rows. ``stats[name]["mean"][l][h]`` (``[l][h][s]`` for ``segment_mass``)."""

    layers: list[int]
    rows: list[list[int]]  # [L][H] valid query rows seen
    stats: dict[str, dict[str, Any]]
    num_segments: int = 0
    model: str | None = None
    extra: dict = field(default_factory=dict)

    def mean(self, stat: str, segment: int | None = None) -> torch.Tensor:
        """[L, H] means of ``stat`` (``segment_mass`` needs ``segment``)."""
        if stat not in self.stats:
            raise KeyError(f"{stat!r} was not collected; have {sorted(self.stats)}")
        m = torch.tensor(self.stats[stat]["mean"], dtype=_F64)
        if stat == "segment_mass":
            if segment is None or not 0 <= segment < self.num_segments:
                raise ValueError(f"segment_mass needs segment in 0..{self.num_segments - 1}")
            m = m[..., segment]
        return m

    def ranking(self, stat: str, *, segment: int | None = None, descending: bool = True) -> list[tuple[int, int]]:
        """(layer, head) pairs ordered by the mean of ``stat`` (largest first by default;
        heads without a mean, NaN, go last; ties in (layer, head) order)."""
        m = self.mean(stat, segment).flatten()
        key = torch.where(torch.isnan(m), torch.tensor(float("inf")), -m if descending else m)
        order = torch.argsort(key, stable=True).tolist()
        H = self.mean(stat, segment).shape[1]
        return [(self.layers[i // H], i % H) for i in order]

    def to_dict(self) -> dict:
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, list):
                return [clean(y) for y in x]
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return x

        return clean({"model": self.model, "layers": self.layers, "rows": self.rows, "num_segments": self.num_segments,
                      "stats": self.stats, "extra": self.extra})

    def to_json(self, path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2))
        return p

    @classmethod
    def from_json(cls, path) -> "HeadReport":
        d = json.loads(Path(path).read_text())

        def unclean(x):
            if x is None:
                return math.nan
            if isinstance(x, list):
                return [unclean(y) for y in x]
            return x

        stats = {k: {kk: unclean(vv) for kk, vv in v.items()} for k, v in d["stats"].items()}
        return cls(layers=d["layers"], rows=d["rows"], stats=stats, num_segments=d["num_segments"],
                   model=d.get("model"), extra=d.get("extra", {}))

    def plot(self, out_dir) -> list[Path]:
        """One layer x head heatmap per statistic (per segment for ``segment_mass``)."""
        from .report import plot_head_heatmap

        out = Path(out_dir)
        paths = []
        for name in self.stats:
            segs = range(self.num_segments) if name == "segment_mass" else [None]
            for s in segs:
                suffix = f"_seg{s}" if s is not None else ""
                paths.append(plot_head_heatmap(self.mean(name, s), out / f"heads_{name}{suffix}.png",
                                               title=f"mean {name}{suffix.replace('_', ' ')} per head", label=name))
        return paths

    def table(self, stat: str, *, top: int = 10, segment: int | None = None) -> str:
        m = self.mean(stat, segment)
        lines = [f"{'rank':>4}  {'layer':>5}  {'head':>4}  {stat:>12}"]
        for r, (lay, h) in enumerate(self.ranking(stat, segment=segment)[:top], 1):
            lines.append(f"{r:>4}  {lay:>5}  {h:>4}  {float(m[self.layers.index(lay), h]):>12.4f}")
        return "\n".join(lines)


"""Layer scoring: stream text through a model, keep per-block statistics, rank layers.

For block ``l`` with output hidden states ``h`` (valid tokens only, padding excluded):

* variance (AVSS paper): ``Var_l = mean_b Var_d( mean_t h[b, t, d] )`` (unbiased over d);
* sparsity: ``S_l = #{|h| < eps} / #h`` (``eps = 1e-5`` as in the paper, or a relative
  threshold ``|h| < rel * rms(h[b, t, :])``);
* ``AVSS_l = Var_l / max(S_l, 1 / N_l)`` with ``N_l`` the number of values seen. The
  guard: on real residual streams ``S_l`` at 1e-5 is often exactly 0; ``1 / N_l`` is the
  smallest non-zero sparsity the data could show, so a layer with no near-zero value
  ranks as if one value had been near zero. Rankings among layers with non-zero
  sparsity are unchanged and nothing is ever inf or NaN. (Use ``sparsity_rel`` for a
  sparsity that is informative on residual streams.);
* ``nAVSS_l = AVSS_l / sum_k AVSS_k``; ``cAVSS_l`` = cumulative nAVSS over layers taken
  in ascending AVSS order, up to and including ``l`` (the paper's pruning rule drops
  layers while cAVSS <= ratio);
* Block Influence (ShortGPT): ``BI_l = 1 - mean_t cos(x_t, h_t)`` with ``x`` the block
  input; angular distance ``mean_t arccos(cos) / pi``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from . import ops
from .models import (
    block_hidden_from_input,
    block_hidden_from_output,
    count_block_call,
    find_layers,
    fit_max_length,
    model_device,
)
from .stats import Moments, Similarity

REPORT_FORMAT = "avss_fast.LayerReport/1"
AVSS_GUARD = (
    "avss = pooled_variance / max(sparsity, 1/elements): when no value of a layer is near zero, "
    "sparsity is replaced by 1/elements, the smallest non-zero sparsity the data could show"
)
METRICS = (
    "avss", "navss", "cavss", "pooled_variance", "token_variance", "variance", "sparsity",
    "block_influence", "angular_distance",
)


def _mask_from_forward(args, kwargs) -> torch.Tensor | None:
    """The [B, T] padding mask of a model call, from its keyword or second positional argument."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        ids = args[0] if isinstance(args[0], torch.Tensor) else None
        if args[1].dim() == 2 and (ids is None or args[1].shape == ids.shape):
            mask = args[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask
    return None


class LayerScorer:
    """Hooks every block of ``model`` and accumulates :class:`Moments` (block output) and
    :class:`Similarity` (block input vs output) while the model runs.

    Use as a context manager around ordinary forward calls (or ``generate``)::

        with LayerScorer(model) as scorer:
            for batch in batches:
                model(**batch)
        report = scorer.report()

    The padding mask is read from each top-level model call (``attention_mask``
    argument); for a block seeing ``T`` positions the last ``T`` columns apply, which
    also covers decoding with a KV cache. Under ``generate`` with a cache each decoding step
    is a model call of one token per sequence, so each step counts as ``samples`` of one
    token: ``token_variance`` and sparsity are those of every token, but the pooled
    (per-sample token mean) variance of the generated part is a single token's variance
    (score the finished sequences with one forward for the AVSS pooled variance of whole
    samples). Accumulators stay on each block's device and
    nothing synchronises the GPU until :meth:`report`. Hooks are removed on exit, also
    when the body raises.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layers_path: str | None = None,
        sparsity_eps: float = 1e-5,
        sparsity_rel: float | None = None,
        similarity: bool = True,
    ):
        self.model = model
        self.layers_path, self.layers = find_layers(model, layers_path)
        self.sparsity_eps = float(sparsity_eps)
        self.sparsity_rel = None if sparsity_rel is None else float(sparsity_rel)
        self.similarity = bool(similarity)
        ops.check_sparsity_thresholds(self.sparsity_eps, self.sparsity_rel)  # now, not at the first batch
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._token_mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self._warned_mask = False
        self._warned_dtype = False
        self._in_call: list[int] | None = None  # block calls in the model call under way
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        n = len(self.layers)
        self.moments: list[Moments | None] = [None] * n
        self.similarities: list[Similarity | None] = [None] * n
        self.batches = 0

    # -- hooks -------------------------------------------------------------------------

    def __enter__(self) -> "LayerScorer":
        if self._handles:
            raise RuntimeError("LayerScorer is already active")
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_model_call, always_call=True))
        for i, block in enumerate(self.layers):
            if self.similarity:
                self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._make_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()
        self._mask = None

    def _after_model_call(self, *unused) -> None:
        self._in_call = None

    def _on_model_call(self, module, args, kwargs):
        self._in_call = [0] * len(self.layers)
        self._mask = _mask_from_forward(args, kwargs)
        given = kwargs.get("attention_mask")
        if self._mask is None and isinstance(given, torch.Tensor) and not self._warned_mask:
            import warnings

            self._warned_mask = True
            warnings.warn(f"attention_mask of shape {tuple(given.shape)} is not a [batch, tokens] padding mask: "
                          "LayerScorer counts every position as a token (pass the 2-D mask, or use token_mask)",
                          UserWarning, stacklevel=2)
        tm = self._token_mask
        if tm is not None:  # statistics only where the token mask (and the call's mask) is nonzero
            if self._mask is not None and tuple(tm.shape) != tuple(self._mask.shape):
                raise ValueError(
                    f"token_mask {tuple(tm.shape)} does not match the model call's attention_mask "
                    f"{tuple(self._mask.shape)}"
                )
            tm = tm.to(self._mask.device) if self._mask is not None else tm
            self._mask = tm != 0 if self._mask is None else (tm != 0) & (self._mask != 0)
        self.batches += 1

    @contextlib.contextmanager
    def token_mask(self, mask: torch.Tensor):
        """Count only the tokens where ``mask`` [batch, tokens] is nonzero (and the model
        call's ``attention_mask`` too) in the statistics of the model calls made inside the
        ``with`` block; the model itself still gets its ordinary ``attention_mask``.
        E.g. answer tokens only, while the model attends to the prompt::

            with scorer, scorer.token_mask(answer_mask):
                model(input_ids=ids, attention_mask=attn)
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"token_mask must be a [batch, tokens] tensor, got {getattr(mask, 'shape', type(mask))}")
        previous, self._token_mask = self._token_mask, mask
        try:
            yield self
        finally:
            self._token_mask = previous

    def _block_mask(self, h: torch.Tensor) -> torch.Tensor | None:
        m = self._mask
        if m is None:
            return None
        B, T = h.shape[:2]
        if m.shape[0] != B or m.shape[1] < T:
            raise ValueError(
                f"attention_mask {tuple(m.shape)} does not fit a block's hidden states {tuple(h.shape)} "
                f"(at {self.layers_path}); pass a [batch, tokens] mask to the model call"
            )
        return m[:, m.shape[1] - T :]

    def _make_pre_hook(self, i: int):
        def hook(module, args, kwargs):
            self._inputs[i] = block_hidden_from_input(args, kwargs)

        return hook

    def _make_hook(self, i: int):
        def hook(module, args, output):
            count_block_call(self._in_call, i, module)
            h = block_hidden_from_output(output)
            if (h.dtype in (torch.bfloat16, torch.float16) and self.sparsity_rel is None and self.sparsity_eps > 0
                    and not self._warned_dtype):
                self._warned_dtype = True
                import warnings

                warnings.warn(
                    f"activations are {str(h.dtype).removeprefix('torch.')}: at |h| < {self.sparsity_eps:g} the "
                    "near-zero counts are mostly exact zeros left by rounding (a residual add that cancels), "
                    "not sparsity, and can reorder AVSS; use sparsity_rel (--sparsity-rel 0.01) "
                    "or float32", UserWarning, stacklevel=2)
            mask = self._block_mask(h)
            m = ops.layer_moments(h, mask, sparsity_eps=self.sparsity_eps, sparsity_rel=self.sparsity_rel)
            self.moments[i] = m if self.moments[i] is None else self.moments[i] + m
            if self.similarity:
                x = self._inputs.pop(i, None)
                if x is not None and x.shape == h.shape:
                    s = ops.block_similarity(x, h, mask)
                    self.similarities[i] = s if self.similarities[i] is None else self.similarities[i] + s

        return hook

    # -- results -----------------------------------------------------------------------

    def report(self, *, model_name: str | None = None, all_reduce: bool | None = None) -> "LayerReport":
        """Build the :class:`LayerReport` (synchronises: call it once, at the end). With
        ``torch.distributed`` initialised (or ``all_reduce=True``), statistics are first
        merged across ranks; every rank must call it, also a rank that saw no data."""
        import torch.distributed as dist

        if all_reduce is None:
            all_reduce = dist.is_available() and dist.is_initialized()
        no_data = ValueError("LayerScorer saw no data: run the model inside the `with` block first")
        if not all_reduce and all(m is None for m in self.moments):
            raise no_data
        moments, sims = [], []
        for block, m, s in zip(self.layers, self.moments, self.similarities):
            dev = next((p.device for p in block.parameters()), model_device(self.model))
            m = m if m is not None else Moments.zeros(dev)
            if self.similarity and s is None:
                s = Similarity.zeros(m.device)
            if all_reduce:
                m = m.all_reduce()
                s = s.all_reduce() if s is not None else None
            moments.append(m.to("cpu"))
            sims.append(None if s is None else s.to("cpu"))
        if all(int(m.tokens) == 0 and int(m.nonfinite) == 0 for m in moments):
            # every position was padding (or, merged, no rank saw anything: checked after
            # the collective, so no rank hangs)
            raise ValueError("LayerScorer saw no valid token: every position of every batch was padding "
                             "(attention_mask == 0), or the data was empty") if self.batches else no_data
        bad = [(i, int(m.nonfinite), int(m.elements) + int(m.nonfinite)) for i, m in enumerate(moments)
               if int(m.nonfinite)]
        if bad:
            import warnings

            worst = max(bad, key=lambda b: b[1] / b[2])
            warnings.warn(
                f"{len(bad)} layer(s) had NaN/Inf activations at valid positions, left out of every statistic "
                f"(worst: layer {worst[0]}, {worst[1]} of {worst[2]} values, {worst[1] / worst[2]:.1%}); "
                "a float16 overflow? (see 'nonfinite' in the report)", UserWarning, stacklevel=2)
        if model_name is None:
            model_name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or type(self.model).__name__
        return LayerReport(
            moments=moments,
            similarity=sims,
            layers_path=self.layers_path,
            model=model_name,
            sparsity_eps=self.sparsity_eps,
            sparsity_rel=self.sparsity_rel,
        )


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x


@dataclasses.dataclass
class LayerReport:
    """Per-layer statistics and scores (see the module docstring for the formulas).

    ``layers`` holds one dict per block with every metric; ``ranking(metric)`` lists
    layer indices from least to most important by that metric.
    """

    moments: list[Moments]
    similarity: list[Similarity | None]
    layers_path: str
    model: str | None = None
    sparsity_eps: float = 1e-5
    sparsity_rel: float | None = None

    def __post_init__(self):
        if len(self.moments) != len(self.similarity):
            raise ValueError("moments and similarity must have one entry per layer")
        self.layers = self._compute()

    def _compute(self) -> list[dict[str, Any]]:
        rows = []
        for i, (m, s) in enumerate(zip(self.moments, self.similarity)):
            raw = m.raw()
            n = raw["elements"]
            var = m.pooled_variance
            spars = m.sparsity
            avss = m.avss
            rows.append(
                dict(
                    layer=i,
                    module=f"{self.layers_path}.{i}",
                    pooled_variance=var,
                    token_variance=m.token_variance,
                    variance=m.variance,
                    sparsity=spars,
                    avss=avss,
                    block_influence=None if s is None or int(s.tokens) == 0 else s.block_influence,
                    angular_distance=None if s is None or int(s.tokens) == 0 else s.angular_distance,
                    tokens=raw["tokens"],
                    samples=raw["samples"],
                    elements=n,
                    near_zero=raw["near_zero"],
                    nonfinite=raw["nonfinite"],
                )
            )
        total = sum(r["avss"] for r in rows if math.isfinite(r["avss"]))
        for r in rows:
            r["navss"] = r["avss"] / total if total > 0 and math.isfinite(r["avss"]) else math.nan
        acc = 0.0
        for i in sorted((r["layer"] for r in rows if math.isfinite(r["navss"])), key=lambda k: rows[k]["avss"]):
            acc += rows[i]["navss"]
            rows[i]["cavss"] = acc
        for r in rows:
            r.setdefault("cavss", math.nan)
        return rows

    def __len__(self) -> int:
        return len(self.layers)

    def metric(self, name: str) -> list[float]:
        """One metric for every layer, in layer order (None/NaN where unavailable)."""
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
        return [r[name] for r in self.layers]

    def ranking(self, metric: str = "avss", *, ascending: bool = True) -> list[int]:
        """Layer indices sorted by ``metric`` (ascending: least important first for avss and
        block_influence). Layers whose value is missing go last."""
        vals = self.metric(metric)

        def key(i):
            v = vals[i]
            missing = v is None or not math.isfinite(v)
            return (missing, (v if ascending else -v) if not missing else 0.0, i)

        return sorted(range(len(vals)), key=key)

    def to_dict(self) -> dict[str, Any]:
        layers = [{k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in r.items()} for r in self.layers]
        return {
            "format": REPORT_FORMAT,
            "model": self.model,
            "layers_path": self.layers_path,
            "num_layers": len(self.layers),
            "sparsity_eps": self.sparsity_eps,
            "sparsity_rel": self.sparsity_rel,
            "avss_guard": AVSS_GUARD,
            "ranking": {"avss": self.ranking("avss"),  # block_influence: null when not collected
                        "block_influence": (None if all(s is None for s in self.similarity)
                                            else self.ranking("block_influence"))},
            "layers": layers,
            "moments": [m.raw() for m in self.moments],
            "similarity": [None if s is None else s.raw() for s in self.similarity],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerReport":
        if d.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a LayerReport (format {d.get('format')!r}, expected {REPORT_FORMAT!r})")
        return cls(
            moments=[Moments.from_raw(m) for m in d["moments"]],
            similarity=[None if s is None else Similarity.from_raw(s) for s in d["similarity"]],
            layers_path=d["layers_path"],
            model=d.get("model"),
            sparsity_eps=d.get("sparsity_eps", 1e-5),
            sparsity_rel=d.get("sparsity_rel"),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        from .report import write_json

        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LayerReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, path: str | os.PathLike) -> Path:
        """Per-layer AVSS, variance, sparsity and Block Influence, as an image file."""
        from .report import plot_layer_report

        return plot_layer_report(self.to_dict(), path)

    def table(self, metric: str = "avss", max_rows: int | None = None) -> str:
        from .report import format_table

        return format_table(self.to_dict(), sort_by=metric, max_rows=max_rows)


# ----------------------------------------------------------------------------- score_layers


# Batch keys never passed on to the model: the loss targets (a loss is not wanted and
# clashes with logits_to_keep) and what the callers set themselves.
_NOT_MODEL_INPUTS = frozenset({"labels", "use_cache", "logits_to_keep", "output_hidden_states",
                               "output_attentions", "return_dict", "past_key_values"})


class BatchInputs:
    """The keyword arguments a tokenized batch gives ``model.forward``: ``input_ids``,
    ``attention_mask`` and every other tensor the forward accepts (``token_type_ids``,
    ``position_ids`` ...), on ``device``. A key the forward does not take is dropped with
    one warning per key (``labels`` silently)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self._warned: set[str] = set()
        self._takes: dict[str, bool] = {}  # key -> model.forward has that argument (read once)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import warnings

        out = {"input_ids": batch["input_ids"].to(self.device, non_blocking=True),
               "attention_mask": batch["attention_mask"].to(self.device, non_blocking=True)}
        for key, value in batch.items():
            if key in out or key in _NOT_MODEL_INPUTS:
                continue
            takes = self._takes.get(key)
            if takes is None:
                takes = self._takes[key] = _accepts(self.model.forward, key)
            if isinstance(value, torch.Tensor) and takes:
                out[key] = value.to(self.device, non_blocking=True)
            elif key not in self._warned:
                self._warned.add(key)
                why = "is not a tensor" if not isinstance(value, torch.Tensor) else \
                    f"is not an argument of {type(self.model).__name__}.forward"
                warnings.warn(f"batch key {key!r} is ignored: it {why}", UserWarning, stacklevel=3)
        return out


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the body; every module's training flag restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


@contextlib.contextmanager
def _eval_no_grad(model: torch.nn.Module):
    """Eval mode and no autograd for the body; the model's training flags restored after."""
    with _eval_mode(model), torch.inference_mode():
        yield


def score_layers(
    model: torch.nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 128,
    field: str = "text",
    layers_path: str | None = None,
    sparsity_eps: float = 1e-5,
    sparsity_rel: float | None = None,
    similarity: bool = True,
    progress: bool = True,
    model_name: str | None = None,
) -> LayerReport:
    """Score every block of ``model`` on ``data`` and return a :class:`LayerReport`.

    ``data``: a list of strings, a ``.txt`` (one document a line) or ``.jsonl`` path
    (``field`` names the text key), a ``datasets`` dataset, or an iterable of tokenized
    batches (dicts with ``input_ids`` and ``attention_mask``, e.g. a ``DataLoader``; their
    other tensors that ``model.forward`` takes, such as ``token_type_ids``, are passed on,
    see :class:`BatchInputs`). Text needs ``tokenizer``; ``max_length=None`` truncates only
    at a learned position table's length. The model runs in eval mode under
    ``inference_mode`` and its training flags are restored afterwards; hooks are removed
    even if a batch fails.
    """
    from .data import iter_batches, num_batches

    if batch_size < 1 or (max_length is not None and max_length < 1):
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    device = model_device(model)
    max_length = fit_max_length(model, max_length)
    batches = iter_batches(data, tokenizer, batch_size=batch_size, max_length=max_length, field=field)
    total = num_batches(data, batch_size, field=field)
    extra: dict[str, Any] = {}
    if _accepts(model.forward, "use_cache"):
        extra["use_cache"] = False
    if _accepts(model.forward, "logits_to_keep"):
        extra["logits_to_keep"] = 1  # the scores need hidden states, not the vocabulary projection

    from tqdm.auto import tqdm

    scorer = LayerScorer(
        model, layers_path=layers_path, sparsity_eps=sparsity_eps, sparsity_rel=sparsity_rel, similarity=similarity
    )
    inputs = BatchInputs(model, device)
    with _eval_no_grad(model), scorer:
        for batch in tqdm(batches, total=total, desc="scoring", unit="batch", disable=not progress):
            model(**inputs(batch), **extra)
    return scorer.report(model_name=model_name)

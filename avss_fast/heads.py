"""Attention-head interventions inside ordinary transformers forward passes and ``generate``.

transformers 5 dropped ``head_mask`` and ``prune_heads``; the published head methods
(ablation, static reweighting, adaptive deactivation of hallucination heads, ADHH) ran on
the eager path that materialises every attention map. Here they run in the one-pass
``masked_attention`` op (flash-style, O(S) memory), with the KV cache:

>>> iv = HeadIntervention(gates={(3, 5): 0.0},                 # ablate layer 3, head 5
...                       reweight={(4, 1): {1: 0.5}},         # halve head (4, 1)'s mass on segment 1
...                       adaptive=AdaptiveRule(heads=[(6, 2)], segment=1, threshold=0.4),
...                       segment_starts=[0, 35])              # segment 1 = key 35 onward
>>> with intervene(model, iv) as run:                          # doctest: +SKIP
...     out = model.generate(input_ids, max_new_tokens=64)

For query head h of layer l, query row i, allowed keys j (causal, padding), with
``p_ij = softmax_j(scaling q_i . k_j)`` and ``seg(j)`` the segment of key j:

    out_i = g[l, h] * sum_j p_ij * f[l, h, seg(j)] * a_ij * v_j

``g`` = ``gates`` (default 1), ``f`` = ``reweight`` factors (default 1, no
renormalisation), and ``a_ij = rule.scale`` when (l, h) is one of the rule's heads, row i
is covered (rows "last": only the last query row of each forward call, so with the KV
cache every generated token's row and the last prompt row), ``seg(j) = rule.segment`` and
``sum_{j in rule.segment} p_ij >= rule.threshold``; else 1. With ``scale=0`` and rows
"last" this is ADHH: the segment's probabilities are zeroed, not renormalised.

Segment starts are key positions as the model sees them: columns of ``input_ids``
(padding included), the last segment running to the end so generated tokens fall in it.
For left-padded batches, :func:`shift_segment_starts` turns starts counted from each
sample's first real token into those positions.

``intervene`` switches the model's attention implementation to ``"avss_fast"`` (registered
with both ``AttentionInterface`` and ``AttentionMaskInterface``, so the padding mask
arrives) and puts every config's implementation back on exit, also after an error. No
module is modified, wrapped or hooked.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops
from .models import count_block_call, find_layers, model_device

ATTENTION_NAME = "avss_fast"  # no "flash" in the name: transformers treats those specially when loading

_REGISTER_LOCK = threading.Lock()
_REGISTERED = False

#: id(attention-bearing module) -> (layer index, active run). Filled by ``intervene``.
_ACTIVE: dict[int, tuple[int, "InterventionRun"]] = {}


# ----------------------------------------------------------------------------- public data


@dataclass(frozen=True)
class AdaptiveRule:
    """Adaptive deactivation (ADHH): for each (layer, head) in ``heads``, in the covered query
    rows (``rows="last"``, the published method, or ``"all"``), when the head's softmax mass
    on ``segment`` is >= ``threshold``, that segment's probabilities are multiplied by
    ``scale`` (0 = deactivated), without renormalising. ``"last"`` is the last query row of
    each attention call: every generated token under ``generate`` (left padding), but in a
    plain forward of a right-padded batch a padding row for the shorter samples (use
    left padding, or ``rows="all"``)."""

    heads: Sequence[tuple[int, int]]
    segment: int
    threshold: float = 0.4
    scale: float = 0.0
    rows: str = "last"

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(_pair(x, "AdaptiveRule.heads") for x in self.heads))
        if not self.heads:
            raise ValueError("AdaptiveRule.heads is empty: name at least one (layer, head)")
        if self.rows not in ("last", "all"):
            raise ValueError(f"AdaptiveRule.rows must be 'last' or 'all', got {self.rows!r}")
        for name in ("threshold", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise ValueError(f"AdaptiveRule.{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not 0.0 <= self.threshold <= 1.0:  # a softmax mass is in [0, 1]: outside, always or never
            raise ValueError(f"AdaptiveRule.threshold is compared with a softmax mass, so it must be in [0, 1], "
                             f"got {self.threshold!r}")
        if isinstance(self.segment, bool) or not isinstance(self.segment, int) or self.segment < 0:
            raise ValueError(f"AdaptiveRule.segment must be a segment index >= 0, got {self.segment!r}")


@dataclass
class HeadIntervention:
    """What to do to which heads. Keys are (layer, query head), both 0-based.

    * ``gates[(l, h)]``: factor on the head's output (0 = ablated). A float, or one value
      per sample of the batch (a sequence of length B: per-row gates).
    * ``reweight[(l, h)]``: ``{segment index: factor}`` on that segment's post-softmax
      probabilities, on every query row, without renormalising.
    * ``adaptive``: an :class:`AdaptiveRule`.
    * ``segment_starts``: key positions where segments begin, ``[s0, s1, ...]`` for all
      samples or one list per sample (at most 4 segments). Needed by ``reweight`` and
      ``adaptive``.
    """

    gates: Mapping[tuple[int, int], Any] = field(default_factory=dict)
    reweight: Mapping[tuple[int, int], Mapping[int, float]] = field(default_factory=dict)
    adaptive: AdaptiveRule | None = None
    segment_starts: Any = None

    def is_empty(self) -> bool:
        return not self.gates and not self.reweight and self.adaptive is None

    def layers(self) -> set[int]:
        """Layers any part of the intervention touches."""
        keys = [_pair(k, "key") for k in list(self.gates) + list(self.reweight)]
        if self.adaptive is not None:
            keys += list(self.adaptive.heads)
        return {layer for layer, _ in keys}


def _pair(x, what: str) -> tuple[int, int]:
    try:
        layer, head = x
        if isinstance(layer, bool) or isinstance(head, bool):
            raise TypeError
        return int(layer), int(head)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a (layer, head) pair of integers, got {x!r}") from None


# ----------------------------------------------------------------------------- per-layer plan


@dataclass
class _LayerPlan:
    """Device tensors for one layer, built once at ``intervene`` entry."""

    gate: torch.Tensor | None = None  # [Hq] or [B0, Hq] float32
    scale: torch.Tensor | None = None  # [Hq, S] float32
    rule: ops.AttentionRule | None = None


def _num_segments(starts) -> int:
    t = torch.as_tensor(starts)
    if t.dim() not in (1, 2) or t.shape[-1] < 1:
        raise ValueError(f"segment_starts must be [S] or one list per sample [B, S], got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise TypeError("segment_starts must be integer key positions")
    if bool((t < 0).any()):
        raise ValueError("segment_starts must be >= 0")
    if t.shape[-1] > ops.MAX_SEGMENTS:
        raise ValueError(f"at most {ops.MAX_SEGMENTS} segments are supported, got {t.shape[-1]}")
    if t.shape[-1] > 1 and bool((t[..., 1:] < t[..., :-1]).any()):
        raise ValueError("segment_starts must be non-decreasing")
    return int(t.shape[-1])


def build_plans(iv: HeadIntervention, num_layers: int, num_heads: int, device) -> dict[int, _LayerPlan]:
    """Check ``iv`` against the model's shape and build the per-layer tensors.

    Raises ValueError for layers or heads out of range, segment indices out of range, or
    ``reweight``/``adaptive`` without ``segment_starts``."""
    if not isinstance(iv, HeadIntervention):
        raise TypeError(f"expected a HeadIntervention, got {type(iv).__name__}")

    def check(key, what):
        layer, head = _pair(key, what)
        if not 0 <= layer < num_layers:
            raise ValueError(f"{what}: layer {layer} is out of range (the model has {num_layers} layers)")
        if not 0 <= head < num_heads:
            raise ValueError(f"{what}: head {head} of layer {layer} is out of range "
                             f"(the model has {num_heads} query heads)")
        return layer, head

    S = None
    if iv.segment_starts is not None:
        S = _num_segments(iv.segment_starts)
    elif iv.reweight or iv.adaptive is not None:
        raise ValueError("reweight and adaptive need segment_starts (key positions where segments begin)")
    plans: dict[int, _LayerPlan] = {}
    batch = None
    gates: dict[int, dict[int, torch.Tensor]] = {}
    for key, value in iv.gates.items():
        layer, head = check(key, "gates")
        g = torch.as_tensor(value, dtype=torch.float32)
        if g.dim() > 1 or not bool(torch.isfinite(g).all()):
            raise ValueError(f"gates[{key}] must be a finite number or one number per sample, got {value!r}")
        if g.dim() == 1:
            if batch is not None and g.shape[0] != batch:
                raise ValueError(f"per-sample gates disagree on the batch size ({batch} vs {g.shape[0]})")
            batch = g.shape[0]
        gates.setdefault(layer, {})[head] = g
    for layer, per_head in gates.items():
        g = torch.ones((batch, num_heads) if batch else (num_heads,), dtype=torch.float32)
        for head, val in per_head.items():
            g[..., head] = val
        plans.setdefault(layer, _LayerPlan()).gate = g.to(device)
    for key, factors in iv.reweight.items():
        layer, head = check(key, "reweight")
        if not isinstance(factors, Mapping) or not factors:
            raise ValueError(f"reweight[{key}] must be a non-empty {{segment: factor}} mapping, got {factors!r}")
        plan = plans.setdefault(layer, _LayerPlan())
        if plan.scale is None:
            plan.scale = torch.ones((num_heads, S), dtype=torch.float32)
        for seg, f in factors.items():
            if isinstance(seg, bool) or not isinstance(seg, int) or not 0 <= seg < S:
                raise ValueError(f"reweight[{key}]: segment {seg!r} is out of range for {S} segments")
            if not math.isfinite(float(f)):
                raise ValueError(f"reweight[{key}][{seg}] must be finite, got {f}")
            plan.scale[head, seg] = float(f)
    for plan in plans.values():
        if plan.scale is not None:
            plan.scale = plan.scale.to(device)
    rule = iv.adaptive
    if rule is not None:
        if not isinstance(rule, AdaptiveRule):
            raise TypeError(f"adaptive must be an AdaptiveRule, got {type(rule).__name__}")
        if rule.segment >= S:
            raise ValueError(f"AdaptiveRule.segment {rule.segment} is out of range for {S} segments")
        by_layer: dict[int, list[int]] = {}
        for key in rule.heads:
            layer, head = check(key, "AdaptiveRule.heads")
            by_layer.setdefault(layer, []).append(head)
        for layer, heads in by_layer.items():
            plans.setdefault(layer, _LayerPlan()).rule = ops.AttentionRule(
                tuple(sorted(set(heads))), rule.segment, float(rule.threshold), float(rule.scale), rule.rows
            )
    return plans


def shift_segment_starts(segment_starts, attention_mask: torch.Tensor) -> torch.Tensor:
    """Segment starts counted from each sample's first real token -> key positions of a
    left-padded batch: ``starts[b, s] + (number of leading padding tokens of row b)``.

    ``segment_starts`` is [S] (shared) or [B, S]; ``attention_mask`` [B, T] (1 = token)."""
    m = torch.as_tensor(attention_mask)
    if m.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got {tuple(m.shape)}")
    starts = torch.as_tensor(segment_starts, dtype=torch.long)
    lead = ((m != 0).long().cumsum(-1) == 0).sum(-1)  # [B]
    if starts.dim() == 1:
        starts = starts[None].expand(m.shape[0], -1)
    if starts.shape[0] != m.shape[0]:
        raise ValueError(f"segment_starts has {starts.shape[0]} rows but the batch has {m.shape[0]}")
    return starts + lead.to(starts.device)[:, None]


# ----------------------------------------------------------------------------- the attention function


def valid_query_rows(mask: torch.Tensor | None, B: int, Sq: int, Sk: int) -> torch.Tensor | None:
    """[B, Sq] bool: the query token of each row is real. A token always attends to itself
    and a padding token's own key is masked out, so the mask's diagonal says which.

    The diagonal sits at key ``i + offset``, ``offset`` the number of cached tokens before
    this call. ``Sq == Sk`` means no cache (``offset = 0``; also the only case of a
    bidirectional encoder mask, where a padding row still sees every real key). Otherwise
    (a cache: ``Sk = offset + Sq`` with a dynamic one, the whole cache's length with a
    static one) the mask is causal, so row ``i`` sees no key past ``i + offset`` and a real
    row sees exactly that one: ``offset = max_i (last key row i sees, in any sample) - i``,
    which holds as long as one row of the batch is real in some sample (the last row alone
    is not enough: right padding can make it padding in every sample). Only self-attention
    masks are read this way: under cross-attention (an encoder-decoder's) the rows are not
    on a diagonal and the result is meaningless. On the device, no synchronisation."""
    if mask is None:
        return None
    if mask.dim() == 2:  # [B, Sk] key mask: one query row (decoding), real if it sees any key
        return mask.to(torch.bool).any(-1, keepdim=True).expand(B, Sq)
    rows = torch.arange(Sq, device=mask.device)
    if Sq == Sk:
        keys = rows
    else:
        seen = mask[:, 0].to(torch.bool).any(0)  # [Sq, Sk]: keys some sample's row i sees
        last = (Sk - 1) - seen.flip(-1).to(torch.int8).argmax(-1)  # [Sq]; rows seeing nothing: compared below
        last = torch.where(seen.any(-1), last, -1)
        # clamped to [0, Sk - Sq]: a mask that is not causal (cross-attention, or a prefix seen
        # bidirectionally) would otherwise overshoot; its rows cannot be read off a diagonal
        keys = rows + (last - rows).amax().clamp(0, Sk - Sq)
    return mask[:, 0, rows, keys].to(torch.bool).expand(B, Sq)


class InterventionRun:
    """What ``intervene`` yields: the per-layer plans and, in ``calls``, how many attention
    calls each layer made under the intervention (a layer named in the intervention with
    0 calls after a forward means the intervention never reached it)."""

    def __init__(self, intervention: HeadIntervention, plans: dict[int, _LayerPlan], starts, num_layers: int):
        self.intervention = intervention
        self.plans = plans
        self.segment_starts = starts  # [S] or [B0, S] int32 on the model's device, or None
        self.num_layers = num_layers
        self.calls: Counter[int] = Counter()
        self._prepared: dict[tuple, ops.AttentionArgs] = {}
        self.collector = None  # a HeadScorer, when one is collecting statistics
        self._checked: dict[int, torch.Tensor] = {}  # layer -> [Hq] rows the rule checked (device)
        self._fired: dict[int, torch.Tensor] = {}  # layer -> [Hq] rows it fired on (device)
        self._last_rows: dict[int, int] = {}  # layer -> rows checked by a rows="last" rule
        self._rule_on: dict[int, torch.Tensor] = {}  # layer -> [Hq] int64, 1 for the rule's heads
        self._columns: int | None = None
        self._in_call: list[int] | None = None  # block calls in the model call under way

    def _on_model_call(self, module, args, kwargs) -> None:
        """Before each call of the model: reset the per-call block counts and, when segment
        starts are in use, note the call's total key columns (before any cache update)."""
        self._in_call = [0] * self.num_layers
        self._columns = self._key_columns(args, kwargs) if self.segment_starts is not None else None

    def _after_model_call(self, *unused) -> None:
        self._columns, self._in_call = None, None

    @staticmethod
    def _key_columns(args, kwargs):
        """Key columns of a model call (cached keys and its tokens), read before the forward
        updates any cache: the length of its [B, T] ``attention_mask``, else the input length
        plus the cache's ``get_seq_length()`` (``past_key_values`` or ``cache``; an int, or a
        device tensor for static caches, kept as one: no synchronisation); None if neither
        is known."""
        from .scoring import _mask_from_forward

        mask = _mask_from_forward(args, kwargs)
        if mask is not None:
            return mask.shape[-1]
        x = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        seen = past.get_seq_length() if hasattr(past, "get_seq_length") else 0
        return x.shape[1] + seen

    def window_args(self, args: ops.AttentionArgs, Sq: int, Sk: int) -> ops.AttentionArgs:
        """``args`` for a sliding-window layer whose cache keeps only the last ``Sk`` keys:
        its key column ``j`` is position ``j + off`` with ``off = columns - Sk``, so the
        segment starts move to ``max(start - off, 0)`` (a segment wholly before the window
        is empty). A device op, no synchronisation."""
        if args.segment_starts is None or Sk == Sq:
            return args
        columns = self._columns
        if columns is None:
            raise ValueError(
                "segment starts on a sliding-window layer with a cache need the model's own call (its "
                "attention_mask, or past_key_values): call the model intervene() was given"
            )
        off = columns - Sk
        if isinstance(off, torch.Tensor):  # a static cache's length: stays on the device
            off = off.clamp_min(0).to(device=args.segment_starts.device, dtype=args.segment_starts.dtype)
        elif off <= 0:
            return args
        return args._replace(segment_starts=(args.segment_starts - off).clamp_min_(0))

    @staticmethod
    def _per_batch(t: torch.Tensor | None, B: int, what: str) -> torch.Tensor | None:
        """A per-sample argument [B0, ...] for a call with batch B: as is, or repeated per
        sample when generate expanded the batch (num_return_sequences, beams: B = k * B0)."""
        if t is None or t.dim() < 2 or t.shape[0] == B:
            return t
        B0 = t.shape[0]
        if B % B0:
            raise ValueError(f"{what} was given for {B0} samples but the model ran a batch of {B}")
        return t.repeat_interleave(B // B0, dim=0)

    def attention_args(self, layer: int, B: int, Hq: int, device) -> ops.AttentionArgs:
        """The op's prepared arguments for ``layer`` at batch size ``B``: built and checked on
        the first call, then reused for every decode step."""
        key = (layer, B, Hq, str(device))
        args = self._prepared.get(key)
        if args is None:
            plan = self.plans.get(layer)
            kw: dict[str, Any] = {}
            wants = self.collector.stats if self.collector is not None else ()
            if plan is not None:
                if plan.gate is not None:
                    kw["head_gate"] = self._per_batch(plan.gate, B, "per-sample gates")
                if plan.scale is not None or plan.rule is not None:
                    kw["segment_scale"] = plan.scale
                    kw["adaptive"] = plan.rule
                    kw["return_rule_fired"] = plan.rule is not None
            if "segment_mass" in wants or "segment_scale" in kw:
                kw["segment_starts"] = self._per_batch(self.segment_starts, B, "segment_starts")
            kw["return_segment_mass"] = "segment_mass" in wants
            kw["return_head_stats"] = any(s in wants for s in ("entropy", "max_logit", "sink_mass"))
            args = ops.prepare_attention_args(B, Hq, device, **kw)
            self._prepared[key] = args
        return args

    def after_call(self, layer: int, args: ops.AttentionArgs, res: ops.AttentionOutputs, mask,
                   B: int, Sq: int, Sk: int) -> None:
        """Book-keeping after one attention call (device tensors only, no synchronisation):
        the adaptive rule's checked/fired rows, and the collector's statistics. Rows "last":
        the last row of each sample (counted on the host); rows "all": the valid rows."""
        if res.fired is not None:
            fired = res.fired
            if self.plans[layer].rule.rows == "last":
                self._last_rows[layer] = self._last_rows.get(layer, 0) + B
            else:
                valid = valid_query_rows(mask, B, Sq, Sk)
                if valid is None:
                    rows = B * Sq
                else:
                    rows = valid.sum()
                    fired = fired * valid[:, None, :].to(fired.dtype)
                on = self._rule_on.get(layer)
                if on is None:
                    on = self._rule_on[layer] = args.rule_heads.to(torch.int64)  # [Hq] on the device
                self._checked[layer] = self._checked.get(layer, 0) + on * rows
            self._fired[layer] = self._fired.get(layer, 0) + fired.sum((0, 2), dtype=torch.int64)
        if self.collector is not None:
            self.collector._collect(layer, res, mask, B, Sq, Sk)

    def rule_report(self) -> dict[tuple[int, int], dict[str, int]]:
        """Per (layer, head) of the adaptive rule: how many query rows it checked and how many
        it fired on, over every call so far. A rule that never fired is visible here instead
        of passing silently. Reads the counts from the device (one transfer)."""
        rule = self.intervention.adaptive
        if rule is None:
            return {}
        out = {}
        for layer, head in rule.heads:
            checked = self._checked.get(layer)
            fired = self._fired.get(layer)
            out[(layer, head)] = {
                "checked": (int(checked[head]) if checked is not None else 0) + self._last_rows.get(layer, 0),
                "fired": int(fired[head]) if fired is not None else 0,
            }
        return out


def avss_fast_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"avss_fast"`` attention implementation (transformers ``AttentionInterface``).

    ``query`` [B, Hq, Sq, D], ``key``/``value`` [B, Hkv, Sk, D] (cache already updated),
    ``attention_mask`` bool [B, 1, Sq, Sk] from the registered mask function or None.
    Returns ([B, Sq, Hq, D], None). Without an active intervention it is plain attention."""
    for name in ("softcap", "sinks", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"the avss_fast attention does not support `{name}` ({type(module).__name__}); "
                "this model cannot run head interventions"
            )
    if dropout and module.training:
        raise NotImplementedError("the avss_fast attention has no dropout: put the model in eval mode")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True materialises every attention map; the avss_fast attention "
                         "never does (use HeadScorer for per-head statistics)")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"the avss_fast attention expects a bool mask from its mask function, got {mask.dtype}")
    # Causal order is passed even with a mask: the mask transformers builds already is causal
    # (and no looser than bottom-right alignment, also with a static cache), so the AND
    # changes nothing, and it lets the kernels skip the key blocks above the diagonal.
    causal = bool(is_causal) and Sq > 1
    if causal and mask is None and Sk > Sq:
        # as in transformers' SDPA integration: only a prefill into an empty static cache
        # gets here; the keys past the prompt are empty slots
        key, value = key[:, :, :Sq], value[:, :, :Sq]
    if mask is not None and mask.shape[2] == 1 and mask.shape[1] == 1:
        mask = mask[:, 0, 0, :]  # decode: a key mask is all there is
    scale = float(scaling) if scaling is not None else D ** -0.5
    dt = _autocast_dtype(query.device.type)
    if dt is not None or not (query.dtype == key.dtype == value.dtype):
        # as SDPA under autocast: one compute dtype (RoPE leaves q, k in fp32 beside a bf16 v)
        dt = dt if dt is not None else query.dtype
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    Dv = value.shape[-1]
    if Dv != D:  # DeepSeek's MLA: value heads of another size; zero columns change no score and no output
        if Dv < D:
            value = torch.nn.functional.pad(value, (0, D - Dv))
        else:
            query, key = torch.nn.functional.pad(query, (0, Dv - D)), torch.nn.functional.pad(key, (0, Dv - D))
    entry = _ACTIVE.get(id(module))
    if entry is not None:
        layer, run = entry
        run.calls[layer] += 1
        args = run.attention_args(layer, B, Hq, query.device)
        if kwargs.get("sliding_window"):  # a rolling cache keeps the last keys only
            args = run.window_args(args, Sq, key.shape[2])
    else:
        args = _PLAIN
    res = ops.masked_attention_prepared(query, key, value, args, scaling=scale, causal=causal, attention_mask=mask)
    if entry is not None:
        run.after_call(layer, args, res, mask, B, Sq, key.shape[2])
    return (res.out[..., :Dv] if Dv < res.out.shape[-1] else res.out), None


_PLAIN = ops.AttentionArgs(None, None, None, None)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def register() -> None:
    """Register ``"avss_fast"`` with transformers' attention and mask interfaces (idempotent).

    The mask function is transformers' own SDPA one (bool [B, 1, Sq, Sk], or None when
    causal order alone decides); without it the attention would get no padding mask."""
    global _REGISTERED
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, avss_fast_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _REGISTERED = True


# ----------------------------------------------------------------------------- intervene


def _all_configs(model: nn.Module) -> list:
    """Every config object the model and its sub-models carry (and their sub-configs)."""
    seen: dict[int, Any] = {}
    todo = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    while todo:
        cfg = todo.pop()
        if id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                todo.append(sub)
    return list(seen.values())


def _check_supported(model: nn.Module) -> None:
    """Attention features the op does not have: refuse up front, naming the feature."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    dropout = next((getattr(text, n) for n in ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")
                    if isinstance(getattr(text, n, None), (int, float))), 0.0)
    if model.training and dropout > 0:
        raise ValueError(f"{type(model).__name__} is in training mode with attention dropout {dropout}; the avss_fast "
                         "attention has no dropout: call model.eval() first")
    if getattr(text, "relative_attention_num_buckets", None) is not None:
        raise ValueError(
            f"{type(model).__name__} adds a learned relative position bias to its attention logits (T5-style); "
            "the avss_fast attention has none, so this model cannot take head interventions"
        )
    for name in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(text, name, None) is not None:
            raise ValueError(
                f"{type(model).__name__} caps its attention logits ({name}={getattr(text, name)}); the avss_fast "
                "attention has no logit soft-capping, so this model cannot take head interventions"
            )


def _num_query_heads(model: nn.Module) -> int:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("num_attention_heads", "n_head", "n_heads"):
        n = getattr(text, name, None)
        if isinstance(n, int) and n > 0:
            return n
    raise ValueError(f"cannot tell the number of attention heads of {type(model).__name__} from its config")


@contextmanager
def intervene(model: nn.Module, intervention: HeadIntervention | None = None, *, layers_path: str | None = None):
    """Run ``model`` (forward or ``generate``) with ``intervention`` applied to its heads.

    Switches every config of the model to the ``"avss_fast"`` attention implementation and
    restores each one's previous implementation on exit, also after an exception. Yields an
    :class:`InterventionRun` (``run.calls``: attention calls per layer). An empty
    intervention gives plain attention (equal to SDPA within dtype tolerance). The
    intervention is read once, on entry: changing its gates or rule inside the ``with``
    has no effect (enter a new ``with`` for new settings).

    Raises ValueError for out-of-range layers/heads and for models whose attention does
    not go through transformers' ``AttentionInterface`` (they cannot take it)."""
    intervention = intervention if intervention is not None else HeadIntervention()
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} is not a transformers PreTrainedModel; intervene needs one")
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "so its heads cannot be intervened on"
        )
    _check_supported(model)
    path, blocks = find_layers(model, layers_path)
    num_layers, num_heads = len(blocks), _num_query_heads(model)
    device = model_device(model)
    plans = build_plans(intervention, num_layers, num_heads, device)
    starts = None
    if intervention.segment_starts is not None:
        starts = torch.as_tensor(intervention.segment_starts, dtype=torch.int32).to(device)
    register()
    run = InterventionRun(intervention, plans, starts, num_layers)
    owned = {id(m): (i, run) for i, block in enumerate(blocks) for m in block.modules()}
    busy = [k for k in owned if k in _ACTIVE]
    if busy:
        raise RuntimeError("this model is already under intervene(); nested interventions are not supported")
    configs = _all_configs(model)
    saved = [(cfg, cfg.__dict__.get("_attn_implementation_internal", None)) for cfg in configs]
    _ACTIVE.update(owned)
    hooks = [model.register_forward_pre_hook(run._on_model_call, with_kwargs=True),
             model.register_forward_hook(run._after_model_call, always_call=True)]
    from .pruning import _layer_config

    if _layer_config(model, num_layers) is None:
        # no config declares this many layers: a block may be applied at several depths (ALBERT's one
        # block for 12 layers), so count block calls (a hook per block costs ~0.1 ms per decode step
        # each on CPU, so only here)
        hooks += [block.register_forward_pre_hook(lambda m, a, i=i: count_block_call(run._in_call, i, m))
                  for i, block in enumerate(blocks)]
    try:
        try:
            model.set_attn_implementation(ATTENTION_NAME)
        except (ValueError, ImportError) as e:
            raise ValueError(f"{type(model).__name__} cannot take the avss_fast attention: {e}") from e
        yield run
    finally:
        for h in hooks:
            h.remove()
        for k in owned:
            _ACTIVE.pop(k, None)
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl


# attribution builds on intervene; ARCHITECTURE.md places attribute_heads here
from .attribution import attribute_heads  # noqa: E402,F401

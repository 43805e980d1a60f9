"""The thin op API: validate, pick a backend, return mergeable accumulators.

Backends (``AVSS_FAST_BACKEND`` forces one):

* ``triton``: the fused kernels of ``avss_fast.kernels`` (default on CUDA/ROCm, and on
  CPU when ``TRITON_INTERPRET=1`` was set before the kernels were imported: tests only);
* ``torch``: the fused one-pass chunked torch path of ``avss_fast.fused_cpu`` (default
  on CPU);
* ``reference``: the eager float64 oracle of ``avss_fast.reference``.

Each op is registered with ``torch.library.custom_op`` (``avss_fast::layer_moments``,
``avss_fast::block_similarity``, ``avss_fast::masked_attention``) with a fake implementation, so it survives
``torch.compile``. Post-processing of kernel partials is float64 device tensor math: no
host synchronisation on the triton path.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from typing import NamedTuple

import torch

from . import fused_cpu, reference
from .stats import Moments, Similarity

_F64 = torch.float64
_I64 = torch.int64
BACKENDS = ("triton", "torch", "reference")
MAX_SEGMENTS = 4  # per-segment running masses in the attention kernel (kernels/masked_attention.py)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(t: torch.Tensor) -> str:
    """The backend an op will use for a tensor on ``t``'s device."""
    forced = os.environ.get("AVSS_FAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"AVSS_FAST_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "triton" and t.device.type == "cpu" and not _interpreting():
            raise RuntimeError(
                "AVSS_FAST_BACKEND=triton on a CPU tensor needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing avss_fast (tests only; it is slow)"
            )
        return forced
    if t.device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:  # pragma: no cover - CUDA without triton
            return "torch"
        return "triton"
    if t.device.type == "cpu" and _interpreting():
        return "triton"
    return "torch"


# ----------------------------------------------------------------------------- validation


def _check_hidden(name: str, h) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32/fp16/bf16/fp64), got {h.dtype}")
    if h.dim() != 3:
        raise ValueError(f"{name} must have shape [batch, tokens, hidden], got {tuple(h.shape)}")


def _check_mask(mask, h: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dim() != 2 or tuple(mask.shape) != tuple(h.shape[:2]):
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} does not match hidden [batch, tokens] = {tuple(h.shape[:2])}"
        )
    if mask.is_complex():
        raise TypeError(f"attention_mask must be bool, integer or float, got {mask.dtype}")
    if mask.device != h.device:
        mask = mask.to(h.device, non_blocking=True)
    return mask


# ----------------------------------------------------------------------------- layer_moments


def check_sparsity_thresholds(sparsity_eps, sparsity_rel) -> None:
    """ValueError unless ``sparsity_eps >= 0`` is finite and ``sparsity_rel`` is None or > 0."""
    def number(x) -> bool:  # Python and NumPy reals; not bool (True would be 1.0)
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))

    if not (number(sparsity_eps) and sparsity_eps >= 0):
        raise ValueError(f"sparsity_eps must be a finite number >= 0, got {sparsity_eps!r}")
    if sparsity_rel is not None and not (number(sparsity_rel) and sparsity_rel > 0):
        raise ValueError(f"sparsity_rel must be None or a finite number > 0, got {sparsity_rel!r}")


def _eager_or_op(impl, op):
    """The custom op under ``torch.compile`` (it needs the registered op and its fake), the
    plain implementation in eager mode: the custom-op dispatch costs tens of microseconds
    a call, which shows when a model calls the op once per block and batch."""
    return op if torch.compiler.is_compiling() else impl


def strict_fp32_bound(x: float) -> float:
    """The fp32 value ``t`` with ``v < t`` exactly when ``v < x``, for every fp32 ``v``
    (``x >= 0``): ``x`` rounded to fp32, or the next fp32 up when that rounding went down
    (fp32(1e-5) is 9.99999975e-06, so ``|v| < fp32(1e-5)`` missed ``v = fp32(1e-5)``, which
    is below 1e-5)."""
    if not x <= 3.4028234663852886e38:
        return float("inf")
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    f = struct.unpack("<f", struct.pack("<I", bits))[0]
    return f if f >= x else struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def _layer_moments_impl(hidden, attention_mask, sparsity_eps, sparsity_rel, backend):
    B, T, D = hidden.shape
    if sparsity_rel is None and backend != "reference":  # the fast paths compare fp32 values with it
        sparsity_eps = strict_fp32_bound(sparsity_eps)
    if backend == "triton":
        from .kernels import layer_moments_packed

        if B * T * D == 0:
            return fused_cpu.layer_moments_packed(hidden, attention_mask, sparsity_eps, sparsity_rel)
        return layer_moments_packed(hidden, attention_mask, sparsity_eps, sparsity_rel)
    if backend == "reference":
        m = reference.layer_moments(hidden, attention_mask, sparsity_eps=sparsity_eps, sparsity_rel=sparsity_rel)
        ints, flts = m.to(hidden.device)._pack()
        return ints, flts
    return fused_cpu.layer_moments_packed(hidden, attention_mask, sparsity_eps, sparsity_rel)


@torch.library.custom_op("avss_fast::layer_moments", mutates_args=())
def _layer_moments_op(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sparsity_eps: float,
    sparsity_rel: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _layer_moments_impl(hidden, attention_mask, sparsity_eps, sparsity_rel, backend)


@_layer_moments_op.register_fake
def _(hidden, attention_mask, sparsity_eps, sparsity_rel, backend):
    return (
        torch.empty(5, dtype=_I64, device=hidden.device),
        torch.empty(4, dtype=_F64, device=hidden.device),
    )


def layer_moments(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    sparsity_eps: float = 1e-5,
    sparsity_rel: float | None = None,
) -> Moments:
    """Streaming statistics of hidden states ``hidden`` [B, T, D] in one read.

    Positions with ``attention_mask == 0`` are ignored (``attention_mask`` [B, T]: bool,
    integer or float, nonzero = token, as transformers' [batch, tokens] masks; an additive
    mask, 0 = token and -inf = padding, would be read backwards); NaN/Inf values are
    counted in ``nonfinite`` and left out of everything else. With ``H`` the valid finite values:

    * ``pooled_var_sum = sum_b Var_d(mean_t h[b, t, d])`` (unbiased over d): the AVSS
      variance once divided by ``samples``;
    * ``token_var_sum = sum_(b,t) Var_d(h[b, t, :])`` over ``tokens``;
    * ``mean``, ``m2 = sum (h - mean)^2`` over ``elements``;
    * ``near_zero = #{|h| < sparsity_eps}``, or with ``sparsity_rel`` set,
      ``#{|h| < sparsity_rel * rms(h[b, t, :])}`` (a scale-free threshold for residual
      streams, where an absolute 1e-5 often finds nothing).

    Computed in fp32 whatever the input dtype (sums merged in float64). Returns a
    :class:`~avss_fast.stats.Moments` on ``hidden``'s device (merge with ``+``).
    """
    _check_hidden("hidden", hidden)
    mask = _check_mask(attention_mask, hidden)
    check_sparsity_thresholds(sparsity_eps, sparsity_rel)
    ints, flts = _eager_or_op(_layer_moments_impl, _layer_moments_op)(
        hidden.detach(), None if mask is None else mask.detach(), float(sparsity_eps),
        None if sparsity_rel is None else float(sparsity_rel), backend_for(hidden),
    )
    return Moments._unpack(ints, flts)


# ----------------------------------------------------------------------------- block_similarity


def _block_similarity_impl(h_in, h_out, attention_mask, eps, backend):
    if backend == "triton" and h_in.numel() > 0:
        from .kernels import block_similarity_rows

        cos, status = block_similarity_rows(h_in, h_out, attention_mask, eps)
        ok = status == 1
        c = torch.where(ok, cos.to(_F64), torch.zeros((), dtype=_F64, device=cos.device))
        ang = torch.where(ok, torch.arccos(c) / math.pi, torch.zeros_like(c))
        ints = torch.stack([ok.sum(), (status == -1).sum()])
        return ints, torch.stack([c.sum(), ang.sum()])
    if backend == "reference":
        s = reference.block_similarity(h_in, h_out, attention_mask, eps=eps)
        ints, flts = s.to(h_in.device)._pack()
        return ints, flts
    return fused_cpu.block_similarity_packed(h_in, h_out, attention_mask, eps)


@torch.library.custom_op("avss_fast::block_similarity", mutates_args=())
def _block_similarity_op(
    h_in: torch.Tensor, h_out: torch.Tensor, attention_mask: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _block_similarity_impl(h_in, h_out, attention_mask, eps, backend)


@_block_similarity_op.register_fake
def _(h_in, h_out, attention_mask, eps, backend):
    return torch.empty(2, dtype=_I64, device=h_in.device), torch.empty(2, dtype=_F64, device=h_in.device)


def block_similarity(
    h_in: torch.Tensor, h_out: torch.Tensor, attention_mask: torch.Tensor | None = None, *, eps: float = 1e-8
) -> Similarity:
    """Similarity of a block's input ``h_in`` and output ``h_out`` ([B, T, D] each), one pass.

    Over valid tokens t: ``cos_t = <h_in_t, h_out_t> / max(|h_in_t| |h_out_t|, eps)``;
    returns sums of ``cos_t`` and ``arccos(cos_t) / pi`` and the token count. Tokens with
    a NaN/Inf in either vector are skipped and counted in ``nonfinite``. ShortGPT's Block
    Influence is ``1 - cos_sum / tokens``.
    """
    _check_hidden("h_in", h_in)
    _check_hidden("h_out", h_out)
    if h_in.shape != h_out.shape:
        raise ValueError(f"h_in {tuple(h_in.shape)} and h_out {tuple(h_out.shape)} must have the same shape")
    if h_in.device != h_out.device:
        raise ValueError(f"h_in is on {h_in.device} but h_out is on {h_out.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < float(eps) < math.inf:
        raise ValueError(f"eps must be a finite number > 0 (the floor of |h_in| |h_out|), got {eps!r}")
    mask = _check_mask(attention_mask, h_in)
    ints, flts = _eager_or_op(_block_similarity_impl, _block_similarity_op)(
        h_in.detach(), h_out.detach(), None if mask is None else mask.detach(), float(eps), backend_for(h_in)
    )
    return Similarity._unpack(ints, flts)


# ----------------------------------------------------------------------------- masked_attention


def _small_tensor(x, dtype, device) -> torch.Tensor:
    """A small argument (list or tensor) on ``device``, built on the host and copied without
    blocking, so that a GPU caller never waits for the device here."""
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device, non_blocking=True)


class AttentionRule(NamedTuple):
    """The adaptive (ADHH) rule at the op level: for query heads ``heads``, where the
    softmax mass on ``segment`` in a query row is >= ``threshold``, that segment's
    probabilities are multiplied by ``scale`` (0 = deactivation); ``rows`` is ``"last"``
    (the published method: only the last query row) or ``"all"``."""

    heads: tuple
    segment: int
    threshold: float = 0.4
    scale: float = 0.0
    rows: str = "last"


#: the columns of ``masked_attention``'s per-row head statistics (``return_head_stats``)
HEAD_STATS = ("entropy", "max_logit", "sink_mass")


def _masked_attention_impl(
    q, k, v, key_mask, full_mask, head_gate, segment_starts, segment_scale, rule_heads,
    scaling, causal, rule_segment, threshold, rule_scale, last_row_only, return_segment_mass,
    return_head_stats, return_rule_fired, backend,
):
    kw = dict(
        scaling=scaling, causal=causal, key_mask=key_mask, full_mask=full_mask, head_gate=head_gate,
        segment_starts=segment_starts, segment_scale=segment_scale, rule_heads=rule_heads,
        rule_segment=rule_segment, threshold=threshold, rule_scale=rule_scale,
        last_row_only=last_row_only, return_segment_mass=return_segment_mass,
        return_head_stats=return_head_stats, return_rule_fired=return_rule_fired,
    )
    if backend == "triton":
        from .kernels.masked_attention import masked_attention_fwd

        res = masked_attention_fwd(q, k, v, **kw)
    elif backend == "reference":
        res = _masked_attention_reference(q, k, v, **kw)
    else:
        from .attention_cpu import masked_attention_torch

        res = masked_attention_torch(q, k, v, **kw)
    return res  # (out, mass, stats, fired); None where not requested


@torch.library.custom_op("avss_fast::masked_attention", mutates_args=())
def _masked_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_mask: torch.Tensor | None, full_mask: torch.Tensor | None, head_gate: torch.Tensor | None,
    segment_starts: torch.Tensor | None, segment_scale: torch.Tensor | None, rule_heads: torch.Tensor | None,
    scaling: float, causal: bool, rule_segment: int, threshold: float, rule_scale: float,
    last_row_only: bool, return_segment_mass: bool, return_head_stats: bool, return_rule_fired: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    res = _masked_attention_impl(
        q, k, v, key_mask, full_mask, head_gate, segment_starts, segment_scale, rule_heads,
        scaling, causal, rule_segment, threshold, rule_scale, last_row_only, return_segment_mass,
        return_head_stats, return_rule_fired, backend,
    )
    empty = lambda dt: torch.empty((0,), dtype=dt, device=q.device)  # noqa: E731  (an op returns tensors)
    return (res[0],) + tuple(x if x is not None else empty(dt) for x, dt in zip(
        res[1:], (torch.float32, torch.float32, torch.int8)))


@_masked_attention_op.register_fake
def _(q, k, v, key_mask, full_mask, head_gate, segment_starts, segment_scale, rule_heads, scaling, causal,
      rule_segment, threshold, rule_scale, last_row_only, return_segment_mass, return_head_stats,
      return_rule_fired, backend):
    B, Hq, Sq, D = q.shape
    S = segment_starts.shape[1] if segment_starts is not None else 1
    out = q.new_empty((B, Sq, Hq, D))
    f32 = dict(dtype=torch.float32)
    mass = q.new_empty((B, Hq, Sq, S), **f32) if return_segment_mass else q.new_empty((0,), **f32)
    stats = q.new_empty((B, Hq, Sq, len(HEAD_STATS)), **f32) if return_head_stats else q.new_empty((0,), **f32)
    fired = q.new_empty((B, Hq, Sq), dtype=torch.int8) if return_rule_fired else q.new_empty((0,), dtype=torch.int8)
    return out, mass, stats, fired


def _masked_attention_reference(q, k, v, *, scaling, causal, key_mask, full_mask, head_gate, segment_starts,
                                segment_scale, rule_heads, rule_segment, threshold, rule_scale, last_row_only,
                                return_segment_mass, return_head_stats=False, return_rule_fired=False):
    mask = None
    if full_mask is not None:
        mask = full_mask.to(torch.bool)
    if key_mask is not None:
        km = key_mask.to(torch.bool)[:, None, None, :]
        mask = km if mask is None else mask & km
    rule = None
    if rule_heads is not None:
        heads = tuple(int(h) for h in torch.nonzero(rule_heads).flatten())
        rule = AttentionRule(heads, rule_segment, threshold, rule_scale, "last" if last_row_only else "all")
    res = reference.masked_attention_outputs(
        q, k, v, scaling=scaling, causal=causal, attention_mask=mask, head_gate=head_gate,
        segment_starts=segment_starts, segment_scale=segment_scale, adaptive=rule,
    )
    return (res["out"], res["mass"] if return_segment_mass else None, res["stats"] if return_head_stats else None,
            res["fired"] if return_rule_fired else None)


class AttentionArgs(NamedTuple):
    """The small per-call arguments of ``masked_attention``, validated and on the device
    (see :func:`prepare_attention_args`)."""

    head_gate: torch.Tensor | None  # [B, Hq] float32
    segment_starts: torch.Tensor | None  # [B, S] int32
    segment_scale: torch.Tensor | None  # [B, Hq, S] float32
    rule_heads: torch.Tensor | None  # [Hq] int8
    rule_segment: int = 0
    threshold: float = 0.0
    rule_scale: float = 1.0
    last_row_only: bool = True
    return_segment_mass: bool = False
    return_head_stats: bool = False
    return_rule_fired: bool = False


def prepare_attention_args(
    B: int, Hq: int, device, *, head_gate=None, segment_starts=None, segment_scale=None,
    adaptive: AttentionRule | None = None, return_segment_mass: bool = False, return_head_stats: bool = False,
    return_rule_fired: bool = False,
) -> AttentionArgs:
    """Validate and place the small arguments of ``masked_attention`` for a batch of ``B``
    rows and ``Hq`` query heads. A caller that runs many calls with the same arguments
    (a head intervention during ``generate``) prepares them once."""
    dev = device
    gate = None
    if head_gate is not None:
        g = _small_tensor(head_gate, torch.float32, dev)
        if g.dim() == 1 and g.shape[0] == Hq:
            g = g[None].expand(B, Hq)
        if tuple(g.shape) != (B, Hq):
            raise ValueError(f"head_gate must be [Hq] or [B, Hq] = [{B}, {Hq}], got {tuple(g.shape)}")
        gate = g.contiguous()
    starts = None
    S = 1
    if segment_starts is not None:
        if not isinstance(segment_starts, torch.Tensor) or segment_starts.device.type == "cpu":
            host = torch.as_tensor(segment_starts)  # checked on the host, before the copy
            if not host.is_floating_point() and bool((host < 0).any()):
                raise ValueError("segment_starts must be key positions >= 0")
            if host.dim() >= 1 and host.shape[-1] > 1 and not host.is_floating_point() and bool(
                (host[..., 1:] < host[..., :-1]).any()
            ):
                raise ValueError("segment_starts must be non-decreasing within each row")
        st = _small_tensor(segment_starts, None, dev)
        if st.dim() == 1:
            st = st[None].expand(B, -1)
        if st.dim() != 2 or st.shape[0] != B or st.shape[1] < 1:
            raise ValueError(f"segment_starts must be [S] or [B, S], got {tuple(st.shape)}")
        if st.is_floating_point():
            raise TypeError("segment_starts must be integer key positions")
        S = st.shape[1]
        if S > MAX_SEGMENTS:
            raise ValueError(f"at most {MAX_SEGMENTS} segments are supported, got {S}")
        starts = st.to(torch.int32).clone(memory_format=torch.contiguous_format)  # private: caches hang on it
    scale = None
    if segment_scale is not None:
        if starts is None:
            raise ValueError("segment_scale needs segment_starts")
        sc = _small_tensor(segment_scale, torch.float32, dev)
        if sc.dim() == 2 and tuple(sc.shape) == (Hq, S):
            sc = sc[None].expand(B, -1, -1)
        if tuple(sc.shape) != (B, Hq, S):
            raise ValueError(f"segment_scale must be [Hq, S] or [B, Hq, S] = [{B}, {Hq}, {S}], got {tuple(sc.shape)}")
        scale = sc.contiguous()
    rule_heads = None
    rule_segment, threshold, rule_scale, last_row_only = 0, 0.0, 1.0, True
    if adaptive is not None:
        if starts is None:
            raise ValueError("adaptive needs segment_starts")
        if adaptive.rows not in ("last", "all"):
            raise ValueError(f"adaptive.rows must be 'last' or 'all', got {adaptive.rows!r}")
        if not 0 <= adaptive.segment < S:
            raise ValueError(f"adaptive.segment {adaptive.segment} is out of range for {S} segments")
        bad = [h for h in adaptive.heads if not 0 <= int(h) < Hq]
        if bad:
            raise ValueError(f"adaptive heads {bad} are out of range for {Hq} query heads")
        on = [0] * Hq
        for h in adaptive.heads:
            on[int(h)] = 1
        rule_heads = _small_tensor(on, torch.int8, dev)
        rule_segment, threshold, rule_scale = int(adaptive.segment), float(adaptive.threshold), float(adaptive.scale)
        if not (math.isfinite(threshold) and math.isfinite(rule_scale)):
            raise ValueError(f"adaptive threshold and scale must be finite, got {threshold} and {rule_scale}")
        last_row_only = adaptive.rows == "last"
    if return_segment_mass and starts is None:
        starts = torch.zeros((B, 1), dtype=torch.int32, device=dev)
    return AttentionArgs(gate, starts, scale, rule_heads, rule_segment, threshold, rule_scale, last_row_only,
                         bool(return_segment_mass), bool(return_head_stats),
                         bool(return_rule_fired and rule_heads is not None))


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={B}, Hkv, Sk, D={D}]")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not (k.dtype == v.dtype == q.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _mask_args(attention_mask, B, Hq, Sq, Sk, dev, keep_bool=False):
    """(key_mask [B, Sk] int8, full_mask [B, 1|Hq, Sq, Sk] int8), at most one of them set.
    ``keep_bool``: a bool 4-D mask is passed on as it is (the torch path reads bool; the
    Triton kernel wants a contiguous int8 copy)."""
    if attention_mask is None:
        return None, None
    if attention_mask.is_floating_point():
        raise TypeError("attention_mask must be bool (True = attend) or integer (nonzero = attend); "
                        "additive float masks are not accepted, since a bias would be silently dropped")
    m = attention_mask.to(dev, non_blocking=True)
    if m.dim() == 2:
        if tuple(m.shape) != (B, Sk):
            raise ValueError(f"a 2-D attention_mask must be [B, Sk] = {(B, Sk)}, got {tuple(m.shape)}")
        return (m != 0).to(torch.int8).contiguous(), None
    if m.dim() == 4:
        if m.shape[0] not in (1, B) or m.shape[1] not in (1, Hq) or tuple(m.shape[2:]) != (Sq, Sk):
            raise ValueError(f"a 4-D attention_mask must be [B|1, 1|Hq, Sq, Sk] = [{B}, 1|{Hq}, {Sq}, {Sk}], "
                             f"got {tuple(m.shape)}")
        if keep_bool and m.dtype == torch.bool:
            return None, m.expand(B, m.shape[1], Sq, Sk)
        if m.dtype == torch.bool and m.shape[0] == B and m.is_contiguous():
            return None, m.view(torch.int8)  # same bytes: no copy per layer
        return None, (m != 0).to(torch.int8).expand(B, m.shape[1], Sq, Sk).contiguous()
    raise ValueError(f"attention_mask must be [B, Sk] or [B, 1|Hq, Sq, Sk], got {tuple(m.shape)}")


class AttentionOutputs(NamedTuple):
    """Everything one ``masked_attention`` call computed; fields not requested are None."""

    out: torch.Tensor  # [B, Sq, Hq, D]
    mass: torch.Tensor | None  # [B, Hq, Sq, S] float32
    stats: torch.Tensor | None  # [B, Hq, Sq, 3] float32: HEAD_STATS
    fired: torch.Tensor | None  # [B, Hq, Sq] int8: where the adaptive rule fired


def masked_attention_prepared(q, k, v, args: AttentionArgs, *, scaling: float, causal: bool = True,
                              attention_mask=None) -> AttentionOutputs:
    """``masked_attention`` with arguments from :func:`prepare_attention_args` (checked once).
    Under ``torch.compile`` it goes through the registered custom op; in eager mode it calls
    the implementation directly (the custom-op dispatch costs tens of microseconds a call,
    which shows in token-by-token decoding). With autograd recording for an input, the
    differentiable torch path runs (the Triton kernel is forward only)."""
    _check_qkv(q, k, v)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    backend = backend_for(q)
    if backend == "triton" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, args.head_gate, args.segment_scale)):
        backend = "torch"  # the kernel is forward only; the torch path is differentiable
    compiling = torch.compiler.is_compiling()
    key_mask, full_mask = _mask_args(attention_mask, B, Hq, Sq, Sk, q.device,
                                     keep_bool=backend == "torch" and not compiling)
    call = _masked_attention_op if compiling else _masked_attention_impl  # see _eager_or_op
    out, mass, stats, fired = call(
        q, k, v, key_mask, full_mask, args.head_gate, args.segment_starts, args.segment_scale, args.rule_heads,
        float(scaling), bool(causal), args.rule_segment, args.threshold, args.rule_scale, args.last_row_only,
        args.return_segment_mass, args.return_head_stats, args.return_rule_fired, backend,
    )
    return AttentionOutputs(out, mass if args.return_segment_mass else None,
                            stats if args.return_head_stats else None, fired if args.return_rule_fired else None)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    head_gate: torch.Tensor | None = None,
    segment_starts=None,
    segment_scale: torch.Tensor | None = None,
    adaptive: AttentionRule | None = None,
    return_segment_mass: bool = False,
    return_head_stats: bool = False,
):
    """Attention forward with head gates, segment reweighting and the adaptive rule, in one
    pass and O(S) memory. ``q`` [B, Hq, Sq, D], ``k``/``v`` [B, Hkv, Sk, D] (Hq a multiple of
    Hkv; k/v never repeated by the kernel). Returns ``out`` [B, Sq, Hq, D] (the layout
    transformers expects), and with ``return_segment_mass`` also ``mass`` [B, Hq, Sq, S].

    For query row i and allowed keys j (causal: ``j <= i + Sk - Sq``, bottom-right; mask):
    ``p = softmax(scaling q_i . k_j)``; ``mass_s = sum_{j in s} p_j``;
    ``out_i = head_gate[h] * sum_j p_j * segment_scale[h, seg(j)] * a_ij * v_j`` with
    ``a_ij = adaptive.scale`` when head h is in the rule, row i is covered ("last": only
    the last query row), ``seg(j) = adaptive.segment`` and ``mass_segment >= threshold``;
    else 1. Nothing is renormalised.

    ``attention_mask``: bool (True = attend) [B, Sk] key-padding mask or [B, 1|Hq, Sq, Sk];
    integer masks are read as nonzero = attend. ``head_gate``: [Hq] or [B, Hq].
    ``segment_starts``: [S] or [B, S] key positions where each segment begins (the last runs
    to the end), at most 4 segments. ``segment_scale``: [Hq, S] or [B, Hq, S].

    ``return_head_stats``: return ``(out, mass or None, stats)`` with ``stats`` [B, Hq, Sq, 3]
    float32, from the plain softmax over the row's allowed keys (:data:`HEAD_STATS`):
    entropy ``-sum_j p_j ln p_j`` (nats), max logit ``max_j scaling q_i . k_j``, and sink
    mass ``p_j0`` at the row's first allowed key j0. A row with no allowed key gives
    (0, -inf, 0).
    """
    _check_qkv(q, k, v)
    args = prepare_attention_args(
        q.shape[0], q.shape[1], q.device, head_gate=head_gate, segment_starts=segment_starts,
        segment_scale=segment_scale, adaptive=adaptive, return_segment_mass=return_segment_mass,
        return_head_stats=return_head_stats,
    )
    res = masked_attention_prepared(q, k, v, args, scaling=scaling, causal=causal, attention_mask=attention_mask)
    if return_head_stats:
        return res.out, res.mass, res.stats
    return (res.out, res.mass) if return_segment_mass else res.out

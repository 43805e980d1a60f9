"""The thin op API: validate, pick a backend, return mergeable accumulators.

Backends (``AVSS_FAST_BACKEND`` forces one):

* ``triton``: the fused kernels of ``avss_fast.kernels`` (default on CUDA/ROCm, and on
  CPU when ``TRITON_INTERPRET=1`` was set before the kernels were imported: tests only);
* ``torch``: the fused one-pass chunked torch path of ``avss_fast.fused_cpu`` (default
  on CPU);
* ``reference``: the eager float64 oracle of ``avss_fast.reference``.

Each op is registered with ``torch.library.custom_op`` (``avss_fast::layer_moments``,
``avss_fast::block_similarity``) with a fake implementation, so it survives
``torch.compile``. Post-processing of kernel partials is float64 device tensor math: no
host synchronisation on the triton path.
"""

from __future__ import annotations

import math
import os

import torch

from . import fused_cpu, reference
from .stats import Moments, Similarity

_F64 = torch.float64
_I64 = torch.int64
BACKENDS = ("triton", "torch", "reference")


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


def _moments_from_partials(p: dict[str, torch.Tensor], B: int, T: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 merge of the kernel's partial buffers into the packed Moments fields."""
    from .stats import chan_reduce

    colsum = p["colsum"].to(_F64).sum(1)  # [B, D]
    colcnt = p["colcnt"].to(_I64).sum(1)
    keep = colcnt > 0
    nd = keep.sum(1)
    mean_bd = colsum / colcnt.clamp(min=1)
    zero = torch.zeros((), dtype=_F64, device=colsum.device)
    mu = torch.where(keep, mean_bd, zero).sum(1) / nd.clamp(min=1)
    var_b = torch.where(keep, (mean_bd - mu[:, None]) ** 2, zero).sum(1) / (nd - 1).clamp(min=1)
    has_var = nd >= 2
    tok_ok = p["rowcnt"] >= 2
    n, mean, m2 = chan_reduce(p["part_i"][:, 0], p["part_f"][:, 0], p["part_f"][:, 1])
    ints = torch.stack([
        has_var.sum(),
        tok_ok.sum(),
        n,
        p["part_i"][:, 1].to(_I64).sum(),
        p["part_i"][:, 2].to(_I64).sum(),
    ])
    flts = torch.stack([
        torch.where(has_var, var_b, zero).sum(),
        torch.where(tok_ok, p["rowvar"].to(_F64), zero).sum(),
        mean,
        m2,
    ])
    return ints, flts


@torch.library.custom_op("avss_fast::layer_moments", mutates_args=())
def _layer_moments_op(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sparsity_eps: float,
    sparsity_rel: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, D = hidden.shape
    if backend == "triton":
        from .kernels import layer_moments_partials

        if B * T * D == 0:
            return fused_cpu.layer_moments_packed(hidden, attention_mask, sparsity_eps, sparsity_rel)
        p = layer_moments_partials(hidden, attention_mask, sparsity_eps, sparsity_rel)
        return _moments_from_partials(p, B, T, D)
    if backend == "reference":
        m = reference.layer_moments(hidden, attention_mask, sparsity_eps=sparsity_eps, sparsity_rel=sparsity_rel)
        ints, flts = m.to(hidden.device)._pack()
        return ints, flts
    return fused_cpu.layer_moments_packed(hidden, attention_mask, sparsity_eps, sparsity_rel)


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

    Positions with ``attention_mask == 0`` are ignored; NaN/Inf values are counted in
    ``nonfinite`` and left out of everything else. With ``H`` the valid finite values:

    * ``pooled_var_sum = sum_b Var_d(mean_t h[b, t, d])`` (unbiased over d): the AVSS
      variance once divided by ``samples``;
    * ``token_var_sum = sum_(b,t) Var_d(h[b, t, :])`` over ``tokens``;
    * ``mean``, ``m2 = sum (h - mean)^2`` over ``elements``;
    * ``near_zero = #{|h| < sparsity_eps}``, or with ``sparsity_rel`` set,
      ``#{|h| < sparsity_rel * rms(h[b, t, :])}`` (a scale-free threshold for residual
      streams, where an absolute 1e-5 often finds nothing).

    Returns a :class:`~avss_fast.stats.Moments` on ``hidden``'s device (merge with ``+``).
    """
    _check_hidden("hidden", hidden)
    mask = _check_mask(attention_mask, hidden)
    if not (isinstance(sparsity_eps, (int, float)) and math.isfinite(sparsity_eps) and sparsity_eps >= 0):
        raise ValueError(f"sparsity_eps must be a finite number >= 0, got {sparsity_eps!r}")
    if sparsity_rel is not None and not (isinstance(sparsity_rel, (int, float)) and math.isfinite(sparsity_rel) and sparsity_rel > 0):
        raise ValueError(f"sparsity_rel must be None or a finite number > 0, got {sparsity_rel!r}")
    ints, flts = _layer_moments_op(
        hidden.detach(), None if mask is None else mask.detach(), float(sparsity_eps),
        None if sparsity_rel is None else float(sparsity_rel), backend_for(hidden),
    )
    return Moments._unpack(ints, flts)


# ----------------------------------------------------------------------------- block_similarity


@torch.library.custom_op("avss_fast::block_similarity", mutates_args=())
def _block_similarity_op(
    h_in: torch.Tensor, h_out: torch.Tensor, attention_mask: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
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
    mask = _check_mask(attention_mask, h_in)
    ints, flts = _block_similarity_op(
        h_in.detach(), h_out.detach(), None if mask is None else mask.detach(), float(eps), backend_for(h_in)
    )
    return Similarity._unpack(ints, flts)

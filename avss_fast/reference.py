"""Eager PyTorch versions of every op: the test oracle and the benchmark baseline.

Written to be obviously right, not fast: float64 throughout, whole-tensor masks and
boolean indexing, each statistic computed on its own. Semantics are those of ``avss_fast.ops``.
"""

from __future__ import annotations

import torch

from .stats import Moments, Similarity

_F64 = torch.float64


def _valid_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    B, T = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=hidden.device)
    return attention_mask.to(hidden.device) != 0


def layer_moments(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    sparsity_eps: float = 1e-5,
    sparsity_rel: float | None = None,
) -> Moments:
    """Reference ``layer_moments`` for ``hidden`` [B, T, D].

    A value takes part when its token is valid (``attention_mask != 0``) and it is
    finite. With ``sparsity_rel`` set, a value is near zero when
    ``|h| < sparsity_rel * rms(h[b, t, :])`` (rms over the token's finite values);
    otherwise when ``|h| < sparsity_eps``.
    """
    h = hidden.detach().to(_F64)
    tok = _valid_tokens(hidden, attention_mask)
    finite = torch.isfinite(h)
    use = finite & tok[..., None]  # [B, T, D]
    nonfinite = int((~finite & tok[..., None]).sum())
    zero = torch.zeros((), dtype=_F64, device=h.device)
    hz = torch.where(use, h, zero)

    # AVSS pooled variance: per-sample mean over valid tokens, unbiased variance over d.
    cnt_bd = use.sum(1)  # [B, D]
    keep = cnt_bd > 0
    mean_bd = hz.sum(1) / cnt_bd.clamp(min=1)
    nd = keep.sum(1)  # [B]
    mu_b = torch.where(keep, mean_bd, zero).sum(1) / nd.clamp(min=1)
    var_b = torch.where(keep, (mean_bd - mu_b[:, None]) ** 2, zero).sum(1) / (nd - 1).clamp(min=1)
    has_var = nd >= 2
    samples = int(has_var.sum())
    pooled = float(torch.where(has_var, var_b, zero).sum())

    # Per-token variance over d (finite values of valid tokens).
    n_t = use.sum(-1)  # [B, T]
    mu_t = hz.sum(-1) / n_t.clamp(min=1)
    var_t = torch.where(use, (h - mu_t[..., None]) ** 2, zero).sum(-1) / (n_t - 1).clamp(min=1)
    tok_ok = n_t >= 2
    tokens = int(tok_ok.sum())
    token_var = float(torch.where(tok_ok, var_t, zero).sum())

    # Sparsity: absolute threshold, or relative to the token's rms.
    if sparsity_rel is not None:
        rms = (hz**2).sum(-1).div(n_t.clamp(min=1)).sqrt()
        thr = (sparsity_rel * rms)[..., None]
    else:
        thr = sparsity_eps
    near_zero = int((use & (h.abs() < thr)).sum())

    vals = h[use]
    n = vals.numel()
    mean = float(vals.mean()) if n else 0.0
    m2 = float(((vals - mean) ** 2).sum()) if n else 0.0
    return Moments(
        samples=samples, tokens=tokens, elements=n, pooled_var_sum=pooled, token_var_sum=token_var,
        mean=mean, m2=m2, near_zero=near_zero, nonfinite=nonfinite,
    )


def block_similarity(
    h_in: torch.Tensor, h_out: torch.Tensor, attention_mask: torch.Tensor | None = None, *, eps: float = 1e-8
) -> Similarity:
    """Reference ``block_similarity``: per valid token, cos = <a, b> / max(|a| |b|, eps).

    Tokens where either vector holds a NaN/Inf are skipped and counted in ``nonfinite``.
    """
    a = h_in.detach().to(_F64)
    b = h_out.detach().to(_F64)
    tok = _valid_tokens(h_in, attention_mask)
    fin = torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1)
    counted = tok & fin
    zero = torch.zeros((), dtype=_F64, device=a.device)
    a = torch.where(counted[..., None], a, zero)
    b = torch.where(counted[..., None], b, zero)
    cos = (a * b).sum(-1) / torch.clamp(a.norm(dim=-1) * b.norm(dim=-1), min=eps)
    cos = cos.clamp(-1.0, 1.0)
    return Similarity(
        tokens=int(counted.sum()),
        cos_sum=float(cos[counted].sum()),
        angular_sum=float((torch.arccos(cos[counted]) / torch.pi).sum()),
        nonfinite=int((tok & ~fin).sum()),
    )


def avss_published(hidden_batches: list[torch.Tensor], eps: float = 1e-5) -> tuple[float, float]:
    """The AVSS paper's procedure for one layer, as published (no padding mask):
    per batch, mean over tokens, unbiased variance over hidden units, mean over samples;
    sparsity = fraction of |h| < eps; both averaged over batches."""
    var, spa = [], []
    for h in hidden_batches:
        h = h.to(_F64)
        var.append(float(h.mean(dim=1).var(dim=-1).mean()))
        spa.append(float((h.abs() < eps).to(_F64).mean()))
    return sum(var) / len(var), sum(spa) / len(spa)

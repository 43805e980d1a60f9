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


def segment_ids(segment_starts: torch.Tensor, Sk: int) -> torch.Tensor:
    """[B, Sk] segment index of every key: the last segment whose start is <= the key
    position (keys before the first start count as segment 0)."""
    pos = torch.arange(Sk, device=segment_starts.device)
    ids = (segment_starts[:, None, :] <= pos[None, :, None]).sum(-1) - 1
    return ids.clamp(min=0)


def masked_attention_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    head_gate: torch.Tensor | None = None,
    segment_starts: torch.Tensor | None = None,
    segment_scale: torch.Tensor | None = None,
    adaptive=None,
    compute_dtype: torch.dtype = torch.float32,
) -> dict:
    """Reference ``masked_attention``: materialises the [B, Hq, Sq, Sk] probabilities.

    ``p = softmax(q k^T * scaling)`` over allowed keys (causal bottom-right: query row i
    sees key j <= i + Sk - Sq; ``attention_mask`` bool, True = attend). A row with no
    allowed key outputs zeros. With segments, ``mass[s] = sum_{j in s} p_j`` (of the plain
    softmax). Key j of segment s is then weighted ``p_j * segment_scale[h, s]``, and, for
    the adaptive rule's heads and rows, by ``adaptive.scale`` more when
    ``mass[adaptive.segment] >= adaptive.threshold`` and s is that segment. No
    renormalisation. ``out = (sum_j p'_j v_j) * head_gate[h]``, returned as [B, Sq, Hq, D].

    Returns a dict: ``out``; ``mass`` [B, Hq, Sq, S] (S = 1 without segments); ``stats``
    [B, Hq, Sq, 3] = (entropy ``-sum p ln p``, max logit, p at the row's first allowed key);
    ``fired`` [B, Hq, Sq] int8 (where the adaptive rule fired).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    cd = compute_dtype
    kk = k.to(cd).repeat_interleave(Hq // Hkv, dim=1)
    vv = v.to(cd).repeat_interleave(Hq // Hkv, dim=1)
    s = (q.to(cd) @ kk.transpose(-1, -2)) * scaling
    allowed = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        allowed = allowed & (j <= i + (Sk - Sq))
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)
    allowed = allowed.expand(B, Hq, Sq, Sk)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no allowed key
    any_key = allowed.any(-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    if Sk:
        max_logit = s.amax(-1)
        first = allowed.to(torch.int8).argmax(-1, keepdim=True)  # first allowed key (0 when none)
        sink = torch.where(any_key, torch.gather(p, -1, first)[..., 0], torch.zeros((), dtype=cd, device=q.device))
    else:  # no key at all: (0, -inf, 0) as for a row with none allowed
        max_logit = torch.full((B, Hq, Sq), float("-inf"), dtype=s.dtype, device=q.device)
        sink = torch.zeros((B, Hq, Sq), dtype=cd, device=q.device)
    stats = torch.stack([entropy, max_logit, sink], -1).to(torch.float32)
    weights = p
    fired = torch.zeros(B, Hq, Sq, dtype=torch.bool, device=q.device)
    S = segment_starts.shape[1] if segment_starts is not None else 1
    seg = segment_ids(segment_starts, Sk) if segment_starts is not None else torch.zeros(
        B, Sk, dtype=torch.long, device=q.device)
    onehot = torch.nn.functional.one_hot(seg, S).to(cd)  # [B, Sk, S]
    mass = p @ onehot[:, None]  # [B, Hq, Sq, S]
    if segment_starts is not None:
        factor = torch.ones_like(p)
        if segment_scale is not None:
            sc = segment_scale.to(cd)
            sc = sc.expand(B, Hq, S) if sc.dim() == 2 else sc
            factor = factor * torch.gather(sc, 2, seg[:, None, :].expand(B, Hq, Sk))[:, :, None, :]
        if adaptive is not None:
            heads = torch.zeros(Hq, dtype=torch.bool, device=q.device)
            heads[list(adaptive.heads)] = True
            fired = mass[..., adaptive.segment] >= adaptive.threshold  # [B, Hq, Sq]
            fired = fired & heads[None, :, None]
            if adaptive.rows == "last":
                last = torch.zeros(Sq, dtype=torch.bool, device=q.device)
                last[-1] = True
                fired = fired & last[None, None, :]
            in_seg = (seg == adaptive.segment)[:, None, None, :]  # [B, 1, 1, Sk]
            factor = factor * torch.where(fired[..., None] & in_seg, adaptive.scale, 1.0).to(cd)
        weights = p * factor
    elif segment_scale is not None or adaptive is not None:
        raise ValueError("segment_scale and adaptive need segment_starts")
    out = weights @ vv  # [B, Hq, Sq, D]
    if head_gate is not None:
        g = head_gate.to(cd)
        g = g[None, :] if g.dim() == 1 else g
        out = out * g[:, :, None, None]
    return {
        "out": out.transpose(1, 2).to(q.dtype),
        "mass": mass.to(torch.float32),
        "stats": stats,
        "fired": fired.to(torch.int8),
    }


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    head_gate: torch.Tensor | None = None,
    segment_starts: torch.Tensor | None = None,
    segment_scale: torch.Tensor | None = None,
    adaptive=None,
    return_segment_mass: bool = False,
    compute_dtype: torch.dtype = torch.float32,
):
    """Reference ``masked_attention`` (see :func:`masked_attention_outputs`): ``out``, and
    with ``return_segment_mass`` also the per-segment mass."""
    if return_segment_mass and segment_starts is None:
        raise ValueError("return_segment_mass needs segment_starts")
    res = masked_attention_outputs(
        q, k, v, scaling=scaling, causal=causal, attention_mask=attention_mask, head_gate=head_gate,
        segment_starts=segment_starts, segment_scale=segment_scale, adaptive=adaptive, compute_dtype=compute_dtype,
    )
    return (res["out"], res["mass"]) if return_segment_mass else res["out"]

"""The CPU path of the stats ops: one pass over cache-sized chunks of tokens.

Each chunk of ``rows x D`` values (about 512 KB in fp32) is upcast once and reduced
while it sits in cache: ``torch.var_mean`` over d gives every token's mean and variance
(Welford, one read), a column sum feeds the per-sample token mean, and one comparison
counts near-zero values. Tokens' (count, mean, M2) are merged into the global moments
with the closed-form Chan reduction. A chunk whose means are not finite takes a masked
slow path that leaves NaN/Inf values out and counts them, so finite data never pays for
the checks. Semantics are exactly those of ``avss_fast.reference``.
"""

from __future__ import annotations

import torch

from .stats import chan_merge, chan_reduce

_F64 = torch.float64
_I64 = torch.int64
CHUNK_ELEMENTS = 1 << 17


def _rows_per_chunk(D: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(D, 1))


def _valid_rows(h: torch.Tensor, mask_row: torch.Tensor | None) -> torch.Tensor:
    if mask_row is None:
        return h
    valid = mask_row != 0
    if bool(valid.all()):
        return h
    return h[valid]


def layer_moments_packed(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None, sparsity_eps: float, sparsity_rel: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer_moments`` on any device with plain torch ops, packed as the custom op returns:
    ints = (samples, tokens, elements, near_zero, nonfinite), floats = (pooled_var_sum,
    token_var_sum, mean, m2)."""
    B, T, D = hidden.shape
    dev = hidden.device
    step = _rows_per_chunk(D)
    g_n = torch.zeros((), dtype=_I64, device=dev)
    g_mean = torch.zeros((), dtype=_F64, device=dev)
    g_m2 = torch.zeros((), dtype=_F64, device=dev)
    tokens = torch.zeros((), dtype=_I64, device=dev)
    token_var = torch.zeros((), dtype=_F64, device=dev)
    near_zero = torch.zeros((), dtype=_I64, device=dev)
    nonfinite = torch.zeros((), dtype=_I64, device=dev)
    samples = torch.zeros((), dtype=_I64, device=dev)
    pooled = torch.zeros((), dtype=_F64, device=dev)

    for b in range(B):
        hb = _valid_rows(hidden[b], None if attention_mask is None else attention_mask[b])
        if hb.shape[0] == 0 or D == 0:
            continue
        colsum = torch.zeros(D, dtype=_F64, device=dev)
        colcnt = torch.zeros(D, dtype=_I64, device=dev)
        for s in range(0, hb.shape[0], step):
            x = hb[s : s + step]
            x = x if x.dtype == torch.float32 else x.float()
            r = x.shape[0]
            if D >= 2:
                var, mean = torch.var_mean(x, dim=1, correction=1)
            else:  # a variance needs two values: let the masked path handle it
                var = mean = torch.full((r,), float("nan"), device=dev)
            if bool(torch.isfinite(var).all()) and bool(torch.isfinite(mean).all()):
                n_r = torch.full((r,), D, dtype=_I64, device=dev)
                m2_r = var.to(_F64) * (D - 1)
                colsum += x.sum(0)
                colcnt += r
                tokens += r
                token_var += var.sum(dtype=_F64)
                if sparsity_rel is not None:
                    rms = (mean.to(_F64).square() + m2_r / D).sqrt()
                    thr = (sparsity_rel * rms).to(torch.float32)[:, None]
                else:
                    thr = sparsity_eps
                near_zero += torch.count_nonzero(x.abs() < thr)
            else:
                fin = torch.isfinite(x)
                nonfinite += (~fin).sum()
                xz = torch.where(fin, x, 0.0)
                n_r = fin.sum(1)
                mean = xz.sum(1, dtype=_F64) / n_r.clamp(min=1)
                dev_ = torch.where(fin, x.to(_F64) - mean[:, None], 0.0)
                m2_r = (dev_ * dev_).sum(1)
                ok = n_r >= 2
                tokens += ok.sum()
                token_var += torch.where(ok, m2_r / (n_r - 1).clamp(min=1), 0.0).sum()
                colsum += xz.sum(0, dtype=_F64)
                colcnt += fin.sum(0)
                if sparsity_rel is not None:
                    rms = ((xz.to(_F64) ** 2).sum(1) / n_r.clamp(min=1)).sqrt()
                    thr = (sparsity_rel * rms).to(torch.float32)[:, None]
                else:
                    thr = sparsity_eps
                near_zero += (fin & (x.abs() < thr)).sum()
            c_n, c_mean, c_m2 = chan_reduce(n_r, mean, m2_r)
            g_n, g_mean, g_m2 = chan_merge(g_n, g_mean, g_m2, c_n, c_mean, c_m2)
        keep = colcnt > 0
        nd = keep.sum()
        if int(nd) >= 2:
            m = colsum[keep] / colcnt[keep]
            pooled += m.var(correction=1)
            samples += 1

    ints = torch.stack([samples, tokens, g_n, near_zero, nonfinite])
    flts = torch.stack([pooled, token_var, g_mean, g_m2])
    return ints, flts


def block_similarity_packed(
    h_in: torch.Tensor, h_out: torch.Tensor, attention_mask: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_similarity`` with plain torch ops: ints = (tokens, nonfinite),
    floats = (cos_sum, angular_sum)."""
    B, T, D = h_in.shape
    dev = h_in.device
    a_all = h_in.reshape(B * T, D)
    b_all = h_out.reshape(B * T, D)
    if attention_mask is not None:
        valid = attention_mask.reshape(B * T) != 0
        if not bool(valid.all()):
            a_all, b_all = a_all[valid], b_all[valid]
    tokens = torch.zeros((), dtype=_I64, device=dev)
    nonfinite = torch.zeros((), dtype=_I64, device=dev)
    cos_sum = torch.zeros((), dtype=_F64, device=dev)
    ang_sum = torch.zeros((), dtype=_F64, device=dev)
    step = _rows_per_chunk(D)
    for s in range(0, a_all.shape[0], step):
        a = a_all[s : s + step].float()
        b = b_all[s : s + step].float()
        dot = torch.linalg.vecdot(a, b)
        na = torch.linalg.vector_norm(a, dim=1)
        nb = torch.linalg.vector_norm(b, dim=1)
        quick = torch.isfinite(dot) & torch.isfinite(na) & torch.isfinite(nb)
        cos = dot / torch.clamp(na * nb, min=eps)
        ok = quick
        if not bool(quick.all()):
            # Either a NaN/Inf, or finite values whose fp32 squares overflowed: redo in fp64.
            fin = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
            redo = fin & ~quick
            if bool(redo.any()):
                a64, b64 = a[redo].to(_F64), b[redo].to(_F64)
                c64 = (a64 * b64).sum(1) / torch.clamp(a64.norm(dim=1) * b64.norm(dim=1), min=eps)
                cos = cos.to(_F64)
                cos[redo] = c64
            nonfinite += (~fin).sum()
            ok = fin
        c = cos[ok].to(_F64).clamp(-1.0, 1.0)
        tokens += ok.sum()
        cos_sum += c.sum()
        ang_sum += (torch.arccos(c) / torch.pi).sum()
    return torch.stack([tokens, nonfinite]), torch.stack([cos_sum, ang_sum])

"""Fused one-read statistics of a layer's hidden states ``h[b, t, d]``.

One program handles BLOCK_T tokens of one sample and walks the hidden dimension in
BLOCK_D chunks, reading every element once (twice, the second time from cache, only
when a relative sparsity threshold is asked for). A value takes part when its token is
valid (``mask[b, t] != 0``) and it is finite (``|x| <= FLT_MAX``). Per chunk it keeps, in
fp32 registers:

* per token: count n_t, mean mu_t and M2_t = sum (h - mu_t)^2 over d, merged across
  D-chunks with Chan's rule  (n, mu, M2) + (n', mu', M2'):
  ``delta = mu' - mu; mu += delta n'/(n+n'); M2 += M2' + delta^2 n n'/(n+n')``;
  the token's unbiased variance is M2_t / (n_t - 1);
* per hidden unit: the sum and count of valid values over the program's tokens
  (partials of the per-sample token mean used by the AVSS pooled variance);
* per program: near-zero count (|h| < eps, or |h| < rel * rms_t) and non-finite count.

Epilogue: the program's tokens are merged into one (n, mu, M2) with the closed form
``mu = sum n_t mu_t / N``, ``M2 = sum M2_t + sum n_t (mu_t - mu)^2``.

No atomics: every partial has its own slot, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLT_MAX, kernel_mask, row_tiles


@triton.jit
def _layer_moments_kernel(
    x_ptr, mask_ptr,
    colsum_ptr, colcnt_ptr,
    rowvar_ptr, rowcnt_ptr,
    part_f_ptr, part_i_ptr,
    T, D,
    stride_xb, stride_xt, stride_mb, stride_mt,
    eps, rel,
    HAS_MASK: tl.constexpr,
    USE_REL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    n_tb = tl.num_programs(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    if HAS_MASK:
        m = tl.load(mask_ptr + pid_b * stride_mb + offs_t * stride_mt, mask=in_t, other=0)
        row_ok = in_t & (m != 0)
    else:
        row_ok = in_t
    row_base = x_ptr + pid_b * stride_xb + offs_t[:, None] * stride_xt
    slot = pid_b * n_tb + pid_t

    if USE_REL:
        # Relative threshold needs each token's rms first: a pre-pass over the tile
        # (the main pass then reads it again, from cache).
        ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        sc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (offs_d[None, :] < D)
            x = tl.load(row_base + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
            v = ok & (tl.abs(x) <= FLT_MAX)
            xz = tl.where(v, x, 0.0)
            ss += tl.sum(xz * xz, axis=1)
            sc += tl.sum(v.to(tl.float32), axis=1)
        thr_row = rel * tl.sqrt(ss / tl.maximum(sc, 1.0))

    r_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    r_mean = tl.zeros([BLOCK_T], dtype=tl.float32)
    r_m2 = tl.zeros([BLOCK_T], dtype=tl.float32)
    nz = tl.zeros([BLOCK_T], dtype=tl.int32)
    nf = tl.zeros([BLOCK_T], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        ok = row_ok[:, None] & in_d[None, :]
        # upcast right after the load: fp32 arithmetic only (bf16 is wrong in the interpreter)
        x = tl.load(row_base + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        fin = tl.abs(x) <= FLT_MAX
        v = ok & fin
        xz = tl.where(v, x, 0.0)
        vi = v.to(tl.int32)
        tl.store(colsum_ptr + slot * D + offs_d, tl.sum(xz, axis=0), mask=in_d)
        tl.store(colcnt_ptr + slot * D + offs_d, tl.sum(vi, axis=0), mask=in_d)
        c_n = tl.sum(vi, axis=1).to(tl.float32)
        c_mean = tl.sum(xz, axis=1) / tl.maximum(c_n, 1.0)
        dev = tl.where(v, x - c_mean[:, None], 0.0)
        c_m2 = tl.sum(dev * dev, axis=1)
        n_new = r_n + c_n
        delta = c_mean - r_mean
        w = c_n / tl.maximum(n_new, 1.0)
        r_mean = r_mean + delta * w
        r_m2 = r_m2 + c_m2 + delta * delta * r_n * w
        r_n = n_new
        if USE_REL:
            small = tl.abs(x) < thr_row[:, None]
        else:
            small = tl.abs(x) < eps
        nz += tl.sum((v & small).to(tl.int32), axis=1)
        nf += tl.sum((ok & (fin == 0)).to(tl.int32), axis=1)

    rows = pid_b * T + offs_t
    tl.store(rowvar_ptr + rows, r_m2 / tl.maximum(r_n - 1.0, 1.0), mask=in_t)
    tl.store(rowcnt_ptr + rows, r_n.to(tl.int32), mask=in_t)

    p_n = tl.sum(r_n, axis=0)
    p_mean = tl.sum(r_n * r_mean, axis=0) / tl.maximum(p_n, 1.0)
    dm = tl.where(r_n > 0, r_mean - p_mean, 0.0)
    p_m2 = tl.sum(r_m2, axis=0) + tl.sum(r_n * dm * dm, axis=0)
    tl.store(part_f_ptr + slot * 2, p_mean)
    tl.store(part_f_ptr + slot * 2 + 1, p_m2)
    tl.store(part_i_ptr + slot * 3, p_n.to(tl.int32))
    tl.store(part_i_ptr + slot * 3 + 1, tl.sum(nz, axis=0))
    tl.store(part_i_ptr + slot * 3 + 2, tl.sum(nf, axis=0))


def layer_moments_partials(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sparsity_eps: float,
    sparsity_rel: float | None,
) -> dict[str, torch.Tensor]:
    """Launch the kernel on ``hidden`` [B, T, D] and return its partial buffers.

    Returns ``colsum`` [B, NT, D] fp32, ``colcnt`` [B, NT, D] int32, ``rowvar`` [B*T] fp32,
    ``rowcnt`` [B*T] int32, ``part_f`` [B*NT, 2] fp32 (mean, M2), ``part_i`` [B*NT, 3]
    int32 (count, near_zero, nonfinite). ``attention_mask`` must already be [B, T].
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    B, T, D = hidden.shape
    dev = hidden.device
    BLOCK_T, BLOCK_D, num_warps = row_tiles(T, D, dev, gpu_block_t=32)
    NT = triton.cdiv(T, BLOCK_T)
    colsum = torch.empty((B, NT, D), dtype=torch.float32, device=dev)
    colcnt = torch.empty((B, NT, D), dtype=torch.int32, device=dev)
    rowvar = torch.empty((B * T,), dtype=torch.float32, device=dev)
    rowcnt = torch.empty((B * T,), dtype=torch.int32, device=dev)
    part_f = torch.empty((B * NT, 2), dtype=torch.float32, device=dev)
    part_i = torch.empty((B * NT, 3), dtype=torch.int32, device=dev)
    mask, smb, smt, has_mask = kernel_mask(attention_mask, hidden)
    if B * NT > 0 and D > 0:
        _layer_moments_kernel[(B, NT)](
            hidden, mask, colsum, colcnt, rowvar, rowcnt, part_f, part_i,
            T, D, hidden.stride(0), hidden.stride(1), smb, smt,
            float(sparsity_eps), float(sparsity_rel if sparsity_rel is not None else 0.0),
            HAS_MASK=has_mask, USE_REL=sparsity_rel is not None,
            BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=num_warps,
        )
    return dict(colsum=colsum, colcnt=colcnt, rowvar=rowvar, rowcnt=rowcnt, part_f=part_f, part_i=part_i)

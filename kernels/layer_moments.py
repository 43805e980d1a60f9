"""Fused one-read statistics of a layer's hidden states ``h[b, t, d]``.

Grid: (sample b, hidden chunk of BLOCK_D units, token split). A program walks its tokens
in tiles of BLOCK_T rows, reading every value once and upcasting it to fp32 right after
the load. A value takes part when its token is valid (``mask[b, t] != 0``) and it is
finite (``|x| <= FLT_MAX``). Per tile it

* accumulates, elementwise in registers (reduced once, at the end), the column sums and
  counts of valid values (partials of the per-sample token mean used by the AVSS pooled
  variance) and the near-zero counts;
* computes, for each token, the count, mean and M2 = sum (h - mean)^2 of its values in
  this hidden chunk (two-pass on the tile in registers) and stores them: the host side
  merges a token's chunks with Chan's rule
  ``mu = sum n_c mu_c / N``, ``M2 = sum M2_c + sum n_c (mu_c - mu)^2``,
  which also gives the global (count, mean, M2);
* counts non-finite values from the row counts (valid positions minus finite ones).

Nothing crosses warps inside the token loop, no atomics (every partial has its own slot,
so results are deterministic), and partials are small next to the activation
(3 floats per token and chunk; 2 words per column and split).

The relative sparsity threshold (``|h| < rel * rms(h[b, t, :])``) needs each token's rms
over all hidden units first: a row pre-pass (``_row_sumsq_kernel``) reads the activation
once more for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLT_MAX, kernel_mask, valid_rows


@triton.jit
def _layer_moments_kernel(
    x_ptr, mask_ptr, thr_ptr,
    colsum_ptr, colcnt_ptr, rowpart_ptr, cnt_ptr,
    T, D, rows_per_split,
    stride_xb, stride_xt, stride_mb, stride_mt,
    eps,
    HAS_MASK: tl.constexpr,
    USE_THR: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dc = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    n_dc = tl.num_programs(1).to(tl.int64)
    n_sp = tl.num_programs(2).to(tl.int64)
    offs_d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    t_begin = sp * rows_per_split
    t_end = tl.minimum(T, t_begin + rows_per_split)

    col_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    col_cnt = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    nz_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    n_ok = tl.zeros([BLOCK_T], dtype=tl.int32)
    n_fin = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_t = offs_t < t_end
        row_ok = valid_rows(mask_ptr, b, offs_t, in_t, stride_mb, stride_mt, HAS_MASK)
        ok = row_ok[:, None] & in_d[None, :]
        x = tl.load(x_ptr + b * stride_xb + offs_t[:, None] * stride_xt + offs_d[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        v = ok & (tl.abs(x) <= FLT_MAX)
        xz = tl.where(v, x, 0.0)
        vi = v.to(tl.int32)
        col_acc += xz
        col_cnt += vi
        n_i = tl.sum(vi, axis=1)
        n = n_i.to(tl.float32)
        mean = tl.sum(xz, axis=1) / tl.maximum(n, 1.0)
        dev = tl.where(v, x - mean[:, None], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
        rp = rowpart_ptr + ((b * T + offs_t) * n_dc + dc) * 3
        tl.store(rp, n, mask=in_t)
        tl.store(rp + 1, mean, mask=in_t)
        tl.store(rp + 2, m2, mask=in_t)
        if USE_THR:
            thr = tl.load(thr_ptr + b * T + offs_t, mask=in_t, other=0.0)[:, None]
        else:
            thr = eps
        nz_acc += (v & (tl.abs(x) < thr)).to(tl.int32)
        n_ok += tl.sum(ok.to(tl.int32), axis=1)
        n_fin += n_i

    slot = b * n_sp + sp
    tl.store(colsum_ptr + slot * D + offs_d, tl.sum(col_acc, axis=0), mask=in_d)
    tl.store(colcnt_ptr + slot * D + offs_d, tl.sum(col_cnt, axis=0), mask=in_d)
    c = cnt_ptr + ((b * n_dc + dc) * n_sp + sp) * 2
    tl.store(c, tl.sum(tl.sum(nz_acc, axis=1), axis=0))
    tl.store(c + 1, tl.sum(n_ok - n_fin, axis=0))


@triton.jit
def _row_sumsq_kernel(
    x_ptr, mask_ptr, thr_ptr, T, D, stride_xb, stride_xt, stride_mb, stride_mt, rel,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """thr[b, t] = rel * sqrt(mean of h^2 over the token's finite values)."""
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    row_ok = valid_rows(mask_ptr, b, offs_t, in_t, stride_mb, stride_mt, HAS_MASK)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (offs_d[None, :] < D)
        x = tl.load(x_ptr + b * stride_xb + offs_t[:, None] * stride_xt + offs_d[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        v = ok & (tl.abs(x) <= FLT_MAX)
        xz = tl.where(v, x, 0.0)
        ss += tl.sum(xz * xz, axis=1)
        cnt += tl.sum(v.to(tl.float32), axis=1)
    tl.store(thr_ptr + b * T + offs_t, rel * tl.sqrt(ss / tl.maximum(cnt, 1.0)), mask=in_t)


def _gpu_layout(B: int, T: int, D: int, device) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps, splits) on a GPU: enough programs to fill the device."""
    block_t, block_d, num_warps = 8, min(256, triton.next_power_of_2(max(D, 16))), 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    n_dc = triton.cdiv(D, block_d)
    want = max(1, (4 * sms) // max(1, B * n_dc))
    splits = max(1, min(triton.cdiv(T, 4 * block_t), want))
    return block_t, block_d, num_warps, splits


def layer_moments_partials(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sparsity_eps: float,
    sparsity_rel: float | None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Launch the kernel on ``hidden`` [B, T, D] and return its partial buffers.

    ``colsum`` [B, S, D] fp32 and ``colcnt`` [B, S, D] int32 (per token split S),
    ``rowpart`` [B*T, C, 3] fp32 (count, mean, M2 of each token in each of C hidden chunks),
    ``cnt`` [B, C, S, 2] int32 (near_zero, nonfinite). ``attention_mask`` must be [B, T].
    ``tiles`` = (BLOCK_T, BLOCK_D, num_warps, splits) overrides the layout (benchmarks).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    B, T, D = hidden.shape
    dev = hidden.device
    if tiles is not None:
        BLOCK_T, BLOCK_D, num_warps, S = tiles
    elif dev.type == "cpu":  # interpreter: few, large programs
        BLOCK_T = min(64, triton.next_power_of_2(max(T, 1)))
        BLOCK_D = min(1024, triton.next_power_of_2(max(D, 1)))
        num_warps, S = 1, 1
    else:
        BLOCK_T, BLOCK_D, num_warps, S = _gpu_layout(B, T, D, dev)
    rows_per_split = triton.cdiv(triton.cdiv(T, S), BLOCK_T) * BLOCK_T
    S = triton.cdiv(T, rows_per_split)
    C = triton.cdiv(D, BLOCK_D)
    mask, smb, smt, has_mask = kernel_mask(attention_mask, hidden)
    colsum = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    colcnt = torch.empty((B, S, D), dtype=torch.int32, device=dev)
    rowpart = torch.empty((B * T, C, 3), dtype=torch.float32, device=dev)
    cnt = torch.empty((B, C, S, 2), dtype=torch.int32, device=dev)
    thr = hidden  # dummy pointer unless a relative threshold is asked for
    if sparsity_rel is not None:
        thr = torch.empty((B * T,), dtype=torch.float32, device=dev)
        bt = min(64, triton.next_power_of_2(max(T, 1))) if dev.type == "cpu" else 16
        _row_sumsq_kernel[(B, triton.cdiv(T, bt))](
            hidden, mask, thr, T, D, hidden.stride(0), hidden.stride(1), smb, smt, float(sparsity_rel),
            HAS_MASK=has_mask, BLOCK_T=bt, BLOCK_D=min(1024 if dev.type == "cpu" else 512, triton.next_power_of_2(max(D, 16))),
            num_warps=1 if dev.type == "cpu" else 8,
        )
    _layer_moments_kernel[(B, C, S)](
        hidden, mask, thr, colsum, colcnt, rowpart, cnt,
        T, D, rows_per_split, hidden.stride(0), hidden.stride(1), smb, smt,
        float(sparsity_eps),
        HAS_MASK=has_mask, USE_THR=sparsity_rel is not None,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return dict(colsum=colsum, colcnt=colcnt, rowpart=rowpart, cnt=cnt)

"""Per-token cosine similarity of a block's input and output, one read of each.

For each token t (rows of the flattened [B*T, D] views) one pass over d accumulates,
in fp32, ``dot = sum a_d b_d``, ``|a|^2`` and ``|b|^2`` and counts non-finite values.
Epilogue: ``cos = dot / max(|a| |b|, eps)`` clamped to [-1, 1], and a status per row:
1 = counted, 0 = padding, -1 = a NaN/Inf in either vector (skipped). A tile with a row of
finite values whose sum of squares overflows fp32 (|h| from ~1.8e19 / sqrt(D) up) is read
once more with that row scaled by 2^-80 (a branch taken only then), as the CPU path redoes
such rows in float64.

The arccos and the float64 sums over rows (B*T values, tiny next to B*T*D) are done
by the caller with device tensor ops, since Triton has no arccos without libdevice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLT_MAX, kernel_mask, row_tiles, valid_rows


@triton.jit
def _row_sums(a_base, b_base, row_ok, D, sa, sb, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
              SCALED: tl.constexpr):
    """One pass over a tile's rows: ``dot = sum (sa a_d)(sb b_d)``, ``|sa a|^2``, ``|sb b|^2``
    (fp32; non-finite values left out) and the count of non-finite values per row. With
    SCALED the rows are multiplied by the per-row factors ``sa``, ``sb`` as they are read."""
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    na = tl.zeros([BLOCK_T], dtype=tl.float32)
    nb = tl.zeros([BLOCK_T], dtype=tl.float32)
    bad = tl.zeros([BLOCK_T], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (offs_d[None, :] < D)
        a = tl.load(a_base + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_base + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        fin = (tl.abs(a) <= FLT_MAX) & (tl.abs(b) <= FLT_MAX)
        bad += tl.sum((fin == 0).to(tl.int32), axis=1)
        a = tl.where(fin, a, 0.0)
        b = tl.where(fin, b, 0.0)
        if SCALED:
            a = a * sa[:, None]
            b = b * sb[:, None]
        dot += tl.sum(a * b, axis=1)
        na += tl.sum(a * a, axis=1)
        nb += tl.sum(b * b, axis=1)
    return dot, na, nb, bad


@triton.jit
def _block_similarity_kernel(
    a_ptr, b_ptr, mask_ptr, cos_ptr, status_ptr,
    T, D,
    stride_ab, stride_at, stride_bb, stride_bt, stride_mb, stride_mt,
    eps,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    row_ok = valid_rows(mask_ptr, pid_b, offs_t, in_t, stride_mb, stride_mt, HAS_MASK)
    a_base = a_ptr + pid_b * stride_ab + offs_t[:, None] * stride_at
    b_base = b_ptr + pid_b * stride_bb + offs_t[:, None] * stride_bt
    one = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
    dot, na, nb, bad = _row_sums(a_base, b_base, row_ok, D, one, one, BLOCK_T, BLOCK_D, SCALED=False)
    # Finite values whose fp32 sum of squares overflows (|h| from ~1.8e19 / sqrt(D) up): the
    # tile is read again with such a row scaled by 2^-80 (the cosine does not change with
    # scale; squares of scaled values stay below ~7.9e28, and a row's norm this large makes
    # the values the scale sends below fp32's range negligible).
    big_a = na > FLT_MAX
    big_b = nb > FLT_MAX
    over = row_ok & (bad == 0) & (big_a | big_b)
    floor = tl.full([BLOCK_T], eps, dtype=tl.float32)
    if tl.max(over.to(tl.int32), axis=0) > 0:
        sa = tl.where(big_a, 8.271806125530277e-25, 1.0)  # 2^-80
        sb = tl.where(big_b, 8.271806125530277e-25, 1.0)
        dot, na, nb, bad = _row_sums(a_base, b_base, row_ok, D, sa, sb, BLOCK_T, BLOCK_D, SCALED=True)
        floor = floor * sa * sb  # the eps of the unscaled norms (cos does not change with scale)
    denom = tl.maximum(tl.sqrt(na) * tl.sqrt(nb), floor)
    cos = tl.minimum(tl.maximum(dot / denom, -1.0), 1.0)
    status = tl.where(row_ok, tl.where(bad > 0, -1, 1), 0)
    rows = pid_b * T + offs_t
    tl.store(cos_ptr + rows, cos, mask=in_t)
    tl.store(status_ptr + rows, status.to(tl.int8), mask=in_t)


def block_similarity_rows(
    h_in: torch.Tensor, h_out: torch.Tensor, attention_mask: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on h_in, h_out [B, T, D]; return per-token ``cos`` [B*T] fp32
    and ``status`` [B*T] int8 (1 counted, 0 padding, -1 non-finite)."""
    if h_in.stride(-1) != 1:
        h_in = h_in.contiguous()
    if h_out.stride(-1) != 1:
        h_out = h_out.contiguous()
    B, T, D = h_in.shape
    dev = h_in.device
    BLOCK_T, BLOCK_D, num_warps = row_tiles(T, D, dev, gpu_block_t=16)
    cos = torch.empty((B * T,), dtype=torch.float32, device=dev)
    status = torch.zeros((B * T,), dtype=torch.int8, device=dev)
    mask, smb, smt, has_mask = kernel_mask(attention_mask, h_in)
    if B * T > 0 and D > 0:
        grid = (B, triton.cdiv(T, BLOCK_T))
        _block_similarity_kernel[grid](
            h_in, h_out, mask, cos, status, T, D,
            h_in.stride(0), h_in.stride(1), h_out.stride(0), h_out.stride(1), smb, smt,
            float(eps), HAS_MASK=has_mask, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=num_warps,
        )
    return cos, status

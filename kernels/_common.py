"""Helpers shared by the launchers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Largest finite fp32; ``|x| <= FLT_MAX`` is false exactly for NaN and +-Inf.
FLT_MAX = tl.constexpr(3.4028234663852886e38)


def kernel_mask(attention_mask: torch.Tensor | None, dummy: torch.Tensor):
    """(mask tensor, stride_b, stride_t, has_mask) for a [B, T] padding mask.

    bool and float masks become int8 (nonzero = valid); integer masks pass as they are.
    Without a mask, ``dummy`` stands in as a pointer that is never read.
    """
    if attention_mask is None:
        return dummy, 0, 0, False
    mask = attention_mask
    if mask.dtype == torch.bool:
        mask = mask.to(torch.int8)
    elif mask.is_floating_point():
        mask = (mask != 0).to(torch.int8)
    return mask, mask.stride(0), mask.stride(1), True


def row_tiles(T: int, D: int, device: torch.device, gpu_block_t: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for a kernel that walks D in chunks for a tile of tokens.

    Under the interpreter (CPU tensors) programs run one by one, so take the largest tiles
    that cover the problem; on GPU, tiles sized for occupancy and coalesced rows.
    """
    if device.type == "cpu":
        return min(64, triton.next_power_of_2(max(T, 1))), min(1024, triton.next_power_of_2(max(D, 1))), 1
    return gpu_block_t, min(512, triton.next_power_of_2(max(D, 16))), 8


@triton.jit
def mask_values(mask_ptr, b, offs_t, in_t, stride_mb, stride_mt, HAS_MASK: tl.constexpr):
    """``mask[b, t]`` of rows ``offs_t`` as stored (0 out of range; 1 without a mask): for a
    kernel that loads the mask ahead of its use (a row is valid where ``in_t & (m != 0)``)."""
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mb + offs_t * stride_mt, mask=in_t, other=0)
    else:
        m = tl.full(offs_t.shape, 1, tl.int8)
    return m


@triton.jit
def valid_rows(mask_ptr, b, offs_t, in_t, stride_mb, stride_mt, HAS_MASK: tl.constexpr):
    """Rows of sample ``b`` that are in range and not padding (``mask[b, t] != 0``)."""
    if HAS_MASK:
        return in_t & (mask_values(mask_ptr, b, offs_t, in_t, stride_mb, stride_mt, HAS_MASK) != 0)
    return in_t


@triton.jit
def valid_span(mask_ptr, b, t_begin, t_end, stride_mb, stride_mt, BLOCK: tl.constexpr):
    """``(lo, hi, holes)`` of sample ``b``'s rows ``[t_begin, t_end)``: the first valid row
    and one past the last (``lo = hi = t_end`` when none is valid), and whether padding lies
    between them (``count of valid rows != hi - lo``). One read of the range's mask, BLOCK
    rows at a time."""
    lo = t_end
    hi = t_begin
    n = t_end - t_end  # 0, of the bounds' integer type
    for t0 in range(t_begin, t_end, BLOCK):
        offs_t = t0 + tl.arange(0, BLOCK)
        ok = valid_rows(mask_ptr, b, offs_t, offs_t < t_end, stride_mb, stride_mt, True)
        lo = tl.minimum(lo, tl.min(tl.where(ok, offs_t, t_end), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, offs_t + 1, t_begin), axis=0))
        n += tl.sum(ok.to(n.dtype), axis=0)
    hi = tl.maximum(hi, lo)
    return lo, hi, n != hi - lo

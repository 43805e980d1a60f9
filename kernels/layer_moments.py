"""Fused one-read statistics of a layer's hidden states ``h[b, t, d]``, and the in-kernel
merge of their partials into the packed ``Moments`` fields.

Four launches, none of which waits on the host:

1. ``_layer_moments_kernel``, grid (sample b, hidden chunk of BLOCK_D units, token split):
   the one read of the activation. A program walks its tokens in tiles of BLOCK_T rows
   (``_fast_pass``; padding rows are not loaded). With a padding mask it first reads the
   mask of its range once (``valid_span``): where the valid rows form one span, as right
   or left padding leaves them, the tiles are read by that span, with no mask load in
   front of a tile's loads (a dependent latency a tile, which held bf16 at 57% of copy
   bandwidth on an H100); a range with holes in its padding is marked -2 and left to the
   next launch. Per tile (``_tile``) it

   * adds the tile's column sums into [BLOCK_D] registers (the partials of the per-sample
     token mean behind the AVSS pooled variance) and its per-column near-zero counts
     ``|h| < eps`` into [BLOCK_D] counters (padding rows get threshold 0: never counted)
     when a tile's rows lie within each thread (chunks of >= 1024 bf16 / 512 fp32 units at
     4 warps: the per-tile sums are in-thread adds, and [BLOCK_T, BLOCK_D] accumulators
     would cost twice the tile's registers); narrower chunks spread rows across warps, and
     there the accumulators stay [BLOCK_T, BLOCK_D], summed once at the end (``_col_add``;
     offline SASS in bench/gpu_sass_stats.py);
   * stores, for each token, the count, mean and M2 of its values in this hidden chunk,
     two passes over the tile in registers: ``mean = sum h / n``,
     ``M2 = sum (h - mean)^2`` (``n`` the chunk's width, one divisor for every row: a
     padding row is loaded as zeros and stores n = 0, mean = M2 = 0).

   This fast pass takes no per-value finiteness test: a NaN/Inf anywhere in a row makes
   that row's M2 non-finite, and the program then marks its range (non-finite count -1).
   Finite values whose squared deviations pass fp32's range (|h| > ~1e19) are marked too
   and give Inf in the exact pass as well: the kernels compute in fp32 whatever the input
   dtype (column sums that overflow, |h| ~ 1e38, are not marked and give Inf in the sums,
   as the torch path does). The same fp32 range holds for the relative threshold's rms:
   with whole-row tiles it comes from the row's moments, ``M2 / n + mean^2``, so a row
   whose mean or spread passes ~1e19 gets an infinite threshold (every value counts as
   near zero) and one of values below ~1e-19 a zero threshold; the row pre-pass of wider
   rows sums ``h^2``, which overflows already where the values do (|h| > ~1e19). The CPU
   path takes the rms in float64 from the moments, as the reference does.

2. ``_layer_moments_exact_kernel``, the same grid: a marked program redoes its range and
   overwrites its slots; every other program reads its mark and ends. A range with holes
   (-2) takes the fast pass with each tile's mask (with PREFETCH_MASK the next tile's mask
   is loaded while this one is read), then, if that finds a non-finite row, the exact
   pass; a non-finite range (-1) the exact masked pass (``_exact_pass``: every value
   tested with ``|x| <= FLT_MAX``, non-finite values counted and left out; otherwise the
   same fp32 formulas, reduced in tiles of a quarter of the rows, so the last bits of a
   row's moments may differ from the fast pass's). In the fast kernel's launch (the earlier form)
   the exact pass set the register count of the whole kernel.

3. ``_finish_kernel``, grid (token blocks + sample x unit blocks): Chan-merges each
   token's chunk partials in float64, ``mu = sum n_c mu_c / N``,
   ``M2 = sum M2_c + sum n_c (mu_c - mu)^2``, and sums ``Var_d(h[b, t, :]) = M2 / (N - 1)``
   over its tokens, with the block's (count, mean, M2); a (sample, units) program sums its
   column partials over splits into the token mean of each unit, ``colsum / colcnt``, and
   returns (units with values, mean, M2) of those means.
4. ``_reduce_kernel``, one program: merges the block partials, each sample's unit
   partials into ``Var_d`` of its token mean (unbiased), and the counts into the packed
   fields ``ints = (samples, tokens, elements, near_zero, nonfinite)``,
   ``flts = (pooled_var_sum, token_var_sum, mean, m2)``.

Every partial has its own slot (no atomics), so results are deterministic run to run.

The relative sparsity threshold (``|h| < rel * rms(h[b, t, :])``) needs each token's rms
over all hidden units. When one chunk holds whole rows (``C = 1``; the GPU layout takes
whole rows up to ``WHOLE_ROW_MAX`` units) the fast kernel computes it from the row's
moments in registers, ``rms = sqrt(sum h^2 / D) = sqrt(M2 / D + mean^2)`` (ROW_THR; the
near-zero test then follows the M2 reduction; the exact pass takes the moments of the
finite values); wider rows take a row pre-pass (``_row_sumsq_kernel``) that reads the
activation once more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLT_MAX, kernel_mask, mask_values, valid_rows, valid_span


@triton.jit
def _col_add(acc, tile, ROWS_IN_THREAD: tl.constexpr):
    """Add a [BLOCK_T, BLOCK_D] tile into a per-column accumulator: summed over its rows
    first ([BLOCK_D] accumulator) when a tile's rows lie within each thread (in-thread adds,
    1/BLOCK_T of the registers), else elementwise ([BLOCK_T, BLOCK_D]: a per-tile sum over
    rows spread across warps would cost a shared-memory reduction and barriers each tile)."""
    if ROWS_IN_THREAD:  # one return statement: Triton types every return of a function alike
        acc = acc + tl.sum(tile, axis=0)
    else:
        acc = acc + tile
    return acc


@triton.jit
def _col_zeros(BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, dtype: tl.constexpr, ROWS_IN_THREAD: tl.constexpr):
    """A zero accumulator for :func:`_col_add`: [BLOCK_D] or [BLOCK_T, BLOCK_D]."""
    if ROWS_IN_THREAD:
        acc = tl.zeros([BLOCK_D], dtype=dtype)
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=dtype)
    return acc


@triton.jit
def _col_total(acc, ROWS_IN_THREAD: tl.constexpr):
    """The [BLOCK_D] per-column totals of an accumulator from :func:`_col_add`."""
    if not ROWS_IN_THREAD:
        acc = tl.sum(acc, axis=0)
    return acc


@triton.jit
def _program_range(T, D, rows_per_split, BLOCK_D: tl.constexpr):
    """Where a program of the (sample, hidden chunk, token split) grid works: ``(b, dc, sp,
    n_dc, n_sp, offs_d, in_d, t_begin, t_end)``, the same for the fast and the exact kernel."""
    b = tl.program_id(0).to(tl.int64)
    dc = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    n_dc = tl.num_programs(1).to(tl.int64)
    n_sp = tl.num_programs(2).to(tl.int64)
    offs_d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    t_begin = sp * rows_per_split
    return b, dc, sp, n_dc, n_sp, offs_d, offs_d < D, t_begin, tl.minimum(T, t_begin + rows_per_split)


@triton.jit
def _store_program(colsum_ptr, colcnt_ptr, cnt_ptr, b, dc, sp, n_dc, n_sp, D, offs_d, in_d,
                   col_sum, col_cnt, nz, nonfinite):
    """A program's own slots: column sums and counts [BLOCK_D], (near_zero, nonfinite)."""
    slot = b * n_sp + sp
    tl.store(colsum_ptr + slot * D + offs_d, col_sum, mask=in_d)
    tl.store(colcnt_ptr + slot * D + offs_d, col_cnt, mask=in_d)
    c = cnt_ptr + ((b * n_dc + dc) * n_sp + sp) * 2
    tl.store(c, nz)
    tl.store(c + 1, nonfinite)


@triton.jit
def _store_fast_program(colsum_ptr, colcnt_ptr, cnt_ptr, b, dc, sp, n_dc, n_sp, D, offs_d, in_d,
                        col_acc, nz_acc, n_rows, mark, BLOCK_D: tl.constexpr, ROWS_IN_THREAD: tl.constexpr):
    """:func:`_store_program` of a fast pass's accumulators (:func:`_fast_pass`); ``mark``:
    the non-finite slot (0, or a mark for the second launch)."""
    _store_program(colsum_ptr, colcnt_ptr, cnt_ptr, b, dc, sp, n_dc, n_sp, D, offs_d, in_d,
                   _col_total(col_acc, ROWS_IN_THREAD), tl.zeros([BLOCK_D], dtype=tl.int32) + tl.sum(n_rows, axis=0),
                   tl.sum(_col_total(nz_acc, ROWS_IN_THREAD), axis=0), mark)


@triton.jit
def _row_threshold(thr_ptr, b, T, offs_t, in_t, m2, mean, n, eps, USE_THR: tl.constexpr, ROW_THR: tl.constexpr):
    """The near-zero threshold of each row of a tile: ``eps``; or, with a relative threshold
    (``eps`` holds the factor ``rel``), the pre-pass's ``thr[b, t]``, or, when the tile holds
    whole rows (ROW_THR), ``rel * rms`` from the row's moments over its ``n`` values,
    ``sum h^2 / n = M2 / n + mean^2`` (two terms >= 0, no cancellation; a third reduction,
    of h^2, across the row cost sm_90 bf16 [2 x 4096] 16.1 against 13.7 instructions a
    value and 119 against 92 registers). The fast and the exact pass take the same form,
    so whether a NaN elsewhere sent a row's range through the exact pass changes its count
    only for values within rounding of the threshold (a form that overflowed where the
    other did not changed whole rows)."""
    if USE_THR:
        if ROW_THR:
            thr = eps * tl.sqrt(m2 / tl.maximum(n, 1.0) + mean * mean)
        else:
            thr = tl.load(thr_ptr + b * T + offs_t, mask=in_t, other=0.0)
    else:
        thr = eps
    return thr


@triton.jit
def _near_zero_add(nz_acc, x, thr, row_ok, in_d, EVEN_D: tl.constexpr, ROWS_IN_THREAD: tl.constexpr):
    """``nz_acc`` plus the tile's values with ``|x| < thr`` of their row, counted in valid rows
    (padding rows get threshold 0: ``|x| < 0`` never holds) and hidden units."""
    thr_row = tl.where(row_ok, thr, 0.0)
    near = tl.abs(x) < thr_row[:, None]
    if not EVEN_D:
        near = near & in_d[None, :]
    return _col_add(nz_acc, near.to(tl.int32), ROWS_IN_THREAD)


@triton.jit
def _exact_pass(
    x_ptr, mask_ptr, thr_ptr, rowpart_ptr, b, dc, n_dc, T, t_begin, t_end, offs_d, in_d,
    stride_xb, stride_xt, stride_mb, stride_mt, eps,
    HAS_MASK: tl.constexpr, USE_THR: tl.constexpr, ROW_THR: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, ROWS_IN_THREAD: tl.constexpr,
):
    """The program's range again with every value tested: (column sums, column counts,
    near-zero count, non-finite count); rewrites the per-token chunk partials."""
    col_acc = _col_zeros(BLOCK_T, BLOCK_D, tl.float32, ROWS_IN_THREAD)
    col_cnt = _col_zeros(BLOCK_T, BLOCK_D, tl.int32, ROWS_IN_THREAD)
    nz_acc = _col_zeros(BLOCK_T, BLOCK_D, tl.int32, ROWS_IN_THREAD)
    n_bad = tl.zeros([BLOCK_T], dtype=tl.int32)
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
        col_acc = _col_add(col_acc, xz, ROWS_IN_THREAD)
        col_cnt = _col_add(col_cnt, vi, ROWS_IN_THREAD)
        n_i = tl.sum(vi, axis=1)
        n = n_i.to(tl.float32)
        mean = tl.sum(xz, axis=1) / tl.maximum(n, 1.0)
        dev = tl.where(v, x - mean[:, None], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
        rp = rowpart_ptr + ((b * T + offs_t) * n_dc + dc) * 3
        tl.store(rp, n, mask=in_t)
        tl.store(rp + 1, mean, mask=in_t)
        tl.store(rp + 2, m2, mask=in_t)
        thr = tl.zeros_like(n) + _row_threshold(thr_ptr, b, T, offs_t, in_t, m2, mean, n, eps, USE_THR, ROW_THR)
        nz_acc = _col_add(nz_acc, (v & (tl.abs(x) < thr[:, None])).to(tl.int32), ROWS_IN_THREAD)
        n_bad += tl.sum(ok.to(tl.int32), axis=1) - n_i
    return (_col_total(col_acc, ROWS_IN_THREAD), _col_total(col_cnt, ROWS_IN_THREAD),
            tl.sum(_col_total(nz_acc, ROWS_IN_THREAD), axis=0), tl.sum(n_bad, axis=0))


@triton.jit
def _load_rows(row_ptr, offs_d, row_ok, in_d, ALL_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """The [BLOCK_T, BLOCK_D] tile of rows ``row_ptr`` and units ``offs_d``: rows not
    ``row_ok`` (and units past D) as 0; ALL_ROWS: every row valid, loaded with no row
    predicate."""
    if ALL_ROWS:
        if EVEN_D:
            x = tl.load(row_ptr[:, None] + offs_d[None, :])
        else:
            x = tl.load(row_ptr[:, None] + offs_d[None, :], mask=in_d[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(row_ptr[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(row_ptr[:, None] + offs_d[None, :], mask=row_ok[:, None] & in_d[None, :], other=0.0)
    return x


@triton.jit
def _tile(
    x_ptr, thr_ptr, rowpart_ptr, b, dc, n_dc, T, t0, offs_t, in_t, row_ok, lo, hi, offs_d, in_d, n_chunk,
    stride_xb, stride_xt, eps, col_acc, nz_acc, n_rows, bad,
    SPAN: tl.constexpr, USE_THR: tl.constexpr, ROW_THR: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_T: tl.constexpr, ROWS_IN_THREAD: tl.constexpr,
):
    """The fast pass over one [BLOCK_T, BLOCK_D] tile: adds its column sums and near-zero
    counts to the accumulators, stores each row's (count, mean, M2) in this chunk (0, 0, 0
    for rows not valid: padding, loaded as zeros) and returns the accumulators.

    The valid rows are ``row_ok``, or with SPAN the rows in ``[lo, hi)`` (int32): a tile
    inside the span is loaded without row predicates, a branch a tile. ``lo``, ``hi`` come
    from a cross-thread reduction, so the compiler cannot keep the rows' predicates in
    uniform registers as it does for ``offs_t < t_end``; loads predicated by them (and the
    zeros their ``other`` needs first) made ptxas issue a tile's loads one after another
    (sm_90 SASS: 8 loads spread over 180 instructions instead of back to back)."""
    row_ptr = x_ptr + b * stride_xb + offs_t * stride_xt
    if SPAN:
        if (t0 >= lo) & (t0 + BLOCK_T <= hi):
            row_ok = in_t  # all true, as each row is inside the span
            x = _load_rows(row_ptr, offs_d, row_ok, in_d, True, EVEN_D)
        else:
            t32 = offs_t.to(tl.int32)
            row_ok = (t32 >= lo) & (t32 < hi)
            x = _load_rows(row_ptr, offs_d, row_ok, in_d, False, EVEN_D)
    else:
        x = _load_rows(row_ptr, offs_d, row_ok, in_d, False, EVEN_D)
    x = x.to(tl.float32)
    # the column sums and near-zero counts first: x is dead once dev is formed, so dev can
    # take its registers (ROW_THR: x stays live until the threshold from the row's moments)
    col_acc = _col_add(col_acc, x, ROWS_IN_THREAD)
    if not ROW_THR:
        thr = _row_threshold(thr_ptr, b, T, offs_t, in_t, 0.0, 0.0, n_chunk, eps, USE_THR, False)
        nz_acc = _near_zero_add(nz_acc, x, thr, row_ok, in_d, EVEN_D, ROWS_IN_THREAD)
    n_rows += row_ok.to(tl.int32)
    # one divisor for every row (padding and tail rows are loaded as 0 and sum to 0):
    # per-row divisors cost a reciprocal sequence a row (offline sm_90 SASS)
    mean = tl.sum(x, axis=1) / n_chunk
    dev = x - mean[:, None]
    if not EVEN_D:
        dev = tl.where(in_d[None, :], dev, 0.0)
    m2 = tl.sum(dev * dev, axis=1)
    if ROW_THR:
        # the threshold after the M2 reduction (from the row's moments), x kept for the test
        thr = _row_threshold(thr_ptr, b, T, offs_t, in_t, m2, mean, n_chunk, eps, True, True)
        nz_acc = _near_zero_add(nz_acc, x, thr, row_ok, in_d, EVEN_D, ROWS_IN_THREAD)
    rp = rowpart_ptr + ((b * T + offs_t) * n_dc + dc) * 3
    tl.store(rp, tl.where(row_ok, n_chunk, 0.0), mask=in_t)
    tl.store(rp + 1, mean, mask=in_t)
    tl.store(rp + 2, m2, mask=in_t)
    bad += (~(m2 <= FLT_MAX)).to(tl.int32)  # NaN or Inf in the row (padding rows: M2 = 0)
    return col_acc, nz_acc, n_rows, bad


@triton.jit
def _store_empty_rows(rowpart_ptr, b, dc, n_dc, T, offs_t, in_t):
    """(count, mean, M2) = (0, 0, 0) of rows ``offs_t`` in this chunk: padding."""
    rp = rowpart_ptr + ((b * T + offs_t) * n_dc + dc) * 3
    zero = tl.zeros(offs_t.shape, dtype=tl.float32)
    tl.store(rp, zero, mask=in_t)
    tl.store(rp + 1, zero, mask=in_t)
    tl.store(rp + 2, zero, mask=in_t)


@triton.jit
def _fast_pass(
    x_ptr, mask_ptr, thr_ptr, rowpart_ptr, b, dc, n_dc, T, D, t_begin, t_end, lo, hi, offs_d, in_d,
    stride_xb, stride_xt, stride_mb, stride_mt, eps,
    ROWS: tl.constexpr, PREFETCH_MASK: tl.constexpr, USE_THR: tl.constexpr, ROW_THR: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_IN_THREAD: tl.constexpr,
):
    """The fast pass over rows ``[t_begin, t_end)`` in tiles of BLOCK_T: (column-sum
    accumulator, near-zero accumulator, valid rows [BLOCK_T], rows with a non-finite M2
    [BLOCK_T]), the rows' (count, mean, M2) stored by :func:`_tile`. Which rows are valid,
    by ROWS:

    * ``"all"``: every row in range (``offs_t < t_end``; with T and the split multiples of
      16, which Triton specialises on, that is one value a tile and the loads are issued
      unpredicated, back to back);
    * ``"span"``: those in ``[lo, hi)`` (int32). A tile with no row in the span only stores
      its rows as empty (no loads, no arithmetic: padding tiles of right-padded samples,
      and every tile of a range with holes, which the second launch reads); a tile inside
      the span loads unpredicated, a partial one with row predicates (see :func:`_tile`).
      The loop's bounds stay the range's: bounds taken from the span cost the sm_90 loop
      12% more registers; the branch to skip empty tiles costs fp32 [4 x 1024] 80 -> 92
      (bf16 [8 x 1024] stays at 128);
    * ``"mask"``: those with ``mask != 0``, each tile's mask loaded before its rows
      (PREFETCH_MASK: one tile ahead, its raw values carried into the next iteration, so
      that a tile's loads do not wait on a load of its mask; fp32 on an H100: 62% -> 94% of
      copy bandwidth, in bf16 slower than the dependent load, bench/README.md).
    """
    col_acc = _col_zeros(BLOCK_T, BLOCK_D, tl.float32, ROWS_IN_THREAD)
    nz_acc = _col_zeros(BLOCK_T, BLOCK_D, tl.int32, ROWS_IN_THREAD)
    n_rows = tl.zeros([BLOCK_T], dtype=tl.int32)
    bad = tl.zeros([BLOCK_T], dtype=tl.int32)
    n_chunk = tl.minimum(D - dc * BLOCK_D, BLOCK_D).to(tl.float32)  # values per valid row in this chunk
    if ROWS == "mask" and PREFETCH_MASK:
        offs_t = t_begin + tl.arange(0, BLOCK_T)
        m = mask_values(mask_ptr, b, offs_t, offs_t < t_end, stride_mb, stride_mt, True)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_t = offs_t < t_end
        if ROWS == "span":
            if (t0 + BLOCK_T <= lo) | (t0 >= hi):  # no valid row: nothing to read or add
                _store_empty_rows(rowpart_ptr, b, dc, n_dc, T, offs_t, in_t)
            else:
                col_acc, nz_acc, n_rows, bad = _tile(
                    x_ptr, thr_ptr, rowpart_ptr, b, dc, n_dc, T, t0, offs_t, in_t, in_t, lo, hi, offs_d, in_d,
                    n_chunk, stride_xb, stride_xt, eps, col_acc, nz_acc, n_rows, bad,
                    True, USE_THR, ROW_THR, EVEN_D, BLOCK_T, ROWS_IN_THREAD)
        else:
            row_ok = in_t
            if ROWS == "mask":
                if PREFETCH_MASK:
                    row_ok = in_t & (m != 0)
                    offs_next = offs_t + BLOCK_T
                    m = mask_values(mask_ptr, b, offs_next, offs_next < t_end, stride_mb, stride_mt, True)
                else:
                    row_ok = in_t & (mask_values(mask_ptr, b, offs_t, in_t, stride_mb, stride_mt, True) != 0)
            col_acc, nz_acc, n_rows, bad = _tile(
                x_ptr, thr_ptr, rowpart_ptr, b, dc, n_dc, T, t0, offs_t, in_t, row_ok, lo, hi, offs_d, in_d,
                n_chunk, stride_xb, stride_xt, eps, col_acc, nz_acc, n_rows, bad,
                False, USE_THR, ROW_THR, EVEN_D, BLOCK_T, ROWS_IN_THREAD)
    return col_acc, nz_acc, n_rows, bad


@triton.jit
def _layer_moments_kernel(
    x_ptr, mask_ptr, thr_ptr,
    colsum_ptr, colcnt_ptr, rowpart_ptr, cnt_ptr,
    T, D, rows_per_split,
    stride_xb, stride_xt, stride_mb, stride_mt,
    eps,
    HAS_MASK: tl.constexpr,
    USE_THR: tl.constexpr,
    ROW_THR: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS_IN_THREAD: tl.constexpr,
    ROWS: tl.constexpr,
    SPAN_BLOCK: tl.constexpr,
):
    b, dc, sp, n_dc, n_sp, offs_d, in_d, t_begin, t_end = _program_range(T, D, rows_per_split, BLOCK_D)
    if HAS_MASK:
        # the valid rows' span first (one read of the range's mask): a range whose padding
        # leaves no holes (right or left padding, or none) is read by its span with no mask
        # load in front of each tile's loads; a range with holes reads nothing here and is
        # marked -2 for the next launch, which reads it with its mask
        lo, hi, holes = valid_span(mask_ptr, b, t_begin, t_end, stride_mb, stride_mt, SPAN_BLOCK)
        # nothing to read (holes, or no valid row): an empty span at the range's start, so
        # that every tile is skipped
        empty = holes | (lo >= hi)
        lo = tl.where(empty, t_begin, lo)
        hi = tl.where(empty, t_begin, hi)
    else:
        lo, hi = t_begin, t_end
    col_acc, nz_acc, n_rows, bad = _fast_pass(
        x_ptr, mask_ptr, thr_ptr, rowpart_ptr, b, dc, n_dc, T, D, t_begin, t_end, lo.to(tl.int32), hi.to(tl.int32),
        offs_d, in_d, stride_xb, stride_xt, stride_mb, stride_mt, eps,
        ROWS, False, USE_THR, ROW_THR, EVEN_D, BLOCK_T, BLOCK_D, ROWS_IN_THREAD,
    )
    # rare: a NaN/Inf (or an fp32 overflow) in this range; a non-finite count of -1 hands the
    # range to _layer_moments_exact_kernel, the next launch (-2: holes, the mask pass)
    mark = -(tl.sum(bad, axis=0) > 0).to(tl.int32)
    if HAS_MASK:
        mark = tl.where(holes, -2, mark)
    _store_fast_program(colsum_ptr, colcnt_ptr, cnt_ptr, b, dc, sp, n_dc, n_sp, D, offs_d, in_d,
                        col_acc, nz_acc, n_rows, mark, BLOCK_D, ROWS_IN_THREAD)


@triton.jit
def _layer_moments_exact_kernel(
    x_ptr, mask_ptr, thr_ptr,
    colsum_ptr, colcnt_ptr, rowpart_ptr, cnt_ptr,
    T, D, rows_per_split,
    stride_xb, stride_xt, stride_mb, stride_mt,
    eps,
    HAS_MASK: tl.constexpr,
    USE_THR: tl.constexpr,
    ROW_THR: tl.constexpr,
    PREFETCH_MASK: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS_IN_THREAD: tl.constexpr,
    EXACT_BLOCK_T: tl.constexpr,
):
    """Same grid as ``_layer_moments_kernel``: a program whose range the fast kernel marked
    redoes it and overwrites its slots, the others only read the mark.

    * -2 (padding with holes in the range): the fast pass with each tile's mask, then, if
      that finds a non-finite row, the exact pass;
    * -1 (a non-finite row): the exact pass, every value tested, in tiles of EXACT_BLOCK_T
      rows (a quarter of the fast pass's, so that its registers do not set those of the
      mask pass in the same launch).

    A launch of its own so that neither the exact pass's registers (three more tile-sized
    live values) nor the mask loads set the fast kernel's register count: offline sm_90
    builds show 255 -> 125 registers for bf16 [8 x 1024] tiles and 255 -> 80 for fp32
    [4 x 1024] (bench/gpu_sass_stats.py), i.e. more resident programs per SM."""
    b, dc, sp, n_dc, n_sp, offs_d, in_d, t_begin, t_end = _program_range(T, D, rows_per_split, BLOCK_D)
    mark = tl.load(cnt_ptr + ((b * n_dc + dc) * n_sp + sp) * 2 + 1)
    if HAS_MASK:
        if mark == -2:
            col_acc, nz_acc, n_rows, bad = _fast_pass(
                x_ptr, mask_ptr, thr_ptr, rowpart_ptr, b, dc, n_dc, T, D, t_begin, t_end, t_begin, t_end, offs_d,
                in_d, stride_xb, stride_xt, stride_mb, stride_mt, eps,
                "mask", PREFETCH_MASK, USE_THR, ROW_THR, EVEN_D, BLOCK_T, BLOCK_D, ROWS_IN_THREAD,
            )
            mark = -(tl.sum(bad, axis=0) > 0).to(tl.int32)
            if mark == 0:
                _store_fast_program(colsum_ptr, colcnt_ptr, cnt_ptr, b, dc, sp, n_dc, n_sp, D, offs_d, in_d,
                                    col_acc, nz_acc, n_rows, 0, BLOCK_D, ROWS_IN_THREAD)
    if mark < 0:
        col_sum, col_cnt, nz, nonfinite = _exact_pass(
            x_ptr, mask_ptr, thr_ptr, rowpart_ptr, b, dc, n_dc, T, t_begin, t_end, offs_d, in_d,
            stride_xb, stride_xt, stride_mb, stride_mt, eps,
            HAS_MASK, USE_THR, ROW_THR, EXACT_BLOCK_T, BLOCK_D, ROWS_IN_THREAD,
        )
        _store_program(colsum_ptr, colcnt_ptr, cnt_ptr, b, dc, sp, n_dc, n_sp, D, offs_d, in_d,
                       col_sum, col_cnt, nz, nonfinite)


@triton.jit
def _chan_merge(n, mu, m2, AXIS: tl.constexpr):
    """(N, mean, M2) of partials (n, mu, M2) along AXIS (0 of a vector, or 1 of a matrix),
    the closed form of repeated Chan merges: ``N = sum n``, ``mean = sum n mu / N``,
    ``M2 = sum M2 + sum n (mu - mean)^2`` (partials with n = 0 add nothing)."""
    tot = tl.sum(n, axis=AXIS)
    mean = tl.sum(n * mu, axis=AXIS) / tl.maximum(tot, 1.0)
    if AXIS == 1:
        d = tl.where(n > 0, mu - mean[:, None], 0.0)
    else:
        d = tl.where(n > 0, mu - mean, 0.0)
    return tot, mean, tl.sum(m2 + n * d * d, axis=AXIS)


@triton.jit
def _finish_kernel(
    rowpart_ptr, colsum_ptr, colcnt_ptr, tok_ptr, samp_ptr,
    R, C, D, S, n_tok_blocks, n_col_blocks,
    BLOCK_R: tl.constexpr, BLOCK_CC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_tok_blocks:
        # tokens: Chan merge of each token's C chunk partials (closed form, one load of the
        # block's contiguous [BLOCK_R, C, 3] partials), then the block's sums
        offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, BLOCK_CC)
        ok = (offs_r < R)[:, None] & (offs_c < C)[None, :]
        p = rowpart_ptr + (offs_r[:, None] * C + offs_c[None, :]) * 3
        n_c = tl.load(p, mask=ok, other=0.0).to(tl.float64)
        mu_c = tl.load(p + 1, mask=ok, other=0.0).to(tl.float64)
        m2_c = tl.load(p + 2, mask=ok, other=0.0).to(tl.float64)
        n_t, mu_t, m2_t = _chan_merge(n_c, mu_c, m2_c, 1)
        tok_ok = n_t >= 2.0
        var_t = tl.where(tok_ok, m2_t / tl.maximum(n_t - 1.0, 1.0), 0.0)
        n_blk, mu_blk, m2_blk = _chan_merge(n_t, mu_t, m2_t, 0)
        o = tok_ptr + pid * 5
        tl.store(o, n_blk)
        tl.store(o + 1, mu_blk)
        tl.store(o + 2, m2_blk)
        tl.store(o + 3, tl.sum(var_t, axis=0))
        tl.store(o + 4, tl.sum(tok_ok.to(tl.float64), axis=0))
    else:
        # (sample b, BLOCK_C hidden units): the token mean of each unit (column sums and
        # counts summed over splits), then (units kept, mean, M2) of those means
        q = pid - n_tok_blocks
        b = (q // n_col_blocks).to(tl.int64)
        offs_d = (q % n_col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_d = offs_d < D
        cs = tl.zeros([BLOCK_C], dtype=tl.float64)
        cc = tl.zeros([BLOCK_C], dtype=tl.int64)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            base = (b * S + offs_s[:, None]) * D + offs_d[None, :]
            ok = (offs_s < S)[:, None] & in_d[None, :]
            cs += tl.sum(tl.load(colsum_ptr + base, mask=ok, other=0.0).to(tl.float64), axis=0)
            cc += tl.sum(tl.load(colcnt_ptr + base, mask=ok, other=0).to(tl.int64), axis=0)
        keep = cc > 0
        mean_d = tl.where(keep, cs / tl.maximum(cc, 1).to(tl.float64), 0.0)
        k = tl.sum(keep.to(tl.float64), axis=0)
        mu = tl.sum(mean_d, axis=0) / tl.maximum(k, 1.0)
        dv = tl.where(keep, mean_d - mu, 0.0)
        o = samp_ptr + q * 3
        tl.store(o, k)
        tl.store(o + 1, mu)
        tl.store(o + 2, tl.sum(dv * dv, axis=0))


@triton.jit
def _reduce_kernel(
    tok_ptr, samp_ptr, cnt_ptr, ints_ptr, flts_ptr, P, B, NCB, NC,
    BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_NCB: tl.constexpr,
):
    """One program: the packed Moments fields from the token-block, sample and count
    partials (Chan merges in closed form, float64)."""
    offs = tl.arange(0, BLOCK)
    n_acc = tl.zeros([BLOCK], dtype=tl.float64)
    s_acc = tl.zeros([BLOCK], dtype=tl.float64)
    tv_acc = tl.zeros([BLOCK], dtype=tl.float64)
    tk_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for p0 in range(0, P, BLOCK):
        i = p0 + offs
        ok = i < P
        n = tl.load(tok_ptr + i * 5, mask=ok, other=0.0)
        n_acc += n
        s_acc += n * tl.load(tok_ptr + i * 5 + 1, mask=ok, other=0.0)
        tv_acc += tl.load(tok_ptr + i * 5 + 3, mask=ok, other=0.0)
        tk_acc += tl.load(tok_ptr + i * 5 + 4, mask=ok, other=0.0)
    n_tot = tl.sum(n_acc, axis=0)
    mu = tl.sum(s_acc, axis=0) / tl.maximum(n_tot, 1.0)
    m2_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for p0 in range(0, P, BLOCK):
        i = p0 + offs
        ok = i < P
        n = tl.load(tok_ptr + i * 5, mask=ok, other=0.0)
        dv = tl.where(n > 0, tl.load(tok_ptr + i * 5 + 1, mask=ok, other=0.0) - mu, 0.0)
        m2_acc += tl.load(tok_ptr + i * 5 + 2, mask=ok, other=0.0) + n * dv * dv
    # samples: merge each sample's unit-chunk partials, unbiased variance over its units
    offs_j = tl.arange(0, BLOCK_NCB)
    hv = tl.zeros([BLOCK_B], dtype=tl.float64)
    pv = tl.zeros([BLOCK_B], dtype=tl.float64)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ok = (offs_b < B)[:, None] & (offs_j < NCB)[None, :]
        o = samp_ptr + (offs_b[:, None] * NCB + offs_j[None, :]) * 3
        kb, _, m2b = _chan_merge(tl.load(o, mask=ok, other=0.0), tl.load(o + 1, mask=ok, other=0.0),
                                 tl.load(o + 2, mask=ok, other=0.0), 1)
        has_var = kb >= 2.0
        hv += has_var.to(tl.float64)
        pv += tl.where(has_var, m2b / tl.maximum(kb - 1.0, 1.0), 0.0)
    nz_acc = tl.zeros([BLOCK], dtype=tl.int64)
    nf_acc = tl.zeros([BLOCK], dtype=tl.int64)
    for c0 in range(0, NC, BLOCK):
        i = c0 + offs
        ok = i < NC
        nz_acc += tl.load(cnt_ptr + i * 2, mask=ok, other=0).to(tl.int64)
        nf_acc += tl.load(cnt_ptr + i * 2 + 1, mask=ok, other=0).to(tl.int64)
    tl.store(ints_ptr, tl.sum(hv, axis=0).to(tl.int64))
    tl.store(ints_ptr + 1, tl.sum(tk_acc, axis=0).to(tl.int64))
    tl.store(ints_ptr + 2, n_tot.to(tl.int64))
    tl.store(ints_ptr + 3, tl.sum(nz_acc, axis=0))
    tl.store(ints_ptr + 4, tl.sum(nf_acc, axis=0))
    tl.store(flts_ptr, tl.sum(pv, axis=0))
    tl.store(flts_ptr + 1, tl.sum(tv_acc, axis=0))
    tl.store(flts_ptr + 2, mu)
    tl.store(flts_ptr + 3, tl.sum(m2_acc, axis=0))


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


#: Widest rows (hidden units) that the GPU layout reads whole, so that a relative threshold
#: is computed in the one read. Measured at D = 4096 on an H100 (bench/README.md); wider rows
#: would take 1 x 8192 tiles at one program an SM (offline sm_90 SASS), so they keep the
#: pre-pass until someone times them.
WHOLE_ROW_MAX = 4096


def _gpu_layout(B: int, T: int, D: int, device, itemsize: int = 2, relative: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps, splits) on a GPU, from bench/gpu_sweep_stats.py (H200,
    [16, 4096, 4096]: 1024-unit chunks, 8 tokens a tile for 2-byte and 4 for 4-byte inputs,
    4 warps, about 4 programs per SM were best of 72 layouts in bf16 and in fp32) and the
    H100 measurements of bench/README.md (at D = 4096):

    * with a padding mask, the same: the fast kernel reads a range by the span of its valid
      rows, as it reads a range without padding (the layouts for the mask loaded with each
      tile, 4 tokens bf16 and 2 fp32 with twice the splits, went with that form);
    * ``relative`` (a relative threshold) and ``D <= WHOLE_ROW_MAX``: whole rows, so that the
      threshold is computed in the one read: one chunk of ``next_power_of_2(D)`` units, the
      usual tokens a tile while the tile stays within 8192 (2-byte) or 4096 (4-byte)
      values, fewer for wider rows (down to 1), 8 warps for 4096-unit rows (4 below:
      narrower rows at 8 warps would no longer lie within each thread), twice the splits
      for 4-byte inputs. For D <= 1024 that is the usual tile; wider rows than
      WHOLE_ROW_MAX get the usual chunks (and the pre-pass).
    """
    wide = itemsize >= 4
    whole_rows = relative and triton.next_power_of_2(D) <= WHOLE_ROW_MAX
    tokens = 4 if wide else 8
    if whole_rows:
        block_d = triton.next_power_of_2(max(D, 16))
        block_t = max(1, min(tokens, (4096 if wide else 8192) // block_d))
        warps = 8 if block_d >= 4096 else 4
    else:
        block_d = min(1024, triton.next_power_of_2(max(D, 16)))
        block_t = tokens
        warps = 4
    waves = 2 if wide and whole_rows else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = max(1, (4 * waves * sms) // max(1, B * triton.cdiv(D, block_d)))
    return block_t, block_d, warps, max(1, min(triton.cdiv(T, block_t), want))


def layer_moments_partials(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sparsity_eps: float,
    sparsity_rel: float | None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Launch the one-read kernel on ``hidden`` [B, T, D] and return its partial buffers.

    ``colsum`` [B, S, D] fp32 and ``colcnt`` [B, S, D] int32 (per token split S),
    ``rowpart`` [B*T, C, 3] fp32 (count, mean, M2 of each token in each of C hidden chunks),
    ``cnt`` [B, C, S, 2] int32 (near_zero, nonfinite). ``attention_mask`` must be [B, T].
    ``tiles`` = (BLOCK_T, BLOCK_D, num_warps, splits) overrides the layout (benchmarks, tests).

    A relative threshold (``|h| < rel * rms(h[b, t, :])``) is computed in the one read when
    a tile holds whole rows (one hidden chunk, ``C = 1``: the GPU layout takes whole rows
    up to :data:`WHOLE_ROW_MAX` units); wider rows take a pre-pass (``_row_sumsq_kernel``)
    that reads the activation once more for each token's rms.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    B, T, D = hidden.shape
    if B * T * D == 0:
        raise ValueError(f"hidden has no values (shape {tuple(hidden.shape)}): nothing to launch")
    dev = hidden.device
    if tiles is not None:
        BLOCK_T, BLOCK_D, num_warps, S = tiles
        if any(t < 1 or t & (t - 1) for t in (BLOCK_T, BLOCK_D, num_warps)) or S < 1:
            raise ValueError(f"tiles must be powers of two (BLOCK_T, BLOCK_D, num_warps) and splits >= 1, got {tiles}")
    elif dev.type == "cpu":  # interpreter: few, large programs
        BLOCK_T = min(64, triton.next_power_of_2(max(T, 1)))
        BLOCK_D = min(1024, triton.next_power_of_2(max(D, 1)))
        num_warps, S = 1, 1
    else:
        BLOCK_T, BLOCK_D, num_warps, S = _gpu_layout(B, T, D, dev, hidden.element_size(), sparsity_rel is not None)
    rows_per_split = triton.cdiv(triton.cdiv(T, S), BLOCK_T) * BLOCK_T
    if dev.type != "cpu" and rows_per_split >= 128:
        # a multiple of 16 on a GPU (Triton specialises integer arguments divisible by 16: see
        # rows below), where that costs at most an eighth of the splits; the interpreter keeps
        # BLOCK_T, so that tests split short sequences many ways
        rows_per_split = triton.cdiv(rows_per_split, 16) * 16
    S = triton.cdiv(T, rows_per_split)
    C = triton.cdiv(D, BLOCK_D)
    row_thr = sparsity_rel is not None and C == 1
    mask, smb, smt, has_mask = kernel_mask(attention_mask, hidden)
    # a tile's rows lie within each thread when the columns need every lane of every warp at
    # 16 bytes a thread (Triton's default blocked layout): then tiles are summed over rows as
    # they come (see _col_add). The interpreter runs either form.
    rows_in_thread = BLOCK_D >= 32 * num_warps * max(1, 16 // hidden.element_size())
    colsum = torch.empty((B, S, D), dtype=torch.float32, device=dev)
    colcnt = torch.empty((B, S, D), dtype=torch.int32, device=dev)
    rowpart = torch.empty((B * T, C, 3), dtype=torch.float32, device=dev)
    cnt = torch.empty((B, C, S, 2), dtype=torch.int32, device=dev)
    thr = hidden  # dummy pointer unless the pre-pass computes thresholds
    if sparsity_rel is not None and not row_thr:
        thr = torch.empty((B * T,), dtype=torch.float32, device=dev)
        bt = min(64, triton.next_power_of_2(max(T, 1))) if dev.type == "cpu" else 16
        _row_sumsq_kernel[(B, triton.cdiv(T, bt))](
            hidden, mask, thr, T, D, hidden.stride(0), hidden.stride(1), smb, smt, float(sparsity_rel),
            HAS_MASK=has_mask, BLOCK_T=bt, BLOCK_D=min(1024 if dev.type == "cpu" else 512, triton.next_power_of_2(max(D, 16))),
            num_warps=1 if dev.type == "cpu" else 8,
        )
    args = (hidden, mask, thr, colsum, colcnt, rowpart, cnt, T, D, rows_per_split,
            hidden.stride(0), hidden.stride(1), smb, smt, float(sparsity_rel if row_thr else sparsity_eps))
    meta = dict(HAS_MASK=has_mask, USE_THR=sparsity_rel is not None, ROW_THR=row_thr, EVEN_D=D % BLOCK_D == 0,
                BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, ROWS_IN_THREAD=rows_in_thread, num_warps=num_warps)
    # rows "all" only where T and the split are multiples of 16: then a tile's range test is
    # one value for all its rows and the compiler issues its loads unpredicated, back to back;
    # otherwise the "span" form's branch between whole and partial tiles does that. A mask is
    # read SPAN_BLOCK values at a time for the span of the valid rows.
    rows = "all" if not has_mask and T % 16 == 0 and rows_per_split % 16 == 0 else "span"
    span_block = min(1024, triton.next_power_of_2(rows_per_split)) if has_mask else 1  # unused without a mask
    _layer_moments_kernel[(B, C, S)](*args, ROWS=rows, SPAN_BLOCK=span_block, **meta)
    # the second launch reads a range with holes in its padding by its mask, a tile ahead
    # for 4-byte inputs only: with 2-byte inputs that cost registers (sm_90: 127 -> 159 at
    # 8 x 1024) and time (H100, bench/README.md)
    # and its exact pass in tiles of a quarter of the rows: at the fast pass's tiles it set
    # the launch's registers (sm_90 bf16 [8 x 1024]: 255 and a 40-byte spill, against 126 at
    # [2 x 1024]; fp32 [4 x 1024] 186 against 96 at [1 x 1024]) for the mask pass too
    meta.update(PREFETCH_MASK=hidden.element_size() >= 4, EXACT_BLOCK_T=max(1, BLOCK_T // 4))
    _layer_moments_exact_kernel[(B, C, S)](*args, **meta)  # the same grid: redoes only marked ranges
    return dict(colsum=colsum, colcnt=colcnt, rowpart=rowpart, cnt=cnt)


#: Tile limits of the merge kernels (tests shrink them to make every loop run more than once):
#: tile = token block x chunks, units per (sample, units) program, splits per load, reduce block.
_MERGE_BLOCKS = {
    "cpu": dict(tile=16384, units=4096, splits=64, reduce=1024, warps=1),  # interpreter: few programs
    "gpu": dict(tile=4096, units=256, splits=16, reduce=1024, warps=4),
}


def reduce_moment_partials(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge :func:`layer_moments_partials`' buffers on the device, in float64, into the
    packed fields ``ints`` (int64 [5]) and ``flts`` (float64 [4]) of ``Moments``."""
    colsum, colcnt, rowpart, cnt = p["colsum"], p["colcnt"], p["rowpart"], p["cnt"]
    B, S, D = colsum.shape
    R, C, _ = rowpart.shape
    dev = colsum.device
    lim = _MERGE_BLOCKS["cpu" if dev.type == "cpu" else "gpu"]
    block_cc = triton.next_power_of_2(C)
    block_r = max(1, min(lim["tile"] // block_cc, triton.next_power_of_2(R)))
    block_c = min(lim["units"], triton.next_power_of_2(D))
    block_s = min(lim["splits"], triton.next_power_of_2(S))
    n_tok, n_col = triton.cdiv(R, block_r), triton.cdiv(D, block_c)
    tok = torch.empty((n_tok, 5), dtype=torch.float64, device=dev)
    samp = torch.empty((B * n_col, 3), dtype=torch.float64, device=dev)
    _finish_kernel[(n_tok + B * n_col,)](
        rowpart, colsum, colcnt, tok, samp, R, C, D, S, n_tok, n_col,
        BLOCK_R=block_r, BLOCK_CC=block_cc, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=lim["warps"],
    )
    ints = torch.empty(5, dtype=torch.int64, device=dev)
    flts = torch.empty(4, dtype=torch.float64, device=dev)
    nc = cnt.numel() // 2
    block_ncb = triton.next_power_of_2(n_col)
    _reduce_kernel[(1,)](
        tok, samp, cnt, ints, flts, n_tok, B, n_col, nc,
        BLOCK=min(lim["reduce"], triton.next_power_of_2(max(n_tok, nc))),
        BLOCK_B=max(1, min(triton.next_power_of_2(B), lim["reduce"] // block_ncb)), BLOCK_NCB=block_ncb,
        num_warps=lim["warps"],
    )
    return ints, flts


def layer_moments_packed(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sparsity_eps: float,
    sparsity_rel: float | None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole op on the device: one read of ``hidden``, then the in-kernel merge.
    Returns ``(ints, flts)`` as :func:`reduce_moment_partials`."""
    return reduce_moment_partials(layer_moments_partials(hidden, attention_mask, sparsity_eps, sparsity_rel, tiles=tiles))

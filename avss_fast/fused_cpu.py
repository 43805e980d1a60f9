"""The CPU path of the stats ops: one pass over cache-sized chunks of tokens.

The activation ``[B, T, D]`` is walked in chunks of about ``CHUNK_ELEMENTS`` values: whole
samples at a time when a sample is small (so short sequences cost a few ops per call,
not a few per sample), else runs of tokens of one sample. Each chunk is upcast to fp32
once and reduced while it sits in cache:

* a row sum gives every token's mean, and ``|| x - mean ||^2`` its M2 (the two-pass
  formula, on cached data: as accurate as Welford and far faster than ``torch.var_mean``
  on CPU);
* a column sum feeds the per-sample token mean (AVSS pooled variance);
* near-zero values are counted without a full comparison pass: a row's ``min |x|`` is
  compared with the threshold first, and only the (rare) rows that hold a near-zero value
  are counted element by element. The count is exactly the same.

Tokens' (count, mean, M2) are kept per token and merged once at the end (closed forms
when every valid token is finite, else the closed-form Chan reduction); the per-sample
variance of the token means is one vectorised reduction over samples. A token whose M2 is
not finite takes a float64 slow path, value by value, that leaves NaN/Inf out and counts
them, so finite data never pays for the checks: a finite M2 proves every value of the row
finite, since ``x - mean`` is NaN/Inf as soon as ``x`` or the mean is. The fast/slow choice
is made per token and column sums are taken per sample by the same op with or without a
mask, so a sample's fp32 partials never depend on which samples share its batch (merging
per-batch results equals one pass up to float64 rounding). Semantics are those of
``avss_fast.reference``, computed in fp32 (fp64 inputs are rounded to fp32).
"""

from __future__ import annotations

import threading

import torch

from .stats import chan_reduce, pooled_variance_from_columns

_F32 = torch.float32
_F64 = torch.float64
_I64 = torch.int64
#: Values per chunk (2 MiB in fp32). Tuned on a 2-core EPYC ([8, 512, 4096], 1 and 2 threads):
#: per-call overhead dominates below, 2**18 is ~15-25% slower, 2**20 no faster. Inputs up to
#: this size (e.g. a batch of short sequences) go through in a single chunk.
CHUNK_ELEMENTS = 1 << 19


def _rows_per_chunk(D: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(D, 1))


def _chunks(B: int, T: int, D: int):
    """(b0, b1, t0, t1) slices of about CHUNK_ELEMENTS values: whole samples when they fit."""
    rows = _rows_per_chunk(D)
    if rows >= T:
        spc = max(1, rows // max(T, 1))
        for b0 in range(0, B, spc):
            yield b0, min(B, b0 + spc), 0, T
    else:
        for b in range(B):
            for t0 in range(0, T, rows):
                yield b, b + 1, t0, min(T, t0 + rows)


def _valid_tokens(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T] bool of the valid tokens, or None when every token is valid."""
    if attention_mask is None:
        return None
    valid = attention_mask != 0
    if bool(valid.all()):
        return None
    return valid


_tls = threading.local()


def _scratch(slot: int, shape, device: torch.device) -> torch.Tensor:
    """An fp32 tensor of ``shape`` carved from a reusable flat buffer.

    On CPU the buffers are kept per thread between calls: a fresh chunk-sized allocation
    comes from ``mmap`` and pays a page fault per 4 KiB on first touch, which costs as much
    as the arithmetic on small inputs. Other devices have caching allocators."""
    n = 1
    for s in shape:
        n *= s
    if device.type != "cpu":
        return torch.empty(shape, dtype=_F32, device=device)
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = [None, None]
    buf = bufs[slot]
    if buf is None or buf.numel() < n:
        # a normal tensor even when first made under inference_mode, so that later calls
        # outside it may still write to it
        with torch.inference_mode(False):
            buf = bufs[slot] = torch.empty(max(n, CHUNK_ELEMENTS), dtype=_F32)
    return buf[:n].view(shape)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """One chunk: its own [B, T] result; several: flattened and joined in row-major order."""
    return parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])


def layer_moments_packed(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None, sparsity_eps: float, sparsity_rel: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer_moments`` on any device with plain torch ops, packed as the custom op returns:
    ints = (samples, tokens, elements, near_zero, nonfinite), floats = (pooled_var_sum,
    token_var_sum, mean, m2).

    Small inputs are dominated by the fixed cost of each torch call (a few microseconds,
    more when the model's forward has just run), so the common case (finite values, one
    or more fast chunks) is written to issue as few calls as it can."""
    B, T, D = hidden.shape
    dev = hidden.device
    if B * T * D == 0:
        return torch.zeros(5, dtype=_I64, device=dev), torch.zeros(4, dtype=_F64, device=dev)
    valid = _valid_tokens(attention_mask)
    invalid = None if valid is None else ~valid
    rel = sparsity_rel is not None
    inf = float("inf")
    zero_i = torch.zeros((), dtype=_I64, device=dev)

    # Per chunk, in row-major token order: each token's mean, M2 and min |x| (+inf for rows
    # the slow path counted itself) and count (None: D for every row). Padding rows have
    # mean = M2 = 0. Per sample: column sums and valid-row counts (per column only once a
    # slow row made them differ).
    #
    # Every statistic of a token depends on that token alone, and every per-sample partial
    # on that sample alone (the fast/slow choice is made token by token, column sums are
    # taken per sample by the same op whatever the mask): so batching samples differently
    # changes results only by the float64 rounding of the final merge.
    means: list[torch.Tensor] = []
    m2s: list[torch.Tensor] = []
    amins: list[torch.Tensor] = []
    counts: list[torch.Tensor | None] = []
    colsum = cnt_b = None  # [B, D] float64, [B] int64: allocated by the first chunk that is not whole
    colcnt = None  # [B, D] int64, from the first slow row on
    extra_nz: list[torch.Tensor] = []  # near-zero counts from slow rows
    extra_nf: list[torch.Tensor] = []  # non-finite counts

    for b0, b1, t0, t1 in _chunks(B, T, D):
        whole = b0 == 0 and b1 == B and t0 == 0 and t1 == T
        x = hidden if whole else hidden[b0:b1, t0:t1]
        shape = x.shape
        if x.dtype != _F32:  # scratch 0: the upcast chunk; scratch 1: x - mean, then |x|
            x = _scratch(0, shape, dev).copy_(x)
        inv = None if invalid is None else (invalid if whole else invalid[b0:b1, t0:t1])
        if inv is not None and not whole and not bool(inv.any()):
            inv = None  # no padding in this chunk (same results either way, fewer passes)
        if not whole and colsum is None:
            colsum = torch.zeros((B, D), dtype=_F64, device=dev)
            cnt_b = torch.zeros(B, dtype=_I64, device=dev)

        # Per-token mean and M2 by the two-pass formula on the cached chunk (fp32).
        mean = x.sum(-1).div_(D)  # [s, t]
        d = torch.sub(x, mean[..., None], out=_scratch(1, shape, dev))
        m2 = torch.linalg.vecdot(d, d)  # exact for exact data (a norm squared is not)
        rows_fin = torch.isfinite(m2)
        if bool(rows_fin.all()):  # the common case: every row finite, padding included
            if inv is None:
                c_sum, c_cnt = x.sum(1), t1 - t0
            else:
                vf = (valid if whole else valid[b0:b1, t0:t1]).to(_F32)
                c_sum = x.mul(vf[..., None]).sum(1)  # = the sum over valid rows, same op
                c_cnt = vf.sum(1, dtype=_I64)
                mean.masked_fill_(inv, 0.0)
                m2.masked_fill_(inv, 0.0)
            if whole:
                colsum = c_sum.to(_F64)
                cnt_b = c_cnt if inv is not None else torch.full((B,), T, dtype=_I64, device=dev)
            else:
                colsum[b0:b1] += c_sum
                cnt_b[b0:b1] += c_cnt
                if colcnt is not None:
                    colcnt[b0:b1] += c_cnt if inv is None else c_cnt[:, None]
            means.append(mean)
            m2s.append(m2)
            amins.append(torch.abs(x, out=d).amin(-1))
            counts.append(None)
            continue

        # Some row holds a NaN/Inf (or overflows fp32). Finite rows keep the fast results;
        # valid non-finite rows ("slow" rows) are redone value by value in float64.
        if colsum is None:
            colsum = torch.zeros((B, D), dtype=_F64, device=dev)
            cnt_b = torch.zeros(B, dtype=_I64, device=dev)
        fast_rows = rows_fin if inv is None else rows_fin & ~inv
        slow_rows = ~rows_fin if inv is None else ~rows_fin & ~inv
        amin = torch.abs(x, out=d).amin(-1).masked_fill_(~fast_rows, inf)
        colsum[b0:b1] += torch.where(fast_rows[..., None], x, 0.0).sum(1)
        f_cnt = fast_rows.sum(1, dtype=_I64)
        cnt_b[b0:b1] += f_cnt
        mean = mean.to(_F64).masked_fill_(~fast_rows, 0.0)
        m2 = m2.to(_F64).masked_fill_(~fast_rows, 0.0)
        n = torch.where(fast_rows, D, 0)
        if bool(slow_rows.any()):
            if colcnt is None:
                colcnt = cnt_b[:, None].expand(B, D).clone()
            else:
                colcnt[b0:b1] += f_cnt[:, None]
            xr = x[slow_rows]  # [k, D]
            s_idx = slow_rows.nonzero()[:, 0] + b0  # sample of each slow row
            fin = torch.isfinite(xr)
            extra_nf.append((~fin).sum())
            xz = torch.where(fin, xr, 0.0)
            n_r = fin.sum(-1)
            mean_r = xz.sum(-1, dtype=_F64) / n_r.clamp(min=1)
            dev_ = torch.where(fin, xr.to(_F64) - mean_r[..., None], 0.0)
            mean[slow_rows] = mean_r
            m2[slow_rows] = (dev_ * dev_).sum(-1)
            n[slow_rows] = n_r
            colsum.index_add_(0, s_idx, xz.to(_F64))
            colcnt.index_add_(0, s_idx, fin.to(_I64))
            if rel:
                rms = ((xz.to(_F64) ** 2).sum(-1) / n_r.clamp(min=1)).sqrt()
                near = xr.abs() < (sparsity_rel * rms).to(_F32)[..., None]
            else:
                near = xr.abs().to(_F32) < sparsity_eps  # in fp32 (a bf16 tensor would round eps)
            extra_nz.append((fin & near).sum())
        elif colcnt is not None:
            colcnt[b0:b1] += f_cnt[:, None]
        means.append(mean)
        m2s.append(m2)
        amins.append(amin)
        counts.append(n)

    row_mean = _cat(means).to(_F64)  # [B, T] (one chunk) or [B*T], row-major
    row_m2 = _cat(m2s)  # fp32 from fast chunks (float64 if any chunk was slow)
    row_amin = _cat(amins)
    flat = row_mean.dim() == 1
    v_rows = None if valid is None else (valid.reshape(-1) if flat else valid)
    inv_rows = None if invalid is None else (invalid.reshape(-1) if flat else invalid)

    # Near-zero values of fast-path rows: only rows whose min |x| is below the threshold
    # can hold one; count those rows' values (read again: rare, and only those rows).
    if rel:
        thr_rows = (sparsity_rel * (row_mean.square() + row_m2.to(_F64) / D).sqrt()).to(_F32)
        cand = row_amin < thr_rows
    else:
        cand = row_amin < sparsity_eps
    near_zero = zero_i
    if bool(cand.any()):
        if v_rows is not None:
            cand &= v_rows
        xs = hidden[cand.view(B, T)].to(_F32)  # [k, D]
        near_zero = torch.count_nonzero(xs.abs() < (thr_rows[cand][:, None] if rel else sparsity_eps))
    for c in extra_nz:
        near_zero = near_zero + c
    nonfinite = zero_i
    for c in extra_nf:
        nonfinite = nonfinite + c

    if colcnt is None:
        # Every valid row has D values (padding rows: mean = M2 = 0): closed forms.
        n_valid = cnt_b.sum()
        tokens = n_valid if D >= 2 else zero_i
        g_n = n_valid * D
        m2_sum = row_m2.sum(dtype=_F64)
        token_var = m2_sum / max(D - 1, 1)
        g_mean = row_mean.sum() / n_valid.clamp(min=1)
        dm = (row_mean - g_mean).square_()
        if inv_rows is not None:
            dm.masked_fill_(inv_rows, 0.0)
        g_m2 = m2_sum + dm.sum() * D
        # AVSS pooled variance: per sample, unbiased variance over d of the token means.
        if D >= 2:
            m = colsum / cnt_b.clamp(min=1)[:, None]
            var_b = (m - m.mean(1, keepdim=True)).square_().sum(1)
            has_var = cnt_b > 0
            samples = has_var.sum()
            pooled = (var_b * has_var).sum() / (D - 1)
        else:
            samples, pooled = zero_i, torch.zeros((), dtype=_F64, device=dev)
    else:
        zero = torch.zeros((), dtype=_F64, device=dev)
        row_m2 = row_m2.to(_F64).reshape(-1)
        row_mean = row_mean.reshape(-1)
        row_n = torch.cat([
            torch.full((m_.numel(),), D, dtype=_I64, device=dev) if n is None else n.reshape(-1)
            for n, m_ in zip(counts, means)
        ])
        if valid is not None:
            row_n = row_n.masked_fill(invalid.reshape(-1), 0)
        tok_ok = row_n >= 2
        tokens = tok_ok.sum()
        token_var = torch.where(tok_ok, row_m2 / (row_n - 1).clamp(min=1), zero).sum()
        g_n, g_mean, g_m2 = chan_reduce(row_n, row_mean, row_m2)
        samples, pooled = pooled_variance_from_columns(colsum, colcnt)

    ints = torch.stack([samples, tokens, g_n, near_zero, nonfinite])
    flts = torch.stack([pooled, token_var, g_mean, g_m2])
    return ints, flts


def block_similarity_packed(
    h_in: torch.Tensor, h_out: torch.Tensor, attention_mask: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_similarity`` with plain torch ops: ints = (tokens, nonfinite),
    floats = (cos_sum, angular_sum).

    Padding rows are computed along with the others (cheaper than gathering the valid
    rows) and dropped afterwards; a NaN/Inf under padding is neither counted nor used."""
    B, T, D = h_in.shape
    dev = h_in.device
    a_all = h_in.reshape(B * T, D)
    b_all = h_out.reshape(B * T, D)
    valid = _valid_tokens(attention_mask)
    vflat = None if valid is None else valid.reshape(-1)
    if B * T == 0:
        return torch.zeros(2, dtype=_I64, device=dev), torch.zeros(2, dtype=_F64, device=dev)
    coss: list[torch.Tensor] = []
    oks: list[torch.Tensor | None] = []  # per chunk: rows to count (None: every row)
    nonfinite = torch.zeros((), dtype=_I64, device=dev)
    step = _rows_per_chunk(D)
    for s in range(0, B * T, step):
        whole = s == 0 and step >= B * T
        a = a_all if whole else a_all[s : s + step]
        b = b_all if whole else b_all[s : s + step]
        a = a if a.dtype == _F32 else a.float()
        b = b if b.dtype == _F32 else b.float()
        v = None if vflat is None else (vflat if whole else vflat[s : s + step])
        dot = torch.linalg.vecdot(a, b)
        na = torch.linalg.vector_norm(a, dim=1)
        nb = torch.linalg.vector_norm(b, dim=1)
        cos = dot / torch.clamp(na * nb, min=eps)
        # dot + |a| + |b| is finite iff all three are (an overflow of the sum only sends
        # the rows to the exact check below).
        quick = torch.isfinite(dot + na + nb)
        if bool((quick if v is None else quick | ~v).all()):
            coss.append(cos)
            oks.append(v)
            continue
        # Either a NaN/Inf, or finite values whose fp32 squares overflowed: redo in fp64.
        fin = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
        redo = fin & ~quick
        if v is not None:
            redo &= v
        if bool(redo.any()):
            a64, b64 = a[redo].to(_F64), b[redo].to(_F64)
            c64 = (a64 * b64).sum(1) / torch.clamp(a64.norm(dim=1) * b64.norm(dim=1), min=eps)
            cos = cos.to(_F64)
            cos[redo] = c64
        bad = ~fin if v is None else ~fin & v
        nonfinite = nonfinite + bad.sum()
        coss.append(cos)
        oks.append(fin if v is None else fin & v)
    cos = _cat(coss).to(_F64)
    if any(o is not None for o in oks):
        ok = _cat([torch.ones(c.numel(), dtype=torch.bool, device=dev) if o is None else o for o, c in zip(oks, coss)])
        cos = cos[ok]
    c = cos.clamp_(-1.0, 1.0)
    tokens = torch.full((), c.numel(), dtype=_I64, device=dev)
    return torch.stack([tokens, nonfinite]), torch.stack([c.sum(), torch.arccos(c).sum() / torch.pi])

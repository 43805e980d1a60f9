"""Flash-style attention forward with head gates, segment reweighting and the adaptive
(ADHH) rule, in one pass with O(S) memory.

For query row i of head h (kv head h // (Hq / Hkv): k/v are never repeated) and keys j:

    s_j = scaling * <q_i, k_j>            (allowed: causal j <= i + Sk - Sq, key/padding mask)
    p_j = exp(s_j - m) / l,   l = sum_j exp(s_j - m)            (online softmax)
    f_j = segment_scale[b, h, seg(j)]     (static reweighting, post-softmax, no renormalising)
    mass_s = sum_{j in s} p_j             (per segment, plain softmax)
    out_i = gate[b, h] * ( sum_j p_j f_j v_j  -  (1 - alpha) [fire] sum_{j in s*} p_j f_j v_j )

where the adaptive rule fires for the rule's heads (and rows: all, or only the last query
row) when ``mass_{s*} >= threshold``. Static factors are folded into p before the P.V
product; the adaptive decision needs the segment's own partial accumulator, kept beside the
total one and combined in the epilogue. Segment masses are running sums rescaled like l.

Segments: ``seg(j)`` is the last segment whose start is <= j (keys before the first start
belong to segment 0); starts are per batch row.

Optional per-(row, head) statistics of the plain softmax p (same pass, O(S) memory):

    entropy   H = -sum_j p_j ln p_j = ln l - ln 2 * t / l,   t = sum_j 2^(s2_j - m) (s2_j - m)
    max logit max_j s_j (natural units; -inf for a row with no allowed key)
    sink mass p at the row's first allowed key (lowest allowed key index)

with s2 = s * log2(e) and m, l the running log2-domain max and normaliser. When m moves
from m_old to m_new, t becomes 2^(m_old - m_new) (t + (m_old - m_new) l_old) plus the new
block's terms. A row with no allowed key gets entropy 0, max logit -inf and sink mass 0.
``fired`` (int8) records where the adaptive rule fired.

Work layout (none of it changes a result): each program takes BLOCK_M query rows and walks
the key blocks in two phases. Key blocks that lie entirely inside Sk and at or below the
causal diagonal for every row of the query block need no causal or bounds mask and run an
unmasked update (key and full masks, when given, still apply there); only the blocks that
cross the diagonal, and the Sk tail, run the masked update. Segment masses are kept only
when they are returned or the rule needs one (then only the rule segment's; with one
segment the mass is l itself). With the rule on the last row only, only the query block
that holds row Sq - 1 keeps the segment accumulator: it runs as a second launch; the other
blocks run without it (their ``fired`` is 0). Causal launches take each head's query
blocks longest first (``_reverse_m``). Two more variants were measured on an H200 and
dropped as no faster (bench/README.md): the rule's block as a branch of the main launch,
and skipping the segment accumulator's P.V for key blocks outside the rule segment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_block(
    q, acc, acc_seg, m_i, l_i, l0, l1, l2, l3, t_i, s_first,
    n0, offs_m, row_ok, offs_n0, offs_d, d_ok, Sq, Sk, offset, scaling_log2,
    k_base, v_base, skn, svn, km_base, fm_base, sfmm, sc_base, st1, st2, st3,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SEG: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_FMASK: tl.constexpr, HAS_SCALE: tl.constexpr,
    ADAPTIVE: tl.constexpr, STORE_MASS: tl.constexpr, UPCAST: tl.constexpr, RULE_SEG: tl.constexpr,
    PRECISION: tl.constexpr, HEAD_STATS: tl.constexpr,
):
    """One key block [n0, n0 + BLOCK_N) of the online softmax; returns the updated loop state.

    MASKED=False: the caller guarantees every key of the block is < Sk and causally allowed
    for every row of the query block, so only the key/full masks (if any) apply; rows past
    Sq then compute finite values from their zero q and are never stored."""
    offs_n = n0 + offs_n0
    key_ok = offs_n < Sk
    k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    elif BLOCK_D != HEAD_DIM:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling_log2  # log2 domain
    if MASKED:
        allowed = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + offset)
        if HAS_KMASK:
            km = tl.load(km_base + offs_n, mask=key_ok, other=0)
            allowed = allowed & (km != 0)[None, :]
        if HAS_FMASK:
            fm = tl.load(fm_base + offs_m.to(tl.int64)[:, None] * sfmm + offs_n[None, :],
                         mask=row_ok[:, None] & key_ok[None, :], other=0)
            allowed = allowed & (fm != 0)
    elif HAS_KMASK:
        km = tl.load(km_base + offs_n)
        allowed = row_ok[:, None] & (km != 0)[None, :]
        if HAS_FMASK:
            fm = tl.load(fm_base + offs_m.to(tl.int64)[:, None] * sfmm + offs_n[None, :],
                         mask=row_ok[:, None], other=0)
            allowed = allowed & (fm != 0)
    elif HAS_FMASK:
        fm = tl.load(fm_base + offs_m.to(tl.int64)[:, None] * sfmm + offs_n[None, :],
                     mask=row_ok[:, None], other=0)
        allowed = fm != 0
    if MASKED or HAS_KMASK or HAS_FMASK:
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        p = tl.where(allowed, p, 0.0)
    else:  # every logit finite: m_new is finite and exp2(-inf - m_new) = 0 on the first block
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = m_new
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
    if HEAD_STATS:
        # (m_old - m_new) * l_old, 0 while the row has seen no allowed key (no -inf * 0)
        shift = (tl.where(l_i > 0, m_i, m_safe) - m_safe) * l_i
        if MASKED or HAS_KMASK or HAS_FMASK:
            d = tl.where(allowed, s - m_safe[:, None], 0.0)
            t_i = alpha * (t_i + shift) + tl.sum(p * d, axis=1)
            # first allowed key of this block (keys are visited in increasing order)
            j_first = tl.min(tl.where(allowed, offs_n[None, :], Sk), axis=1)
            s_blk = tl.sum(tl.where(offs_n[None, :] == j_first[:, None], s, 0.0), axis=1)
            s_first = tl.where((s_first == float("-inf")) & (j_first < Sk), s_blk, s_first)
        else:
            d = s - m_safe[:, None]
            t_i = alpha * (t_i + shift) + tl.sum(p * d, axis=1)
            # every key allowed: the block's first key is the row's first allowed one
            s_blk = tl.sum(tl.where(offs_n0[None, :] == 0, s, 0.0), axis=1)
            s_first = tl.where(s_first == float("-inf"), s_blk, s_first)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if NUM_SEG > 1:
        seg = (offs_n >= st1).to(tl.int32)
        if NUM_SEG > 2:
            seg += (offs_n >= st2).to(tl.int32)
        if NUM_SEG > 3:
            seg += (offs_n >= st3).to(tl.int32)
        if STORE_MASS:  # every segment's running mass, rescaled like l
            l0 = l0 * alpha + tl.sum(tl.where((seg == 0)[None, :], p, 0.0), axis=1)
            l1 = l1 * alpha + tl.sum(tl.where((seg == 1)[None, :], p, 0.0), axis=1)
            if NUM_SEG > 2:
                l2 = l2 * alpha + tl.sum(tl.where((seg == 2)[None, :], p, 0.0), axis=1)
            if NUM_SEG > 3:
                l3 = l3 * alpha + tl.sum(tl.where((seg == 3)[None, :], p, 0.0), axis=1)
        elif ADAPTIVE:  # only the rule segment's, kept in l0
            l0 = l0 * alpha + tl.sum(tl.where((seg == RULE_SEG)[None, :], p, 0.0), axis=1)
    else:
        seg = tl.zeros_like(offs_n0)  # one segment: its mass is l itself
    if HAS_SCALE:
        f = tl.load(sc_base + seg)
        pw = p * f[None, :]
    else:
        pw = p
    if UPCAST:
        acc = tl.dot(pw, v, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(pw.to(v.dtype), v, acc)
    if ADAPTIVE:
        acc_seg = acc_seg * alpha[:, None]
        in_rule = seg == RULE_SEG
        ps = tl.where(in_rule[None, :], pw, 0.0)
        if UPCAST:
            acc_seg = tl.dot(ps, v, acc_seg, input_precision=PRECISION)
        else:
            acc_seg = tl.dot(ps.to(v.dtype), v, acc_seg)
    return acc, acc_seg, m_new, l_i, l0, l1, l2, l3, t_i, s_first


@triton.jit
def _attn_rows(
    q, m_lo, offs_m, row_ok, offs_n0, offs_d, d_ok, Sq, Sk, scaling_log2,
    k_base, v_base, skn, svn, km_base, fm_base, sfmm, sc_base, st1, st2, st3,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SEG: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_FMASK: tl.constexpr,
    HAS_SCALE: tl.constexpr, ADAPTIVE: tl.constexpr, STORE_MASS: tl.constexpr, UPCAST: tl.constexpr,
    RULE_SEG: tl.constexpr, PRECISION: tl.constexpr, HEAD_STATS: tl.constexpr,
):
    """All key blocks of the query block starting at row m_lo, in two phases; returns the
    final state (acc, acc_seg, m, l, l0..l3, t, s_first)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # state the block update carries whether or not it is used (unused parts fold away)
    acc_seg = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # ADAPTIVE: the rule segment's part of acc
    # HEAD_STATS: t = sum_j 2^(s2_j - m) (s2_j - m), rescaled like l; s2 of the row's first allowed key
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_first = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # running segment masses (NUM_SEG <= 4), rescaled like l: all of them with STORE_MASS,
    # else the rule segment's alone (in l0) for ADAPTIVE; none with one segment (l_i is it)
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l3 = tl.zeros([BLOCK_M], dtype=tl.float32)

    offset = Sk - Sq  # bottom-right causal alignment
    if CAUSAL:
        hi = tl.minimum(Sk, m_lo + BLOCK_M + offset)
        # keys every row of the block may see: those of its first row, within Sk
        full_hi = tl.maximum(tl.minimum(m_lo + offset + 1, Sk), 0)
    else:
        hi = Sk
        full_hi = Sk
    n_full = (full_hi // BLOCK_N) * BLOCK_N  # full_hi >= 0: floor
    for n0 in range(0, n_full, BLOCK_N):  # phase 1: no causal or bounds mask
        acc, acc_seg, m_i, l_i, l0, l1, l2, l3, t_i, s_first = _attn_block(
            q, acc, acc_seg, m_i, l_i, l0, l1, l2, l3, t_i, s_first,
            n0, offs_m, row_ok, offs_n0, offs_d, d_ok, Sq, Sk, offset, scaling_log2,
            k_base, v_base, skn, svn, km_base, fm_base, sfmm, sc_base, st1, st2, st3,
            False, HEAD_DIM, BLOCK_D, NUM_SEG, CAUSAL, HAS_KMASK, HAS_FMASK, HAS_SCALE,
            ADAPTIVE, STORE_MASS, UPCAST, RULE_SEG, PRECISION, HEAD_STATS)
    for n0 in range(n_full, hi, BLOCK_N):  # phase 2: blocks on the diagonal, the Sk tail
        acc, acc_seg, m_i, l_i, l0, l1, l2, l3, t_i, s_first = _attn_block(
            q, acc, acc_seg, m_i, l_i, l0, l1, l2, l3, t_i, s_first,
            n0, offs_m, row_ok, offs_n0, offs_d, d_ok, Sq, Sk, offset, scaling_log2,
            k_base, v_base, skn, svn, km_base, fm_base, sfmm, sc_base, st1, st2, st3,
            True, HEAD_DIM, BLOCK_D, NUM_SEG, CAUSAL, HAS_KMASK, HAS_FMASK, HAS_SCALE,
            ADAPTIVE, STORE_MASS, UPCAST, RULE_SEG, PRECISION, HEAD_STATS)
    return acc, acc_seg, m_i, l_i, l0, l1, l2, l3, t_i, s_first


@triton.jit(do_not_specialize=["NUM_M_BLOCKS", "M_OFFSET"])
def _masked_attention_fwd(
    q_ptr, k_ptr, v_ptr, out_ptr, mass_ptr,
    kmask_ptr, starts_ptr, scale_ptr, gate_ptr, rule_heads_ptr,
    Sq, Sk, Hq, GROUP, scaling_log2,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, som, soh,
    skmb, sstb, sscb, ssch, sgb,
    threshold, adapt_scale,
    fmask_ptr, sfmb, sfmh, sfmm,
    stats_ptr, fired_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SEG: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GATE: tl.constexpr,
    ADAPTIVE: tl.constexpr, LAST_ROW_ONLY: tl.constexpr, STORE_MASS: tl.constexpr,
    UPCAST: tl.constexpr, RULE_SEG: tl.constexpr, HAS_FMASK: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_STATS: tl.constexpr = False, STORE_FIRED: tl.constexpr = False,
    FOLD_GRID: tl.constexpr = False, NUM_M_BLOCKS=1, M_OFFSET=0,
    REVERSE_M: tl.constexpr = False,
):
    """Programs cover query blocks M_OFFSET .. M_OFFSET + NUM_M_BLOCKS - 1 (REVERSE_M: the
    longest causal blocks of a head first) of every (batch, head)."""
    if FOLD_GRID:  # B * Hq beyond the grid's second axis (65,535): everything on axis 0
        pid = tl.program_id(0).to(tl.int64)
        pid_m = (pid % NUM_M_BLOCKS).to(tl.int32)
        bh = pid // NUM_M_BLOCKS
    else:
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
    if REVERSE_M:
        pid_m = NUM_M_BLOCKS - 1 - pid_m
    pid_m = pid_m + M_OFFSET
    b = bh // Hq
    h = bh % Hq
    kvh = h // GROUP
    m_lo = pid_m * BLOCK_M
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM

    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    st1 = 0
    st2 = 0
    st3 = 0
    if NUM_SEG > 1:
        st1 = tl.load(starts_ptr + b * sstb + 1)
    if NUM_SEG > 2:
        st2 = tl.load(starts_ptr + b * sstb + 2)
    if NUM_SEG > 3:
        st3 = tl.load(starts_ptr + b * sstb + 3)

    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    km_base = kmask_ptr + b * skmb
    fm_base = fmask_ptr + b * sfmb + h * sfmh
    sc_base = scale_ptr + b * sscb + h * ssch

    acc, acc_seg, m_i, l_i, l0, l1, l2, l3, t_i, s_first = _attn_rows(
        q, m_lo, offs_m, row_ok, offs_n0, offs_d, d_ok, Sq, Sk, scaling_log2,
        k_base, v_base, skn, svn, km_base, fm_base, sfmm, sc_base, st1, st2, st3,
        BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, NUM_SEG, CAUSAL, HAS_KMASK, HAS_FMASK, HAS_SCALE,
        ADAPTIVE, STORE_MASS, UPCAST, RULE_SEG, PRECISION, HEAD_STATS)

    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    out = acc
    if ADAPTIVE:
        rule_on = tl.load(rule_heads_ptr + h) != 0
        if NUM_SEG == 1:
            mass_r = l_i
        elif not STORE_MASS:
            mass_r = l0  # the rule segment's running mass
        elif RULE_SEG == 0:
            mass_r = l0
        elif RULE_SEG == 1:
            mass_r = l1
        elif RULE_SEG == 2:
            mass_r = l2
        else:
            mass_r = l3
        fire = (mass_r * inv_l >= threshold) & rule_on
        if LAST_ROW_ONLY:
            fire = fire & (offs_m == Sq - 1)
        out = out - tl.where(fire[:, None], (1.0 - adapt_scale) * acc_seg, 0.0)
    out = out * inv_l[:, None]
    if HAS_GATE:
        out = out * tl.load(gate_ptr + b * sgb + h)
    tl.store(out_ptr + b * sob + offs_m.to(tl.int64)[:, None] * som + h * soh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_MASS:
        mbase = mass_ptr + ((b * Hq + h) * Sq + offs_m) * NUM_SEG
        if NUM_SEG == 1:
            tl.store(mbase, l_i * inv_l, mask=row_ok)
        else:
            tl.store(mbase, l0 * inv_l, mask=row_ok)
            tl.store(mbase + 1, l1 * inv_l, mask=row_ok)
        if NUM_SEG > 2:
            tl.store(mbase + 2, l2 * inv_l, mask=row_ok)
        if NUM_SEG > 3:
            tl.store(mbase + 3, l3 * inv_l, mask=row_ok)
    if HEAD_STATS:
        sbase = stats_ptr + ((b * Hq + h) * Sq + offs_m) * 3
        m_fin = tl.where(l_i > 0, m_i, 0.0)
        ent = tl.log(tl.where(l_i > 0, l_i, 1.0)) - 0.6931471805599453 * t_i * inv_l  # ln 2
        tl.store(sbase, ent, mask=row_ok)
        tl.store(sbase + 1, m_i * 0.6931471805599453, mask=row_ok)  # log2 -> natural units
        tl.store(sbase + 2, tl.exp2(s_first - m_fin) * inv_l, mask=row_ok)
    if STORE_FIRED:
        fbase = fired_ptr + (b * Hq + h) * Sq + offs_m
        if ADAPTIVE:
            tl.store(fbase, fire.to(tl.int8), mask=row_ok)
        else:
            tl.store(fbase, tl.zeros([BLOCK_M], dtype=tl.int8), mask=row_ok)


MAX_SEGMENTS = 4
_MAX_GRID_Y = 65535  # CUDA's limit on the grid's second axis
_force_fold = False  # tests: take the folded-grid path at small sizes
_reverse_m = True  # causal: each head's longest query blocks first (results do not depend on it)


def _gpu_tiles(Sq: int, BLOCK_D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU, from bench/gpu_sweep_attention.py
    (H200, bf16, D=128, S=2048/8192: 64x64 tiles, 4 warps, 3 stages were best or within 5%
    of the best for plain, adaptive and head-stats calls; 2 stages was 10-20% slower).
    fp32 inputs (computed in fp32) and heads wider than 128 keep 2 stages: 3 would need
    more shared memory than an A100 (fp32, D=128) or an Ada card (fp32, D=64) has."""
    BLOCK_M = 64 if Sq > 16 else 16
    BLOCK_N = 64 if BLOCK_D <= 128 else 32
    stages = 3 if dtype in (torch.float16, torch.bfloat16) and BLOCK_D <= 128 else 2
    return BLOCK_M, BLOCK_N, 4, stages


def masked_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float, causal: bool,
    key_mask: torch.Tensor | None, full_mask: torch.Tensor | None, head_gate: torch.Tensor | None,
    segment_starts: torch.Tensor | None, segment_scale: torch.Tensor | None,
    rule_heads: torch.Tensor | None, rule_segment: int, threshold: float, rule_scale: float, last_row_only: bool,
    return_segment_mass: bool, return_head_stats: bool = False, return_rule_fired: bool = False,
    tiles: tuple[int, int, int, int] | None = None,
):
    """Launch the kernel. q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (last dim contiguous);
    key_mask [B, Sk] (nonzero = attend) or None; full_mask [B, 1|Hq, Sq, Sk] int8 or None; head_gate [B, Hq] fp32 or None;
    segment_starts [B, S] int32; segment_scale [B, Hq, S] fp32; rule_heads [Hq] int8.
    ``tiles`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the tiling (sweeps, tests);
    BLOCK_M and BLOCK_N powers of two >= 16.
    Returns (out, mass, stats, fired): out [B, Sq, Hq, D] (q's dtype); mass [B, Hq, Sq, S] fp32
    (or None); stats [B, Hq, Sq, 3] fp32 = (entropy in nats, max logit, sink mass) of the plain
    softmax (or None); fired [B, Hq, Sq] int8, 1 where the adaptive rule fired (or None)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    dev = q.device
    S = 1 if segment_starts is None else segment_starts.shape[1]
    if S > MAX_SEGMENTS:
        raise ValueError(f"at most {MAX_SEGMENTS} segments are supported, got {S}")
    if max(k.stride(2), v.stride(2)) * Sk >= 2**31:  # key offsets within a head are 32-bit
        raise ValueError(f"k/v too long for the kernel: {Sk} keys x row stride {max(k.stride(2), v.stride(2))} "
                         "elements is past 2^31; use a [B, H, Sk, D] layout (row stride D)")
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=dev)
    mass = torch.empty((B, Hq, Sq, S), dtype=torch.float32, device=dev) if return_segment_mass else out
    stats = torch.empty((B, Hq, Sq, 3), dtype=torch.float32, device=dev) if return_head_stats else out
    fired = torch.empty((B, Hq, Sq), dtype=torch.int8, device=dev) if return_rule_fired else out
    interp = dev.type == "cpu"
    upcast = interp or q.dtype not in (torch.float16, torch.bfloat16)  # fp32/fp64: fp32 compute
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if tiles is not None:
        BLOCK_M, BLOCK_N, num_warps, num_stages = (int(t) for t in tiles)
        if min(BLOCK_M, BLOCK_N) < 16 or BLOCK_M & (BLOCK_M - 1) or BLOCK_N & (BLOCK_N - 1):
            raise ValueError(f"tiles: BLOCK_M and BLOCK_N must be powers of two >= 16, got {tuple(tiles)}")
    elif interp:
        BLOCK_M = max(16, min(64, triton.next_power_of_2(Sq)))
        BLOCK_N = max(16, min(128, triton.next_power_of_2(Sk)))
        num_warps, num_stages = 1, 1
    else:
        BLOCK_M, BLOCK_N, num_warps, num_stages = _gpu_tiles(Sq, BLOCK_D, q.dtype)
    dummy = out
    num_m = triton.cdiv(Sq, BLOCK_M)
    fold = B * Hq > _MAX_GRID_Y or _force_fold
    adaptive = rule_heads is not None
    # rule on the last row only: the block holding row Sq - 1 is the only one that needs the
    # rule's accumulator; the others run without it, in a launch of their own
    split = adaptive and last_row_only and num_m > 1

    def launch(m_offset: int, n_blocks: int, adaptive_here: bool) -> None:
        # segment starts matter only for masses, reweighting or the rule; arguments a launch does
        # not use are normalised so that launches share compiled variants
        nseg = S if (return_segment_mass or segment_scale is not None or adaptive_here) else 1
        starts = segment_starts if nseg > 1 else dummy
        grid = (n_blocks * B * Hq,) if fold else (n_blocks, B * Hq)
        _masked_attention_fwd[grid](
            q, k, v, out, mass,
            key_mask if key_mask is not None else dummy, starts,
            segment_scale if segment_scale is not None else dummy,
            head_gate if head_gate is not None else dummy,
            rule_heads if adaptive_here else dummy,
            Sq, Sk, Hq, Hq // Hkv, scaling * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            key_mask.stride(0) if key_mask is not None else 0, starts.stride(0) if nseg > 1 else 0,
            segment_scale.stride(0) if segment_scale is not None else 0,
            segment_scale.stride(1) if segment_scale is not None else 0,
            head_gate.stride(0) if head_gate is not None else 0,
            float(threshold), float(rule_scale),
            full_mask if full_mask is not None else dummy,
            full_mask.stride(0) if full_mask is not None else 0,
            (full_mask.stride(1) if full_mask.shape[1] > 1 else 0) if full_mask is not None else 0,
            full_mask.stride(2) if full_mask is not None else 0,
            stats, fired,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_SEG=nseg,
            CAUSAL=causal, HAS_KMASK=key_mask is not None, HAS_SCALE=segment_scale is not None,
            HAS_GATE=head_gate is not None, ADAPTIVE=adaptive_here,
            LAST_ROW_ONLY=bool(adaptive_here and last_row_only),
            STORE_MASS=return_segment_mass, UPCAST=upcast,
            RULE_SEG=int(rule_segment) if adaptive_here else 0, HAS_FMASK=full_mask is not None,
            PRECISION="ieee" if upcast else "tf32",
            HEAD_STATS=bool(return_head_stats), STORE_FIRED=bool(return_rule_fired),
            FOLD_GRID=fold, NUM_M_BLOCKS=n_blocks, M_OFFSET=m_offset,
            REVERSE_M=bool(causal and _reverse_m),
            num_warps=num_warps, num_stages=num_stages,
        )

    if split:
        launch(0, num_m - 1, False)
        launch(num_m - 1, 1, True)
    else:
        launch(0, num_m, adaptive)
    return (
        out,
        mass if return_segment_mass else None,
        stats if return_head_stats else None,
        fired if return_rule_fired else None,
    )

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
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
    FOLD_GRID: tl.constexpr = False, NUM_M_BLOCKS=1,
):
    if FOLD_GRID:  # B * Hq beyond the grid's second axis (65,535): everything on axis 0
        pid = tl.program_id(0).to(tl.int64)
        pid_m = (pid % NUM_M_BLOCKS).to(tl.int32)
        bh = pid // NUM_M_BLOCKS
    else:
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM

    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if ADAPTIVE:
        acc_seg = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HEAD_STATS:
        # t = sum_j 2^(s2_j - m) (s2_j - m), rescaled like l; s2 of the row's first allowed key
        t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        s_first = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # per-segment running mass (NUM_SEG <= 4), rescaled like l
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l3 = tl.zeros([BLOCK_M], dtype=tl.float32)

    if NUM_SEG > 1:
        st1 = tl.load(starts_ptr + b * sstb + 1)
    if NUM_SEG > 2:
        st2 = tl.load(starts_ptr + b * sstb + 2)
    if NUM_SEG > 3:
        st3 = tl.load(starts_ptr + b * sstb + 3)

    offset = Sk - Sq  # bottom-right causal alignment
    if CAUSAL:
        hi = tl.minimum(Sk, (pid_m + 1) * BLOCK_M + offset)
    else:
        hi = Sk
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        key_ok = offs_n < Sk
        k = tl.load(k_ptr + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling_log2  # log2 domain
        allowed = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + offset)
        if HAS_KMASK:
            km = tl.load(kmask_ptr + b * skmb + offs_n, mask=key_ok, other=0)
            allowed = allowed & (km != 0)[None, :]
        if HAS_FMASK:
            fm = tl.load(fmask_ptr + b * sfmb + h * sfmh + offs_m.to(tl.int64)[:, None] * sfmm + offs_n[None, :],
                         mask=row_ok[:, None] & key_ok[None, :], other=0)
            allowed = allowed & (fm != 0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        p = tl.where(allowed, p, 0.0)
        if HEAD_STATS:
            # (m_old - m_new) * l_old, 0 while the row has seen no allowed key (no -inf * 0)
            shift = (tl.where(l_i > 0, m_i, m_safe) - m_safe) * l_i
            d = tl.where(allowed, s - m_safe[:, None], 0.0)
            t_i = alpha * (t_i + shift) + tl.sum(p * d, axis=1)
            # first allowed key of this block (keys are visited in increasing order)
            j_first = tl.min(tl.where(allowed, offs_n[None, :], Sk), axis=1)
            s_blk = tl.sum(tl.where(offs_n[None, :] == j_first[:, None], s, 0.0), axis=1)
            s_first = tl.where((s_first == float("-inf")) & (j_first < Sk), s_blk, s_first)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if NUM_SEG > 1:
            seg = (offs_n >= st1).to(tl.int32)
            if NUM_SEG > 2:
                seg += (offs_n >= st2).to(tl.int32)
            if NUM_SEG > 3:
                seg += (offs_n >= st3).to(tl.int32)
        else:
            seg = tl.zeros([BLOCK_N], dtype=tl.int32)
        l0 = l0 * alpha + tl.sum(tl.where((seg == 0)[None, :], p, 0.0), axis=1)
        if NUM_SEG > 1:
            l1 = l1 * alpha + tl.sum(tl.where((seg == 1)[None, :], p, 0.0), axis=1)
        if NUM_SEG > 2:
            l2 = l2 * alpha + tl.sum(tl.where((seg == 2)[None, :], p, 0.0), axis=1)
        if NUM_SEG > 3:
            l3 = l3 * alpha + tl.sum(tl.where((seg == 3)[None, :], p, 0.0), axis=1)
        if HAS_SCALE:
            f = tl.load(scale_ptr + b * sscb + h * ssch + seg)
            pw = p * f[None, :]
        else:
            pw = p
        if UPCAST:
            acc += tl.dot(pw, v, input_precision=PRECISION)
        else:
            acc += tl.dot(pw.to(v.dtype), v)
        if ADAPTIVE:
            acc_seg = acc_seg * alpha[:, None]
            ps = tl.where((seg == RULE_SEG)[None, :], pw, 0.0)
            if UPCAST:
                acc_seg += tl.dot(ps, v, input_precision=PRECISION)
            else:
                acc_seg += tl.dot(ps.to(v.dtype), v)
        m_i = m_new

    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    out = acc
    if ADAPTIVE:
        rule_on = tl.load(rule_heads_ptr + h) != 0
        if RULE_SEG == 0:
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
    tl.store(out_ptr + b * sob + offs_m[:, None] * som + h * soh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_MASS:
        mbase = mass_ptr + ((b * Hq + h) * Sq + offs_m) * NUM_SEG
        tl.store(mbase, l0 * inv_l, mask=row_ok)
        if NUM_SEG > 1:
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


def masked_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float, causal: bool,
    key_mask: torch.Tensor | None, full_mask: torch.Tensor | None, head_gate: torch.Tensor | None,
    segment_starts: torch.Tensor | None, segment_scale: torch.Tensor | None,
    rule_heads: torch.Tensor | None, rule_segment: int, threshold: float, rule_scale: float, last_row_only: bool,
    return_segment_mass: bool, return_head_stats: bool = False, return_rule_fired: bool = False,
):
    """Launch the kernel. q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (last dim contiguous);
    key_mask [B, Sk] (nonzero = attend) or None; full_mask [B, 1|Hq, Sq, Sk] int8 or None; head_gate [B, Hq] fp32 or None;
    segment_starts [B, S] int32; segment_scale [B, Hq, S] fp32; rule_heads [Hq] int8.
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
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=dev)
    mass = torch.empty((B, Hq, Sq, S), dtype=torch.float32, device=dev) if return_segment_mass else out
    stats = torch.empty((B, Hq, Sq, 3), dtype=torch.float32, device=dev) if return_head_stats else out
    fired = torch.empty((B, Hq, Sq), dtype=torch.int8, device=dev) if return_rule_fired else out
    interp = dev.type == "cpu"
    upcast = interp or q.dtype not in (torch.float16, torch.bfloat16)  # fp32/fp64: fp32 compute
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if interp:
        BLOCK_M = max(16, min(64, triton.next_power_of_2(Sq)))
        BLOCK_N = max(16, min(128, triton.next_power_of_2(Sk)))
        num_warps, num_stages = 1, 1
    else:
        BLOCK_M = 64 if Sq > 16 else 16
        BLOCK_N = 64 if BLOCK_D <= 128 else 32
        num_warps, num_stages = 4, 2
    dummy = out
    starts = segment_starts if segment_starts is not None else torch.zeros((B, 1), dtype=torch.int32, device=dev)
    num_m = triton.cdiv(Sq, BLOCK_M)
    fold = B * Hq > _MAX_GRID_Y or _force_fold
    grid = (num_m * B * Hq,) if fold else (num_m, B * Hq)
    _masked_attention_fwd[grid](
        q, k, v, out, mass,
        key_mask if key_mask is not None else dummy, starts,
        segment_scale if segment_scale is not None else dummy,
        head_gate if head_gate is not None else dummy,
        rule_heads if rule_heads is not None else dummy,
        Sq, Sk, Hq, Hq // Hkv, scaling * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        key_mask.stride(0) if key_mask is not None else 0, starts.stride(0),
        segment_scale.stride(0) if segment_scale is not None else 0,
        segment_scale.stride(1) if segment_scale is not None else 0,
        head_gate.stride(0) if head_gate is not None else 0,
        float(threshold), float(rule_scale),
        full_mask if full_mask is not None else dummy,
        full_mask.stride(0) if full_mask is not None else 0,
        (full_mask.stride(1) if full_mask.shape[1] > 1 else 0) if full_mask is not None else 0,
        full_mask.stride(2) if full_mask is not None else 0,
        stats, fired,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_SEG=S,
        CAUSAL=causal, HAS_KMASK=key_mask is not None, HAS_SCALE=segment_scale is not None,
        HAS_GATE=head_gate is not None, ADAPTIVE=rule_heads is not None, LAST_ROW_ONLY=last_row_only,
        STORE_MASS=return_segment_mass, UPCAST=upcast,
        RULE_SEG=int(rule_segment), HAS_FMASK=full_mask is not None,
        PRECISION="ieee" if upcast else "tf32",
        HEAD_STATS=bool(return_head_stats), STORE_FIRED=bool(return_rule_fired),
        FOLD_GRID=fold, NUM_M_BLOCKS=num_m,
        num_warps=num_warps, num_stages=num_stages,
    )
    return (
        out,
        mass if return_segment_mass else None,
        stats if return_head_stats else None,
        fired if return_rule_fired else None,
    )


"""The torch path of ``masked_attention``: SDPA does the heavy work, nothing of size
Sq x Sk is built unless the caller's mask already is one (padding with causal masking).

* Static segment factors are folded into the values: ``v'_j = f[h, seg(j)] v_j`` (values
  expanded to query heads only when a factor differs per head), so one SDPA gives
  ``sum_j p_j f_j v_j``.
* Segment masses of every row come from the same SDPA call: values extended with one-hot
  segment columns (and q/k zero-padded to the same width, which keeps the fast kernel);
  ``sum_j p_j onehot(seg(j))`` is the mass per segment.
* The adaptive rule needs ``sum_{j in s*} p_j f_j v_j``: for rows "last" (the published
  method) it is computed for the last query row alone, O(Sk); for rows "all" it rides in
  the extended values as well.
* Segment masses come out of SDPA in the input dtype: in bf16 they carry bf16 rounding
  (the Triton kernel keeps them in fp32), so an adaptive decision with rows "all" can
  differ between the two backends when a mass sits within ~1e-3 of the threshold.
* A single query row (decoding with the KV cache) with any intervention is computed
  explicitly, O(Sk) per head: scores, softmax, masses and factors in a handful of ops,
  cheaper than SDPA plus the extra columns at this size.
* Head statistics (``return_head_stats``) with more than one query row go to the compiled
  kernel of :mod:`avss_fast.native` when it builds (one pass at the head's own width),
  except with the rule on every row or when autograd must see the output (the kernel is
  forward only); otherwise :func:`_sdpa_outputs` (the flash kernel
  with the keys appended to the values, and a blocked pass for the max logit).
* Causal masking is bottom-right aligned: ``is_causal`` when Sq == Sk, no mask when
  Sq == 1 (decode), an explicit [Sq, Sk] mask otherwise (chunked prefill).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from .reference import segment_ids

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa= exists


def _sdpa_mask(B, Sq, Sk, causal, key_mask, full_mask, device):
    """(attn_mask or None, is_causal) for SDPA with bottom-right causal alignment."""
    if full_mask is None and key_mask is None:
        if not causal or Sq == 1:  # decode: the one query row sees every key
            return None, False
        if Sq == Sk:
            return None, True
    m = full_mask.to(torch.bool) if full_mask is not None else torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Sk, device=device)[None, :]
        m = m & (j <= i + (Sk - Sq))
    if key_mask is not None:
        m = m & key_mask.to(torch.bool)[:, None, None, :]
    return m, False


def _in_segment(segment_starts: torch.Tensor, s: int, Sk: int, dtype=None) -> torch.Tensor:
    """[B, Sk] bool (or [B, 1, Sk] in ``dtype``): key j is in segment s (keys before the first
    start count as segment 0). Decoding asks again for every new key: the answer for a given
    starts tensor is kept (per segment and dtype, for twice the keys asked so far) on the
    tensor itself (``prepare_attention_args`` makes a private copy, so nobody changes it in
    place) and sliced: one op instead of six."""
    per = getattr(segment_starts, "_avss_fast_in_segment", None)
    if per is None:
        per = {}
        segment_starts._avss_fast_in_segment = per
    buf = per.get((s, dtype))
    if buf is None or buf.shape[-1] < Sk:
        n = max(Sk, 2 * (buf.shape[-1] if buf is not None else 64))
        pos = torch.arange(n, device=segment_starts.device)[None, :]
        S = segment_starts.shape[1]
        buf = pos < segment_starts[:, s + 1 : s + 2] if s + 1 < S else torch.ones_like(pos, dtype=torch.bool)
        if s > 0:
            buf = buf & (pos >= segment_starts[:, s : s + 1])
        if dtype is not None:
            buf = buf.to(dtype)[:, None, :]
        per[(s, dtype)] = buf
    return buf[..., :Sk]


def _rule_on(rule_heads: torch.Tensor) -> torch.Tensor:
    """[Hq] bool of the rule's heads, kept on the (private, prepared) int8 tensor."""
    on = getattr(rule_heads, "_avss_fast_on", None)
    if on is None:
        on = rule_heads != 0
        rule_heads._avss_fast_on = on
    return on


def _one_row(q, k, v, *, scaling, key_mask, full_mask, head_gate, segment_starts, segment_scale,
             rule_heads, rule_segment, threshold, rule_scale, return_segment_mass, return_head_stats=False,
             return_rule_fired=False):
    """Sq == 1 (the row sees every allowed key): explicit scores and softmax in fp32 (or fp64
    for fp64 inputs), ``p`` [B, Hq, Sk]; masses ``p @ onehot``; factors
    ``f[h, seg(j)] * (rule.scale where the rule fires and seg(j) = rule.segment)``;
    ``out = gate * (p * f) @ v``. Grouped-query heads by reshaping, never repeating k/v."""
    B, Hq, _, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    up = q.dtype != cd
    qg = q.reshape(B, Hkv, G, D)
    s = ((qg.to(cd) if up else qg) @ (k.to(cd) if up else k).transpose(-1, -2)).reshape(B, Hq, Sk)
    s.mul_(scaling)
    allowed = None
    if key_mask is not None:
        allowed = key_mask.to(torch.bool)[:, None, :]
    if full_mask is not None:
        fm = full_mask.to(torch.bool)[:, :, 0, :]
        allowed = fm if allowed is None else allowed & fm
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if allowed is not None:
        p = torch.nan_to_num(p, nan=0.0)  # a row with no allowed key
    w, mass, fire = p, None, None
    if segment_starts is not None:
        factor = None
        if segment_scale is not None or return_segment_mass:
            seg = segment_ids(segment_starts.to(torch.long), Sk)  # [B, Sk]
            if return_segment_mass:
                mass = p @ F.one_hot(seg, segment_starts.shape[1]).to(cd)  # [B, Hq, S]
            if segment_scale is not None:
                factor = torch.gather(segment_scale.to(cd), 2, seg[:, None, :].expand(B, Hq, Sk))
        if rule_heads is not None:
            in_seg = _in_segment(segment_starts, rule_segment, Sk, cd)  # [B, 1, Sk] in cd
            p_seg = p * in_seg
            fire = (p_seg.sum(-1) >= threshold) & _rule_on(rule_heads)  # [B, Hq]
            if factor is None:  # w = p - (1 - scale) [fire] p_seg
                w = p - (fire.to(cd) * (1.0 - rule_scale))[..., None] * p_seg
            else:
                factor = factor * (1.0 + (fire.to(cd) * (rule_scale - 1.0))[..., None] * in_seg)
        if factor is not None:
            w = p * factor
    out = (w.reshape(B, Hkv, G, Sk) @ (v.to(cd) if up else v)).reshape(B, Hq, D)
    if head_gate is not None:
        out = out * head_gate.to(cd)[..., None]
    out = (out.to(q.dtype) if up else out).reshape(B, 1, Hq, D)
    stats = fired = None
    if return_head_stats:
        first = allowed.to(torch.int8).argmax(-1, keepdim=True).expand(B, Hq, 1) if allowed is not None else None
        sink = p[..., :1] if first is None else torch.gather(p, -1, first)
        stats = torch.stack([-torch.special.xlogy(p, p).sum(-1), s.amax(-1), sink[..., 0]], -1)
        stats = stats.float().reshape(B, Hq, 1, 3)
    if return_rule_fired:
        fired = (fire if fire is not None else torch.zeros(B, Hq, dtype=torch.bool, device=q.device))
        fired = fired.to(torch.int8).reshape(B, Hq, 1)
    if return_segment_mass:
        mass = mass.float().reshape(B, Hq, 1, -1)
    return out, mass, stats, fired


def masked_attention_torch(
    q, k, v, *, scaling, causal, key_mask, full_mask, head_gate, segment_starts, segment_scale,
    rule_heads, rule_segment, threshold, rule_scale, last_row_only, return_segment_mass,
    return_head_stats=False, return_rule_fired=False,
):
    """Same contract as ``kernels.masked_attention.masked_attention_fwd``: returns
    ``(out, mass, stats, fired)``, the last three None unless requested."""
    B, Hq, Sq, D = q.shape
    if Sq == 1:  # decoding: one explicit row, also without any intervention, so that a plain row and
        # a gated one (attribute_heads' baseline and its ablations) round alike; as fast as SDPA in
        # fp32 and 3-4x faster in bf16 at 512-2048 keys
        return _one_row(
            q, k, v, scaling=scaling, key_mask=key_mask, full_mask=full_mask, head_gate=head_gate,
            segment_starts=segment_starts, segment_scale=segment_scale, rule_heads=rule_heads,
            rule_segment=rule_segment, threshold=threshold, rule_scale=rule_scale,
            return_segment_mass=return_segment_mass, return_head_stats=return_head_stats,
            return_rule_fired=return_rule_fired,
        )
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev, dt = q.device, q.dtype
    attn_mask, is_causal = _sdpa_mask(B, Sq, Sk, causal, key_mask, full_mask, dev)
    seg = segment_ids(segment_starts.to(torch.long), Sk) if segment_starts is not None else None
    S = segment_starts.shape[1] if segment_starts is not None else 1

    kk, vv = k, v
    if segment_scale is not None:  # fold f[b, h, seg(j)] into the values, per query head
        kk = k.repeat_interleave(G, dim=1) if G > 1 else k
        f = torch.gather(segment_scale, 2, seg[:, None, :].expand(B, Hq, Sk))  # [B, Hq, Sk]
        vv = (v.repeat_interleave(G, dim=1) if G > 1 else v) * f[..., None].to(dt)
    adaptive_all = rule_heads is not None and not last_row_only
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    fn = native.kernel() if return_head_stats and not adaptive_all and not grad and native.supports(q) else None
    acc_seg = None
    if fn is not None:  # one compiled pass: output, statistics and masses at the narrow width
        out, stats, mass = native.head_stats_attention(
            fn, q, k, vv, scaling=scaling, causal=causal, attn_mask=attn_mask, segment_starts=segment_starts,
            want_mass=return_segment_mass, seg_ids=seg)
    else:
        out, mass, acc_seg, stats = _sdpa_outputs(
            q, k, kk, vv, seg=seg, S=S, attn_mask=attn_mask, is_causal=is_causal, causal=causal, scaling=scaling,
            G=G, adaptive_all=adaptive_all, rule_segment=rule_segment, return_segment_mass=return_segment_mass,
            return_head_stats=return_head_stats)
    fired = None
    if rule_heads is not None:
        if last_row_only:
            # the last query row again, explicitly: O(Sk) per head, GQA by reshaping
            Hk = vv.shape[1]  # Hkv, or Hq when segment factors were folded in per head
            kr = kk if kk.shape[1] == Hk else k
            s = (q[:, :, -1:, :].reshape(B, Hk, Hq // Hk, D).float() @ kr.float().transpose(-1, -2)) * scaling
            s = s.reshape(B, Hq, Sk)
            if attn_mask is not None:  # without one, the last row sees every key
                s = s.masked_fill(~attn_mask[:, :, -1, :], float("-inf"))
            p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
            in_seg = (seg == rule_segment)[:, None, :]  # [B, 1, Sk]
            p_seg = p * in_seg
            fire = (p_seg.sum(-1) >= threshold) & (rule_heads != 0)[None, :]  # [B, Hq]
            acc_last = (p_seg.reshape(B, Hk, Hq // Hk, Sk) @ vv.float()).reshape(B, Hq, D)
            corr = torch.where(fire[..., None], (1.0 - rule_scale) * acc_last, 0.0)
            if out.requires_grad:  # autograd saved SDPA's output: no in-place update
                out = torch.cat([out[:, :, :-1], out[:, :, -1:] - corr.to(dt)[:, :, None]], dim=2)
            else:
                out[:, :, -1, :] -= corr.to(dt)
            fired = torch.zeros(B, Hq, Sq, dtype=torch.int8, device=dev)
            fired[:, :, -1] = fire.to(torch.int8)
        else:
            fire = (mass[..., rule_segment] >= threshold) & (rule_heads != 0)[None, :, None]  # [B, Hq, Sq]
            corr = torch.where(fire[..., None], (1.0 - rule_scale) * acc_seg, torch.zeros((), dtype=dt, device=dev))
            out = out - corr if out.requires_grad else out.sub_(corr)
            fired = fire.to(torch.int8)
    if head_gate is not None:
        gate = head_gate.to(dt)[:, :, None, None]
        out = out * gate if out.requires_grad or gate.requires_grad else out.mul_(gate)
    out = out.transpose(1, 2).to(dt).contiguous()  # the statistics path may have run in fp32
    if return_rule_fired and fired is None:
        fired = torch.zeros(B, Hq, Sq, dtype=torch.int8, device=dev)
    return (out, mass.contiguous() if return_segment_mass else None, stats,
            fired if return_rule_fired else None)


def _sdpa_outputs(q, k, kk, vv, *, seg, S, attn_mask, is_causal, causal, scaling, G, adaptive_all, rule_segment,
                  return_segment_mass, return_head_stats):
    """SDPA with extended values: ``(out [B, Hq, Sq, D], mass, acc_seg, stats)``: the
    segment masses (one-hot columns), the rule segment's part of the output (rows "all") and
    the head statistics (keys appended for ``sum_j p_j k_j``; log-sum-exp from the CPU flash
    kernel, the max logit from a blocked pass) as requested, else None."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    dev, dt = q.device, q.dtype
    extra = []
    if adaptive_all:
        in_seg = (seg == rule_segment)[:, None, :, None].to(dt)  # [B, 1, Sk, 1]
        extra.append(vv * in_seg)
    if return_segment_mass or adaptive_all:
        onehot = F.one_hot(seg if seg is not None else torch.zeros(B, Sk, dtype=torch.long, device=dev), S)
        extra.append(onehot[:, None].to(dt).expand(B, vv.shape[1], Sk, S))
    if return_head_stats:  # sum_j p_j k_j: with q, the softmax mean of the logits
        extra.append(kk if kk.shape[1] == vv.shape[1] else k)
    if extra:
        v_ext = torch.cat([vv] + extra, dim=-1)
        width = v_ext.shape[-1]
        q_ext = F.pad(q, (0, width - D))
        k_ext = F.pad(kk, (0, width - D))
    else:
        v_ext, q_ext, k_ext = vv, q, kk
    lse = bias = None
    if return_head_stats:  # the CPU flash kernel also returns each row's log-sum-exp
        bias = _additive_mask(attn_mask)  # one float mask for the flash call and the max-logit pass
        o, lse = _sdpa_with_lse(q_ext, k_ext, v_ext, attn_mask, bias, is_causal, scaling, G)
    else:
        gqa = {}
        if k_ext.shape[1] != Hq:
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:  # torch < 2.5: repeat k/v per query head
                k_ext, v_ext = k_ext.repeat_interleave(G, dim=1), v_ext.repeat_interleave(G, dim=1)
        o = F.scaled_dot_product_attention(
            q_ext, k_ext, v_ext, attn_mask=attn_mask, is_causal=is_causal, scale=scaling, **gqa
        )
    if attn_mask is not None:  # rows with no allowed key (o is ours: updated in place unless autograd saved it)
        o = o.nan_to_num(nan=0.0) if o.requires_grad else o.nan_to_num_(nan=0.0)
    out = o[..., :D]
    mass = None
    col = D
    acc_seg = None
    if adaptive_all:
        acc_seg = o[..., col : col + D]
        col += D
    if return_segment_mass or adaptive_all:
        mass = o[..., col : col + S].float()
        col += S
    stats = None
    if return_head_stats:
        stats = _row_stats(q, k, o[..., col : col + D], lse, attn_mask, bias, causal, scaling)
    return out, mass, acc_seg, stats


def _additive_mask(attn_mask):
    """The bool mask as an fp32 bias (0 where allowed, -inf elsewhere), or None."""
    if attn_mask is None:
        return None
    return torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill_(~attn_mask, float("-inf"))


def _sdpa_with_lse(q, k, v, attn_mask, bias, is_causal, scaling, G):
    """(out, logsumexp) of attention, for the statistics path (``bias``: ``attn_mask`` from
    :func:`_additive_mask`). On CPU: torch's CPU flash kernel, which returns both (k/v
    repeated to the query heads: that kernel has no grouped-query mode; the additive mask). bf16/fp16 run in fp32 there: the
    entropy is a difference of two large numbers (lse - E[s]) that half precision would
    cancel badly. Elsewhere (the torch backend forced on CUDA): SDPA for the output and the
    log-sum-exp from blocked scores."""
    low = q.dtype in (torch.float16, torch.bfloat16)
    if low:
        q, k, v = q.float(), k.float(), v.float()
    if q.device.type != "cpu":
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] and _SDPA_GQA else {}
        if k.shape[1] != q.shape[1] and not gqa:
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scaling, **gqa)
        lse = _blocked_rows(q, k, bias, is_causal, scaling, torch.logsumexp)
        return o, lse
    if k.shape[1] != q.shape[1]:
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1), v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, bool(is_causal), attn_mask=None if bias is None else bias.to(q.dtype), scale=scaling
    )
    return o, lse


#: bounds of a block of scores when scanning for each row's largest logit: elements of the
#: [B, H, rows, keys] block, and rows
_MAX_LOGIT_ELEMENTS = 1 << 22
_MAX_LOGIT_ROWS = 32


def _blocked_rows(qf, k, bias, causal, scaling, reduce):
    """[B, Hq, Sq] = ``reduce(scores + bias, dim=-1)`` over each row's allowed keys
    (``bias``: the mask from :func:`_additive_mask`, or None; ``torch.amax``:
    the largest logit; ``torch.logsumexp``), query block by query block: a block of R rows
    needs only the keys its last row may see (causal), only the diagonal part is masked when
    causal order is all there is, and k is never repeated (the G query heads of a kv head
    are stacked as G x R rows of one matrix product)."""
    B, Hq, Sq, D = qf.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    offset = Sk - Sq
    q5 = qf.float().reshape(B, Hkv, G, Sq, D)
    kf = k.float()
    # 32 rows a block: less of the causal triangle's upper half computed and cache-sized
    # blocks (measured 1.3-2x faster than 128 rows at S = 256..2048 on 2 CPU cores)
    R = max(16, min(Sq, _MAX_LOGIT_ROWS, _MAX_LOGIT_ELEMENTS // max(1, B * Hq * Sk)))
    out = torch.empty(B, Hkv, G, Sq, device=qf.device)
    for r0 in range(0, Sq, R):
        r1 = min(Sq, r0 + R)
        n = r1 - r0
        hi = min(Sk, r1 + offset) if causal and Sq > 1 else Sk
        s = q5[:, :, :, r0:r1].reshape(B, Hkv, G * n, D) @ kf[:, :, :hi].transpose(-1, -2)  # [B, Hkv, G*n, hi]
        s = s.view(B, Hkv, G, n, hi).mul_(scaling)
        if bias is not None:  # adding a bias is faster than a masked_fill per block
            m = bias[..., r0:r1, :hi]  # [B, 1|Hq, n, hi]
            s.add_(m.reshape(B, Hkv, G, n, hi) if m.shape[1] == Hq and Hq > 1 else m[:, :, None])
        elif causal and Sq > 1:
            lo = max(0, r0 + offset + 1)  # keys past the block's first row limit: the diagonal part
            if lo < hi:
                rows = torch.arange(r0, r1, device=qf.device)[:, None]
                cols = torch.arange(lo, hi, device=qf.device)[None, :]
                s[..., lo:hi].masked_fill_(cols > rows + offset, float("-inf"))
        out[:, :, :, r0:r1] = reduce(s, dim=-1)
    return out.reshape(B, Hq, Sq)


def _row_stats(q, k, pk, lse, attn_mask, bias, causal, scaling):
    """[B, Hq, Sq, 3] = (entropy, max logit, sink mass) of every row, without an Sq x Sk
    matrix: entropy = lse - E_p[s] with E_p[s] = scaling * q . sum_j p_j k_j (``pk``, from
    the same SDPA call); the max logit from q k^T in key blocks; the sink mass
    exp(s_j0 - lse) at the row's first allowed key j0."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qf = q.float()
    lse = lse.float()
    has = torch.isfinite(lse)  # the flash kernel's lse of a row with no allowed key is not reliable,
    first = None  # so the mask decides: a row has a key if its first "allowed" one really is
    if attn_mask is not None:
        m8 = attn_mask.view(torch.int8) if attn_mask.is_contiguous() else attn_mask.to(torch.int8)
        first = m8.argmax(-1, keepdim=True)  # [B, 1|Hq, Sq, 1]: the first allowed key (0 if none)
        has = has & torch.gather(attn_mask, -1, first)[..., 0].expand(B, Hq, Sq)
        first = first[..., 0].expand(B, Hq, Sq)
    mean_s = scaling * (qf * pk.float()).sum(-1)
    entropy = torch.where(has, lse - mean_s, 0.0).clamp_min(0.0)
    best = _blocked_rows(qf, k, bias, causal, scaling, torch.amax)
    # sink: the first allowed key of each row
    if first is None:
        first = torch.zeros(B, Hq, Sq, dtype=torch.long, device=q.device)
    b_idx = torch.arange(B, device=q.device)[:, None, None]
    kv_idx = (torch.arange(Hq, device=q.device) // G)[None, :, None]
    s_first = scaling * (qf * k[b_idx, kv_idx, first].float()).sum(-1)
    sink = torch.where(has, torch.exp(s_first - torch.where(has, lse, 0.0)), 0.0)
    return torch.stack([entropy, best, sink], -1)

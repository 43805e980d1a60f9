"""An eager, materialised implementation of head interventions, independent of avss_fast:
the oracle that ``intervene`` (one-pass masked attention) is checked against inside
``generate``.

It is a transformers attention function (registered as ``"avss_test_eager"``) that builds
the full [B, Hq, Sq, Sk] softmax in float32 and applies, for layer ``module.layer_idx``:
gates on head outputs, static segment factors on every row, and the adaptive rule
(published ADHH: in the last query row of each call, if the head's mass on the segment is
>= threshold, that segment's probabilities are scaled, no renormalisation).
"""

from __future__ import annotations

import torch

NAME = "avss_test_eager"

#: the intervention to apply (a HeadIntervention-like object) and how often the rule fired
STATE: dict = {"iv": None, "fired": 0, "checked": 0}


def _segments(starts, B: int, Sk: int) -> torch.Tensor:
    st = torch.as_tensor(starts, dtype=torch.long)
    if st.dim() == 1:
        st = st[None].expand(B, -1)
    elif st.shape[0] != B:
        st = st.repeat_interleave(B // st.shape[0], dim=0)
    pos = torch.arange(Sk)
    seg = torch.zeros(B, Sk, dtype=torch.long)
    for s in range(1, st.shape[1]):
        seg = torch.where(pos[None, :] >= st[:, s : s + 1], s, seg)
    return seg  # [B, Sk]


def eager_rule_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    iv = STATE["iv"]
    layer = module.layer_idx
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    G = Hq // key.shape[1]
    k = key.float().repeat_interleave(G, 1)
    v = value.float().repeat_interleave(G, 1)
    scaling = D**-0.5 if scaling is None else scaling
    s = (query.float() @ k.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        allowed = attention_mask.bool().expand(B, 1, Sq, Sk)
    else:
        i = torch.arange(Sq)[:, None]
        j = torch.arange(Sk)[None, :]
        causal = getattr(module, "is_causal", True) and Sq > 1
        allowed = (j <= i + (Sk - Sq)) if causal else torch.ones(Sq, Sk, dtype=torch.bool)
        allowed = allowed[None, None].expand(B, 1, Sq, Sk)
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1), nan=0.0)
    w = p.clone()
    if iv is not None and iv.segment_starts is not None:
        seg = _segments(iv.segment_starts, B, Sk)
        for (lay, h), factors in iv.reweight.items():
            if lay == layer:
                for sg, f in factors.items():
                    w[:, h] = w[:, h] * torch.where(seg == sg, f, 1.0)[:, None, :]
        rule = iv.adaptive
        if rule is not None:
            rows = [Sq - 1] if rule.rows == "last" else list(range(Sq))
            in_seg = seg == rule.segment  # [B, Sk]
            for lay, h in rule.heads:
                if lay != layer:
                    continue
                for r in rows:
                    mass = (p[:, h, r] * in_seg).sum(-1)  # [B]
                    fire = mass >= rule.threshold
                    STATE["checked"] += B
                    STATE["fired"] += int(fire.sum())
                    factor = torch.where(fire[:, None] & in_seg, rule.scale, 1.0)
                    w[:, h, r] = w[:, h, r] * factor
    out = w @ v  # [B, Hq, Sq, D]
    if iv is not None:
        for (lay, h), g in iv.gates.items():
            if lay == layer:
                gt = torch.as_tensor(g, dtype=torch.float32)
                gt = gt.repeat_interleave(B // gt.shape[0]) if gt.dim() == 1 else gt.expand(B)
                out[:, h] = out[:, h] * gt[:, None, None]
    return out.transpose(1, 2).to(query.dtype), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, eager_rule_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)

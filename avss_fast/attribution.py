"""Which attention heads push a model toward a token: exact ablation, batched, and a
first-order screen.

For a target (sample s, position t) the token ``y = input_ids[s, t]`` is predicted from the
logits at row ``t - 1``. With ``p = softmax(logits[t - 1])[y]`` of the unchanged model and
``p_lh`` the same probability when head h of layer l has its output zeroed:

* ``prob_diff``      ``p - p_lh``            (> 0: the head pushed toward y)
* ``log_prob_diff``  ``log p - log p_lh``
* ``abs_prob_diff``  ``|p - p_lh|``

``positions="target"`` zeroes the head only in query row ``t - 1``: the prefix (rows
``< t - 1``) is run once, unchanged, into a KV cache, and then row ``t - 1`` runs for every
head at once, one batch row per ablated head with per-row head gates (the published
method, run with a KV cache). ``positions="all"`` zeroes the head in every row: the
sequence runs once per batch of heads, again one batch row per head. Either way no hook is
registered per head and the shared prefix is never re-run per head; the result equals the
one-head-at-a-time loop (:func:`attribute_heads_loop`).

Each sample is evaluated on its own tokens: padding (``attention_mask == 0``) is removed
before the model sees the sample, and target positions are columns of ``input_ids``.

:func:`estimate_head_effects` is the fast screen: with a gate ``g`` on each head's output
(1 = unchanged), ``p(g = 0) ~= p(1) - dp/dg``, so ``p - p_lh ~= dp/dg_lh`` from one backward
pass per target through differentiable gates at the attention output projection.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from tqdm.auto import tqdm

from .heads import HeadIntervention, _num_query_heads, intervene
from .models import attention_output_projection, find_layers, model_device
from .scoring import _eval_mode

SCORES = ("prob_diff", "log_prob_diff", "abs_prob_diff")
POSITIONS = ("target", "all")


def _score(lp: torch.Tensor, lp_abl: torch.Tensor, score: str) -> torch.Tensor:
    """The effect from the log-probabilities of the target (unchanged, ablated): taken in
    log space for ``log_prob_diff``, so that a probability below fp32's range (log p <
    ~-104) still gives a finite difference."""
    if score == "log_prob_diff":
        return lp - lp_abl
    d = lp.exp() - lp_abl.exp()
    return d.abs() if score == "abs_prob_diff" else d


def _target_pair(t) -> tuple[int, int]:
    """A (sample, position) pair of whole numbers (Python or NumPy ints, 0-d integer tensors)."""
    try:
        pair = tuple(t)
    except TypeError:
        pair = ()
    vals = [x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x for x in pair]
    if len(vals) != 2 or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in vals):
        raise ValueError(f"a target must be a (sample, position) pair of integers, got {t!r}")
    return int(vals[0]), int(vals[1])


def _check_inputs(model, input_ids, targets, attention_mask, score, positions, batch_size):
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.is_floating_point() or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] integer tensor, got {tuple(ids.shape)}")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
    targets = [_target_pair(t) for t in targets]
    if not targets:
        raise ValueError("targets is empty: give (sample, position) pairs")
    B, T = ids.shape
    for s, t in targets:
        if not 0 <= s < B:
            raise ValueError(f"target ({s}, {t}): sample {s} is out of range for {B} samples")
        if not 1 <= t < T:
            raise ValueError(f"target ({s}, {t}): position must be in 1..{T - 1} (it is predicted from position - 1)")
        if not (mask[s, t] and mask[s, t - 1]):
            raise ValueError(f"target ({s}, {t}): the target or the position before it is padding")
    if "CausalLM" not in type(model).__name__ and not hasattr(model, "lm_head"):
        raise ValueError(f"attribute_heads needs a causal language model, got {type(model).__name__}")
    return ids, mask.bool(), targets


def _sample_tokens(ids, mask, s: int, t: int) -> tuple[torch.Tensor, int]:
    """Sample s without padding, and column t's index in it."""
    keep = mask[s]
    return ids[s][keep], int(keep[:t].sum())


def _log_probs(logits: torch.Tensor, token: int) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)[..., token]


def _cache_arg(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _baseline(model, tokens, pos: int, y: int, positions: str, kv_arg: str, layers_path):
    """log p(y) of the unchanged model at row pos - 1, and for positions "target" the KV cache of
    the prefix (rows < pos - 1) that every ablation then continues from (None if empty)."""
    with intervene(model, HeadIntervention(), layers_path=layers_path):
        if positions != "target":
            return _log_probs(model(input_ids=tokens[None, : pos + 1], use_cache=False).logits[0, pos - 1], y), None
        cache = None
        if pos > 1:
            cache = _returned_cache(model(input_ids=tokens[None, : pos - 1], use_cache=True))
        row = tokens[None, pos - 1 : pos]
        return _log_probs(model(input_ids=row, **{kv_arg: copy.deepcopy(cache)}).logits[0, -1], y), cache


def _heads(num_layers: int, num_heads: int) -> list[tuple[int, int]]:
    return [(layer, h) for layer in range(num_layers) for h in range(num_heads)]


def _one_head_gates(chunk: Sequence[tuple[int, int]]) -> dict:
    """Per-row gates: batch row r zeroes head chunk[r] and nothing else."""
    gates = {}
    for r, pair in enumerate(chunk):
        g = gates.setdefault(pair, [1.0] * len(chunk))
        g[r] = 0.0
    return gates


@torch.no_grad()
def attribute_heads(
    model: nn.Module,
    input_ids,
    targets,
    *,
    attention_mask=None,
    score: str = "prob_diff",
    positions: str = "target",
    batch_size: int = 64,
    layers_path: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Effect of zeroing each (layer, head) on each target token: a float32 tensor
    [len(targets), L, H] (see the module docstring for the scores). Batched: ``batch_size``
    ablated heads per forward pass. Memory: with ``positions="target"`` each pass holds
    ``batch_size`` copies of the prefix's KV cache (one per ablated head), so for long
    prefixes on large models lower ``batch_size`` (e.g. 64 copies of a 4k-token cache of an
    8B GQA model are ~32 GiB)."""
    ids, mask, targets = _check_inputs(model, input_ids, targets, attention_mask, score, positions, batch_size)
    _, blocks = find_layers(model, layers_path)
    L, H = len(blocks), _num_query_heads(model)
    heads = _heads(L, H)
    dev = model_device(model)
    out = torch.empty(len(targets), L, H)
    kv_arg = _cache_arg(model)
    chunks = [heads[i : i + batch_size] for i in range(0, len(heads), batch_size)]
    with _eval_mode(model), tqdm(total=len(targets) * len(chunks), desc="attributing heads", unit="batch",
                                 disable=not progress) as bar:
        for i, (s, t) in enumerate(targets):
            tokens, pos = _sample_tokens(ids, mask, s, t)
            y = int(tokens[pos])  # read on the host, before the copy
            tokens = tokens.to(dev)
            effects = []
            p, cache = _baseline(model, tokens, pos, y, positions, kv_arg, layers_path)
            if positions == "target":
                row = tokens[pos - 1 : pos]
                for chunk in chunks:
                    c = len(chunk)
                    kv = None
                    if cache is not None:
                        kv = copy.deepcopy(cache)
                        kv.batch_repeat_interleave(c)
                    with intervene(model, HeadIntervention(gates=_one_head_gates(chunk)), layers_path=layers_path):
                        logits = model(input_ids=row[None].expand(c, 1), **{kv_arg: kv}, use_cache=kv is not None).logits
                    effects.append(_score(p, _log_probs(logits[:, -1], y), score))
                    bar.update(1)
            else:
                seq = tokens[: pos + 1][None]
                for chunk in chunks:
                    c = len(chunk)
                    with intervene(model, HeadIntervention(gates=_one_head_gates(chunk)), layers_path=layers_path):
                        logits = model(input_ids=seq.expand(c, -1), use_cache=False).logits
                    effects.append(_score(p, _log_probs(logits[:, pos - 1], y), score))
                    bar.update(1)
            out[i] = torch.cat(effects).float().cpu().reshape(L, H)
    return out


@torch.no_grad()
def attribute_heads_loop(model, input_ids, targets, *, attention_mask=None, score="prob_diff", positions="target",
                         layers_path=None) -> torch.Tensor:
    """The one-head-at-a-time loop that :func:`attribute_heads` batches: for every target and
    every (layer, head), one forward pass with that head zeroed (for ``positions="target"``
    only the predicting row runs, on a copy of the prefix's KV cache). The reference for
    tests and the baseline of the benchmark."""
    ids, mask, targets = _check_inputs(model, input_ids, targets, attention_mask, score, positions, 1)
    _, blocks = find_layers(model, layers_path)
    L, H = len(blocks), _num_query_heads(model)
    dev = model_device(model)
    out = torch.empty(len(targets), L, H)
    kv_arg = _cache_arg(model)
    for i, (s, t) in enumerate(targets):
        tokens, pos = _sample_tokens(ids, mask, s, t)
        y = int(tokens[pos])
        tokens = tokens.to(dev)
        row = tokens[pos - 1 : pos]
        p, cache = _baseline(model, tokens, pos, y, positions, kv_arg, layers_path)
        for layer, h in _heads(L, H):
            with intervene(model, HeadIntervention(gates={(layer, h): 0.0}), layers_path=layers_path):
                if positions == "target":
                    logits = model(input_ids=row[None], **{kv_arg: copy.deepcopy(cache)}).logits[0, -1]
                else:
                    logits = model(input_ids=tokens[None, : pos + 1], use_cache=False).logits[0, pos - 1]
            out[i, layer, h] = _score(p, _log_probs(logits, y), score).float().cpu()
    return out


def estimate_head_effects(
    model: nn.Module,
    input_ids,
    targets,
    *,
    attention_mask=None,
    score: str = "prob_diff",
    positions: str = "target",
    layers_path: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """First-order estimate of :func:`attribute_heads`, [len(targets), L, H].

    Gates ``g[l, i, h]`` (all 1) multiply head h's slice of the attention output projection's
    input at layer l and query row i. One backward pass per target gives ``G = dp/dg``;
    the estimate of ``p - p_lh`` is ``G[l, t-1, h]`` for positions "target" and
    ``sum_i G[l, i, h]`` for "all" (log-probabilities for ``log_prob_diff``; absolute
    values for ``abs_prob_diff``)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("estimate_head_effects needs a backward pass, which torch.inference_mode() forbids: "
                           "call it outside inference_mode (no_grad is fine)")
    ids, mask, targets = _check_inputs(model, input_ids, targets, attention_mask, score, positions, 1)
    _, blocks = find_layers(model, layers_path)
    L, H = len(blocks), _num_query_heads(model)
    dev = model_device(model)
    projections = [attention_output_projection(block) for block in blocks]
    out = torch.empty(len(targets), L, H)
    handles = []
    gates: list[torch.Tensor] = []

    def make_hook(layer):
        def pre_hook(module, args):
            x = args[0]
            B, T, E = x.shape
            g = gates[layer]
            return (x * g.repeat_interleave(E // H, dim=-1)[None].to(x.dtype),) + tuple(args[1:])

        return pre_hook

    try:
        for layer, proj in enumerate(projections):
            handles.append(proj.register_forward_pre_hook(make_hook(layer)))
        with _eval_mode(model), tqdm(total=len(targets), desc="estimating head effects", unit="event",
                                     disable=not progress) as bar:
            for i, (s, t) in enumerate(targets):
                tokens, pos = _sample_tokens(ids, mask, s, t)
                y = int(tokens[pos])  # read on the host, before the copy
                seq = tokens[: pos + 1].to(dev)[None]
                gates[:] = [torch.ones(pos + 1, H, device=dev, requires_grad=True) for _ in range(L)]
                with torch.enable_grad():
                    logits = model(input_ids=seq, use_cache=False).logits[0, pos - 1].float()
                    logp = torch.log_softmax(logits, -1)[y]
                    objective = logp if score == "log_prob_diff" else logp.exp()
                    grads = torch.autograd.grad(objective, gates)
                G = torch.stack([g.detach() for g in grads])  # [L, T, H]
                est = G[:, pos - 1, :] if positions == "target" else G.sum(1)
                out[i] = (est.abs() if score == "abs_prob_diff" else est).float().cpu()
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
    return out


def rank_heads(effects: torch.Tensor, hallucinated: Sequence[bool], *, top_k: int = 20) -> dict:
    """Contrast of two event sets: ``score[l, h] = mean over hallucinated events of effect
    - mean over correct events``. Returns ``{"hal_heads": up to top_k pairs with score > 0,
    highest first, "non_hal_heads": up to top_k pairs with score < 0, lowest first, "scores": [[L x H]], "events": counts}``,
    the format ``avss-fast generate --heads-from`` reads; tied scores list the lower
    (layer, head) first in both lists. Non-finite effects are an error."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    eff = torch.as_tensor(effects, dtype=torch.float64)
    labels = torch.as_tensor(list(hallucinated), dtype=torch.bool)
    if eff.dim() != 3 or eff.shape[0] != labels.shape[0]:
        raise ValueError(f"effects must be [events, L, H] with one label per event, got {tuple(eff.shape)} "
                         f"and {labels.shape[0]} labels")
    if not torch.isfinite(eff).all():
        bad = torch.nonzero(~torch.isfinite(eff))[0].tolist()
        raise ValueError(f"effects hold non-finite values (first at event {bad[0]}, layer {bad[1]}, head {bad[2]}): "
                         "a head's score would be NaN and drop out of both lists")
    n_hal, n_ok = int(labels.sum()), int((~labels).sum())
    if n_hal == 0 or n_ok == 0:
        raise ValueError(f"both event sets must be non-empty (hallucinated: {n_hal}, correct: {n_ok})")
    scores = eff[labels].mean(0) - eff[~labels].mean(0)  # [L, H]
    L, H = scores.shape
    flat = scores.flatten()
    down = torch.argsort(flat, descending=True, stable=True).tolist()  # ties: lower (layer, head) first
    up = torch.argsort(flat, stable=True).tolist()
    k = min(top_k, L * H)
    return {
        "hal_heads": [[i // H, i % H] for i in down if flat[i] > 0][:k],
        "non_hal_heads": [[i // H, i % H] for i in up if flat[i] < 0][:k],
        "scores": scores.tolist(),
        "events": {"hallucinated": n_hal, "correct": n_ok},
    }

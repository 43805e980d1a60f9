"""Layer pruning: choose the least important blocks, drop them, measure what is kept.

Three steps, each usable on its own::

    report = score_layers(model, calibration_texts, tokenizer)
    drop = select_layers(report, ratio=0.25, metric="avss")          # e.g. [3, 5]
    small = prune_layers(model, drop)                                 # a deep copy, 6 of 8 blocks
    r = evaluate_retention(model, small, heldout_texts, tokenizer)    # r.retention = ppl_o / ppl_p

Selection (:func:`select_layers`), with ``L`` blocks and ``k = round(ratio * L)``
(halves up, at least 1; see :func:`avss_fast.report.layers_for_ratio`):

* ``rule="lowest"``: the ``k`` layers with the lowest score. Scores: ``avss`` (AVSS paper),
  ``block_influence`` (ShortGPT, ``BI_l = 1 - mean_t cos(x_t, h_t)``), ``angular_distance``
  (``mean_t arccos(cos(x_t, h_t)) / pi``); low = the block changes the residual stream
  least = least important.
* ``rule="cumulative"`` (the AVSS paper's rule): with ``n_l = s_l / sum_k s_k`` (for AVSS
  this is nAVSS), take layers in ascending score order while the cumulative share
  ``sum n <= ratio`` (cAVSS <= ratio). It can select no layer at all (when the smallest
  share already exceeds ``ratio``).
* baselines: ``reverse`` drops the ``k`` layers just before the final one
  (``L-1-k .. L-2``: deep layers first, the last block kept), ``random`` draws ``k``
  layers with ``random.Random(seed)``.

Pruning (:func:`prune_layers`) removes blocks from the model's ``nn.ModuleList`` and keeps
the model a plain transformers model: every ``layer_idx`` attribute inside a kept block is
renumbered to the block's new position (the KV cache is indexed by it), and the config
gets the new layer count (``num_hidden_layers`` / ``n_layer`` / ``n_layers`` /
``num_layers``), its ``layer_types`` and every other per-layer list (any list attribute
whose length is the old layer count, token-id lists excepted) keep the entries of the
kept layers; lists of layer indices (a ``*_layers`` list of distinct indices, such as
Qwen-MoE's ``mlp_only_layers``) are renumbered and a dense-prefix count
(``first_k_dense_replace``) counts the kept layers below it. ``save_pretrained`` then
writes a checkpoint that plain ``from_pretrained`` loads to the same logits. Before
anything changes, the model's class is built on the meta device from the original and
from the updated config, and the second must be the first without the dropped blocks
(parameter names and shapes); a config that describes its layers some other way (a
period such as ``decoder_sparse_step``) is refused with the differing names rather than
saved as a different model.

Retention (:func:`evaluate_retention`) compares the pruned model with the original on
held-out data; the retention is a ratio to the unpruned model (1 = nothing lost):

* causal LM, text: perplexity ``PPL = exp( sum NLL / N )`` over every predicted token
  (token ``t`` predicted from ``< t``; padding and the first token of each text are not
  predicted); ``retention = PPL_original / PPL_pruned``;
* causal LM, JSONL of ``{question, choices, answer}``: each choice scored by its summed
  log-likelihood ``sum_j log p(c_j | question, c_<j)``; the prediction is the argmax;
  ``retention = accuracy_pruned / accuracy_original``;
* sequence-classification model, JSONL of ``{text, label}``: ``retention =
  accuracy_pruned / accuracy_original``;
* encoder (or any model without an LM head), text: sentence embeddings
  ``e_i = sum_t m_it h_it / sum_t m_it`` (mean pooling of the last hidden state over valid
  tokens); ``retention = mean_i cos(e_i^original, e_i^pruned)`` (the original against
  itself gives 1), and in ``details["spearman"]`` the Spearman rank correlation between
  the pairwise cosine similarities ``cos(e_i, e_j), i < j`` of the two models.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import operator
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import find_layers, is_encoder, model_device

__all__ = [
    "SELECT_METRICS",
    "RULES",
    "TASKS",
    "select_layers",
    "prune_layers",
    "Measurement",
    "Retention",
    "measure",
    "evaluate_retention",
    "perplexity",
    "choice_scores",
    "choice_accuracy",
    "classification_accuracy",
    "sentence_embeddings",
    "spearman",
]

#: Metrics :func:`select_layers` accepts: three scores and two baselines.
SELECT_METRICS = ("avss", "block_influence", "angular_distance", "reverse", "random")
SCORE_METRICS = ("avss", "block_influence", "angular_distance")
RULES = ("lowest", "cumulative")
#: What :func:`measure` / :func:`evaluate_retention` can evaluate.
TASKS = ("perplexity", "multiple_choice", "classification", "embedding")

# Config attributes that name the number of blocks, tried in this order.
_LAYER_COUNT_NAMES = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
# Config integers counting a prefix of layers of another kind (DeepSeek's dense layers).
_PREFIX_COUNT_NAMES = ("first_k_dense_replace",)
# Config lists of layer indices, whatever their length.
_LAYER_INDEX_LISTS = frozenset({"mlp_only_layers", "moe_layers"})
# Per-layer config lists whose entries are layer indices.
_LAYER_VALUED_LISTS = ("kv_source_layers",)
# Config lists that are never per-layer, whatever their length.
_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                            "forced_decoder_ids"})
_CUMULATIVE_TOL = 1e-9  # cumulative shares are sums of floats: 0.1 + 0.2 must count as <= 0.3


# ============================================================================ selection


def _check_ratio(ratio: float) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}") from None
    if not (0.0 < r < 1.0):  # also rejects NaN
        raise ValueError(f"ratio must be in (0, 1) (the fraction of layers to prune), got {ratio!r}")
    return r


def _num_layers(report: Any) -> int:
    if isinstance(report, int) and not isinstance(report, bool):
        n = report
    elif isinstance(report, Mapping):
        n = len(_report_rows(report))
    else:
        n = len(report)
    if n < 1:
        raise ValueError("the report has no layers")
    return n


def _report_rows(report: Mapping) -> list:
    rows = report.get("layers")
    if not isinstance(rows, list):
        raise ValueError("a report dict needs a 'layers' list of per-layer dicts (LayerReport.to_dict())")
    return rows


def _metric_values(report: Any, metric: str) -> list[float]:
    """One float per layer (NaN where the report has no value)."""
    if isinstance(report, int):
        raise ValueError(f"metric {metric!r} needs a LayerReport (or its dict), not a layer count")
    if isinstance(report, Mapping):
        raw = [row.get(metric) if isinstance(row, Mapping) else None for row in _report_rows(report)]
    else:
        raw = report.metric(metric)
    out = []
    for v in raw:
        try:
            out.append(float(v) if v is not None else math.nan)
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _ascending(values: list[float]) -> list[int]:
    """Layers with a finite value, lowest first (ties by layer index)."""
    return sorted((i for i, v in enumerate(values) if math.isfinite(v)), key=lambda i: (values[i], i))


def _select_lowest(values: list[float], k: int, metric: str) -> list[int]:
    order = _ascending(values)
    if len(order) < k:
        missing = [i for i, v in enumerate(values) if not math.isfinite(v)]
        raise ValueError(
            f"cannot select {k} layers by {metric!r}: layers {missing} have no {metric} value "
            f"(block_influence / angular_distance need score_layers(..., similarity=True))"
        )
    return order[:k]


def _select_cumulative(values: list[float], ratio: float, metric: str) -> list[int]:
    """Ascending order while the cumulative normalised score ``sum s / sum_all s`` <= ratio."""
    order = _ascending(values)
    if len(order) != len(values):
        missing = [i for i, v in enumerate(values) if not math.isfinite(v)]
        raise ValueError(f"rule='cumulative' needs a {metric} value for every layer; missing for layers {missing}")
    if any(values[i] < 0 for i in order):
        raise ValueError(f"rule='cumulative' needs non-negative scores; {metric} has negative values")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"rule='cumulative': the {metric} scores sum to {total}, cannot normalise")
    chosen, acc = [], 0.0
    for i in order:
        acc += values[i] / total
        if acc > ratio + _CUMULATIVE_TOL:
            break
        chosen.append(i)
    return chosen


def select_layers(
    report: Any,
    *,
    ratio: float = 0.25,
    metric: str = "avss",
    rule: str = "lowest",
    seed: int = 0,
) -> list[int]:
    """Indices of the layers to prune, ascending.

    ``report``: a :class:`~avss_fast.scoring.LayerReport`, its ``to_dict()`` (or any dict
    with a ``"layers"`` list of per-layer dicts), or, for the ``reverse`` / ``random``
    baselines, just the number of layers. See the module docstring for the metrics and
    rules: ``rule="lowest"`` takes ``k = round(ratio * L)`` layers (at least 1) with the
    lowest score; ``rule="cumulative"`` takes layers in ascending score order while the
    cumulative normalised score (cAVSS for ``avss``) is <= ``ratio``.

    Raises:
        ValueError: ``ratio`` not in (0, 1); unknown ``metric`` / ``rule``; ``cumulative``
            with a baseline; a score missing where it is needed; or a selection that
            would remove every layer.
    """
    from .report import layers_for_ratio

    ratio = _check_ratio(ratio)
    if metric not in SELECT_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(SELECT_METRICS)}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    n = _num_layers(report)
    if rule == "cumulative":
        if metric not in SCORE_METRICS:
            raise ValueError(f"rule='cumulative' needs a score metric ({', '.join(SCORE_METRICS)}), not {metric!r}")
        chosen = _select_cumulative(_metric_values(report, metric), ratio, metric)
    else:
        k = layers_for_ratio(n, ratio)
        if k >= n:
            raise ValueError(f"ratio {ratio} of {n} layers selects {k}: that would prune every layer")
        if metric == "reverse":
            chosen = list(range(n - 1 - k, n - 1))
        elif metric == "random":
            chosen = random.Random(seed).sample(range(n), k)
        else:
            chosen = _select_lowest(_metric_values(report, metric), k, metric)
    if len(chosen) >= n:
        raise ValueError(f"the selection removes all {n} layers; lower the ratio")
    return sorted(chosen)


# ============================================================================== pruning


def _check_indices(layers: Iterable[Any], n: int) -> list[int]:
    """Validated, sorted layer indices (ints in [0, n), no repeats, not all of them)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be a list of layer indices, got {type(layers).__name__}")
    out = []
    for x in layers:
        if isinstance(x, bool):
            raise ValueError(f"layer indices must be integers, got {x!r}")
        try:
            i = operator.index(x.item() if isinstance(x, torch.Tensor) else x)
        except TypeError:
            raise ValueError(f"layer indices must be integers, got {x!r}") from None
        if not 0 <= i < n:
            raise ValueError(f"layer index {i} out of range: the model has {n} layers (0..{n - 1})")
        out.append(i)
    dupes = sorted({i for i in out if out.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate layer indices: {dupes}")
    if len(out) >= n:
        raise ValueError(f"cannot prune every layer ({n} of {n}); keep at least one")
    return sorted(out)


def _is_config(obj: Any) -> bool:
    return hasattr(obj, "to_dict") and hasattr(obj, "model_type")


def _layer_counts(cfg: Any) -> set[int]:
    """Every layer count ``cfg`` declares (BART: ``num_hidden_layers`` is its encoder's
    count, ``decoder_layers`` another)."""
    counts = set()
    for name in _LAYER_COUNT_NAMES:
        try:
            v = getattr(cfg, name)
        except AttributeError:
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            counts.add(v)
    return counts


def _layer_config(model: nn.Module, n_old: int):
    """The config (the model's, or a nested text config) that declares ``n_old`` layers."""
    return _layer_config_in(getattr(model, "config", None), n_old)


def _layer_config_in(cfg: Any, n_old: int):
    """The config among ``cfg`` and its nested configs that declares ``n_old`` layers."""
    if not _is_config(cfg):
        return None
    candidates = [cfg]
    try:
        candidates.append(cfg.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):
        pass
    candidates += [v for v in vars(cfg).values() if _is_config(v)]
    for c in candidates:
        if n_old in _layer_counts(c):
            return c
    return None


def _per_layer_list_names(cfg: Any, n_old: int) -> list[str]:
    """Config attributes holding one entry per layer: lists of length ``n_old`` that are not
    lists of layer indices (:func:`_layer_index_list_names`)."""
    index_lists = set(_layer_index_list_names(cfg, n_old))
    names = []
    for key, value in cfg.to_dict().items():
        if key in _NOT_PER_LAYER or key in index_lists or key.endswith(("_id", "_ids", "_token", "_tokens")):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n_old:
            names.append(key)
    return names


def _check_config(cfg: Any, model: nn.Module | None = None) -> None:
    top = getattr(model, "config", None)
    if getattr(top, "is_encoder_decoder", False):
        raise ValueError(f"pruning encoder-decoder models ({top.model_type}) is not supported: their encoder and "
                         "decoder layer counts are separate config fields")
    if cfg is not None and getattr(cfg, "is_heterogeneous", False):
        raise ValueError(
            "this model's config has per_layer_config overrides (heterogeneous layers); "
            "pruning such configs is not supported"
        )


def _layer_index_list_names(cfg: Any, n_old: int) -> list[str]:
    """Config attributes listing layer indices: the known ones (``mlp_only_layers`` of
    Qwen-MoE, ``moe_layers`` of Llama 4) whatever their length, and any other list named
    ``*_layers`` of distinct integers in ``[0, n_old)`` that is not one entry per layer
    (a length other than ``n_old``, or all of ``0 .. n_old - 1`` in order with ``n_old > 2``,
    which as per-layer flags would not be 0/1)."""
    names = []
    for key, value in cfg.to_dict().items():
        if not key.endswith("_layers") or not isinstance(value, (list, tuple)):
            continue
        if not (all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_old for v in value)
                and len(set(value)) == len(value)):
            continue
        if key in _LAYER_INDEX_LISTS or len(value) != n_old or (n_old > 2 and list(value) == list(range(n_old))):
            names.append(key)
    return names


def _layer_valued_list_names(cfg: Any, n_old: int) -> list[str]:
    """Per-layer lists whose entries are layer indices (``kv_source_layers``: the layer
    whose keys and values each layer reads)."""
    return [k for k in _LAYER_VALUED_LISTS if isinstance(getattr(cfg, k, None), (list, tuple))
            and len(getattr(cfg, k)) == n_old]


def _update_config(cfg: Any, keep: list[int], n_old: int) -> None:
    """New layer count, per-layer lists restricted to the kept layers and layer-index lists
    renumbered (in place)."""
    valued = set(_layer_valued_list_names(cfg, n_old))
    lists = {name: getattr(cfg, name) for name in _per_layer_list_names(cfg, n_old) if name not in valued}
    index_lists = {name: getattr(cfg, name) for name in _layer_index_list_names(cfg, n_old) if name not in valued}
    new_index = {old: new for new, old in enumerate(keep)}
    for name in valued:  # one entry per kept layer, naming kept layers by their new index
        value = getattr(cfg, name)
        lost = sorted({value[i] for i in keep if value[i] not in new_index})
        if lost:
            raise ValueError(f"cannot prune: config.{name} has kept layers reading from removed layer(s) {lost}")
        setattr(cfg, name, type(value)(new_index[value[i]] for i in keep))
    for name in _LAYER_COUNT_NAMES:
        try:
            current = getattr(cfg, name)
        except AttributeError:
            continue
        if current == n_old and not isinstance(current, bool):
            setattr(cfg, name, len(keep))
    for name, value in lists.items():
        setattr(cfg, name, type(value)(value[i] for i in keep))
    for name, value in index_lists.items():
        setattr(cfg, name, type(value)(new_index[i] for i in value if i in new_index))
    for name in _PREFIX_COUNT_NAMES:  # the first k layers are of another kind: k of them kept
        k = getattr(cfg, name, None)
        if isinstance(k, int) and not isinstance(k, bool):
            setattr(cfg, name, sum(1 for i in keep if i < k))


def _check_structure(model: nn.Module, blocks: nn.ModuleList, keep: list[int], n_old: int) -> None:
    """Refuse a pruning whose config would reload as a different model: the model's class,
    built on the meta device (no memory) from the original config and from the updated
    one, must differ only by the dropped blocks: the second's parameters and buffers
    (names and shapes) are the first's with the blocks renumbered. Built from the config
    both times, so what the config does not describe (adapters, quantised weights,
    constructor options such as ``add_pooling_layer=False``) takes no part. This catches
    what the config says in a way the edits above do not follow (layer periods such as
    ``decoder_sparse_step``, unknown index lists). Models that are not transformers models
    (no config) or whose class cannot be built from its config alone are not checked."""
    cfg = getattr(model, "config", None)
    if not _is_config(cfg) or not hasattr(type(model), "config_class"):
        return
    path = next((n for n, m in model.named_modules() if m is blocks), None)
    if not path:
        return
    new_cfg = copy.deepcopy(cfg)
    inner = _layer_config_in(new_cfg, n_old)
    if inner is None:
        return
    _update_config(inner, keep, n_old)
    try:
        with torch.device("meta"):
            before = type(model)(copy.deepcopy(cfg))
    except Exception:  # noqa: BLE001 - a class that cannot be built from its config alone
        return
    try:
        with torch.device("meta"):
            after = type(model)(new_cfg)
    except Exception as e:  # noqa: BLE001 - the pruned config describes no model this class can build
        raise ValueError(
            f"cannot prune layers {sorted(set(range(n_old)) - set(keep))} of this {cfg.model_type} model: "
            f"its class cannot be built from the pruned config ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None

    def shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(t.shape) for k, t in m.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}

    new_index = {old: new for new, old in enumerate(keep)}
    prefix = path + "."
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes(before).items():
        if name.startswith(prefix):
            idx, _, rest = name[len(prefix):].partition(".")
            if idx.isdigit():
                if int(idx) not in new_index:
                    continue
                name = f"{prefix}{new_index[int(idx)]}.{rest}"
        expected[name] = shape
    got = shapes(after)
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        differ = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("not in the rebuilt model", missing),
                                              ("only in the rebuilt model", extra), ("other shapes", differ)) if keys)
        raise ValueError(
            f"cannot prune layers {sorted(set(range(n_old)) - set(keep))} of this {cfg.model_type} model: its config "
            f"describes the layers in a way the pruned config would not match (a {type(model).__name__} built from it "
            f"differs from the pruned model: {detail})"
        )


def _check_layer_scaling(blocks: nn.ModuleList, keep: list[int]) -> None:
    """GPT-2's ``scale_attn_by_inverse_layer_idx`` bakes ``1 / (layer_idx + 1)`` into the
    attention at build time: a renumbered layer would load with another scale."""
    for new, old in enumerate(keep):
        if new == old:
            continue
        for m in blocks[old].modules():
            if getattr(m, "scale_attn_by_inverse_layer_idx", False):
                raise ValueError(
                    "cannot prune this model: its attention is scaled by 1/(layer_idx + 1) "
                    "(config.scale_attn_by_inverse_layer_idx), so a renumbered layer would compute "
                    "differently once reloaded; only trailing layers can be removed"
                )


_LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")  # the KV cache's index (GPT-Neo: layer_id)


def _renumber(blocks: nn.ModuleList) -> None:
    """Set every integer ``layer_idx`` / ``layer_id`` inside block ``i`` (the block included)
    to ``i``."""
    for i, block in enumerate(blocks):
        for m in block.modules():
            for attr in _LAYER_INDEX_ATTRS:
                v = getattr(m, attr, None)
                if isinstance(v, int) and not isinstance(v, bool):
                    setattr(m, attr, i)


def prune_layers(
    model: nn.Module,
    layers: Iterable[int],
    *,
    inplace: bool = False,
    layers_path: str | None = None,
) -> nn.Module:
    """Remove the blocks ``layers`` (indices into the block list) from ``model``.

    Returns a deep copy (``inplace=False``, the default; the original is untouched) or
    ``model`` itself, modified (``inplace=True``). Kept blocks keep their order; every
    ``layer_idx`` attribute inside them is renumbered to the new position; the config
    (see the module docstring) gets the new layer count, ``layer_types`` and the other
    per-layer lists of the kept layers. ``layers_path`` names the ``nn.ModuleList`` of
    blocks for layouts :func:`avss_fast.models.find_layers` does not know. An empty
    ``layers`` returns an unchanged copy.

    Raises:
        ValueError: a non-integer, out-of-range (negative included) or repeated index;
            every layer selected; a config that cannot represent the result
            (heterogeneous ``per_layer_config``, GPT-2 ``scale_attn_by_inverse_layer_idx``
            with renumbered layers).
    """
    _, blocks = find_layers(model, layers_path)
    n_old = len(blocks)
    drop = _check_indices(layers, n_old)
    keep = sorted(set(range(n_old)) - set(drop))
    _check_layer_scaling(blocks, keep)
    cfg = _layer_config(model, n_old)
    _check_config(cfg, model)
    if drop:
        _check_structure(model, blocks, keep, n_old)
    if not inplace:
        model = copy.deepcopy(model)
        _, blocks = find_layers(model, layers_path)
        cfg = _layer_config(model, n_old)
    for i in reversed(drop):
        del blocks[i]  # ModuleList renumbers its keys: state-dict names follow the new order
    _renumber(blocks)
    if cfg is not None:
        _update_config(cfg, keep, n_old)
    return model


# ============================================================================ evaluation


@dataclasses.dataclass
class Measurement:
    """One model on one evaluation set (see :func:`measure`).

    ``value``: perplexity (``task="perplexity"``), accuracy (``multiple_choice``,
    ``classification``) or NaN (``embedding``: the embeddings are the measurement).
    ``examples``: texts / questions; ``tokens``: predicted tokens (perplexity) or texts'
    valid tokens (embedding).
    """

    task: str
    metric: str
    value: float
    examples: int
    tokens: int = 0
    nll: float | None = None
    embeddings: torch.Tensor | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class Retention:
    """How much of the original model's quality a pruned model keeps.

    ``retention`` is the ratio to the unpruned model (1.0 = all kept): ``PPL_o / PPL_p``
    for perplexity, ``acc_p / acc_o`` for accuracies (NaN when ``acc_o`` is 0), the mean
    cosine of sentence embeddings for ``embedding`` (whose ``original`` is 1.0, the
    original against itself). ``details`` holds the secondary numbers (e.g.
    ``spearman``, ``nll_original``, ``nll_pruned``).
    """

    task: str
    metric: str
    original: float
    pruned: float
    retention: float
    examples: int
    details: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _forward_kwargs(model: nn.Module) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _model_kind(model: nn.Module) -> str:
    """``classification``, ``causal`` (has an LM head and generates) or ``embedding``."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if is_encoder(model):
        return "embedding"
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return "causal"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    return "embedding"


def _tqdm(it, *, total=None, desc="", progress=False):
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="batch", disable=not progress, leave=False)


def _texts_and_batches(model, data, tokenizer, batch_size, max_length, field):
    from .data import iter_batches, num_batches
    from .models import fit_max_length

    max_length = fit_max_length(model, max_length)
    batches = iter_batches(data, tokenizer, batch_size=batch_size, max_length=max_length, field=field)
    return batches, num_batches(data, batch_size, field=field)


def _logits(model, inputs: dict, extra) -> torch.Tensor:
    out = model(**inputs, **extra)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"{type(model).__name__} returns no logits; it is not a language/classification model")
    return logits


def perplexity(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 128,
    field: str = "text",
    progress: bool = False,
) -> Measurement:
    """Perplexity ``exp( sum_t -log p(x_t | x_<t) / N )`` of a causal LM over ``data``.

    ``data``: texts (a list, a ``.txt`` / ``.jsonl`` path, a dataset; tokenized with
    ``tokenizer``, truncated to ``max_length``) or tokenized batches. Every token with a
    valid predecessor counts (``mask[t] = mask[t-1] = 1``); padding never does. The sum
    is kept in float64; ``nll`` is the mean negative log-likelihood in nats per token.
    """
    from .scoring import BatchInputs, _eval_no_grad

    inputs = BatchInputs(model, model_device(model))
    extra = _forward_kwargs(model)
    batches, total = _texts_and_batches(model, data, tokenizer, batch_size, max_length, field)
    nll_sum, count, examples = 0.0, 0, 0
    with _eval_no_grad(model):
        for b in _tqdm(batches, total=total, desc="perplexity", progress=progress):
            kw = inputs(b)
            ids, mask = kw["input_ids"], kw["attention_mask"]
            logits = _logits(model, kw, extra)[:, :-1].float()
            target = ids[:, 1:]
            valid = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll_sum += float(nll[valid].double().sum())
            count += int(valid.sum())
            examples += ids.shape[0]
    if count == 0:
        raise ValueError("perplexity: no token to predict (every text is shorter than 2 tokens)")
    if not math.isfinite(nll_sum):
        raise ValueError(f"perplexity: the model's log-probabilities are not finite ({type(model).__name__} in "
                         f"{next(model.parameters()).dtype}: a float16 overflow?); evaluate in float32 or bfloat16")
    mean = nll_sum / count
    return Measurement("perplexity", "perplexity", math.exp(mean), examples, tokens=count, nll=mean)


# ---------------------------------------------------------------------------- records


def _load_records(data: Any) -> list[tuple[str, dict]]:
    """A JSONL path or a list of dicts, as ``(where, record)`` pairs: ``where`` names the
    file and line (``"evals.jsonl: line 3"``) or the list index (``"record 0"``) for errors."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {os.fspath(data)!r}")
        from .data import read_jsonl

        records = [(f"{path}: line {lineno}", obj) for lineno, obj in read_jsonl(path)]
    elif isinstance(data, Sequence) and data and all(isinstance(r, Mapping) for r in data):
        records = [(f"record {i}", dict(r)) for i, r in enumerate(data)]
    else:
        raise ValueError("expected a .jsonl path or a list of dicts")
    if not records:
        raise ValueError(f"no records in {data!r}")
    return records


def _first_record(data: Any) -> Mapping | None:
    """The first JSON object of a ``.jsonl`` path / list of dicts, else None (plain text)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix.lower() != ".jsonl" or not path.is_file():
            return None
        from .data import _utf8

        with _utf8(path), path.open(encoding="utf-8-sig") as fh:
            for line in fh:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        return None
                    return obj if isinstance(obj, dict) else None
        return None
    if isinstance(data, Sequence) and data and isinstance(data[0], Mapping):
        return data[0]
    return None


def _answer_index(answer: Any, choices: list[str], where: str) -> int:
    """An answer given as an index, the text of a choice, or a letter A, B, ..."""
    if isinstance(answer, bool):
        raise ValueError(f"{where}: answer must be an index, a choice or a letter, got {answer!r}")
    if isinstance(answer, int):
        idx = answer
    elif isinstance(answer, str) and answer in choices:
        idx = choices.index(answer)
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        idx = ord(answer.strip().upper()) - ord("A")
    else:
        raise ValueError(f"{where}: answer {answer!r} is neither an index, one of the choices, nor a letter")
    if not 0 <= idx < len(choices):
        raise ValueError(f"{where}: answer {answer!r} is out of range for {len(choices)} choices")
    return idx


def _check_choice_record(rec: Mapping, where: str) -> tuple[str, list[str], int]:
    q, choices = rec.get("question"), rec.get("choices")
    if not isinstance(q, str):
        raise ValueError(f"{where}: 'question' must be a string; keys present: {sorted(rec)}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if "answer" not in rec:
        raise ValueError(f"{where}: no 'answer'; keys present: {sorted(rec)}")
    return q, choices, _answer_index(rec["answer"], choices, where)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _choice_rows(question: str, choices: list[str], tokenizer, sep: str, max_length: int | None):
    """(token ids, number of continuation tokens) for each choice: the tokens of
    ``question + sep + choice`` after the longest prefix shared with the question's."""
    ctx = _encode(tokenizer, question)
    rows = []
    for choice in choices:
        full = _encode(tokenizer, question + sep + choice)
        shared = 0
        while shared < min(len(ctx), len(full)) and ctx[shared] == full[shared]:
            shared += 1
        n_cont = len(full) - shared
        if max_length is not None and len(full) > max_length:
            full = full[-max_length:]  # keep the end: the continuation is what is scored
        n_cont = min(n_cont, len(full) - 1)  # the first token has no prediction
        if n_cont < 1:
            raise ValueError(f"choice {choice!r} of question {question[:40]!r} has no token to score")
        rows.append((full, n_cont))
    return rows


def _score_rows(model, rows, pad_id: int, extra) -> list[float]:
    """Summed log-likelihood of the last ``n`` tokens of each row (one right-padded batch)."""
    device = model_device(model)
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (r, _) in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logp = torch.log_softmax(_logits(model, {"input_ids": ids, "attention_mask": mask}, extra)[:, :-1].float(), dim=-1)
    token_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]: log p(x_{t+1} | x_<=t)
    return [float(token_lp[j, len(r) - 1 - n : len(r) - 1].double().sum()) for j, (r, n) in enumerate(rows)]


def choice_scores(
    model: nn.Module,
    data: Any,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    sep: str = " ",
    progress: bool = False,
) -> tuple[list[list[float]], list[int]]:
    """Per question, ``sum_j log p(c_j | question + sep, c_<j)`` for each choice ``c``, and
    the answer indices. ``data``: a ``.jsonl`` path or a list of dicts with ``question``,
    ``choices`` (a list of strings) and ``answer`` (an index, the choice's text, or a
    letter ``A``, ``B``, ...)."""
    from .data import _pad_id
    from .models import fit_max_length
    from .scoring import _eval_no_grad

    max_length = fit_max_length(model, max_length)
    records = [_check_choice_record(r, where) for where, r in _load_records(data)]
    rows, owner = [], []
    for qi, (q, choices, _) in enumerate(records):
        for row in _choice_rows(q, choices, tokenizer, sep, max_length):
            rows.append(row)
            owner.append(qi)
    extra = _forward_kwargs(model)
    flat: list[float] = []
    with _eval_no_grad(model):
        starts = range(0, len(rows), batch_size)
        for start in _tqdm(starts, total=len(starts), desc="choices", progress=progress):
            flat += _score_rows(model, rows[start : start + batch_size], _pad_id(tokenizer), extra)
    scores: list[list[float]] = [[] for _ in records]
    for qi, s in zip(owner, flat):
        scores[qi].append(s)
    return scores, [a for _, _, a in records]


def choice_accuracy(model: nn.Module, data: Any, tokenizer: Any, **kw) -> Measurement:
    """Multiple-choice accuracy: the predicted choice is ``argmax_c sum_j log p(c_j | ...)``
    (see :func:`choice_scores`; ties go to the first choice)."""
    scores, answers = choice_scores(model, data, tokenizer, **kw)
    correct = sum(int(max(range(len(s)), key=lambda c: (s[c], -c)) == a) for s, a in zip(scores, answers))
    return Measurement("multiple_choice", "accuracy", correct / len(answers), len(answers))


def _label_index(label: Any, model: nn.Module, where: str) -> int:
    cfg = getattr(model, "config", None)
    if isinstance(label, bool):
        raise ValueError(f"{where}: label must be an int or a label name, got {label!r}")
    if isinstance(label, int):
        return label
    label2id = getattr(cfg, "label2id", None) or {}
    if isinstance(label, str) and label in label2id:
        return int(label2id[label])
    raise ValueError(f"{where}: label {label!r} is not an int nor one of {sorted(label2id)}")


def classification_accuracy(
    model: nn.Module,
    data: Any,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int | None = 128,
    field: str = "text",
    progress: bool = False,
) -> Measurement:
    """Accuracy ``mean_i [argmax logits(text_i) == label_i]`` of a sequence classifier on a
    ``.jsonl`` path / list of dicts with ``text`` (``field``) and ``label`` (an int or a
    name in ``config.label2id``)."""
    from .scoring import BatchInputs, _eval_no_grad

    records = _load_records(data)
    texts, labels = [], []
    for where, rec in records:
        if not isinstance(rec.get(field), str) or "label" not in rec:
            raise ValueError(f"{where}: needs a string {field!r} and a 'label'; keys present: {sorted(rec)}")
        texts.append(rec[field])
        labels.append(_label_index(rec["label"], model, where))
    inputs = BatchInputs(model, model_device(model))
    extra = _forward_kwargs(model)
    batches, total = _texts_and_batches(model, texts, tokenizer, batch_size, max_length, field)
    preds: list[int] = []
    with _eval_no_grad(model):
        for b in _tqdm(batches, total=total, desc="classification", progress=progress):
            logits = _logits(model, inputs(b), extra)
            preds += logits.argmax(-1).tolist()
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    return Measurement("classification", "accuracy", correct / len(labels), len(labels))


def sentence_embeddings(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 128,
    field: str = "text",
    progress: bool = False,
) -> Measurement:
    """Mean-pooled last hidden states ``e_i = sum_t m_it h_it / sum_t m_it`` (float32, CPU),
    one row per text, in ``Measurement.embeddings`` [N, D]."""
    from .scoring import BatchInputs, _eval_no_grad

    inputs = BatchInputs(model, model_device(model))
    extra = _forward_kwargs(model)
    batches, total = _texts_and_batches(model, data, tokenizer, batch_size, max_length, field)
    rows, tokens = [], 0
    with _eval_no_grad(model):
        for b in _tqdm(batches, total=total, desc="embeddings", progress=progress):
            kw = inputs(b)
            mask = kw["attention_mask"]
            out = model(**kw, output_hidden_states=True, **extra)
            h = getattr(out, "last_hidden_state", None)
            if h is None:
                h = out.hidden_states[-1]
            m = mask.to(torch.float32)[..., None]
            rows.append(((h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu())
            tokens += int(mask.sum())
    emb = torch.cat(rows)
    return Measurement("embedding", "embeddings", math.nan, emb.shape[0], tokens=tokens, embeddings=emb)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing the mean of their ranks."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    new = torch.ones_like(xs, dtype=torch.bool)
    new[1:] = xs[1:] != xs[:-1]
    group = torch.cumsum(new.long(), 0) - 1
    pos = torch.arange(1, len(x) + 1, dtype=torch.float64)
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, pos)
    mean_rank = sums / torch.bincount(group).to(torch.float64)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (ties get
    the mean of their ranks). NaN when fewer than 2 values or a constant input."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"spearman: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if len(x) < 2:
        return math.nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else math.nan


def _pairwise_cosines(e: torch.Tensor) -> torch.Tensor:
    """``cos(e_i, e_j)`` for ``i < j`` (row-major), float64."""
    e = torch.nn.functional.normalize(e.double(), dim=-1)
    sim = e @ e.T
    i, j = torch.triu_indices(len(e), len(e), offset=1)
    return sim[i, j]


# ----------------------------------------------------------------------- measure / retention


def _detect_task(model: nn.Module, data: Any) -> str:
    first = _first_record(data)
    kind = _model_kind(model)
    if first is not None and "question" in first and "choices" in first:
        return "multiple_choice"
    if kind == "classification":
        return "classification"
    if kind == "causal":
        return "perplexity"
    return "embedding"


def measure(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    task: str = "auto",
    batch_size: int = 8,
    max_length: int | None = 128,
    field: str = "text",
    progress: bool = False,
) -> Measurement:
    """Evaluate one model. ``task="auto"`` picks: ``multiple_choice`` for records with
    ``question`` and ``choices``; ``classification`` for a ``...ForSequenceClassification``
    model; ``perplexity`` for a causal LM; ``embedding`` otherwise (encoders, base models)."""
    if task == "auto":
        task = _detect_task(model, data)
    kw = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    if task == "perplexity":
        return perplexity(model, data, tokenizer, field=field, **kw)
    if task == "multiple_choice":
        return choice_accuracy(model, data, tokenizer, **kw)
    if task == "classification":
        return classification_accuracy(model, data, tokenizer, field=field, **kw)
    if task == "embedding":
        return sentence_embeddings(model, data, tokenizer, field=field, **kw)
    raise ValueError(f"unknown task {task!r}; choose auto or one of {', '.join(TASKS)}")


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and math.isfinite(den) else math.nan


def _compare(o: Measurement, p: Measurement) -> Retention:
    if o.task != p.task:
        raise ValueError(f"cannot compare a {o.task} measurement with a {p.task} one")
    if o.examples != p.examples:
        raise ValueError(f"the measurements cover different data ({o.examples} vs {p.examples} examples)")
    if o.task == "perplexity":
        return Retention(o.task, "perplexity", o.value, p.value, _ratio(o.value, p.value), o.examples,
                         details={"nll_original": o.nll, "nll_pruned": p.nll, "tokens": o.tokens})
    if o.task == "embedding":
        cos = torch.nn.functional.cosine_similarity(o.embeddings.double(), p.embeddings.double(), dim=-1)
        mean_cos = float(cos.mean())
        rho = spearman(_pairwise_cosines(o.embeddings), _pairwise_cosines(p.embeddings))
        return Retention(o.task, "mean_cosine", 1.0, mean_cos, mean_cos, o.examples,
                         details={"spearman": rho, "min_cosine": float(cos.min()), "tokens": o.tokens})
    return Retention(o.task, "accuracy", o.value, p.value, _ratio(p.value, o.value), o.examples)


def evaluate_retention(
    original: nn.Module | Measurement,
    pruned: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    task: str = "auto",
    batch_size: int = 8,
    max_length: int | None = 128,
    field: str = "text",
    progress: bool = False,
) -> Retention:
    """Quality of ``pruned`` relative to ``original`` on ``data`` (formulas in the module
    docstring). ``original`` may be a :class:`Measurement` from :func:`measure` on the same
    data, so that comparing several pruned models evaluates the original once. The task is
    detected from ``pruned`` and ``data`` unless given (``perplexity``, ``multiple_choice``,
    ``classification``, ``embedding``)."""
    if task == "auto":
        task = original.task if isinstance(original, Measurement) else _detect_task(pruned, data)
    kw = dict(task=task, batch_size=batch_size, max_length=max_length, field=field, progress=progress)
    base = original if isinstance(original, Measurement) else measure(original, data, tokenizer, **kw)
    return _compare(base, measure(pruned, data, tokenizer, **kw))

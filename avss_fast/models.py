"""Where a model keeps its transformer blocks, and how to read their hidden states.

This module knows the layouts of the common Hugging Face model families: the
dotted attribute path from the model object to the ``nn.ModuleList`` of
transformer blocks (decoder layers / encoder layers), for both the task model
(``LlamaForCausalLM``: ``model.layers``) and the bare base model
(``LlamaModel``: ``layers``).  It also pulls the residual-stream hidden state
out of a block's forward arguments and return value, so callers can hook any
block without knowing its signature.

Only ``torch`` is imported; ``transformers`` is never needed here, a model is
inspected by duck typing (``model.config.model_type`` and attributes).

Layouts were checked against transformers 5.24 (where every block listed
returns a bare tensor, and takes the hidden state as its first positional
argument, named ``hidden_states``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "LAYER_PATHS",
    "GENERIC_LAYER_PATHS",
    "ENCODER_MODEL_TYPES",
    "UnknownLayoutError",
    "resolve_module",
    "find_layers",
    "block_hidden_from_output",
    "block_hidden_from_input",
    "model_device",
    "is_encoder",
]

# Decoder-only families whose task model wraps the base model as ``.model``
# and whose base model keeps its blocks in ``.layers``.
_LLAMA_LIKE = ("model.layers", "layers")
# BERT-style encoders: ``XModel.encoder.layer``; task models wrap the base
# model under the prefix named after the family.
_BERT_LIKE = ("bert.encoder.layer", "encoder.layer")
_ROBERTA_LIKE = ("roberta.encoder.layer", "encoder.layer")

#: ``config.model_type`` -> dotted paths (tried in order) from the model to the
#: ``nn.ModuleList`` of transformer blocks.  Each tuple lists the task-model
#: path first (``LlamaForCausalLM``, ``BertForMaskedLM``, ...) and the bare
#: base-model path second (``LlamaModel``, ``BertModel``, ...).
LAYER_PATHS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,  # Gemma3ForCausalLM / Gemma3TextModel
    # Multimodal Gemma 3: Gemma3ForConditionalGeneration / Gemma3Model; the
    # text blocks sit in the language model (the vision tower has its own).
    "gemma3": ("model.language_model.layers", "language_model.layers"),
    "phi3": _LLAMA_LIKE,
    "gpt2": ("transformer.h", "h"),  # GPT2LMHeadModel / GPT2Model
    "gpt_neox": ("gpt_neox.layers", "layers"),  # GPTNeoXForCausalLM / GPTNeoXModel
    "opt": ("model.decoder.layers", "decoder.layers"),  # OPTForCausalLM / OPTModel
    "bert": _BERT_LIKE,  # BertForMaskedLM, BertFor...Classification / BertModel
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,  # XLMRoberta* also name their base model `roberta`
    # DistilBertFor... / DistilBertModel
    "distilbert": ("distilbert.transformer.layer", "transformer.layer"),
}


def _dedupe(paths) -> tuple[str, ...]:
    """Return ``paths`` without repeats, first occurrence kept."""
    return tuple(dict.fromkeys(paths))


#: Every known path, tried in order when the model type is unknown (or its
#: listed paths do not fit the model).  Deeper (task-model) paths come first.
GENERIC_LAYER_PATHS: tuple[str, ...] = _dedupe(
    sorted(
        (p for paths in LAYER_PATHS.values() for p in paths),
        key=lambda p: -p.count("."),
    )
)

#: Model types treated as (bidirectional) encoders by :func:`is_encoder`.
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "distilbert",
        "roberta",
        "xlm-roberta",
        "camembert",
        "electra",
        "albert",
        "deberta",
        "deberta-v2",
        "mpnet",
        "modernbert",
    }
)


class UnknownLayoutError(ValueError):
    """No ``nn.ModuleList`` of transformer blocks was found in a model.

    Raised by :func:`find_layers` when neither the paths registered for the
    model's ``model_type`` nor the generic fallback paths lead to a non-empty
    ``nn.ModuleList``.  The message names the model class and ``model_type``,
    lists the paths tried and says how to pass an explicit ``layers_path``.
    """

    def __init__(self, model: nn.Module, tried: Sequence[str]):
        self.model_class = type(model).__name__
        self.model_type = _model_type(model)
        self.tried = tuple(tried)
        candidates = _module_lists(model)
        hint = ""
        if candidates:
            shown = ", ".join(f"{name!r} ({n} modules)" for name, n in candidates[:8])
            hint = f" ModuleLists found in the model: {shown}."
        super().__init__(
            f"cannot find the transformer blocks of {self.model_class} "
            f"(model_type={self.model_type!r}); tried paths: "
            f"{', '.join(repr(p) for p in self.tried) or '(none)'}.{hint} "
            f'Pass layers_path="dotted.path.to.ModuleList" (e.g. layers_path="model.layers") '
            f"to say where the blocks are."
        )


def _model_type(model) -> str | None:
    """``model.config.model_type``, or ``None`` when the model has no HF config."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _module_lists(model: nn.Module) -> list[tuple[str, int]]:
    """Names and lengths of the non-empty ``nn.ModuleList`` submodules, longest first."""
    found = [
        (name, len(mod))
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name
    ]
    found.sort(key=lambda item: -item[1])
    return found


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Follow the dotted ``path`` from ``model`` and return the module there.

    Each component is an attribute name; an integer component (``"3"``,
    ``"-1"``) indexes into an ``nn.ModuleList`` / ``nn.Sequential``.  The empty
    path returns ``model`` itself.

    Raises:
        AttributeError: a component does not exist; the message names the
            missing attribute, the object it was looked up on, and the path.
        IndexError: an integer component is out of range.
        TypeError: the path leads to something that is not an ``nn.Module``.
    """
    if not isinstance(path, str):
        raise TypeError(f"path must be a dotted string, got {type(path).__name__}")
    obj = model
    if path == "":
        parts: list[str] = []
    else:
        parts = path.split(".")
    walked: list[str] = []
    for part in parts:
        if part == "":
            raise AttributeError(f"empty component in module path {path!r}")
        here = ".".join(walked) or "<model>"
        if _is_int(part) and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            idx = int(part)
            try:
                obj = obj[idx]
            except IndexError:
                raise IndexError(
                    f"index {idx} out of range for {type(obj).__name__} of length {len(obj)} "
                    f"at {here!r} (while resolving {path!r})"
                ) from None
        else:
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise AttributeError(
                    f"{type(obj).__name__} at {here!r} has no attribute {part!r} "
                    f"(while resolving {path!r} on {type(model).__name__})"
                ) from None
        walked.append(part)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{path!r} on {type(model).__name__} is a {type(obj).__name__}, not an nn.Module")
    return obj


def _is_int(text: str) -> bool:
    """Whether ``text`` spells an integer (optionally negative)."""
    return text.lstrip("-").isdigit() and text.count("-") <= 1 and not text.endswith("-")


def find_layers(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Locate the transformer blocks of ``model``.

    With ``layers_path`` the path is resolved (see :func:`resolve_module`) and
    must lead to a non-empty ``nn.ModuleList``.  Without it the paths
    registered in :data:`LAYER_PATHS` for ``model.config.model_type`` are tried,
    then every path in :data:`GENERIC_LAYER_PATHS`; the first that resolves
    to a non-empty ``nn.ModuleList`` wins.

    Returns:
        ``(path, module_list)``.

    Raises:
        ValueError: ``layers_path`` does not resolve, or resolves to something
            other than a non-empty ``nn.ModuleList`` (the message says what), or the
            list holds one module at two positions (a shared block).
        UnknownLayoutError: no path was given and none of the known ones fit.
    """
    if layers_path is not None:
        try:
            found = resolve_module(model, layers_path)
        except (AttributeError, IndexError, TypeError) as exc:
            raise ValueError(f"layers_path={layers_path!r} does not resolve: {exc}") from exc
        if not isinstance(found, nn.ModuleList):
            raise ValueError(
                f"layers_path={layers_path!r} on {type(model).__name__} resolves to a "
                f"{type(found).__name__}, not an nn.ModuleList of transformer blocks"
            )
        if len(found) == 0:
            raise ValueError(f"layers_path={layers_path!r} on {type(model).__name__} is an empty nn.ModuleList")
        return layers_path, _distinct_blocks(model, layers_path, found)

    model_type = _model_type(model)
    candidates = _dedupe(tuple(LAYER_PATHS.get(model_type, ())) + GENERIC_LAYER_PATHS)
    for path in candidates:
        try:
            found = resolve_module(model, path)
        except (AttributeError, IndexError, TypeError):
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, _distinct_blocks(model, path, found)
    raise UnknownLayoutError(model, candidates)


def _distinct_blocks(model: nn.Module, path: str, blocks: nn.ModuleList) -> nn.ModuleList:
    """``blocks``, refused when one module object stands at two positions (a weight-shared
    block applied twice): hooks on it fire for both uses, so no per-layer statistic, gate
    or pruning can tell the layers apart."""
    first: dict[int, int] = {}
    for i, block in enumerate(blocks):
        j = first.setdefault(id(block), i)
        if j != i:
            raise ValueError(
                f"{type(model).__name__}.{path}[{j}] and [{i}] are the same module (a shared block applied "
                "twice): per-layer scores, head gates and pruning need one module per layer"
            )
    return blocks


def count_block_call(counts: list[int] | None, i: int, block: nn.Module) -> None:
    """Count a call of block ``i`` in the model call under way (``counts``: zeros from the
    model's pre-hook, None outside a call of the model, e.g. a submodule called directly).
    A second call is a block shared across depths (ALBERT's one block for 12 layers):
    ValueError, since no per-layer statistic or head gate can tell its uses apart."""
    if counts is None:
        return
    counts[i] += 1
    if counts[i] == 2:
        raise ValueError(
            f"block {i} ({type(block).__name__}) ran twice in one forward: it is shared across depths "
            "(ALBERT-style), so per-layer statistics and head gates cannot tell its uses apart"
        )


def block_hidden_from_output(output) -> torch.Tensor:
    """The hidden-state tensor in what a transformer block's ``forward`` returned.

    Accepts a bare tensor (every family in :data:`LAYER_PATHS` under
    transformers 5.x), a tuple / list whose first element is the tensor (older
    transformers: ``(hidden_states, attn_weights, ...)``), or a mapping such as
    a ``ModelOutput``: its ``last_hidden_state``, else a tensor
    ``hidden_states``, else its first field.

    Raises:
        TypeError: no tensor could be found; the message names the type seen.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "hidden_states"):
            value = output.get(key)
            if isinstance(value, torch.Tensor):
                return value
        for value in output.values():  # ModelOutput: the first non-None field
            if isinstance(value, torch.Tensor):
                return value
            break
        raise TypeError(
            f"block returned a {type(output).__name__} without a tensor 'last_hidden_state', "
            f"'hidden_states' or first field (keys: {list(output.keys())})"
        )
    if isinstance(output, (tuple, list)):
        if output and isinstance(output[0], torch.Tensor):
            return output[0]
        first = type(output[0]).__name__ if output else "nothing (empty)"
        raise TypeError(
            f"block returned a {type(output).__name__} whose first element is {first}, "
            f"expected the hidden-state tensor"
        )
    raise TypeError(
        f"cannot find the hidden states in a block output of type {type(output).__name__}; "
        f"expected a tensor, a tuple/list starting with one, or a ModelOutput"
    )


#: Keyword names under which blocks receive their input hidden state.  All
#: families in :data:`LAYER_PATHS` use ``hidden_states`` in transformers 5.x
#: (and are called with it positionally); older DistilBERT blocks used ``x``.
_INPUT_KWARGS = ("hidden_states", "x", "hidden_state", "input", "inputs")


def block_hidden_from_input(args, kwargs) -> torch.Tensor:
    """The input hidden state of a block, from a forward pre-hook's arguments.

    For a hook registered with ``register_forward_pre_hook(hook,
    with_kwargs=True)`` (``kwargs`` may be ``None`` for a hook without
    kwargs): ``args[0]`` when it is a tensor, else the first tensor among
    ``kwargs["hidden_states"]``, ``kwargs["x"]`` (DistilBERT before
    transformers 5), ``kwargs["hidden_state"]``, ``kwargs["input"]``,
    ``kwargs["inputs"]``.

    Raises:
        TypeError: none of those is a tensor.
    """
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    kwargs = kwargs or {}
    for key in _INPUT_KWARGS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value
    first = type(args[0]).__name__ if args else "no positional arguments"
    raise TypeError(
        f"cannot find the block's input hidden state: first positional argument is {first}, "
        f"keyword arguments are {sorted(kwargs)}; expected a tensor as args[0] or one of "
        f"{', '.join(_INPUT_KWARGS)}"
    )


_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions", "positions_embed")


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence a model with a learned absolute position table can take, or
    None for rotary/relative positions, which have no hard limit.

    ``min(config.max_position_embeddings, rows usable in the table)`` (BERT, GPT-2,
    OpenAI-GPT, OPT ...; longer inputs fail inside the model), where the usable rows are
    ``num_embeddings - offset`` (OPT/BART tables start ``offset`` rows in) less
    ``padding_idx + 1`` when the table has a padding index (RoBERTa counts positions from
    there)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            rows = m.num_embeddings - int(getattr(m, "offset", 0) or 0)
            if m.padding_idx is not None:
                rows -= m.padding_idx + 1
            return max(1, min(n, rows))
    return None


def fit_max_length(model: nn.Module, max_length: int | None) -> int | None:
    """``max_length`` capped at :func:`position_limit` (with a warning when it is cut), so
    that texts are truncated to what the model can take instead of failing in its forward."""
    import warnings

    limit = position_limit(model)
    if limit is None or (max_length is not None and max_length <= limit):
        return max_length
    if max_length is not None:
        warnings.warn(f"max_length={max_length} is more than the {limit} positions of this model's position "
                      f"embeddings: texts are truncated to {limit} tokens", UserWarning, stacklevel=3)
    return limit


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's input embeddings (where input ids must go).

    Uses ``model.get_input_embeddings()`` when available, else the first
    parameter, else the first buffer; a model with neither is taken to be on
    the CPU.
    """
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            for tensor in emb.parameters():
                return tensor.device
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def is_encoder(model: nn.Module) -> bool:
    """Whether ``model`` is a bidirectional encoder (BERT, DistilBERT, RoBERTa, ...).

    True when ``config.model_type`` is in :data:`ENCODER_MODEL_TYPES` and the
    config is not set up as a decoder (``config.is_decoder`` false, as it is
    for e.g. ``BertLMHeadModel``).  Encoders have no next-token perplexity;
    callers use embedding-style statistics for them instead.
    """
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "is_decoder", False):
        return False
    return getattr(config, "model_type", None) in ENCODER_MODEL_TYPES


#: Where a block keeps the linear map that mixes the heads' outputs (its input is the
#: concatenation of every head's output, head h at columns h*D:(h+1)*D).
ATTENTION_OUTPUT_PATHS = (
    "self_attn.o_proj",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3
    "self_attn.out_proj",  # OPT
    "attn.c_proj",  # GPT-2
    "attention.dense",  # GPT-NeoX
    "attention.output.dense",  # BERT, RoBERTa
    "attention.out_lin",  # DistilBERT
    "self_attn.dense",  # Phi
    "attn.out_proj",  # GPT-J, CodeGen
    "attn.Wo",  # ModernBERT
    "self_attention.dense",  # Falcon, Bloom
)


def attention_output_projection(block: nn.Module) -> nn.Module:
    """The attention output projection of one block (see :data:`ATTENTION_OUTPUT_PATHS`)."""
    for path in ATTENTION_OUTPUT_PATHS:
        try:
            return resolve_module(block, path)
        except (AttributeError, ValueError, KeyError, IndexError):
            continue
    raise ValueError(
        f"cannot find the attention output projection of {type(block).__name__} "
        f"(tried {', '.join(ATTENTION_OUTPUT_PATHS)})"
    )

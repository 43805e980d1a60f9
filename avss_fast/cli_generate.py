"""``avss-fast generate``: generate text with and without a head intervention, side by side.

With no ``--model`` it runs the shipped demo language model on a held-out prompt. Heads
come from ``--heads 3:5,4:1`` (``4:*`` = every head of layer 4) or ``--heads-from FILE``
(JSON: ``{"hal_heads": [[layer, head], ...]}`` as ``avss-fast heads`` writes it, or a plain
list of pairs). Modes: ``gate`` (head output x ``--scale``, default 0 = ablation),
``reweight`` (segment probabilities x ``--scale``, default 0.5, every query row) and
``adaptive`` (ADHH: in the last query row, when the head's mass on the segment is >=
``--threshold``, that segment's probabilities x ``--scale``, default 0).

Segments are token positions of the prompt: ``--segment-starts 0,12`` makes tokens 12..
(and every generated token) segment 1. By default segment 1 starts where generation
starts, so ``reweight``/``adaptive`` act on the attention paid to the generated text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli import CLIError, load_model, parse_segment_starts


def parse_heads(spec: str, num_layers: int, num_heads: int) -> list[tuple[int, int]]:
    """``"3:5,4:1,6:*"`` -> [(3, 5), (4, 1), (6, 0), ..., (6, H-1)] (checked against the model)."""
    pairs: list[tuple[int, int]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        layer_s, sep, head_s = item.partition(":")
        try:
            layer = int(layer_s)
            heads = range(num_heads) if head_s.strip() == "*" else [int(head_s)]
        except ValueError:
            raise CLIError(f"--heads: {item!r} is not LAYER:HEAD (e.g. 3:5, or 3:* for every head)") from None
        if not sep:
            raise CLIError(f"--heads: {item!r} is not LAYER:HEAD (e.g. 3:5, or 3:* for every head)")
        if not 0 <= layer < num_layers:
            raise CLIError(f"--heads: layer {layer} is out of range (the model has {num_layers} layers)")
        for h in heads:
            if not 0 <= h < num_heads:
                raise CLIError(f"--heads: head {h} is out of range (the model has {num_heads} query heads)")
            pairs.append((layer, h))
    if not pairs:
        raise CLIError("--heads: no heads given")
    return list(dict.fromkeys(pairs))


def read_heads_file(path: str) -> list[tuple[int, int]]:
    """Heads from a JSON file: ``{"hal_heads": [[l, h], ...], ...}`` or ``[[l, h], ...]``."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--heads-from {path!r}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise CLIError(f"--heads-from {path!r}: not JSON ({e})") from e
    if isinstance(data, dict):
        if "hal_heads" not in data:
            raise CLIError(f"--heads-from {path!r}: expected a 'hal_heads' list, found keys {sorted(data)}")
        data = data["hal_heads"]
    try:
        return [(int(layer), int(head)) for layer, head in data]
    except (TypeError, ValueError):
        raise CLIError(f"--heads-from {path!r}: expected a list of [layer, head] pairs") from None


def _intervention(args, pairs, starts):
    from .heads import AdaptiveRule, HeadIntervention

    segment = len(starts) - 1 if args.segment is None else args.segment
    if not 0 <= segment < len(starts):
        raise CLIError(f"--segment {segment} is out of range for segment starts {starts}")
    if args.mode == "gate":
        scale = 0.0 if args.scale is None else args.scale
        return HeadIntervention(gates={p: scale for p in pairs}), f"gate x {scale:g}"
    if args.mode == "reweight":
        scale = 0.5 if args.scale is None else args.scale
        return (HeadIntervention(reweight={p: {segment: scale} for p in pairs}, segment_starts=starts),
                f"reweight segment {segment} x {scale:g} on every query row")
    scale = 0.0 if args.scale is None else args.scale
    if not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold {args.threshold:g}: a head's mass on the segment is in [0, 1], so the rule "
                       "would always or never fire; give a value in [0, 1]")
    rule = AdaptiveRule(heads=pairs, segment=segment, threshold=args.threshold, scale=scale, rows="last")
    return (HeadIntervention(adaptive=rule, segment_starts=starts),
            f"adaptive: last row's mass on segment {segment} >= {args.threshold:g} -> x {scale:g}")


def default_prompt(prompts: list[str]) -> str:
    """The first shipped prompt line that reads as a sentence (not a title or stage direction)."""
    return next(p for p in prompts if len(p) >= 40 and not p.startswith(("[", "by ")))


def cmd_generate(args) -> int:
    import torch

    from .demo import demo_model_path, demo_texts
    from .heads import HeadIntervention, _num_query_heads, intervene
    from .models import find_layers

    if args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be >= 1")
    model_path = args.model or demo_model_path()
    prompt = args.prompt if args.prompt is not None else default_prompt(demo_texts("prompts"))
    if not prompt.strip():
        raise CLIError("--prompt is empty")
    model, tok = load_model(model_path, device=args.device, dtype=args.dtype)
    if "CausalLM" not in type(model).__name__:
        raise CLIError(f"{model_path}: generate needs a causal language model, got {type(model).__name__}")
    _, blocks = find_layers(model)
    num_layers, num_heads = len(blocks), _num_query_heads(model)
    if args.heads and args.heads_from:
        raise CLIError("give --heads or --heads-from, not both")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError("--top-k must be >= 1")
    if args.heads_from:
        pairs = read_heads_file(args.heads_from)
        if args.top_k:
            pairs = pairs[: args.top_k]
        if not pairs:
            raise CLIError(f"--heads-from {args.heads_from!r}: the file names no heads "
                           "(an empty hal_heads list: no head scored above 0?)")
        for layer, head in pairs:  # a file from another model: say which file and which head
            if not (0 <= layer < num_layers and 0 <= head < num_heads):
                raise CLIError(f"--heads-from {args.heads_from!r}: head ({layer}, {head}) is out of range for "
                               f"this model's {num_layers} layers x {num_heads} heads (a file from another model?)")
    elif args.heads:
        pairs = parse_heads(args.heads, num_layers, num_heads)
    else:
        pairs = [(num_layers // 2, h) for h in range(num_heads)]
        print(f"no --heads given: using every head of the middle layer ({num_layers // 2}:*)", file=sys.stderr)
    enc = tok(prompt, return_tensors="pt").to(model.device)
    n_prompt = enc["input_ids"].shape[1]
    starts = [0, n_prompt] if args.segment_starts is None else parse_segment_starts(args.segment_starts)
    if args.mode != "gate" and starts[-1] >= n_prompt + args.max_new_tokens:
        raise CLIError(f"--segment-starts: segment {len(starts) - 1} starts at token {starts[-1]}, past the "
                       f"{n_prompt} prompt + {args.max_new_tokens} generated tokens: it would be empty")
    iv, what = _intervention(args, pairs, starts)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    with torch.no_grad():
        with intervene(model, HeadIntervention()):  # the same attention code, nothing changed
            plain = model.generate(**enc, **kw)[0, n_prompt:]
        try:
            with intervene(model, iv) as run:
                changed = model.generate(**enc, **kw)[0, n_prompt:]
        except ValueError as e:
            raise CLIError(str(e)) from e
    texts = {name: tok.decode(ids, skip_special_tokens=True) for name, ids in (("plain", plain), ("intervened", changed))}
    n = min(len(plain), len(changed))
    same = (plain[:n] == changed[:n]).tolist()
    first_diff = same.index(False) if False in same else (None if len(plain) == len(changed) else n)
    result = {
        "model": model_path, "prompt": prompt, "mode": args.mode, "intervention": what,
        "heads": [list(p) for p in pairs], "segment_starts": starts, "prompt_tokens": n_prompt,
        "without": texts["plain"], "with": texts["intervened"], "first_different_token": first_diff,
        "attention_calls": sum(run.calls[layer] for layer in iv.layers()),  # on the intervened layers
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    shown = ", ".join(f"{lay}:{h}" for lay, h in pairs[:12]) + (f" ... ({len(pairs)} heads)" if len(pairs) > 12 else "")
    print(f"model: {model_path}")
    print(f"heads: {shown}")
    print(f"intervention: {what}")
    print(f"segments (token starts): {starts}  (prompt: {n_prompt} tokens)")
    print(f"prompt: {prompt}")
    print("\n--- without intervention ---")
    print(prompt + texts["plain"])
    print("\n--- with intervention ---")
    print(prompt + texts["intervened"])
    print()
    if first_diff is None:
        print(f"the intervention did not change the {len(plain)} generated tokens")
    else:
        print(f"generations differ from generated token {first_diff} on (counting from 0)")
    return 0


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate with and without a head intervention (gate, reweight, ADHH)",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    g.add_argument("--model", help="causal LM directory or hub name (default: the shipped demo LM)")
    g.add_argument("--prompt", help="prompt text (default: a held-out line for the demo model)")
    g.add_argument("--heads", help="LAYER:HEAD list, e.g. 3:5,4:1 or 4:* (default: every head of the middle layer)")
    g.add_argument("--heads-from", help="JSON file with 'hal_heads' (as avss-fast heads writes) or [[l, h], ...]")
    g.add_argument("--top-k", type=int, default=None, help="with --heads-from: use only the first K heads")
    g.add_argument("--mode", choices=("gate", "reweight", "adaptive"), default="gate",
                   help="gate: scale the heads' outputs; reweight: scale their attention to --segment; adaptive: "
                        "reweight only where that attention mass reaches --threshold (ADHH) (default gate)")
    g.add_argument("--segment-starts", help="token positions where segments begin, e.g. 0,12 "
                                            "(default: 0,<prompt length>: segment 1 = generated text)")
    g.add_argument("--segment", type=int, default=None, help="segment the rule acts on (default: the last)")
    g.add_argument("--scale", type=float, default=None,
                   help="factor (default: 0 for gate and adaptive, 0.5 for reweight)")
    g.add_argument("--threshold", type=float, default=0.4, help="adaptive: mass threshold (default 0.4)")
    g.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate, greedily (default 40)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

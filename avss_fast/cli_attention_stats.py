"""``avss-fast attention-stats``: per-head attention statistics (segment mass, entropy, max
logit, attention-sink mass) streamed over a dataset under fast attention, with no attention
map ever materialised. Default: the shipped demo LM on its held-out text.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli import CLIError, load_model, parse_segment_starts


def cmd_attention_stats(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .data import iter_batches, load_texts, num_batches
    from .demo import demo_model_path, demo_texts
    from .head_stats import HeadScorer
    from .models import fit_max_length

    if args.batch_size < 1 or args.max_length < 1:
        raise CLIError("--batch-size and --max-length must be >= 1")
    if args.limit < 0 or args.top < 1:
        raise CLIError(f"--limit must be >= 0 (0 = all texts) and --top >= 1, got {args.limit} and {args.top}")
    model_path = args.model or demo_model_path()
    if args.data and not Path(args.data).is_file():
        raise CLIError(f"--data {args.data!r}: no such file")
    texts = load_texts(args.data, field=args.field) if args.data else demo_texts("heldout")
    if args.limit:
        texts = texts[: args.limit]
    if not texts:
        raise CLIError("no texts to run")
    model, tok = load_model(model_path, device=args.device, dtype=args.dtype)
    starts = None if args.segment_starts is None else parse_segment_starts(args.segment_starts)
    max_length = fit_max_length(model, args.max_length)
    if starts is not None and starts[-1] >= max_length:
        raise CLIError(f"--segment-starts: segment {len(starts) - 1} starts at token {starts[-1]}, but no text is "
                       f"longer than {max_length} tokens (--max-length, or the model's positions): it would be empty")
    try:
        scorer = HeadScorer(model, segment_starts=starts)
    except ValueError as e:
        raise CLIError(str(e)) from e
    batches = iter_batches(texts, tok, batch_size=args.batch_size, max_length=max_length)
    try:
        with torch.inference_mode(), scorer:
            for batch in tqdm(batches, total=num_batches(texts, args.batch_size), desc="attention stats",
                              unit="batch", disable=args.quiet):
                model(**{k: v.to(model.device) for k, v in batch.items()})
    except (ValueError, NotImplementedError) as e:
        raise CLIError(str(e)) from e
    report = scorer.report(model_name=model_path)
    out = Path(args.out)
    json_path = report.to_json(out / "head_stats.json")
    pngs = report.plot(out)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    rows = report.rows[0][0] if report.rows else 0
    print(f"model: {model_path}")
    print(f"layers: {len(report.layers)}   query rows per head: {rows}   segments: {starts or 'none'}")
    for stat in ("sink_mass", "entropy", "max_logit"):
        print(f"\nheads by mean {stat} (highest first)")
        print(report.table(stat, top=args.top))
    if report.num_segments:
        last = report.num_segments - 1
        print(f"\nheads by mean mass on segment {last} (highest first)")
        print(report.table("segment_mass", top=args.top, segment=last))
    print(f"\nwrote {json_path} and {len(pngs)} heatmaps in {out}")
    return 0


def register(sub) -> None:
    a = sub.add_parser("attention-stats", help="per-head attention statistics without attention maps",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    a.add_argument("--model", help="causal LM or encoder directory (default: the shipped demo LM)")
    a.add_argument("--data", help=".txt or .jsonl file (default: the demo LM's held-out passages)")
    a.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    a.add_argument("--segment-starts", help="token positions where segments begin, e.g. 0,16 (for segment mass)")
    a.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    a.add_argument("--max-length", type=int, default=256, help="tokens per text, longer texts truncated (default 256)")
    a.add_argument("--limit", type=int, default=64, help="use at most this many texts (default 64; 0 = all)")
    a.add_argument("--top", type=int, default=8, help="rows of each ranked table (default 8)")
    a.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    a.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    a.add_argument("--out", default="avss_fast_out", help="output directory (head_stats.json + heatmaps)")
    a.add_argument("--json", action="store_true", help="print the JSON report instead of the tables")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_attention_stats, out_kind="dir")

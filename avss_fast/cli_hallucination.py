"""``avss-fast hallucination``: EAVSS layer scores from truthful vs hallucinated answers.

With no arguments it runs the shipped demo language model on the built-in data
(``assets/hallucination_demo.jsonl``: held-out Shakespeare prompts, the text's own
continuation as the truthful answer, a hand-written wrong one as the hallucinated answer).
``--data FILE`` takes a JSONL of ``{"prompt", "truthful", "hallucinated"}`` records.
Statistics are taken over answer tokens only. Prints the layers ranked by EAVSS (most
hallucination-prone first) and writes ``hallucination.json``, ``hallucination.csv`` and
``hallucination.png`` (per-layer hsav, hss, eavss) to ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli import CLIError, load_model

#: Fewer near-zero values than this in a layer's smaller count makes hss a noisy ratio.
FEW_NEAR_ZERO = 30


def cmd_hallucination(args) -> int:
    from .demo import demo_model_path
    from .hallucination import demo_hallucination_path, score_hallucination
    from .report import layers_for_ratio

    if args.batch_size < 1 or args.max_length < 1:
        raise CLIError("--batch-size and --max-length must be >= 1")
    if args.data is not None and not Path(args.data).is_file():
        raise CLIError(f"--data {args.data!r}: no such file")
    model_path = args.model or demo_model_path()
    data = args.data or demo_hallucination_path()
    model, tokenizer = load_model(model_path, device=args.device, dtype=args.dtype)
    try:
        report = score_hallucination(
            model, data, None, tokenizer,
            batch_size=args.batch_size, max_length=args.max_length,
            sparsity_eps=args.sparsity_eps, sparsity_rel=args.sparsity_rel,
            layers_path=args.layers_path, progress=not args.quiet, model_name=model_path,
        )
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise CLIError(str(e)) from e
    out = Path(args.out)
    json_path = report.to_json(out / "hallucination.json")
    csv_path = report.to_csv(out / "hallucination.csv")
    png_path = report.plot(out / "hallucination.png")
    if args.json:
        print(json.dumps(json.loads(json_path.read_text()), indent=2))
        return 0
    rows = report.layers
    print(f"model: {model_path}")
    print(f"data: {data} ({report.num_pairs} prompts, each with a truthful and a hallucinated answer)")
    tok_t = rows[0]["tokens_truthful"] if rows else 0
    tok_h = rows[0]["tokens_hallucinated"] if rows else 0
    print(f"layers: {len(rows)} at {report.layers_path}   answer tokens: {tok_t} truthful, {tok_h} hallucinated")
    thr = f"|h| < {args.sparsity_rel} x token rms" if args.sparsity_rel else f"|h| < {args.sparsity_eps:g}"
    print(f"sparsity threshold: {thr}")
    print("eavss = hsav / hss; hsav = Var(H) / Var(T), hss = max(Sparsity(H), 1/N) / max(Sparsity(T), 1/N) "
          "with N = the smaller element count (this project's definitions)")
    print()
    print(report.table("eavss"))
    print()
    if all(r["near_zero_truthful"] == 0 and r["near_zero_hallucinated"] == 0 for r in rows):
        print("note: no value fell below the sparsity threshold in any layer, so hss = 1 and eavss = hsav; "
              "try --sparsity-rel 0.01 for a scale-free sparsity.")
    elif any(min(r["near_zero_truthful"], r["near_zero_hallucinated"]) < FEW_NEAR_ZERO for r in rows):
        print(f"note: in some layers fewer than {FEW_NEAR_ZERO} values fell below the sparsity threshold, so hss "
              "(and eavss) rest on a handful of values and are noisy; try --sparsity-rel 0.01.")
    top = report.ranking("eavss")[: layers_for_ratio(len(report), 0.25)]
    print(f"most hallucination-prone layers (top 25% by eavss): {top}")
    print(f"wrote {json_path}, {csv_path}, {png_path}")
    return 0


def register(sub) -> None:
    """Add the ``hallucination`` subcommand to an argparse subparsers object."""
    h = sub.add_parser("hallucination", help="EAVSS: layer statistics on truthful vs hallucinated answers",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    h.add_argument("--model", help="model directory or hub name (default: the shipped demo LM)")
    h.add_argument("--data", help="JSONL of {prompt, truthful, hallucinated} records "
                                  "(default: built-in held-out Shakespeare data for the demo LM)")
    h.add_argument("--batch-size", type=int, default=8, help="prompt+answer pairs per forward pass (default 8)")
    h.add_argument("--max-length", type=int, default=256,
                   help="tokens per prompt+answer; prompts are cut from the left (default 256)")
    h.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    h.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    h.add_argument("--layers-path", help="dotted path to the model's ModuleList of blocks, for unknown layouts")
    sp = h.add_mutually_exclusive_group()
    sp.add_argument("--sparsity-eps", type=float, default=1e-5, help="near-zero threshold |h| < eps (default 1e-5)")
    sp.add_argument("--sparsity-rel", type=float, default=None,
                    help="near-zero threshold relative to each token's rms, e.g. 0.01")
    h.add_argument("--out", default="avss_fast_out", help="output directory (default: ./avss_fast_out)")
    h.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    h.set_defaults(func=cmd_hallucination, out_kind="dir")

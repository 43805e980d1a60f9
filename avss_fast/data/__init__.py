"""Calibration data for layer scoring: texts in, padded token batches out.

Scoring needs batches of ``input_ids`` / ``attention_mask``. This module gets them
from whatever the user has at hand:

* :func:`default_corpus` - a small built-in English corpus (``english_corpus.txt``,
  written for this project, Apache-2.0) for quick runs and tests;
* :func:`load_texts` - a list of strings, a ``.txt`` / ``.jsonl`` file, or a
  Hugging Face ``datasets.Dataset``-like object, normalised to ``list[str]``;
* :func:`iter_batches` - texts plus a tokenizer, or already tokenized batches
  (dicts, ``BatchEncoding`` objects, a ``DataLoader`` producing dicts), turned into
  validated ``{"input_ids", "attention_mask", ...}`` dicts;
* :func:`num_batches` - the batch count when it is cheap to know (progress bars).

Nothing here imports ``datasets``: Dataset-like objects are recognised by duck
typing (``column_names`` plus ``obj[field]``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = ["default_corpus", "load_texts", "iter_batches", "num_batches", "SUPPORTED_SUFFIXES"]

#: File extensions :func:`load_texts` understands.
SUPPORTED_SUFFIXES = (".txt", ".jsonl")

_CORPUS_FILE = "english_corpus.txt"

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------- texts


def default_corpus() -> list[str]:
    """Return the built-in English calibration corpus, one sentence per item.

    The sentences come from ``english_corpus.txt`` shipped inside the
    ``avss_fast.data`` package; it is read with :mod:`importlib.resources`, so this
    works from a source checkout, an installed wheel or a zip import alike. Blank
    lines (there should be none) are skipped and every sentence is stripped.
    """
    text = resources.files(__name__).joinpath(_CORPUS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _is_pathlike(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _is_dataset_like(source: Any) -> bool:
    return hasattr(source, "column_names") and hasattr(source, "__getitem__")


def _describe(source: Any) -> str:
    if _is_pathlike(source):
        return f"{os.fspath(source)!r}"
    return type(source).__name__


def _texts_from_txt(path: Path) -> list[str]:
    with _utf8(path), path.open(encoding="utf-8-sig") as fh:
        return [line.strip() for line in fh if line.strip()]


@contextlib.contextmanager
def _utf8(path: Path):
    """A file that is not UTF-8 text: a ValueError naming it (the codec's own names none)."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def read_jsonl(path, *, expect: str = "") -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; a clear
    ValueError naming the file and line for invalid JSON or a non-object (``expect``
    describes the fields wanted, for the message)."""
    path = Path(path)
    out = []
    with _utf8(path), path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}: line {lineno} must be a JSON object{' with ' + expect if expect else ''}, "
                    f"got a JSON {type(obj).__name__}"
                )
            out.append((lineno, obj))
    return out


def _texts_from_jsonl(path: Path, field: str) -> list[str]:
    texts: list[str] = []
    for lineno, obj in read_jsonl(path, expect=f"a {field!r} field"):
        if field not in obj:
            raise ValueError(f"{path}: line {lineno} has no field {field!r}; keys present: {sorted(obj)}")
        value = obj[field]
        if not isinstance(value, str) or not value.strip():
            got = (("a blank string" if value else "an empty string") if isinstance(value, str)
                   else type(value).__name__)
            raise ValueError(
                f"{path}: line {lineno}: field {field!r} must be a non-empty string, "
                f"got {got}; keys present: {sorted(obj)}"
            )
        texts.append(value)
    return texts


def _texts_from_file(source: str | os.PathLike, field: str) -> list[str]:
    path = Path(source)
    if not path.is_file():
        hint = ""
        if isinstance(source, str):
            hint = (
                " (a str is always treated as a file path; to use a text directly, "
                "pass a list of strings, e.g. [text])"
            )
        raise FileNotFoundError(f"text file not found: {os.fspath(source)!r}{hint}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _texts_from_txt(path)
    if suffix == ".jsonl":
        return _texts_from_jsonl(path, field)
    raise ValueError(
        f"unsupported file type {path.suffix or '(no extension)'!r} for {str(path)!r}; "
        f"supported: {', '.join(SUPPORTED_SUFFIXES)} "
        "(.txt: one document per line; .jsonl: one JSON object per line)"
    )


def _texts_from_dataset(ds: Any, field: str) -> list[str]:
    columns = ds.column_names
    if isinstance(columns, Mapping):
        raise ValueError(
            f"{type(ds).__name__} has several splits ({sorted(columns)}); pick one, "
            "e.g. ds['train']"
        )
    if columns is None or field not in columns:
        raise ValueError(
            f"dataset has no column {field!r}; columns: {list(columns) if columns else columns}"
        )
    texts: list[str] = []
    for i, value in enumerate(ds[field]):
        if not isinstance(value, str):
            raise ValueError(
                f"dataset column {field!r}: row {i} is {type(value).__name__}, expected str"
            )
        if value.strip():
            texts.append(value)
    return texts


def load_texts(source: Any, *, field: str = "text") -> list[str]:
    """Normalise a text source to a list of strings.

    Parameters
    ----------
    source:
        One of

        * a ``list`` / ``tuple`` of ``str`` - returned as a new list, unchanged
          (empty strings are kept: they are the caller's choice);
        * a path (``str`` or :class:`os.PathLike`) to a ``.txt`` file - one document
          per non-empty line, stripped;
        * a path to a ``.jsonl`` file - one JSON object per line, the document is
          ``obj[field]`` and must be a non-empty string; blank lines are skipped;
        * a Hugging Face ``datasets.Dataset``-like object, i.e. anything with
          ``column_names`` and ``obj[field]`` returning the column; rows that are
          empty or whitespace only are skipped (common in e.g. wikitext).

        A bare ``str`` is always a path, never a text.
    field:
        Column / JSON key holding the text (``.jsonl`` and datasets only).

    Raises
    ------
    FileNotFoundError
        ``source`` is a path that does not name an existing file.
    ValueError
        Unsupported file extension; a ``.jsonl`` line that is not valid JSON, not an
        object, or lacks a non-empty string ``field`` (the message gives the line
        number, the field name and the keys present); a list with non-string items;
        a dataset without the column; or no text at all ("no text found in ...").
    TypeError
        ``source`` is of none of the kinds above.
    """
    if _is_pathlike(source):
        texts = _texts_from_file(source, field)
    elif isinstance(source, (list, tuple)):
        for i, item in enumerate(source):
            if not isinstance(item, str):
                raise ValueError(
                    f"texts must all be str; item {i} is {type(item).__name__}"
                )
        texts = list(source)
    elif _is_dataset_like(source):
        texts = _texts_from_dataset(source, field)
    else:
        raise TypeError(
            "expected a list/tuple of str, a path to a .txt/.jsonl file, or a "
            f"datasets.Dataset-like object; got {type(source).__name__}"
        )
    if not texts:
        raise ValueError(f"no text found in {_describe(source)}")
    return texts


# ------------------------------------------------------------------------- batches


def _is_text_source(data: Any) -> bool:
    """True if ``data`` is something :func:`load_texts` should handle."""
    if _is_pathlike(data) or (_is_dataset_like(data) and (
            not isinstance(data, Mapping) or isinstance(data.column_names, Mapping))):  # a DatasetDict too
        return True
    if isinstance(data, (list, tuple)):
        return len(data) > 0 and isinstance(data[0], str)
    return False


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has neither a pad token nor an eos token; "
        "set one, e.g. tokenizer.add_special_tokens({'pad_token': '[PAD]'})"
    )


def _tokenize_batches(
    texts: list[str], tokenizer: Any, batch_size: int, max_length: int | None, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    # Padding is done here rather than by the tokenizer so that a tokenizer without a
    # pad token (GPT-2 style) can be used with its eos id as padding without ever
    # touching its state, and so that padding is always on the right.
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = tokenizer(
            chunk,
            padding=False,
            truncation=max_length is not None,
            max_length=max_length,
            return_attention_mask=True,
        )
        rows = [list(r) for r in enc["input_ids"]]
        masks = enc.get("attention_mask") if hasattr(enc, "get") else None
        masks = [list(m) for m in masks] if masks is not None else [[1] * len(r) for r in rows]
        # At least one column, even if every text in the batch produced no token at all
        # (such rows come out fully masked).
        width = max(1, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            if r:
                input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                attention_mask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
        yield {"input_ids": input_ids, "attention_mask": attention_mask}


def _as_tensor(value: Any, name: str, index: int) -> torch.Tensor:
    """``value`` as a tensor (lists and arrays converted); ValueError naming the batch and key."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"batch {index}: {name} could not be converted to a tensor ({exc})") from None


def _check_batch(batch: Any, index: int) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        if isinstance(batch, str):
            raise ValueError(
                f"batch {index} is a str: to tokenize texts on the fly pass them as a "
                "list/tuple of str, a .txt/.jsonl path or a Dataset, with a tokenizer"
            )
        raise ValueError(
            f"batch {index} is {type(batch).__name__}; expected a mapping with "
            "'input_ids' (and optionally 'attention_mask')"
        )
    if "input_ids" not in batch:
        raise ValueError(f"batch {index} has no 'input_ids'; keys present: {sorted(batch)}")
    out = dict(batch)  # extra keys pass through untouched
    ids = _as_tensor(batch["input_ids"], "input_ids", index)
    if ids.dtype not in _INT_DTYPES:
        raise ValueError(f"batch {index}: input_ids must be integers, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(
            f"batch {index}: input_ids must be 2-D [batch, seq], got shape {tuple(ids.shape)}"
        )
    ids = ids.long()
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = _as_tensor(mask, "attention_mask", index)
        if mask.shape != ids.shape:
            raise ValueError(
                f"batch {index}: attention_mask shape {tuple(mask.shape)} does not match "
                f"input_ids shape {tuple(ids.shape)}"
            )
        mask = mask.to(device=ids.device, dtype=torch.long)
    out["input_ids"] = ids
    out["attention_mask"] = mask
    return out


def _validated_batches(batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
    count = 0
    for count, batch in enumerate(batches, start=1):
        yield _check_batch(batch, count - 1)
    if count == 0:
        raise ValueError("no data: the iterable of tokenized batches produced no batch")


def iter_batches(
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 128,
    field: str = "text",
) -> Iterator[dict[str, Any]]:
    """Yield ``{"input_ids", "attention_mask", ...}`` batches from texts or token batches.

    Parameters
    ----------
    data:
        Either texts - anything :func:`load_texts` accepts (list/tuple of ``str``,
        ``.txt`` / ``.jsonl`` path, ``datasets.Dataset``-like object) - or already
        tokenized batches: a single mapping, or an iterable (list, generator,
        ``torch.utils.data.DataLoader``, ...) of mappings / ``BatchEncoding`` objects
        with ``input_ids`` and optionally ``attention_mask``. A bare ``str`` is a
        path; if no such file exists :class:`FileNotFoundError` is raised.
    tokenizer:
        A Hugging Face tokenizer (anything callable like one). Required for texts,
        ignored for tokenized batches.
    batch_size:
        Texts per batch (texts only); the last batch may be smaller.
    max_length:
        Texts are truncated to this many tokens, special tokens included
        (``None``: no truncation).
    field:
        Text column / JSON key, see :func:`load_texts`.

    Texts are tokenized one batch at a time, padded on the right to the longest
    sequence in the batch, and returned as CPU ``torch.long`` tensors ``[B, T]``.
    Padding uses the tokenizer's pad token, or its eos token if it has none (the
    tokenizer itself is never modified); a tokenizer with neither is a
    :class:`ValueError`. Texts that produce no tokens still get the special tokens the
    tokenizer adds; if that is none at all the row is fully masked (``T`` is at
    least 1).

    Tokenized batches are validated and yielded as new dicts: ``input_ids`` must be
    a 2-D integer tensor (lists / arrays are converted) and becomes ``long``;
    ``attention_mask`` defaults to ones, must have the same shape and becomes
    ``long`` on the same device; every other key passes through untouched.

    Argument errors on texts (missing file, missing tokenizer, ...) are raised by
    this call; errors in tokenized batches, and :class:`ValueError` ("no data ...")
    when an iterable yields no batch, are raised while iterating.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_length is not None and (
        not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1
    ):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")

    if isinstance(data, Mapping) and not _is_text_source(data):
        return _validated_batches([data])
    if isinstance(data, (list, tuple)) and not data:
        raise ValueError("no data: got an empty list")
    if _is_text_source(data):
        texts = load_texts(data, field=field)
        if tokenizer is None:
            raise ValueError(
                "a tokenizer is required to turn texts into batches "
                "(pass tokenizer=..., or pass already tokenized batches)"
            )
        specials = getattr(tokenizer, "num_special_tokens_to_add", None)
        n_special = specials(pair=False) if callable(specials) else 0
        if max_length is not None and isinstance(n_special, int) and max_length <= n_special:
            raise ValueError(f"max_length={max_length} leaves no room for text: this tokenizer adds "
                             f"{n_special} special tokens to every text (give more than {n_special})")
        return _tokenize_batches(texts, tokenizer, batch_size, max_length, _pad_id(tokenizer))
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be texts (list of str, .txt/.jsonl path, Dataset) or tokenized "
            f"batches (mapping or iterable of mappings); got {type(data).__name__}"
        )
    return _validated_batches(data)


def num_batches(data: Any, batch_size: int, field: str = "text") -> int | None:
    """Number of batches :func:`iter_batches` will yield, or ``None`` if not cheap to know.

    * texts in a list/tuple or a Dataset-like object: ``ceil(n / batch_size)``
      with ``n`` the number of texts :func:`load_texts` returns (for a Dataset this
      reads the ``field`` column, so blank rows are not counted);
    * a ``.txt`` / ``.jsonl`` path: counted from the non-blank lines (no parsing);
    * a single tokenized mapping: 1;
    * tokenized batches with ``__len__`` (a list, a ``DataLoader``): ``len(data)``;
    * anything else (generators, ``DataLoader`` over an ``IterableDataset``, missing
      files, ...): ``None``.

    Meant for progress-bar totals; it never raises on bad data (``iter_batches``
    reports that), only on a bad ``batch_size``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    try:
        if isinstance(data, Mapping) and not _is_text_source(data):
            return 1
        if _is_pathlike(data):
            path = Path(data)
            if not path.is_file() or path.suffix.lower() not in SUPPORTED_SUFFIXES:
                return None
            with path.open(encoding="utf-8-sig") as fh:
                n = sum(1 for line in fh if line.strip())
            return math.ceil(n / batch_size) if n else None
        if _is_text_source(data):  # list/tuple of str, or a Dataset: in memory already
            return math.ceil(len(load_texts(data, field=field)) / batch_size)
        if hasattr(data, "__len__"):
            return len(data) or None
    except (TypeError, ValueError, OSError):
        return None
    return None

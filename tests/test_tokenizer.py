"""CLIP BPE tokenizer: golden ids from the official CLIP-ES run, truncation, decoding."""

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from tag2mask.clip import tokenizer as tk

# tokens.json of every golden set (VOC and COCO prompt strings)
TOKEN_FILES = sorted((Path(__file__).parent / "data").glob("*/tokens.json"))
GOLDENS = [json.loads(p.read_text(encoding="utf-8")) for p in TOKEN_FILES]
ENTRIES = [(g, e) for g in GOLDENS for e in g["entries"]]


@pytest.mark.parametrize("golden", GOLDENS, ids=[p.parent.name for p in TOKEN_FILES])
def test_fixture_header_matches_our_constants(golden):
    assert golden["sot"] == tk.SOT_ID and golden["eot"] == tk.EOT_ID
    assert golden["context_length"] == tk.CONTEXT_LENGTH
    digest = hashlib.sha256(tk.VOCAB_PATH.read_bytes()).hexdigest()
    assert digest == golden["bpe_file_sha256"]


@pytest.mark.parametrize("golden,entry", ENTRIES, ids=[e["text"][:30] for _, e in ENTRIES])
def test_tokenize_matches_official(golden, entry):
    out = tk.tokenize(entry["text"], context_length=golden["context_length"])
    assert out.shape == (1, golden["context_length"]) and out.dtype == torch.long
    assert out[0].tolist() == entry["ids"]
    assert int((out[0] != 0).sum()) == entry["n_tokens"]


@pytest.mark.parametrize("golden", GOLDENS, ids=[p.parent.name for p in TOKEN_FILES])
def test_batch_equals_rows(golden):
    texts = [e["text"] for e in golden["entries"]]
    out = tk.tokenize(texts)
    assert out.shape == (len(texts), 77)
    assert out.tolist() == [e["ids"] for e in golden["entries"]]


def test_vocab_layout():
    tok = tk.get_tokenizer()
    assert tok is tk.get_tokenizer()  # singleton
    assert tok.vocab_size == tk.VOCAB_SIZE
    assert tok.encode("<|startoftext|>") == [tk.SOT_ID]
    with gzip.open(tk.VOCAB_PATH, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    first_merge = "".join(lines[1].split())
    assert tok.encoder[first_merge] == 512  # merges come right after the 2 x 256 byte symbols


def test_truncation_keeps_prefix_and_ends_with_eot():
    text = " ".join(["cat"] * 100)
    out = tk.tokenize(text, truncate=True)
    row = out[0].tolist()
    cat = tk.get_tokenizer().encode("cat")
    assert len(cat) == 1
    assert row[0] == tk.SOT_ID and row[-1] == tk.EOT_ID
    assert row[1:-1] == cat * 75
    short = tk.tokenize(text, context_length=10)[0].tolist()
    assert short == [tk.SOT_ID] + cat * 8 + [tk.EOT_ID]


def test_too_long_without_truncate_raises_with_text():
    text = "dog " * 80
    with pytest.raises(ValueError, match="dog dog"):
        tk.tokenize(["a cat", text], truncate=False)
    # exactly fitting text is fine: 75 words + SOT + EOT = 77
    assert tk.tokenize("dog " * 75, truncate=False)[0, -1] == tk.EOT_ID


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A photo of a Cat.", "a photo of a cat ."),
        ("  two   words ", "two words"),
        ("Café naïve façade", "café naïve façade"),
        ("Fish &amp;amp; chips", "fish & chips"),
        ("日本語 text 123", "日本語 text 1 2 3"),
    ],
)
def test_decode_round_trip(text, expected):
    tok = tk.get_tokenizer()
    assert tok.decode(tok.encode(text)) == expected
    row = tk.tokenize(text)[0].tolist()  # padded row: SOT skipped, stops at EOT
    assert tok.decode(row) == expected


def test_bad_inputs():
    with pytest.raises(TypeError):
        tk.tokenize([1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        tk.get_tokenizer().decode([tk.VOCAB_SIZE])

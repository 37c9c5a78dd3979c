"""CLIP byte-level BPE tokenizer, token-for-token compatible with OpenAI's ``clip.tokenize``.

The vocabulary (``assets/bpe_simple_vocab_16e6.txt.gz``) is a list of BPE merges.  The id space is
laid out as: 256 byte symbols, the same 256 symbols with the end-of-word marker ``</w>``, one id per
merge (in merge order), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) -- 49408 ids.

Everything heavy (reading the merges, compiling the regex, importing ftfy) happens the first time a
tokenizer is needed, so ``import tag2mask.clip.tokenizer`` stays cheap.
"""

from __future__ import annotations

import gzip
import html
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Sequence, Union

import torch

VOCAB_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
# 49152 - 256 - 2 merges are used (the file holds more); +1 accounts for the header line.
_NUM_MERGE_LINES = 49152 - 256 - 2 + 1

# Same split rule as CLIP: special tokens, English contractions, letter runs, single digits,
# runs of anything that is neither whitespace, letter nor digit.
_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_WHITESPACE = re.compile(r"\s+")
_END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character (BPE works on these characters).

    Bytes that are already printable, non-space latin-1 characters map to themselves; the rest are
    shifted to code points 256, 257, ... in byte order, so the mapping is a bijection.  The dict's
    iteration order (printable bytes, then shifted ones) is the order of the first 256 vocabulary ids.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    # Insertion order matters: the vocabulary lists the printable bytes first, then the shifted ones.
    table: dict[int, str] = {b: chr(b) for b in sorted(printable)}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _normalise(text: str) -> str:
    """ftfy repair, double HTML unescape, whitespace collapse and lower-casing (CLIP's cleaning)."""
    try:
        import ftfy
    except ImportError as exc:  # pragma: no cover - ftfy is a hard dependency
        raise ImportError(
            "tag2mask.clip.tokenizer needs the 'ftfy' package to reproduce CLIP's text cleaning; "
            "install it with `pip install ftfy`"
        ) from exc
    text = ftfy.fix_text(text)
    # Twice, because web captions are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def _load_merges(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found at {path}; the package data 'tag2mask/clip/assets' is missing"
        )
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # Line 0 is a version header; only the first 48894 merges are part of CLIP's vocabulary.
    body = lines[1:_NUM_MERGE_LINES]
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}: line {lineno} is not a BPE merge ('a b'): {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != _NUM_MERGE_LINES - 1:
        raise ValueError(f"{path}: expected {_NUM_MERGE_LINES - 1} merges, found {len(merges)}")
    return merges


class ClipTokenizer:
    """Byte-level BPE tokenizer reproducing OpenAI CLIP's ``SimpleTokenizer`` ids.

    Args:
        vocab_path: gzip'ed merge list; defaults to the bundled CLIP vocabulary.
    """

    def __init__(self, vocab_path: Union[str, Path, None] = None) -> None:
        import regex  # third-party: needed for \p{L} / \p{N}

        path = Path(vocab_path) if vocab_path is not None else VOCAB_PATH
        merges = _load_merges(path)
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        symbols += [s + _END_OF_WORD for s in symbols]
        symbols += ["".join(m) for m in merges]
        symbols += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(symbols)}
        self.decoder: dict[int, str] = {i: s for s, i in self.encoder.items()}
        if self.encoder[SOT_TOKEN] != SOT_ID or self.encoder[EOT_TOKEN] != EOT_ID:
            raise ValueError(f"{path}: vocabulary layout does not give SOT={SOT_ID}, EOT={EOT_ID}")
        self.merge_rank: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        # Special tokens are already whole symbols; seeding the cache keeps BPE from splitting them.
        self._cache: dict[str, str] = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, token: str) -> str:
        """Apply the merges to one pre-token (in byte-symbol space); returns space-joined symbols."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + _END_OF_WORD]
        ranks = self.merge_rank
        while len(word) > 1:
            # Merge the lowest-ranked adjacent pair everywhere it occurs, then look again.
            best = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        with self._lock:
            if len(self._cache) > 200_000:  # keep memory bounded on huge open-vocabulary runs
                self._cache.clear()
                self._cache.update({SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN})
            self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without SOT/EOT. ``text`` is cleaned and lower-cased first."""
        ids: list[int] = []
        for piece in self.pattern.findall(_normalise(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(symbols).split(" "))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """BPE ids -> text (lower-cased, one space per word boundary, stripped).

        With ``skip_special`` the SOT id is dropped and decoding stops at the first EOT, so a
        zero-padded row of :func:`tokenize` decodes to its text.
        """
        symbols: list[str] = []
        for raw in ids:
            i = int(raw)
            if skip_special and i == SOT_ID:
                continue
            if skip_special and i == EOT_ID:
                break
            if i not in self.decoder:
                raise ValueError(f"token id {i} is outside the CLIP vocabulary (0..{self.vocab_size - 1})")
            symbols.append(self.decoder[i])
        out = bytearray()
        for sym in symbols:
            if sym in (SOT_TOKEN, EOT_TOKEN):  # not made of byte symbols; keep verbatim
                out.extend(sym.encode("utf-8"))
            else:
                out.extend(self.byte_decoder[ch] for ch in sym)
        decoded = out.decode("utf-8", errors="replace")
        return decoded.replace(_END_OF_WORD, " ").strip()


_SINGLETON: ClipTokenizer | None = None
_SINGLETON_LOCK = threading.Lock()


def get_tokenizer() -> ClipTokenizer:
    """The shared tokenizer over the bundled vocabulary, built on first use."""
    global _SINGLETON
    if _SINGLETON is None:
        with _SINGLETON_LOCK:
            if _SINGLETON is None:
                _SINGLETON = ClipTokenizer()
    return _SINGLETON


def tokenize(
    texts: Union[str, Sequence[str]],
    context_length: int = CONTEXT_LENGTH,
    truncate: bool = True,
) -> torch.Tensor:
    """Tokenize like ``clip.tokenize``: ``[SOT] + BPE + [EOT]``, zero-padded.

    Args:
        texts: one string or a sequence of N strings.
        context_length: row length (77 for every released CLIP).
        truncate: if a text needs more than ``context_length`` ids, keep the first
            ``context_length`` and overwrite the last with EOT; otherwise raise ``ValueError``.

    Returns:
        ``(N, context_length)`` int64 tensor (N = 1 for a single string).
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 to hold SOT and EOT, got {context_length}")
    tok = get_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects strings, got {type(text).__name__} at position {row}")
        ids = [SOT_ID] + tok.encode(text) + [EOT_ID]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"text needs {len(ids)} tokens but context_length is {context_length}: {text!r}"
                )
            ids = ids[:context_length]
            ids[-1] = EOT_ID
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result


__all__ = ["ClipTokenizer", "get_tokenizer", "tokenize", "SOT_ID", "EOT_ID", "VOCAB_SIZE", "CONTEXT_LENGTH"]

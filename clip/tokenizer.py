"""CLIP's byte-level BPE tokenizer (same ids as OpenAI's `simple_tokenizer`)."""
from __future__ import annotations

import functools
import gzip
import html
import re
from collections.abc import Iterable
from pathlib import Path

import ftfy
import regex
import torch

_VOCAB_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
# The vocabulary file holds more merges than CLIP was trained with; CLIP uses the first
# 49152 - 256 - 2 of them, so that bytes + merges + the two specials make 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"

# Words, single digits, runs of other non-space symbols, and English contractions.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, so BPE never sees whitespace/control bytes.

    Printable latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to the
    code points 256, 257, ... The dict's order (printable bytes first) is the order of the
    first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(others)})
    return mapping


def _clean(text: str) -> str:
    # ftfy repairs mojibake; html entities are unescaped twice because some captions are
    # double-escaped ("&amp;amp;"); then whitespace runs collapse to one space.
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class SimpleTokenizer:
    """Lower-cased byte-level BPE over CLIP's 49408-token vocabulary."""

    def __init__(self, bpe_path: str | Path = _VOCAB_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is a version header
        merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}
        self.sot_token = self.encoder[SOT]  # 49406
        self.eot_token = self.encoder[EOT]  # 49407

    def bpe(self, token: str) -> str:
        """Merge one pre-token's characters greedily by merge rank; returns space-separated symbols."""
        if token in self.cache:
            return self.cache[token]
        # the last symbol carries the end-of-word marker
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            ranked = [(self.bpe_ranks.get(pair, float("inf")), pair) for pair in zip(word, word[1:])]
            rank, (first, second) = min(ranked, key=lambda r: r[0])
            if rank == float("inf"):
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _WORD_PATTERN.findall(_clean(text).lower()):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(piece).split(" "))
        return ids

    def decode(self, tokens: Iterable[int] | torch.Tensor) -> str:
        text = "".join(self.decoder[int(t)] for t in tokens)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> SimpleTokenizer:
    # built on first use: reading the vocabulary costs a fraction of a second
    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """Token ids [N, context_length]: start id, BPE ids, end id, zero padding.

    A text longer than the context raises ValueError, unless `truncate` is set: then it is cut
    so that the last position holds the end id.
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = _default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tokenizer.sot_token] + tokenizer.encode(text) + [tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"text {text!r} is {len(ids)} tokens long, over the context length {context_length}"
                )
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_token
        result[i, :len(ids)] = torch.tensor(ids)
    return result

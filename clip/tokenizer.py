"""OpenAI CLIP's byte-level BPE tokenizer.

The vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` comes from OpenAI's CLIP release (MIT licence,
see ``LICENSE-vocab.txt``). Its first line is a header; the next 48894 lines are BPE merges in
priority order. The token table is built the way CLIP was trained with:

* 256 byte symbols (bytes mapped to printable unicode characters, see :func:`bytes_to_unicode`),
* the same 256 symbols with the end-of-word marker ``</w>``,
* one token per merge (the concatenation of the pair),
* ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407),

49408 tokens in all. Text is cleaned like CLIP's training data: ``ftfy.fix_text``, HTML entities
unescaped (twice, so doubly escaped text like ``&amp;amp;`` is also decoded), runs of whitespace
collapsed to one space, lower-cased.
"""

from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache
from typing import Iterable, Sequence, Union

import ftfy
import regex
import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77
# 49152 - 256 - 2 = 48894 merges follow the header line; CLIP never used the rest of the file.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# Contractions, runs of letters, single digits, runs of other non-space symbols. The special tokens
# come first so that they survive as whole words.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def default_bpe() -> str:
    """Path of the vocabulary file shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte value to a printable unicode character.

    Bytes that already are printable, non-space Latin-1 characters map to themselves; the other 68
    bytes (control characters, space, NBSP, soft hyphen, ...) map to ``chr(256 + k)`` in increasing
    byte order. BPE then works on strings that never contain whitespace or control characters.

    Returns:
        Dict of 256 entries, ordered printable bytes first (ascending), then the remapped ones;
        this order is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def get_pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    """Set of adjacent symbol pairs of a word given as a sequence of symbols."""
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


def basic_clean(text: str) -> str:
    """Fix mojibake with ftfy and unescape HTML entities (twice, as CLIP's training data was)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines, ...) to one space and strip."""
    return _WHITESPACE.sub(" ", text).strip()


def read_merges(bpe_path: str) -> list[tuple[str, str]]:
    """Read CLIP's merges (in priority order) from the gzipped vocabulary file.

    Args:
        bpe_path: path of ``bpe_simple_vocab_16e6.txt.gz``.

    Returns:
        The first 48894 merges after the header line.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds fewer merges than CLIP's vocabulary needs.
    """
    if not os.path.isfile(bpe_path):
        raise FileNotFoundError(
            f"BPE vocabulary file not found: {bpe_path}. It ships with the package as "
            f"clip/bpe_simple_vocab_16e6.txt.gz; reinstall the package or pass bpe_path."
        )
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merge_lines = lines[1 : 1 + NUM_MERGES]
    if len(merge_lines) < NUM_MERGES:
        raise ValueError(
            f"{bpe_path} holds {len(merge_lines)} merges, CLIP needs {NUM_MERGES}: "
            f"the file is truncated or not CLIP's bpe_simple_vocab_16e6.txt.gz"
        )
    merges = []
    for line in merge_lines:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"malformed merge line {line!r} in {bpe_path}")
        merges.append((parts[0], parts[1]))
    return merges


class SimpleTokenizer:
    """CLIP's byte-level BPE tokenizer.

    Args:
        bpe_path: gzipped merges file; defaults to the one shipped with the package.
    """

    def __init__(self, bpe_path: str | None = None) -> None:
        self.bpe_path = bpe_path or default_bpe()
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        merges = read_merges(self.bpe_path)

        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(pair) for pair in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        # Special tokens are words of their own that BPE must not split.
        self.cache: dict[str, str] = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(self.encoder)

    def bpe(self, token: str) -> str:
        """Apply the BPE merges to one word (already mapped to byte symbols).

        Returns:
            The word's BPE symbols joined by single spaces; the last carries ``</w>``.
        """
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word: tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        while pairs:
            # The highest-priority merge present in the word is applied everywhere at once.
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def clean(self, text: str) -> str:
        """Normalise text the way CLIP's training captions were (ftfy, HTML, whitespace, lower)."""
        return whitespace_clean(basic_clean(text)).lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens.

        Raises:
            TypeError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(self.clean(text)):
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(symbols).split(" "))
        return ids

    def decode(self, tokens: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of token ids.

        Args:
            tokens: ids (list or 1-D tensor).
            skip_special_tokens: drop start/end-of-text tokens instead of writing them out.

        Returns:
            The decoded text; word ends (``</w>``) become spaces, invalid UTF-8 is replaced.

        Raises:
            ValueError: an id is outside the vocabulary.
        """
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        pieces = []
        for t in tokens:
            t = int(t)
            if t not in self.decoder:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")
            if skip_special_tokens and t in (self.sot_token_id, self.eot_token_id):
                continue
            pieces.append(self.decoder[t])
        out = bytearray()
        for piece in pieces:
            # Only a word's last symbol carries "</w>"; it stands for the space after the word.
            word_end = piece.endswith("</w>")
            if word_end:
                piece = piece[:-4]
            out += bytes(self.byte_decoder[ch] for ch in piece)
            if word_end:
                out += b" "
        return out.decode("utf-8", errors="replace")


_default_tokenizer: SimpleTokenizer | None = None


def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer built from the packaged vocabulary (built on first use)."""
    global _default_tokenizer
    if _default_tokenizer is None:
        _default_tokenizer = SimpleTokenizer()
    return _default_tokenizer


def tokenize(
    texts: Union[str, Sequence[str]],
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    truncate: bool = False,
) -> torch.LongTensor:
    """Tokenize texts into CLIP's fixed-length input.

    Each row is ``<|startoftext|>``, the text's tokens, ``<|endoftext|>``, then zeros.

    Args:
        texts: one string or a list of strings.
        context_length: row length (77 for every OpenAI CLIP model).
        truncate: cut texts that do not fit; the last kept position then holds ``<|endoftext|>``.

    Returns:
        LongTensor ``[len(texts), context_length]``.

    Raises:
        TypeError: ``texts`` is not a string or a sequence of strings.
        ValueError: ``context_length`` is below 2.
        RuntimeError: a text is too long and ``truncate`` is False.
    """
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (list, tuple)):
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"tokenize() expects strings, got items of type {sorted(set(bad))}")
    else:
        raise TypeError(f"tokenize() expects a str or a list of str, got {type(texts).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")

    tok = get_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_token_id] + tok.encode(text) + [tok.eot_token_id]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(
                    f"Input {text!r} is too long for context length {context_length} "
                    f"({len(ids)} tokens with start/end); shorten it or pass truncate=True"
                )
            ids = ids[:context_length]
            ids[-1] = tok.eot_token_id
        result[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result

"""Tests of clip/tokenizer.py (OpenAI CLIP's byte-level BPE)."""

import gzip
import hashlib
import json

import pytest
import torch

from clip import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.get_tokenizer()


def test_vocab_file_is_openai_release():
    with open(T.default_bpe(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == T.VOCAB_SHA256


def test_bytes_to_unicode_is_a_printable_bijection():
    table = T.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
    assert table[ord("a")] == "a"
    # 188 printable bytes keep their character, byte 0 is the first remapped one, space the 33rd.
    assert table[0] == chr(256) and table[ord(" ")] == chr(256 + 32)


def test_vocabulary_layout(tok):
    assert tok.vocab_size == 49408 == T.VOCAB_SIZE
    assert tok.encoder["<|startoftext|>"] == 49406 and tok.encoder["<|endoftext|>"] == 49407
    # '!' is the first printable byte; 'a' (97) is printable byte number 97 - 33 = 64.
    assert tok.encoder["!"] == 0
    assert tok.encoder["a"] == 64 and tok.encoder["a</w>"] == 256 + 64
    assert tok.encoder["."] == 13 and tok.encoder[".</w>"] == 256 + 13
    assert tok.encoder[chr(256)] == 188  # byte 0 follows the 188 printable bytes
    with gzip.open(T.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    first, last = lines[1].split(), lines[48894].split()
    assert tok.encoder["".join(first)] == 512
    assert tok.encoder["".join(last)] == 512 + 48893
    assert len(tok.bpe_ranks) == 48894


def test_known_encoding(tok):
    # 320 = 'a</w>', 269 = '.</w>' (derived above); 'photo', 'of', 'dog' are merges of the vocab.
    assert tok.encode("a photo of a dog.") == [320, 1125, 539, 320, 1929, 269]
    row = T.tokenize("a photo of a dog.")
    assert row.shape == (1, 77) and row.dtype == torch.long
    assert row[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    assert row[0, 8:].eq(0).all()
    assert tok.encode("") == []
    assert T.tokenize("")[0, :3].tolist() == [49406, 49407, 0]


@pytest.mark.parametrize(
    "messy, clean",
    [
        ("Tom &amp; Jerry", "tom & jerry"),  # HTML entity
        ("Tom &amp;amp; Jerry", "tom & jerry"),  # doubly escaped: unescaped twice
        ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
        ("  A\tPHOTO\n\n of   a\r\nDOG.  ", "a photo of a dog."),  # whitespace runs, upper case
        ("a\u00a0photo", "a photo"),  # no-break space is whitespace
        ("cafÃ©", "café"),  # mojibake fixed by ftfy
        ("cafe\u0301", "café"),  # combining accent normalised (NFC) by ftfy
    ],
)
def test_cleaning(tok, messy, clean):
    assert tok.encode(messy) == tok.encode(clean)
    assert tok.clean(messy) == clean


def test_unicode_and_emoji_round_trip(tok):
    for text in ["naïve façade", "straße 中文 日本語 한국어", "i ❤️ 🐶 and 🇫🇷!", "x" * 60]:
        ids = tok.encode(text)
        assert all(0 <= i < 49406 for i in ids)
        decoded = tok.decode(ids)
        # Words come back separated by one space each; re-encoding is the identity.
        assert decoded.replace(" ", "") == text.replace(" ", "")
        assert tok.encode(decoded) == ids


def test_decode(tok):
    assert tok.decode([320, 1125, 539, 320, 1929, 269]) == "a photo of a dog . "
    row = T.tokenize("a dog")[0]
    assert tok.decode(row[:4]) == "<|startoftext|>a dog <|endoftext|>"
    assert tok.decode(row[:4], skip_special_tokens=True) == "a dog "
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49408])


def test_special_token_text_maps_to_special_id(tok):
    # As in OpenAI's tokenizer, the literal marker is one token.
    assert tok.encode("<|endoftext|>") == [49407]


def test_batch_and_padding():
    out = T.tokenize(["a dog", "a photo of a cat", "DOG"])
    assert out.shape == (3, 77)
    assert out.argmax(dim=-1).tolist() == [3, 6, 2]  # EOT (highest id) positions
    assert out[0, 4:].eq(0).all()
    assert out[2, :3].tolist() == [49406, 1929, 49407]  # upper case folds to 'dog'
    assert torch.equal(T.tokenize(("a dog",)), out[:1])
    small = T.tokenize("a dog", context_length=5)
    assert small.tolist() == [[49406, 320, 1929, 49407, 0]]


def test_overflow_raises_and_truncates():
    fits = " ".join(["a"] * 75)  # 75 + start + end = 77
    assert T.tokenize(fits)[0, 76].item() == 49407
    too_long = fits + " a"
    with pytest.raises(RuntimeError, match=r"too long for context length 77.*truncate=True"):
        T.tokenize(["fine", too_long])
    cut = T.tokenize(too_long, truncate=True)[0]
    assert cut[0].item() == 49406 and cut[76].item() == 49407
    assert cut[1:76].eq(320).all()


def test_bad_input():
    with pytest.raises(TypeError, match="str or a list of str"):
        T.tokenize(42)
    with pytest.raises(TypeError, match="expects strings"):
        T.tokenize(["ok", None])
    with pytest.raises(ValueError, match="context_length"):
        T.tokenize("a", context_length=1)
    with pytest.raises(FileNotFoundError, match="BPE vocabulary"):
        T.SimpleTokenizer("/nonexistent/vocab.txt.gz")


def test_truncated_vocab_file_rejected(tmp_path):
    bad = tmp_path / "short.txt.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write("#version\nh e\n")
    with pytest.raises(ValueError, match="48894"):
        T.SimpleTokenizer(str(bad))


def test_matches_hugging_face_tokenizer(tok, tmp_path):
    """Cross-check against transformers' independent implementation built from the same merges."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.json").write_text(json.dumps(tok.encoder))
    merges = T.read_merges(T.default_bpe())
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    # HF does not unescape HTML entities, so those are tested above instead.
    texts = [
        "a photo of a dog.",
        "A Photo of  the\tLARGE\nairliner, itself.",
        "The quick brown fox jumps over the lazy dog! 123,456.78",
        "don't you'll we've I'm he'd it's they're",
        "Straße Ünïcödé 中文 日本語 한국어 naïve",
        "i ❤️ 🐶 emoji 👍🏽",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "e-mail: someone@example.com #hashtag $100 50% (parens) [brackets]",
    ]
    for text in texts:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text

"""Word lists (lexicons) from which negative labels are mined (NegLabel, CSP).

We never ship the words; the user points a config value at one of three sources:

``wordnet``
    WordNet 3.0's database folder, read from its index files ``index.noun`` and ``index.adj``
    (one lemma per line after a licence header whose lines start with two spaces; the lemma is the
    first field, ``_`` joins the words of a compound). Accepted as installed by
      * the WordNet 3.0 tarball: ``WordNet-3.0/dict/`` (or its parent);
      * Debian/Ubuntu's ``wordnet-base`` package: ``/usr/share/wordnet/``;
      * NLTK's ``wordnet`` corpus: ``nltk_data/corpora/wordnet/`` (or ``nltk_data`` itself), also still
        zipped as ``nltk_data/corpora/wordnet.zip`` (read in place).
    117,798 noun and 21,479 adjective lemmas in WordNet 3.0; a lemma that is both is kept once, as a
    noun (nouns are read first).

``neglabel``
    The folder of word lists that the NegLabel and CSP repositories read (their ``txtfiles/``):
    files named ``noun.<lexname>.txt`` and ``adj.<lexname>.txt``, one word per line; other files
    are ignored. These lists hold, per WordNet lexicographer file, one lower-cased lemma per synset
    (noun.animal and noun.food are absent), 70,000 distinct words in all; with them the selection
    reproduces the papers' negative labels. Both repositories read the files in ``os.listdir``
    order and keep the first occurrence of a word, so a word present in a noun and an adjective
    file takes the part of speech (and prompt) of whichever file their file system listed first;
    we read the files in **sorted name order** so the result does not depend on the file system
    (1,637 of the 70,000 words are affected). CSP excludes some files (``exclude``).

``words``
    A plain text file, one word per line (blank lines and lines starting with ``#`` skipped); every
    word gets the part of speech ``plain_pos`` (default ``noun``).

In every format surrounding white space is stripped, ``_`` becomes a space and duplicates are
dropped (first occurrence wins, as NegLabel's ``dedup`` dictionary), so the order of the words is
deterministic. :attr:`Lexicon.sha256` hashes the words and parts of speech actually used, so two
lexicons that yield the same words share negative-label caches.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = ["Lexicon", "read_lexicon", "detect_format", "LEXICON_FORMATS", "PARTS_OF_SPEECH", "LEXICON_LAYOUTS"]

PathLike = Union[str, os.PathLike]

LEXICON_FORMATS = ("wordnet", "neglabel", "words")
PARTS_OF_SPEECH = ("noun", "adj")
_WN_INDEX = {"noun": "index.noun", "adj": "index.adj"}

LEXICON_LAYOUTS = """A lexicon is one of:
  wordnet   WordNet 3.0's database folder holding index.noun and index.adj: the WordNet-3.0/dict/ folder
            of the tarball, /usr/share/wordnet/ of Debian's wordnet-base package (apt-get install
            wordnet-base), or NLTK's corpus (python -m nltk.downloader wordnet: nltk_data/corpora/wordnet/
            or nltk_data/corpora/wordnet.zip; the nltk_data folder itself is accepted too);
  neglabel  the txtfiles/ folder of the NegLabel repository (github.com/XueJiang16/NegLabel): files
            noun.<lexname>.txt and adj.<lexname>.txt, one word per line (the papers' lexicon);
  words     a text file with one word per line."""


@dataclass(frozen=True)
class Lexicon:
    """Deduplicated words with their part of speech, in reading order.

    Attributes:
        words: the words (``_`` replaced by spaces), unique.
        pos: part of speech of each word (``noun`` or ``adj``).
        source: the path that was read.
        format: ``wordnet``, ``neglabel`` or ``words``.
        files: the files read, in order (``zip:member`` for a member of a zip archive).
        sha256: hash of the ``(pos, word)`` list (what the negative labels depend on).
    """

    words: Tuple[str, ...]
    pos: Tuple[str, ...]
    source: str
    format: str
    files: Tuple[str, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.words)

    def of(self, pos: str) -> List[str]:
        """The words of one part of speech, in order."""
        return [w for w, p in zip(self.words, self.pos) if p == pos]

    def counts(self) -> Dict[str, int]:
        """``{pos: number of words}`` for the parts of speech present."""
        out: Dict[str, int] = {}
        for p in self.pos:
            out[p] = out.get(p, 0) + 1
        return out

    def describe(self) -> str:
        """One line for logs: format, path, counts and hash prefix."""
        counts = ", ".join(f"{n:,} {p}" for p, n in self.counts().items())
        return f"{self.format} lexicon {self.source}: {len(self):,} words ({counts}), sha256 {self.sha256[:12]}"


def _hash_words(words: Sequence[str], pos: Sequence[str]) -> str:
    h = hashlib.sha256()
    for w, p in zip(words, pos):
        h.update(f"{p}\t{w}\n".encode("utf-8"))
    return h.hexdigest()


def _clean(word: str) -> str:
    return word.strip().replace("_", " ").strip()


def _find_wordnet(path: str) -> Optional[Tuple[str, Optional[str]]]:
    """``(folder or zip file, member prefix or None)`` holding WordNet's index files, or None."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith("index.noun"):
                    return path, name[: -len("index.noun")]
        return None
    for cand in (path, os.path.join(path, "dict"), os.path.join(path, "corpora", "wordnet")):
        if os.path.isfile(os.path.join(cand, "index.noun")):
            return cand, None
    for z in (os.path.join(path, "wordnet.zip"), os.path.join(path, "corpora", "wordnet.zip")):
        if os.path.isfile(z):
            return _find_wordnet(z)
    return None


def _neglabel_files(path: str) -> List[str]:
    if not os.path.isdir(path):
        return []
    return sorted(f for f in os.listdir(path) if f.split(".")[0] in PARTS_OF_SPEECH and
                  os.path.isfile(os.path.join(path, f)))


def detect_format(path: PathLike) -> str:
    """The format of ``path`` (see the module docstring).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a folder that is neither a WordNet database nor a NegLabel word-list folder.
    """
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(p):
        raise FileNotFoundError(f"lexicon {p} not found.\n{LEXICON_LAYOUTS}")
    if _find_wordnet(p) is not None:
        return "wordnet"
    if os.path.isdir(p):
        if _neglabel_files(p):
            return "neglabel"
        raise ValueError(f"lexicon folder {p} holds neither WordNet's index.noun / index.adj nor "
                         f"noun.*.txt / adj.*.txt word lists.\n{LEXICON_LAYOUTS}")
    return "words"


def _read_wordnet_index(lines: Iterable[str], where: str) -> List[str]:
    out = []
    for line in lines:
        if line.startswith("  ") or not line.strip():
            continue  # licence header (every line starts with two spaces)
        out.append(line.split(" ", 1)[0])
    if not out:
        raise ValueError(f"{where} has no lemma lines (only the licence header?); expected WordNet 3.0's "
                         "index file format: '<lemma> <pos> <synset_cnt> ...' per line")
    return out


def _wordnet_lemmas(found: Tuple[str, Optional[str]], pos: str) -> Tuple[List[str], str]:
    base, member_prefix = found
    name = _WN_INDEX[pos]
    if member_prefix is None:
        f = os.path.join(base, name)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"WordNet folder {base} has no {name} (part of speech {pos!r}).\n{LEXICON_LAYOUTS}")
        with open(f, "r", encoding="utf-8", errors="replace") as fh:
            return _read_wordnet_index(fh, f), f
    with zipfile.ZipFile(base) as zf:
        member = member_prefix + name
        try:
            raw = zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"WordNet archive {base} has no {member} (part of speech {pos!r}).\n"
                                    f"{LEXICON_LAYOUTS}") from None
    where = f"{base}:{member}"
    return _read_wordnet_index(raw.decode("utf-8", errors="replace").splitlines(), where), where


def read_lexicon(path: PathLike, fmt: str = "auto", parts_of_speech: Sequence[str] = PARTS_OF_SPEECH,
                 exclude: Sequence[str] = (), plain_pos: str = "noun") -> Lexicon:
    """Read a lexicon (words and their parts of speech).

    Args:
        path: a WordNet database folder / zip, a NegLabel ``txtfiles`` folder, or a word-list file.
        fmt: ``auto`` (detected), ``wordnet``, ``neglabel`` or ``words``.
        parts_of_speech: the parts of speech to keep (``noun``, ``adj``; both by default, as NegLabel).
        exclude: ``neglabel`` format only: file names to skip (CSP's ``txt_exclude``), each must exist.
        plain_pos: part of speech given to every word of a ``words`` file.

    Returns:
        The :class:`Lexicon`.

    Raises:
        FileNotFoundError: ``path`` (or a needed index file) is missing; the message lists the layouts.
        ValueError: unknown format or part of speech, an empty lexicon, an excluded file that is not there.
    """
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    fmt = str(fmt).lower()
    if fmt not in ("auto",) + LEXICON_FORMATS:
        raise ValueError(f"unknown lexicon format {fmt!r}; choose auto or one of {list(LEXICON_FORMATS)}")
    keep = list(parts_of_speech)
    bad = [x for x in keep + [plain_pos] if x not in PARTS_OF_SPEECH]
    if bad or not keep:
        raise ValueError(f"parts of speech must be a non-empty subset of {list(PARTS_OF_SPEECH)}, got {bad or keep}")
    if fmt == "auto":
        fmt = detect_format(p)
    elif not os.path.exists(p):
        raise FileNotFoundError(f"lexicon {p} not found.\n{LEXICON_LAYOUTS}")
    if exclude and fmt != "neglabel":
        raise ValueError(f"exclude (file names to skip) applies to the neglabel format only, not {fmt!r}")

    seen: Dict[str, None] = {}
    words: List[str] = []
    pos: List[str] = []
    files: List[str] = []

    def add(word: str, part: str) -> None:
        w = _clean(word)
        if w and w not in seen:
            seen[w] = None
            words.append(w)
            pos.append(part)

    if fmt == "wordnet":
        found = _find_wordnet(p)
        if found is None:
            raise FileNotFoundError(f"no WordNet index.noun under {p}.\n{LEXICON_LAYOUTS}")
        for part in PARTS_OF_SPEECH:  # nouns first: a lemma that is both stays a noun
            if part in keep:
                lemmas, where = _wordnet_lemmas(found, part)
                files.append(where)
                for w in lemmas:
                    add(w, part)
    elif fmt == "neglabel":
        if not os.path.isdir(p):
            raise ValueError(f"the neglabel lexicon format is a folder of noun.*.txt / adj.*.txt files; "
                             f"{p} is a file.\n"
                             f"{LEXICON_LAYOUTS}")
        names = _neglabel_files(p)
        missing = [e for e in exclude if e not in names]
        if missing:
            raise ValueError(f"excluded lexicon files {missing} are not in {p} (it has: {', '.join(names)})")
        names = [n for n in names if n not in set(exclude)]
        for name in names:
            part = name.split(".")[0]
            if part not in keep:
                continue
            f = os.path.join(p, name)
            files.append(f)
            with open(f, "r", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    add(line, part)
    else:
        if os.path.isdir(p):
            raise ValueError(f"the words lexicon format is a text file; {p} is a folder.\n{LEXICON_LAYOUTS}")
        files.append(p)
        with open(p, "r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lstrip().startswith("#"):
                    continue
                add(line, plain_pos)

    if not words:
        kept = ", ".join(keep)
        raise ValueError(f"lexicon {p} ({fmt} format) yields no words for parts of speech {kept} "
                         f"(files read: {', '.join(files) or 'none'}).\n{LEXICON_LAYOUTS}")
    return Lexicon(tuple(words), tuple(pos), p, fmt, tuple(files), _hash_words(words, pos))

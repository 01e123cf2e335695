"""Lexicon reader: WordNet index files (every install layout), NegLabel's word lists, plain files."""
import os
import zipfile

import pytest

from locoop.ood.lexicon import detect_format, read_lexicon

HEADER = "".join(f"  {i} This software and database is being provided to you, the LICENSEE  \n" for i in range(1, 30))
NOUNS = ["'hood n 1 2 @ ; 1 0 08641944  ", "dog n 7 5 @ ~ #m #p %p 7 1 02084071 10114209  ",
         "hot_dog n 2 3 @ ~ + 2 0 07697537 10187990  ", "light n 15 6 ! @ ~ 15 3 11473954  "]
ADJS = ["gigantic a 1 2 & + 1 0 01385773  ", "light a 14 4 ! & ^ = 14 5 01186408  ",
        "sky-blue a 1 1 & 1 0 00376994  "]


def _write_index(folder, nouns=NOUNS, adjs=ADJS):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "index.noun"), "w") as f:
        f.write(HEADER + "\n".join(nouns) + "\n")
    with open(os.path.join(folder, "index.adj"), "w") as f:
        f.write(HEADER + "\n".join(adjs) + "\n")
    with open(os.path.join(folder, "data.noun"), "w") as f:
        f.write(HEADER)  # other database files are ignored


EXPECTED_WN = (["'hood", "dog", "hot dog", "light", "gigantic", "sky-blue"],
               ["noun", "noun", "noun", "noun", "adj", "adj"])


def test_wordnet_index_files(tmp_path):
    _write_index(tmp_path / "wordnet")
    lex = read_lexicon(tmp_path / "wordnet")
    assert lex.format == "wordnet"
    # header skipped, '_' -> ' ', 'light' (noun and adjective) kept once, as a noun
    assert (list(lex.words), list(lex.pos)) == EXPECTED_WN
    assert lex.counts() == {"noun": 4, "adj": 2}
    assert lex.of("adj") == ["gigantic", "sky-blue"]
    assert [os.path.basename(f) for f in lex.files] == ["index.noun", "index.adj"]
    only_adj = read_lexicon(tmp_path / "wordnet", parts_of_speech=["adj"])
    assert list(only_adj.words) == ["gigantic", "light", "sky-blue"]


@pytest.mark.parametrize("layout", ["tarball", "tarball-parent", "debian", "nltk-corpus", "nltk-root"])
def test_wordnet_install_layouts(tmp_path, layout):
    folder = {"tarball": "WordNet-3.0/dict", "tarball-parent": "WordNet-3.0/dict", "debian": "usr/share/wordnet",
              "nltk-corpus": "nltk_data/corpora/wordnet", "nltk-root": "nltk_data/corpora/wordnet"}[layout]
    _write_index(tmp_path / folder)
    given = {"tarball": "WordNet-3.0/dict", "tarball-parent": "WordNet-3.0", "debian": "usr/share/wordnet",
             "nltk-corpus": "nltk_data/corpora/wordnet", "nltk-root": "nltk_data"}[layout]
    lex = read_lexicon(tmp_path / given)
    assert (list(lex.words), list(lex.pos)) == EXPECTED_WN


@pytest.mark.parametrize("given", ["nltk_data", "nltk_data/corpora", "nltk_data/corpora/wordnet.zip"])
def test_wordnet_zip_as_nltk_downloads_it(tmp_path, given):
    corpora = tmp_path / "nltk_data" / "corpora"
    corpora.mkdir(parents=True)
    with zipfile.ZipFile(corpora / "wordnet.zip", "w") as zf:
        zf.writestr("wordnet/index.noun", HEADER + "\n".join(NOUNS) + "\n")
        zf.writestr("wordnet/index.adj", HEADER + "\n".join(ADJS) + "\n")
    lex = read_lexicon(tmp_path / given)
    assert (list(lex.words), list(lex.pos)) == EXPECTED_WN
    assert lex.files[0].endswith("wordnet.zip:wordnet/index.noun")


def _write_neglabel(folder):
    os.makedirs(folder, exist_ok=True)
    files = {"noun.plant.txt": "oak\nlight\nmoss\n", "noun.Tops.txt": "entity\noak\n",
             "adj.all.txt": "light\n  gigantic \n", "adj.pert.txt": "solar\n", "README.md": "not words\n"}
    for name, text in files.items():
        (folder / name).write_text(text)


def test_neglabel_folder_sorted_dedup_and_exclude(tmp_path):
    _write_neglabel(tmp_path / "txtfiles")
    lex = read_lexicon(tmp_path / "txtfiles")
    assert lex.format == "neglabel" and detect_format(tmp_path / "txtfiles") == "neglabel"
    # sorted names: adj.all, adj.pert, noun.Tops, noun.plant ('T' < 'p'); first occurrence wins
    assert list(lex.words) == ["light", "gigantic", "solar", "entity", "oak", "moss"]
    assert list(lex.pos) == ["adj", "adj", "adj", "noun", "noun", "noun"]
    assert [os.path.basename(f) for f in lex.files] == ["adj.all.txt", "adj.pert.txt", "noun.Tops.txt",
                                                        "noun.plant.txt"]
    csp_like = read_lexicon(tmp_path / "txtfiles", exclude=["adj.pert.txt"])
    assert "solar" not in csp_like.words and len(csp_like) == 5
    with pytest.raises(ValueError, match="adj.missing.txt"):
        read_lexicon(tmp_path / "txtfiles", exclude=["adj.missing.txt"])
    nouns = read_lexicon(tmp_path / "txtfiles", parts_of_speech=["noun"])
    assert list(nouns.words) == ["entity", "oak", "light", "moss"]


def test_plain_word_file(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("# my negatives\nred_panda\n\n tractor \nred panda\ncloud\n")
    lex = read_lexicon(f)
    assert lex.format == "words"
    assert list(lex.words) == ["red panda", "tractor", "cloud"] and set(lex.pos) == {"noun"}
    adj = read_lexicon(f, plain_pos="adj")
    assert set(adj.pos) == {"adj"} and adj.sha256 != lex.sha256
    # the hash is of the words used, not of the file: the same words from another file match
    g = tmp_path / "same.txt"
    g.write_text("red panda\ntractor\ncloud\n")
    assert read_lexicon(g).sha256 == lex.sha256


def test_errors_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.noun and index.adj"):
        read_lexicon(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither WordNet"):
        read_lexicon(tmp_path / "empty")
    _write_index(tmp_path / "headeronly", nouns=[], adjs=[])
    with pytest.raises(ValueError, match="no lemma lines"):
        read_lexicon(tmp_path / "headeronly")
    (tmp_path / "blank.txt").write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="yields no words"):
        read_lexicon(tmp_path / "blank.txt")
    only_adj_dir = tmp_path / "nounlists"
    only_adj_dir.mkdir()
    (only_adj_dir / "noun.a.txt").write_text("oak\n")
    with pytest.raises(ValueError, match="yields no words"):
        read_lexicon(only_adj_dir, parts_of_speech=["adj"])
    with pytest.raises(ValueError, match="unknown lexicon format"):
        read_lexicon(only_adj_dir, fmt="conceptnet")
    with pytest.raises(ValueError, match="parts of speech"):
        read_lexicon(only_adj_dir, parts_of_speech=["verb"])
    with pytest.raises(ValueError, match="neglabel format only"):
        read_lexicon(tmp_path / "blank.txt", exclude=["noun.a.txt"])
    with pytest.raises(ValueError, match="is a file"):
        read_lexicon(tmp_path / "blank.txt", fmt="neglabel")

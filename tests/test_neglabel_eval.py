"""NegLabel / CSP wired into the OOD benchmark, end to end through ``python -m locoop``: zero-shot,
LoCoOp's learned prompts, a SeTAR-pruned model, the feature cache (text side only), and the errors
that come before any image is encoded. Scores are recomputed by hand from the definitions."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip
from locoop.cli import main as cli_main
from locoop.data.synthetic import make_imagenet_like, make_ood_sets, make_val_split
from locoop.ood.neglabel import CSP_ADJ_TEMPLATES, CSP_MODIFIERS, CSP_NOUN_TEMPLATES, text_fingerprint

DS_CFG = "configs/datasets/imagenet.yaml"
METHOD_CFG = "configs/trainers/LoCoOp/vit_b16_ep50.yaml"
SETS = ["iNaturalist", "Texture"]
WORDS = ["tractor", "violin", "cloud", "river", "hammer", "kettle", "lamp", "rocket", "tulip", "moss", "oak", "fern",
         "bicycle", "umbrella"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_vit_path):
    root = tmp_path_factory.mktemp("neglabel_eval")
    make_imagenet_like(str(root / "data"), num_classes=3, train_per_class=2, val_per_class=3, image_size=(40, 40),
                       seed=0)
    make_ood_sets(str(root / "data"), names=SETS, per_set=4, image_size=(40, 40), seed=1)
    make_val_split(str(root / "val_split.json"), str(root / "data" / "imagenet" / "images" / "train"), per_class=1)
    (root / "words.txt").write_text("# a tiny lexicon\n" + "\n".join(WORDS) + "\n")
    lex = root / "txtfiles"  # NegLabel's word-list folder, with the files CSP excludes
    lex.mkdir()
    (lex / "noun.artifact.txt").write_text("tractor\nhammer\nviolin\nbicycle\nlamp\nkettle\numbrella\nrocket\n")
    (lex / "noun.plant.txt").write_text("oak\nmoss\nfern\ntulip\n")
    (lex / "adj.all.txt").write_text("gigantic\nwooden\nshiny\nfurry\nbitter\nsilent\n")
    for excluded, word in (("noun.person.txt", "sailor"), ("noun.quantity.txt", "dozen"),
                           ("noun.group.txt", "crowd"), ("adj.pert.txt", "lunar")):
        (lex / excluded).write_text(word + "\n")
    return {"root": root, "data": root / "data", "words": root / "words.txt", "txtfiles": lex, "ckpt": tiny_vit_path}


def common(d, out, *opts):
    return ["--root", d["data"], "--dataset-config-file", DS_CFG, "--config-file", METHOD_CFG, "--output-dir", out,
            "MODEL.BACKBONE.NAME", d["ckpt"], "INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TEST.BATCH_SIZE", "4", "TRAINER.LOCOOP.PREC", "fp32", "OOD.DATASETS", str(SETS),
            "OOD.PLOT", "False", "VERBOSE", "False", "OOD.CACHE_DIR", d["root"] / "cache", *opts]


def cli(args, capsys):
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def neg_opts(d, lexicon=None, *extra):
    return ["OOD.NEGLABEL.LEXICON", lexicon or d["words"], "OOD.NEGLABEL.NGROUP", "2", "OOD.NEGLABEL.RATIO", "0.5",
            *extra]


# ------------------------------------------------------------------------------------ hand computations
def _encode(model, prompts):
    with torch.no_grad():
        return F.normalize(model.encode_text(clip.tokenize(prompts)).float(), dim=-1)


def _ensemble(model, prompts):
    """CSP's prompt ensemble: the raw mean of the prompts' features, then normalised."""
    with torch.no_grad():
        return F.normalize(model.encode_text(clip.tokenize(prompts)).float().mean(dim=0), dim=-1)


def _image_features(model, d, names=("ID",) + tuple(SETS)):
    from locoop.config import get_cfg_default, merge_cfg
    from locoop.data import build_data_loader, build_dataset, build_ood_datasets, build_test_transform
    from locoop.ood.features import extract_features

    cfg = get_cfg_default()
    merge_cfg(cfg, DS_CFG, METHOD_CFG, {"DATASET.ROOT": str(d["data"])}, ["INPUT.SIZE", "(32,32)"])
    ds = build_dataset(cfg, need_train=False)
    sets = {"ID": ds.test, **build_ood_datasets(str(d["data"]), SETS)}
    tfm = build_test_transform(cfg)
    return ds.classnames, {n: extract_features(model, build_data_loader(sets[n], 4, tfm, is_train=False), "cpu",
                                               with_local=False).global_feats for n in names}


def _read_bank(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    labels, pos = [r[1] for r in rows], [r[2] for r in rows]
    groups = {}
    for i, r in enumerate(rows):
        if r[3] != "":
            groups.setdefault(int(r[3]), []).append(i)
    return labels, pos, [groups[g] for g in sorted(groups)]


def _neglabel_by_hand(img, ids, negs, groups, tau=0.01):
    """S = mean_g sum_k e^(cos_k/tau) / (sum_k e^(cos_k/tau) + sum_(j in g) e^(cos_j/tau)), in float64."""
    a = img.double().numpy() @ ids.double().numpy().T / tau
    b = img.double().numpy() @ negs.double().numpy().T / tau
    top = a.max(axis=1, keepdims=True)
    ea = np.exp(a - top).sum(axis=1)
    return np.mean([ea / (ea + np.exp(b[:, g] - top).sum(axis=1)) for g in groups], axis=0)


def _twin_selection(model, words, ids, templates, ratio):
    """NegMining written out: per word the 95th percentile of its cosines to the ID labels, smallest kept."""
    feats = torch.stack([_ensemble(model, [t.format(w) for t in templates]) for w in words])
    q = np.percentile(feats.numpy() @ ids.numpy().T, 95, axis=1)
    keep = np.argsort(q, kind="stable")[: int(len(words) * ratio)]
    return [words[i] for i in keep]


# ------------------------------------------------------------------------------------ zero-shot
def test_zero_shot_neglabel_eval_files_and_hand_scores(data, tmp_path, capsys):
    out = tmp_path / "zs"
    rc, stdout, err = cli(["eval", "--trainer", "ZeroshotCLIP"] + common(data, out, "OOD.SCORES", "['MCM', 'NegLabel']",
                                                                          *neg_opts(data)), capsys)
    assert rc == 0, err
    for name in ("ood_results.md", "ood_results.csv", "ood_results.json", "ood_scores.npz", "text_bank_NegLabel.tsv"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "ood_results.json").read_text())
    assert set(doc["scores"]) == {"MCM", "NegLabel"} and set(doc["scores"]["NegLabel"]) == set(SETS) | {"Average"}
    bank = doc["meta"]["text_banks"]["NegLabel"]
    assert bank["id_text"] == "recipe" and bank["id_prompts"] == ["the nice {}"] and bank["recipe"] == "neglabel"
    assert (bank["num_candidates"], bank["num_negatives"], bank["num_groups"], bank["group_size"]) == (14, 7, 2, 3)
    assert bank["params"]["ngroup"] == 2 and bank["params"]["ratio"] == 0.5 and bank["lexicon_format"] == "words"
    assert bank["dropped_by_grouping"] == 1 and bank["num_text_features"] == 3 + 7
    assert "[NegLabel]" in stdout and "## NegLabel" in (out / "ood_results.md").read_text()

    model = clip.load(data["ckpt"], device="cpu")[0].eval()
    classnames, img = _image_features(model, data)
    ids = _encode(model, [f"the nice {c}" for c in classnames])
    labels, pos, groups = _read_bank(out / "text_bank_NegLabel.tsv")
    assert labels == _twin_selection(model, WORDS, ids, ["the nice {}"], 0.5) and pos == ["noun"] * 7
    torch.manual_seed(0)  # the grouping: drop 7 mod 2 = 1, randperm(6) seeded with 0 on the CPU, 2 groups of 3
    assert groups == [sorted(g) for g in torch.randperm(6).view(2, 3).tolist()]
    assert bank["text_sha256"] == text_fingerprint(model) and len(bank["id_features_sha256"]) == 64
    npz = np.load(out / "ood_scores.npz")
    negs = _encode(model, [f"the nice {w}" for w in labels])
    for name, feats in img.items():
        np.testing.assert_allclose(npz[f"{name}/NegLabel"], _neglabel_by_hand(feats, ids, negs, groups), rtol=2e-5,
                                   atol=1e-7)
    # the other scores do not change when NegLabel is asked for too
    rc, _, err = cli(["eval", "--trainer", "ZeroshotCLIP"] + common(data, tmp_path / "mcm", "OOD.SCORES", "['MCM']"),
                     capsys)
    assert rc == 0, err
    alone = np.load(tmp_path / "mcm" / "ood_scores.npz")
    for name in img:
        np.testing.assert_array_equal(alone[f"{name}/MCM"], npz[f"{name}/MCM"])


def test_reevaluation_from_the_feature_cache_recomputes_only_the_text_side(data, tmp_path, capsys, monkeypatch):
    import locoop.ood.neglabel as nl
    import locoop.ood.runner as runner

    opts = ["OOD.SCORES", "['NegLabel']", "OOD.CACHE_DIR", tmp_path / "cache", *neg_opts(data)]
    rc, _, err = cli(["eval", "--trainer", "ZeroshotCLIP"] + common(data, tmp_path / "full", *opts), capsys)
    assert rc == 0, err
    rc, _, err = cli(["extract", "--root", data["data"], "--dataset-config-file", DS_CFG, "--config-file", METHOD_CFG,
                      "--no-local", "MODEL.BACKBONE.NAME", data["ckpt"], "INPUT.SIZE", "(32,32)",
                      "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4", "TRAINER.LOCOOP.PREC", "fp32",
                      "OOD.DATASETS", str(SETS), "OOD.CACHE_DIR", tmp_path / "cache", "VERBOSE", "False"], capsys)
    assert rc == 0, err

    def no_images(*a, **k):
        raise AssertionError("an image was encoded although its features are cached")

    def no_candidates(*a, **k):
        raise AssertionError("the lexicon was encoded again although its text features are cached")

    monkeypatch.setattr(runner, "iter_feature_batches", no_images)
    monkeypatch.setattr(nl, "build_candidates", no_candidates)
    rc, stdout, err = cli(["eval", "--trainer", "ZeroshotCLIP"] + common(data, tmp_path / "again", *opts)
                          + ["VERBOSE", "True"], capsys)
    assert rc == 0, err
    assert stdout.count("using cached features") == 3 and "Negative labels: 7 from the cache" in stdout
    full, again = np.load(tmp_path / "full" / "ood_scores.npz"), np.load(tmp_path / "again" / "ood_scores.npz")
    assert sorted(full.files) == sorted(again.files)
    for k in full.files:
        np.testing.assert_array_equal(full[k], again[k], err_msg=k)
    # another prompt set (here: the selection parameters) re-selects from the cached candidate features
    rc, _, err = cli(["eval", "--trainer", "ZeroshotCLIP"] + common(data, tmp_path / "other", *opts)
                     + ["OOD.NEGLABEL.RATIO", "0.75"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "other" / "ood_results.json").read_text())["meta"]["text_banks"]["NegLabel"][
        "num_negatives"] == 10


def test_csp_with_neglabel_word_lists(data, tmp_path, capsys):
    out = tmp_path / "csp"
    rc, _, err = cli(["eval", "--trainer", "ZeroshotCLIP"] + common(
        data, out, "OOD.SCORES", "['CSP']", *neg_opts(data, data["txtfiles"]), "OOD.NEGLABEL.NGROUP", "1"), capsys)
    assert rc == 0, err
    bank = json.loads((out / "ood_results.json").read_text())["meta"]["text_banks"]["CSP"]
    assert bank["recipe"] == "csp" and bank["lexicon_format"] == "neglabel" and bank["lexicon_exclude_applied"] is True
    assert bank["id_prompts"] == list(CSP_NOUN_TEMPLATES) and bank["num_groups"] == 0
    assert bank["lexicon_counts"] == {"adj": 6, "noun": 12}  # sailor, dozen, crowd, lunar: excluded files
    labels, pos, groups = _read_bank(out / "text_bank_CSP.tsv")
    assert (pos.count("noun"), pos.count("adj")) == (6, 3) and groups == []
    import random

    random.seed(0)  # CSP's conjugation: one superclass template per adjective, in reading order
    phrases = {a: random.choice(CSP_MODIFIERS).format(a) for a in ["gigantic", "wooden", "shiny", "furry", "bitter",
                                                                   "silent"]}
    assert set(lab for lab, p in zip(labels, pos) if p == "adj") <= set(phrases.values())

    model = clip.load(data["ckpt"], device="cpu")[0].eval()
    classnames, img = _image_features(model, data, names=("ID",))
    ids = torch.stack([_ensemble(model, [t.format(c) for t in CSP_NOUN_TEMPLATES]) for c in classnames])
    nouns = ["tractor", "hammer", "violin", "bicycle", "lamp", "kettle", "umbrella", "rocket", "oak", "moss", "fern",
             "tulip"]  # noun.artifact.txt, then noun.plant.txt (sorted file names)
    assert [lab for lab, p in zip(labels, pos) if p == "noun"] == _twin_selection(model, nouns, ids,
                                                                                  CSP_NOUN_TEMPLATES, 0.5)
    negs = torch.stack([_ensemble(model, [t.format(lab) for t in (CSP_NOUN_TEMPLATES if p == "noun"
                                                                   else CSP_ADJ_TEMPLATES)])
                        for lab, p in zip(labels, pos)])
    np.testing.assert_allclose(np.load(out / "ood_scores.npz")["ID/CSP"],
                               _neglabel_by_hand(img["ID"], ids, negs, [list(range(len(labels)))]), rtol=2e-5,
                               atol=1e-7)


# ------------------------------------------------------------------------------------ learned prompts, SeTAR
def _prompt_run(run_dir, n_ctx=4, width=64):
    from locoop.engine.checkpoint import save_checkpoint

    ctx = torch.randn(n_ctx, width, generator=torch.Generator().manual_seed(3)) * 0.02
    save_checkpoint({"state_dict": {"ctx": ctx}, "epoch": 2, "trainer": "LoCoOp"}, str(run_dir / "prompt_learner"))
    return run_dir


def test_locoop_prompts_are_the_id_labels_of_neglabel(data, tmp_path, capsys):
    run = _prompt_run(tmp_path / "locoop")
    out = tmp_path / "eval"
    rc, _, err = cli(["eval", "--trainer", "LoCoOp", "--model-dir", run] + common(
        data, out, "TRAINER.LOCOOP.N_CTX", "4", "OOD.SCORES", "['MCM', 'NegLabel']", *neg_opts(data)), capsys)
    assert rc == 0, err
    bank = json.loads((out / "ood_results.json").read_text())["meta"]["text_banks"]["NegLabel"]
    assert bank["id_text"] == "trainer" and "id_prompts" not in bank and bank["num_text_features"] == 7

    from locoop.engine.registry import build_trainer
    from tiny_setup import tiny_trainer_cfg

    cfg = tiny_trainer_cfg(data["data"], data["ckpt"], tmp_path / "t", "LoCoOp", **{"TRAINER.LOCOOP.PREC": "fp32"})
    trainer = build_trainer(cfg, need_train=False)
    trainer.load_model(str(run))
    trainer.set_model_mode("eval")
    with torch.no_grad():
        text = F.normalize(trainer.text_features().float(), dim=-1)
    model = clip.load(data["ckpt"], device="cpu")[0].eval()
    _, img = _image_features(model, data, names=("ID",))
    labels, _, groups = _read_bank(out / "text_bank_NegLabel.tsv")
    assert labels == _twin_selection(model, WORDS, text, ["the nice {}"], 0.5)
    got = np.load(out / "ood_scores.npz")["ID/NegLabel"]
    negs = _encode(model, [f"the nice {w}" for w in labels])
    np.testing.assert_allclose(got, _neglabel_by_hand(img["ID"], text, negs, groups), rtol=2e-5, atol=1e-7)
    # OOD.NEGLABEL.ID_TEXT recipe: NegLabel's own "the nice {}" labels, whatever the trainer
    rc, _, err = cli(["eval", "--trainer", "LoCoOp", "--model-dir", run] + common(
        data, tmp_path / "recipe", "TRAINER.LOCOOP.N_CTX", "4", "OOD.SCORES", "['NegLabel']", *neg_opts(data),
        "OOD.NEGLABEL.ID_TEXT", "recipe"), capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "recipe" / "ood_results.json").read_text())["meta"]["text_banks"]["NegLabel"][
        "id_text"] == "recipe"


def test_setar_pruned_text_tower_encodes_the_negative_labels(data, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps([["visual", "W_up", 1, 0.2], ["text", "W_up", 0, 0.3]]))
    out = tmp_path / "setar"
    rc, _, err = cli(["setar-search", "--root", data["data"], "--config-file", "configs/setar/imagenet/SeTAR.yaml",
                      "--output-dir", out, "--settings", settings, "MODEL.BACKBONE.NAME", data["ckpt"],
                      "DATASET.VAL_SPLIT_FILE", data["root"] / "val_split.json", "INPUT.SIZE", "(32, 32)",
                      "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4", "SETAR.TOPK", "2",
                      "OOD.DATASETS", str(SETS), "OOD.PLOT", "False", "VERBOSE", "False",
                      "OOD.CACHE_DIR", tmp_path / "cache", "OOD.SCORES", "['MCM', 'NegLabel']", *neg_opts(data)],
                     capsys)
    assert rc == 0, err
    doc = json.loads((out / "ood_results.json").read_text())
    assert set(doc["scores"]) == {"MCM", "NegLabel"} and doc["meta"]["setar"]["settings"]
    bank = doc["meta"]["text_banks"]["NegLabel"]
    unpruned = clip.load(data["ckpt"], device="cpu")[0]
    assert bank["id_text"] == "recipe" and bank["text_sha256"] != text_fingerprint(unpruned)  # the pruned text tower


# ------------------------------------------------------------------------------------ early errors
def test_lexicon_problems_stop_before_any_model_or_image(data, tmp_path, capsys, monkeypatch):
    import clip.pretrained

    def boom(*a, **k):
        raise AssertionError("CLIP was loaded: the bad lexicon was not caught early")

    monkeypatch.setattr(clip.pretrained, "load", boom)
    monkeypatch.setattr(clip, "load", boom)
    base = ["eval", "--trainer", "ZeroshotCLIP"] + common(data, tmp_path / "x", "OOD.SCORES", "['MCM', 'NegLabel']")
    rc, _, err = cli(base, capsys)
    assert rc == 2 and "score NegLabel needs a word list" in err and "OOD.NEGLABEL.LEXICON" in err
    rc, _, err = cli(base + ["OOD.NEGLABEL.LEXICON", tmp_path / "missing.txt"], capsys)
    assert rc == 2 and "OOD.NEGLABEL.LEXICON" in err and "missing.txt not found" in err and "wordnet-base" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(base + ["OOD.NEGLABEL.LEXICON", tmp_path / "empty"], capsys)
    assert rc == 2 and "holds neither WordNet's index.noun" in err
    rc, _, err = cli(base + ["OOD.NEGLABEL.LEXICON", data["words"], "OOD.NEGLABEL.LEXICON_FORMAT", "neglabel"], capsys)
    assert rc == 2 and "is a file" in err
    rc, _, err = cli(base + ["OOD.NEGLABEL.LEXICON", data["words"], "OOD.NEGLABEL.ID_TEXT", "learned"], capsys)
    assert rc == 2 and "OOD.NEGLABEL.ID_TEXT = 'learned' is not valid" in err
    rc, _, err = cli(["setar-search", "--root", data["data"], "--config-file", "configs/setar/imagenet/SeTAR.yaml",
                      "--output-dir", tmp_path / "s", "SETAR.CRITERION", "auroc", "SETAR.SCORE", "NegLabel",
                      "SETAR.OOD_VAL_DATASETS", "['Texture']", "MODEL.BACKBONE.NAME", data["ckpt"]], capsys)
    assert rc == 2 and "'NegLabel' needs its negative labels" in err


def test_too_few_negatives_for_the_groups_fail_before_the_images(data, tmp_path, capsys, monkeypatch):
    import locoop.ood.runner as runner

    def no_images(*a, **k):
        raise AssertionError("images were encoded before the bank was checked")

    monkeypatch.setattr(runner, "iter_feature_batches", no_images)
    rc, _, err = cli(["eval", "--trainer", "ZeroshotCLIP"] + common(
        data, tmp_path / "x", "OOD.SCORES", "['NegLabel']", "OOD.NEGLABEL.LEXICON", data["words"]), capsys)
    assert rc == 2 and "cannot form 100 groups" in err and "OOD.NEGLABEL.NGROUP" in err


def test_id_text_auto_follows_how_the_trainer_gets_its_prompts():
    from locoop.config import get_cfg_default
    from locoop.ood.neglabel import resolve_id_text

    cfg = get_cfg_default()
    for trainer, want in (("LoCoOp", "trainer"), ("CoOp", "trainer"), ("ZeroshotCLIP", "recipe"),
                          ("SeTARZeroshotCLIP", "recipe"), ("SeTARFT", "recipe"), ("LoRA", "recipe"), ("", "recipe")):
        cfg.TRAINER.NAME = trainer
        assert resolve_id_text(cfg) == want, trainer
    cfg.OOD.NEGLABEL.ID_TEXT = "trainer"
    cfg.TRAINER.NAME = "ZeroshotCLIP"
    assert resolve_id_text(cfg) == "trainer"


def test_a_model_without_text_tower_cannot_build_a_bank():
    from locoop.ood.textbank import build_text_banks

    with pytest.raises(ValueError, match="need a CLIP text tower"):
        build_text_banks({"NegLabel": object()}, torch.nn.Linear(2, 2), torch.zeros(3, 2), ["a", "b", "c"], "cpu",
                         None)

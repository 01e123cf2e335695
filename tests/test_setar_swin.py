"""A Swin-V2 classifier (SeTAR's vision-only backbone) through the OOD runner, ``eval`` and ``setar-search``.

Tiny random Swin-V2 snapshots (:func:`locoop.models.swinv2.make_tiny_swinv2`) on generated data; the
scores are recomputed here from the HF model's own logits, written out by hand.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from locoop.cli import main as cli_main  # noqa: E402
from locoop.data.synthetic import make_imagenet_like, make_ood_sets  # noqa: E402
from locoop.models.swinv2 import build_swin_preprocess, load_swinv2, make_tiny_swinv2, save_snapshot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DS_CFG = str(REPO / "configs/datasets/imagenet.yaml")
SWIN_CFG = REPO / "configs/setar/imagenet/swin_base"
NUM_CLASSES = 4
OOD_SETS = ["iNaturalist", "SUN", "Places", "Texture"]
SMALL = ["INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4",
         "MODEL.DEVICE", "cpu", "OOD.PLOT", "True"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("swin_data")
    make_imagenet_like(str(root), num_classes=NUM_CLASSES, train_per_class=2, val_per_class=3, image_size=(40, 40),
                       seed=0)
    make_ood_sets(str(root), per_set=3, image_size=(40, 40), seed=1)
    return root


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    out = tmp_path_factory.mktemp("swin_snap") / "tiny-swinv2"
    save_snapshot(make_tiny_swinv2(num_labels=NUM_CLASSES, seed=0), out)
    return out


def cli(args, capsys):
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _hand_scores(snapshot, paths, T=1.0):
    """MSP / energy / GL-MCM of SeTAR's scorers from the HF model's logits and the reference local logits."""
    from PIL import Image

    model = load_swinv2(snapshot)
    tfm = build_swin_preprocess(32)
    x = torch.stack([tfm(Image.open(p)) for p in paths])
    with torch.no_grad():
        logits = model.to_hf()(pixel_values=x).logits.double()
        _, local = model.reference_forward(x)
    local = local.double()
    msp = torch.softmax(logits / T, -1).max(-1).values
    energy = T * torch.logsumexp(logits / T, -1)
    lmcm = torch.softmax(local / T, -1).max(-1).values.max(-1).values
    return {"MCM": msp.numpy(), "energy": energy.numpy(), "GL-MCM": (msp + lmcm).numpy()}, logits.argmax(-1).numpy()


def test_eval_swin_through_the_runner(tmp_path, data_root, snapshot, capsys, one_thread):
    out = tmp_path / "eval"
    rc, stdout, err = cli(["eval", "--root", data_root, "--trainer", "SeTARSwin", "--dataset-config-file", DS_CFG,
                           "--config-file", SWIN_CFG / "Vanilla_MCM.yaml", "--output-dir", out,
                           "MODEL.BACKBONE.NAME", snapshot, "OOD.SCORES", "['MCM', 'energy', 'GL-MCM']"] + SMALL,
                          capsys)
    assert rc == 0, err
    for name in ("ood_results.md", "ood_results.csv", "ood_results.json", "ood_scores.npz", "plots/overview.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "ood_results.json").read_text())
    assert doc["meta"]["trainer"] == "SeTARSwin" and doc["meta"]["logit_scale"] == 1.0
    assert doc["meta"]["precision"] == "fp32"
    npz = np.load(out / "ood_scores.npz")
    from locoop.data import build_dataset
    from locoop.config import get_cfg_default, merge_cfg

    cfg = get_cfg_default()
    merge_cfg(cfg, DS_CFG, None, {"DATASET.ROOT": str(data_root)})
    ds = build_dataset(cfg, need_train=False)
    want, preds = _hand_scores(snapshot, [d.impath for d in ds.test])
    for s in ("MCM", "energy", "GL-MCM"):
        np.testing.assert_allclose(npz[f"ID/{s}"], want[s], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(npz["id_predictions"], preds)
    assert doc["id_accuracy"] == pytest.approx(100 * float((preds == np.array([d.label for d in ds.test])).mean()))
    sun = sorted((Path(data_root) / "SUN").rglob("*.*"))
    got = npz["SUN/MCM"]
    assert len(got) == len(sun)


def test_swin_rejects_text_bank_scores_and_wrong_classes(tmp_path, data_root, snapshot, capsys):
    base = ["eval", "--root", data_root, "--trainer", "SeTARSwin", "--dataset-config-file", DS_CFG,
            "--config-file", SWIN_CFG / "Vanilla_MCM.yaml", "--output-dir", tmp_path / "x"] + SMALL
    other = tmp_path / "snap7"
    save_snapshot(make_tiny_swinv2(num_labels=7, seed=0), other)
    rc, _, err = cli(base + ["MODEL.BACKBONE.NAME", other], capsys)
    assert rc == 2 and "7 classes" in err
    rc, _, err = cli(base + ["MODEL.BACKBONE.NAME", "ViT-B/16"], capsys)
    assert rc == 2 and "Swin-V2 snapshot" in err


# ============================================================================ the search
def _search_data(num_classes=NUM_CLASSES, n_batches=2, batch=3, seed=0):
    from locoop.setar.search import SearchData

    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen))
               for _ in range(n_batches)]
    return SearchData(batches, None)


def test_visual_only_swin_order():
    from locoop.setar.searchers import build_steps

    steps = build_steps("visual_only_swin", {"visual": [2, 2, 18, 2]}, ["W_q", "W_up"])
    layers = [s.layer for s in steps[::2]]
    assert layers[:4] == [(3, 1), (3, 0), (2, 17), (2, 16)] and layers[-1] == (0, 0) and len(layers) == 24
    assert [s.weight_type for s in steps[:2]] == ["W_q", "W_up"] and {s.tower for s in steps} == {"visual"}
    with pytest.raises(ValueError, match="no W_p"):
        build_steps("visual_only_swin", {"visual": [2, 2]}, ["W_up"], freeze_proj=False)
    with pytest.raises(ValueError, match="visual_only_swin"):
        build_steps("visual_only", {"visual": [2, 2]}, ["W_up"])
    with pytest.raises(ValueError, match="Swin-V2 classifier"):
        build_steps("visual_only_swin", {"visual": 12, "text": 12}, ["W_up"])


@pytest.mark.parametrize("weight_types", [["W_up"], ["W_q", "W_k", "W_v", "W_o", "W_up", "W_down"]])
def test_fast_search_equals_naive(weight_types, one_thread):
    from locoop.models.swinv2 import SwinV2Classifier
    from locoop.setar.search import run_search

    results = {}
    for mode in ("fast", "naive"):
        model = SwinV2Classifier(make_tiny_swinv2(num_labels=NUM_CLASSES, seed=3)).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        results[mode] = run_search(model, _search_data(), searcher="visual_only_swin", weight_types=weight_types,
                                   ratios=[0.0, 0.25, 0.5], lam=0.01, top_k=2, mode=mode, verbose=False)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        from locoop.setar.settings import nonzero

        assert len(changed) == len(nonzero(results[mode].settings))
    fast, naive = results["fast"], results["naive"]
    assert fast.settings == naive.settings
    assert [tuple(s[:3]) for s in fast.settings][:len(weight_types)] == [("visual", w, (1, 1)) for w in weight_types]
    assert fast.baseline == pytest.approx(naive.baseline, rel=1e-6, abs=1e-6)
    assert fast.final == pytest.approx(naive.final, rel=1e-6, abs=1e-6)
    for a, b in zip(fast.log, naive.log):
        assert (a["layer"], a["ratio"]) == (b["layer"], b["ratio"])
        assert a["criterion"] == pytest.approx(b["criterion"], rel=1e-6, abs=1e-6)
    assert fast.counters["visual_layer_passes"] < naive.counters["visual_layer_passes"]


def test_stage_block_settings_applied_and_reverted_bitwise(tmp_path):
    from locoop.models.swinv2 import SwinV2Classifier
    from locoop.setar.lowrank import LowRankEditor
    from locoop.setar.settings import apply_settings, load_settings, save_best_settings

    model = SwinV2Classifier(make_tiny_swinv2(num_labels=NUM_CLASSES, seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps([["visual", "W_up", [1, 1], 0.25], ["visual", "W_q", [0, 0], 0.5],
                                ["visual", "W_down", [1, 0], 0.0]]))
    settings = load_settings(path, model)
    assert settings[0] == ("visual", "W_up", (1, 1), 0.25)
    editor = LowRankEditor(model)
    apply_settings(editor, settings)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"swinv2.encoder.layers.1.blocks.1.intermediate.dense.weight",
                       "swinv2.encoder.layers.0.blocks.0.attention.self.query.weight"}
    w = model.get_linear("W_up", (1, 1)).weight
    u, s, vh = torch.linalg.svd(before["swinv2.encoder.layers.1.blocks.1.intermediate.dense.weight"],
                                full_matrices=False)
    k = round(0.25 * min(w.shape))
    torch.testing.assert_close(w, (u[:, :-k] * s[:-k]) @ vh[:-k])
    save_best_settings(tmp_path / "best.json", settings)
    assert json.loads((tmp_path / "best.json").read_text())["settings"][0] == ["visual", "W_up", [1, 1], 0.25]
    assert load_settings(tmp_path / "best.json", model) == settings
    editor.revert_all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for bad, msg in ((["visual", "W_up", [2, 0], 0.1], "stage 2"), (["visual", "W_up", 3, 0.1], r"\[stage, block\]"),
                     (["text", "W_up", [0, 0], 0.1], "no text tower"), (["visual", "W_p", None, 0.1], "W_p")):
        path.write_text(json.dumps([bad]))
        with pytest.raises(ValueError, match=msg):
            load_settings(path, model)


# ============================================================================ end to end
@pytest.fixture(scope="module")
def val_split(data_root):
    from locoop.data.synthetic import make_val_split

    path = Path(data_root) / "val_split.json"
    if not path.is_file():
        make_val_split(str(path), str(Path(data_root) / "imagenet" / "images" / "train"), per_class=2)
    return path


def _search_args(data_root, snapshot, val_split, config, out, *extra, flags=()):
    return ["setar-search", "--root", data_root, "--dataset-config-file", DS_CFG, "--config-file", SWIN_CFG / config,
            "--output-dir", out, *flags, "MODEL.BACKBONE.NAME", snapshot, "DATASET.VAL_SPLIT_FILE", val_split,
            "SETAR.TOPK", "2", "SETAR.RATIOS", "[0.0, 0.25, 0.5]", *SMALL, *extra]


def test_setar_search_swin_end_to_end(tmp_path, data_root, snapshot, val_split, capsys, one_thread):
    out = tmp_path / "search"
    rc, stdout, err = cli(_search_args(data_root, snapshot, val_split, "SeTAR.yaml", out, "TRAINER.NAME", ""),
                          capsys)
    assert rc == 0, err[-3000:]
    marked = json.loads((out / "best_settings.json").read_text())
    settings = marked["settings"]
    assert marked["complete"] and [s[:3] for s in settings] == [["visual", "W_up", [1, 1]], ["visual", "W_up", [1, 0]],
                                                                 ["visual", "W_up", [0, 1]], ["visual", "W_up", [0, 0]]]
    rows = (out / "search_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 * 3 and '"[1, 1]"' in rows[1]
    results = json.loads((out / "ood_results.json").read_text())
    assert results["meta"]["trainer"] == "SeTARSwin" and results["meta"]["setar"]["settings"] == settings
    assert set(results["scores"]) == {"MCM", "energy"}
    for name in ("ood_results.md", "ood_results.csv", "ood_scores.npz", "plots/overview.png", "search_summary.json"):
        assert (out / name).is_file(), name

    # naive mode: the same settings and criteria
    out_naive = tmp_path / "naive"
    rc, _, err = cli(_search_args(data_root, snapshot, val_split, "SeTAR.yaml", out_naive,
                                  flags=("--mode", "naive", "--no-test")), capsys)
    assert rc == 0, err[-3000:]
    assert json.loads((out_naive / "best_settings.json").read_text())["settings"] == settings
    log_f = json.loads((out / "search_log.json").read_text())
    log_n = json.loads((out_naive / "search_log.json").read_text())
    assert [r["criterion"] for r in log_f] == pytest.approx([r["criterion"] for r in log_n], rel=1e-6, abs=1e-6)

    # the settings applied again without a search give the same test results; a resumed complete search too
    out_apply = tmp_path / "apply"
    rc, _, err = cli(_search_args(data_root, snapshot, val_split, "SeTAR.yaml", out_apply,
                                  flags=("--settings", out / "best_settings.json")), capsys)
    assert rc == 0, err[-3000:]
    assert json.loads((out_apply / "ood_results.json").read_text())["scores"] == results["scores"]
    rc, _, err = cli(_search_args(data_root, snapshot, val_split, "SeTAR.yaml", out), capsys)
    assert rc == 0, err[-3000:]
    assert json.loads((out / "ood_results.json").read_text())["scores"] == results["scores"]


@pytest.mark.parametrize("config,score", [("Vanilla_MCM.yaml", "MCM"), ("Vanilla_energy.yaml", "energy")])
def test_setar_search_swin_vanilla(tmp_path, data_root, snapshot, val_split, capsys, config, score):
    out = tmp_path / "v"
    rc, _, err = cli(_search_args(data_root, snapshot, val_split, config, out), capsys)
    assert rc == 0, err[-3000:]
    doc = json.loads((out / "ood_results.json").read_text())
    assert set(doc["scores"]) == {score} and doc["meta"]["setar"]["settings"] == []
    want, _ = _hand_scores(snapshot, _id_test_paths(data_root))
    np.testing.assert_allclose(np.load(out / "ood_scores.npz")[f"ID/{score}"], want[score], rtol=1e-5, atol=1e-6)


def _id_test_paths(data_root):
    from locoop.config import get_cfg_default, merge_cfg
    from locoop.data import build_dataset

    cfg = get_cfg_default()
    merge_cfg(cfg, DS_CFG, None, {"DATASET.ROOT": str(data_root)})
    return [d.impath for d in build_dataset(cfg, need_train=False).test]


def test_setar_search_swin_errors(tmp_path, data_root, snapshot, val_split, capsys):
    rc, _, err = cli(_search_args(data_root, snapshot, val_split, "SeTAR.yaml", tmp_path / "a", "SETAR.SEARCHER",
                                  "visual_text"), capsys)
    assert rc == 2 and "visual_only_swin" in err
    bad = tmp_path / "bad.json"
    bad.write_text('[["visual", "W_up", [5, 0], 0.1]]')
    rc, _, err = cli(_search_args(data_root, snapshot, val_split, "SeTAR.yaml", tmp_path / "b",
                                  flags=("--settings", bad)), capsys)
    assert rc == 2 and "stage 5" in err


# ============================================================================ shipped configs
def _load(rel):
    from locoop.config import get_cfg_default, merge_cfg

    return merge_cfg(get_cfg_default(), DS_CFG, str(REPO / "configs/setar/imagenet" / rel))


def test_shipped_swin_and_clip_large_configs():
    from locoop.config.checks import check_setar, validate_cfg
    from locoop.models.swinv2 import SETAR_SWIN_MODEL, is_swinv2_backbone

    seen = {}
    for rel in ("swin_base/SeTAR.yaml", "swin_base/Vanilla_MCM.yaml", "swin_base/Vanilla_energy.yaml",
                "clip_large/SeTAR.yaml", "clip_large/Vanilla_MCM.yaml", "clip_large/Vanilla_GL_MCM.yaml"):
        cfg = _load(rel)
        validate_cfg(cfg)
        search = not str(cfg.SETAR.SETTINGS_FILE)
        check_setar(cfg, search)
        seen[rel] = cfg
        assert cfg.SEED == 5 and float(cfg.OOD.T) == 1.0
    swin = seen["swin_base/SeTAR.yaml"]
    assert swin.MODEL.BACKBONE.NAME == SETAR_SWIN_MODEL and is_swinv2_backbone(swin.MODEL.BACKBONE.NAME)
    assert (swin.SETAR.SEARCHER, list(swin.SETAR.WEIGHT_TYPES), swin.SETAR.LAMBDA, swin.SETAR.TOPK) == \
        ("visual_only_swin", ["W_up"], 0.01, 700)
    assert swin.DATALOADER.TEST.BATCH_SIZE == 384 and tuple(swin.INPUT.SIZE) == (256, 256)
    assert list(swin.SETAR.RATIOS) == [0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40]
    assert list(seen["swin_base/Vanilla_MCM.yaml"].OOD.SCORES) == ["MCM"]
    assert list(seen["swin_base/Vanilla_energy.yaml"].OOD.SCORES) == ["energy"]
    large = seen["clip_large/SeTAR.yaml"]
    assert large.MODEL.BACKBONE.NAME == "ViT-L/14" and not is_swinv2_backbone(large.MODEL.BACKBONE.NAME)
    assert (large.SETAR.SEARCHER, large.SETAR.LAMBDA, large.SETAR.TOPK, large.DATALOADER.TEST.BATCH_SIZE) == \
        ("visual_text", 0.5, 300, 512)
    assert list(seen["clip_large/Vanilla_GL_MCM.yaml"].OOD.SCORES) == ["GL-MCM"]


def test_searcher_must_fit_the_backbone():
    from locoop.config.checks import check_setar

    cfg = _load("swin_base/SeTAR.yaml")
    cfg.SETAR.SEARCHER = "visual_text"
    with pytest.raises(ValueError, match="use SETAR.SEARCHER visual_only_swin"):
        check_setar(cfg, True)
    cfg = _load("clip_large/SeTAR.yaml")
    cfg.SETAR.SEARCHER = "visual_only_swin"
    with pytest.raises(ValueError, match="is a CLIP model"):
        check_setar(cfg, True)


def test_setar_json_swin_config_runs_the_swin_search(tmp_path, data_root, snapshot, val_split, capsys, one_thread):
    # SeTAR's swin_base SeTAR.json keys (hand-written, same keys), its searcher name visual_only_swin included
    cfg = {"id_dataset": "ID_ImageNet1K", "model_name": str(snapshot), "model_type": "SwinTransformerV2",
           "searcher": "visual_only_swin", "weight_type": "W_up", "lora_svd_init_type": "small",
           "candi_ratios": [0.0, 0.25], "locoop_lambda": 0.01, "locoop_top_k": 2, "temperature": 1,
           "batch_size": 4, "seed": 5, "split": "val", "scorers": ["mcm_score", "energy_score"]}
    path = tmp_path / "SeTAR.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "json_search"
    rc, _, err = cli(["setar-search", "--root", data_root, "--dataset-config-file", DS_CFG, "--config-file", path,
                      "--output-dir", out, "DATASET.VAL_SPLIT_FILE", val_split, "INPUT.SIZE", "(32,32)",
                      "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "OOD.PLOT", "False"], capsys)
    assert rc == 0, err[-3000:]
    results = json.loads((out / "ood_results.json").read_text())
    assert results["meta"]["trainer"] == "SeTARSwin" and set(results["scores"]) == {"MCM", "energy"}
    settings = json.loads((out / "best_settings.json").read_text())["settings"]
    assert [s[2] for s in settings] == [[1, 1], [1, 0], [0, 1], [0, 0]]


def test_visualize_refuses_a_swin_backbone_in_one_line(tmp_path, data_root, snapshot, capsys):
    image = next(p for p in (Path(data_root) / "imagenet" / "images" / "val").rglob("*") if p.is_file())
    rc, _, err = cli(["visualize", "--root", data_root, "--trainer", "ZeroshotCLIP", "--dataset-config-file", DS_CFG,
                      "--image_path", image, "--label", "0", "--output-dir", tmp_path,
                      "MODEL.BACKBONE.NAME", snapshot], capsys)
    assert rc == 2 and "is a Swin-V2 classifier" in err and "Traceback" not in err
    assert "visualize needs a CLIP model's class prompts" in err and "--backbone ViT-B/16" in err


def test_extract_refuses_a_swin_backbone_in_one_line(tmp_path, data_root, snapshot, capsys):
    rc, _, err = cli(["extract", "--root", data_root, "--dataset-config-file", DS_CFG, "--datasets", "ID",
                      "--cache-dir", tmp_path / "cache", "MODEL.BACKBONE.NAME", snapshot], capsys)
    assert rc == 2 and "is a Swin-V2 classifier" in err and "Traceback" not in err
    assert "extract needs CLIP image features to cache" in err and "--backbone ViT-B/16" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pt"))


def test_classifier_local_logits_are_cached_in_float32(snapshot):
    from locoop.config import get_cfg_default
    from locoop.ood.runner import cache_local_dtype

    cfg = get_cfg_default()
    assert cfg.OOD.CACHE_LOCAL_DTYPE == "float16" and cache_local_dtype(cfg) == torch.float16
    assert cache_local_dtype(cfg, load_swinv2(snapshot)) == torch.float32  # unbounded logits: exact

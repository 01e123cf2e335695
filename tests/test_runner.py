"""OOD benchmark runner and shared feature extraction on generated folders with a tiny CLIP."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip
from locoop.config import get_cfg_default, merge_cfg
from locoop.data import build_test_transform, read_image
from locoop.data.synthetic import corrupt_image, make_imagenet_like, make_ood_sets
from locoop.ood import runner as runner_mod
from locoop.ood.features import extract_features, iter_similarities, score_features
from locoop.ood.metrics import ood_metrics
from locoop.ood.runner import run_ood_benchmark

OOD_SETS = ["iNaturalist", "Texture"]
SIZE = 32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner_data")
    info = make_imagenet_like(str(root), num_classes=3, train_per_class=0, val_per_class=3,
                              image_size=(40, 40), seed=0)
    make_ood_sets(str(root), names=OOD_SETS, per_set=4, image_size=(40, 40), seed=1)
    return root, info


@pytest.fixture(scope="module")
def model_and_text(tiny_vit_path, data_root):
    torch.manual_seed(0)
    model, _ = clip.load(tiny_vit_path, device="cpu")
    _, info = data_root
    with torch.no_grad():
        text = model.encode_text(clip.tokenize([f"a photo of a {c}." for c in info["classnames"]]))
    return model, text


def make_cfg(root, opts=()):
    cfg = get_cfg_default()
    merge_cfg(cfg, "configs/datasets/imagenet.yaml", "configs/trainers/LoCoOp/vit_b16_ep50.yaml",
              {"DATASET.ROOT": str(root)},
              ["INPUT.SIZE", f"({SIZE}, {SIZE})", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4",
               "OOD.DATASETS", str(OOD_SETS), "OOD.SCORES", "['MCM', 'GL-MCM', 'energy']", "OOD.PLOT", "False",
               "VERBOSE", "False"] + list(opts))
    return cfg


def hand_scores(model, text, paths, cfg, T):
    """MCM and GL-MCM written out from the definitions, image by image."""
    tfm = build_test_transform(cfg)
    text_n = F.normalize(text.float(), dim=-1)
    mcm, glmcm, preds = [], [], []
    with torch.no_grad():
        for p in paths:
            g, loc = model.encode_image(tfm(read_image(p)).unsqueeze(0), return_local=True)
            cos_g = F.normalize(g.float(), dim=-1) @ text_n.t()            # [1, C]
            cos_l = F.normalize(loc.float(), dim=-1) @ text_n.t()          # [1, P, C]
            m = torch.softmax(cos_g / T, dim=-1).max().item()
            lm = torch.softmax(cos_l / T, dim=-1).max().item()
            mcm.append(m)
            glmcm.append(m + lm)
            preds.append(int(cos_g.argmax()))
    return np.array(mcm), np.array(glmcm), np.array(preds)


def test_benchmark_files_scores_and_metrics(tmp_path, data_root, model_and_text):
    root, info = data_root
    model, text = model_and_text
    cfg = make_cfg(root, ["OOD.T", "2.0", "OOD.PLOT", "True"])
    out = tmp_path / "run"
    res = run_ood_benchmark(cfg, model, text, out, meta={"model_dir": "somewhere"}, verbose=False)

    for name in ("ood_results.md", "ood_results.csv", "ood_results.json", "ood_scores.npz"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        [f"hist_{s}_{o}.png" for s in ("MCM", "GL-MCM", "energy") for o in OOD_SETS] + ["overview.png"])

    # Scores against the definitions computed image by image (T = 2 on the cosine).
    from locoop.data import list_images

    id_paths = sorted(list_images(str(root / "imagenet/images/val"), recursive=True))
    mcm, glmcm, preds = hand_scores(model, text, id_paths, cfg, T=2.0)
    np.testing.assert_allclose(res["id_scores"]["MCM"], mcm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["id_scores"]["GL-MCM"], glmcm, rtol=1e-5, atol=1e-6)
    labels = np.repeat(np.arange(3), 3)
    assert res["id_accuracy"] == pytest.approx(float((preds == labels).mean()))
    tex = sorted(list_images(str(root / "Texture/images"), recursive=True))
    t_mcm, _, _ = hand_scores(model, text, tex, cfg, T=2.0)
    np.testing.assert_allclose(res["ood_scores"]["Texture"]["MCM"], t_mcm, rtol=1e-5, atol=1e-6)

    # The files hold ood_metrics of those scores, in percent, and everything is in [0, 100].
    doc = json.loads((out / "ood_results.json").read_text())
    expect = ood_metrics(mcm, t_mcm)
    for k in ("fpr95", "auroc", "aupr"):
        assert doc["scores"]["MCM"]["Texture"][k] == pytest.approx(100 * expect[k])
    for rows in doc["scores"].values():
        assert set(rows) == set(OOD_SETS) | {"Average"}
        for m in rows.values():
            assert all(0.0 <= v <= 100.0 and math.isfinite(v) for v in m.values())
    assert doc["id_accuracy"] == pytest.approx(100 * res["id_accuracy"])
    meta = doc["meta"]
    assert meta["num_images"] == {"ID": 9, "iNaturalist": 4, "Texture": 4}
    assert meta["T"] == 2.0 and meta["model_dir"] == "somewhere"
    assert meta["config"]["OOD"]["T"] == 2.0 and len(meta["classnames_hash"]) == 64
    npz = np.load(out / "ood_scores.npz")
    np.testing.assert_array_equal(npz["ID/GL-MCM"], res["id_scores"]["GL-MCM"])
    assert "| Average |" in (out / "ood_results.md").read_text()


def test_missing_ood_folder_fails_before_any_image(tmp_path, data_root, model_and_text, monkeypatch):
    root, _ = data_root
    model, text = model_and_text
    calls = []
    monkeypatch.setattr(runner_mod, "iter_feature_batches", lambda *a, **k: calls.append(1))
    cfg = make_cfg(root, ["OOD.DATASETS", "['iNaturalist', 'SUN', 'Places']"])
    with pytest.raises(FileNotFoundError) as e:
        run_ood_benchmark(cfg, model, text, tmp_path, verbose=False)
    msg = str(e.value)
    assert "SUN" in msg and "Places" in msg and "iNaturalist:" not in msg
    assert calls == [] and not list(tmp_path.iterdir())


def test_unknown_score_and_bad_inputs_fail_early(tmp_path, data_root, model_and_text, monkeypatch):
    root, _ = data_root
    model, text = model_and_text
    monkeypatch.setattr(runner_mod, "iter_feature_batches", lambda *a, **k: pytest.fail("encoded images"))
    with pytest.raises(ValueError, match="unknown OOD score 'MCMM'.*valid scores: MCM"):
        run_ood_benchmark(make_cfg(root, ["OOD.SCORES", "['MCMM']"]), model, text, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="OOD.T"):
        run_ood_benchmark(make_cfg(root, ["OOD.T", "0.0"]), model, text, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="FPR_CONVENTION"):
        run_ood_benchmark(make_cfg(root, ["OOD.FPR_CONVENTION", "tpr"]), model, text, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="2 rows but the ID dataset ImageNet has 3 classes"):
        run_ood_benchmark(make_cfg(root), model, text[:2], tmp_path, verbose=False)


def test_corrupt_image_is_skipped_and_counted(tmp_path, model_and_text):
    model, text = model_and_text
    root = tmp_path / "data"
    make_imagenet_like(str(root), num_classes=3, train_per_class=0, val_per_class=2, image_size=(40, 40))
    make_ood_sets(str(root), names=OOD_SETS, per_set=3, image_size=(40, 40))
    bad = sorted((root / "imagenet/images/val/n01440001").iterdir())[0]
    corrupt_image(str(bad))
    with pytest.warns(UserWarning, match="unreadable"):
        res = run_ood_benchmark(make_cfg(root), model, text, tmp_path / "run", verbose=False)
    doc = json.loads((tmp_path / "run/ood_results.json").read_text())
    assert res["num_images"]["ID"] == 5 and doc["meta"]["num_skipped"]["ID"] == 1
    assert doc["meta"]["skipped_images"]["ID"] == [str(bad)]


def test_openood_convention_adds_its_own_metric_names(tmp_path, data_root, model_and_text):
    root, _ = data_root
    model, text = model_and_text
    res = run_ood_benchmark(make_cfg(root, ["OOD.FPR_CONVENTION", "openood", "OOD.SCORES", "['MCM']"]),
                            model, text, tmp_path, verbose=False)
    m = res["metrics"]["MCM"]["Texture"]
    assert {"fpr95", "auroc", "aupr", "fpr95_openood", "aupr_in", "aupr_out"} <= set(m)


def test_uncached_local_scores_come_from_fp32_features(tmp_path, data_root, model_and_text):
    """The benchmark scores the local features the model computed (float32), not a float16 copy.

    Storing them in float16 (as the evaluation did before) moves L-MCM / GL-MCM by the fp16 rounding;
    only the feature cache stores float16 (see test_feature_cache for its bound).
    """
    from locoop.data import build_dataset, build_ood_datasets, build_transform

    root, _ = data_root
    model, text = model_and_text
    cfg = make_cfg(root, ["OOD.SCORES", "['MCM', 'L-MCM', 'GL-MCM']"])
    res = run_ood_benchmark(cfg, model, text, tmp_path, verbose=False, use_cache=False)
    tfm = build_transform(cfg, is_train=False)
    sets = {"ID": build_dataset(cfg, need_train=False).test, **build_ood_datasets(str(root), OOD_SETS)}
    got = {"ID": res["id_scores"], **res["ood_scores"]}
    fp16_moved = 0.0
    for name, items in sets.items():
        # The same loader (order, batches) as the benchmark's, features kept in each dtype.
        exact = extract_features(model, runner_mod.eval_loader(cfg, items, tfm), "cpu", local_dtype=torch.float32)
        half = extract_features(model, runner_mod.eval_loader(cfg, items, tfm), "cpu", local_dtype=torch.float16)
        ref, _ = score_features(exact, text, ["MCM", "L-MCM", "GL-MCM"])
        old, _ = score_features(half, text, ["MCM", "L-MCM", "GL-MCM"])
        for s in ("MCM", "L-MCM", "GL-MCM"):
            np.testing.assert_array_equal(got[name][s], ref[s])
        np.testing.assert_array_equal(old["MCM"], ref["MCM"])  # global features are float32 either way
        fp16_moved = max(fp16_moved, float(np.abs(old["GL-MCM"] - ref["GL-MCM"]).max()))
    assert 0.0 < fp16_moved < 2.0 ** -11  # float16 storage would have changed the scores (within its bound)


def test_features_normalised_local_fp32_and_chunking_exact(data_root, model_and_text):
    root, _ = data_root
    model, text = model_and_text
    from locoop.data import build_data_loader, list_images
    from locoop.data.datum import Datum

    cfg = make_cfg(root)
    items = [Datum(p, i % 3, "x") for i, p in enumerate(sorted(list_images(str(root / "imagenet/images/val"),
                                                                              recursive=True)))]
    loader = build_data_loader(items, 4, build_test_transform(cfg), is_train=False)
    feats = extract_features(model, loader, "cpu", with_local=True)
    assert len(feats) == 9 and feats.labels.tolist() == [d.label for d in items]
    assert feats.impaths == [d.impath for d in items]
    assert feats.local_feats.dtype == torch.float32 and feats.local_feats.shape == (9, 16, text.shape[1])
    torch.testing.assert_close(feats.global_feats.norm(dim=-1), torch.ones(9))
    torch.testing.assert_close(feats.local_feats.norm(dim=-1), torch.ones(9, 16))
    half = extract_features(model, loader, "cpu", with_local=True, local_dtype=torch.float16)  # the cache's
    assert half.local_feats.dtype == torch.float16
    torch.testing.assert_close(half.local_feats.float().norm(dim=-1), torch.ones(9, 16), atol=2e-3, rtol=0)
    torch.testing.assert_close(half.local_feats.float(), feats.local_feats, atol=2.0 ** -11, rtol=0)

    whole, preds = score_features(feats, text, ["MCM", "L-MCM", "entropy"], T=1.0)
    tiny, preds2 = score_features(feats, text, ["MCM", "L-MCM", "entropy"], T=1.0, chunk_elements=1)
    for k in whole:
        np.testing.assert_array_equal(whole[k], tiny[k])
    np.testing.assert_array_equal(preds, preds2)
    chunks = list(iter_similarities(feats, text, chunk_elements=3 * 17))  # 1 row per chunk
    assert [(lo, hi) for lo, hi, _, _ in chunks] == [(i, i + 1) for i in range(9)]

    # The streaming form gives the same features batch by batch.
    from locoop.ood.features import concat_features, iter_feature_batches

    parts = list(iter_feature_batches(model, loader, "cpu"))
    assert [len(p) for p in parts] == [4, 4, 1]
    streamed = concat_features(parts)
    torch.testing.assert_close(streamed.local_feats, feats.local_feats)
    assert streamed.impaths == feats.impaths

    glob_only = extract_features(model, loader, "cpu", with_local=False)
    assert glob_only.local_feats is None
    torch.testing.assert_close(glob_only.global_feats, feats.global_feats)
    with pytest.raises(ValueError, match="needs per-patch similarities"):
        score_features(glob_only, text, ["GL-MCM"])
    with pytest.raises(ValueError, match="dimension"):
        score_features(feats, torch.randn(3, 7), ["MCM"])

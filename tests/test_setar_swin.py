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

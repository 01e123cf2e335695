"""configs/zeroshot/{MCM,GL-MCM}.yaml carry the MCM / GL-MCM evaluation protocol: prompt, resize,
precision, temperature, lambda_local; the prompt key reaches ZeroshotCLIP and lambda_local the GL-MCM score."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import clip
from locoop.cli import main as cli_main
from locoop.config import get_cfg_default, merge_cfg
from locoop.data import build_transform
from locoop.data.image_io import read_image
from locoop.data.synthetic import make_imagenet_like, make_ood_sets

REPO = Path(__file__).resolve().parents[1]
DS_CFG = str(REPO / "configs/datasets/imagenet.yaml")
ZS = {name: str(REPO / f"configs/zeroshot/{name}.yaml") for name in ("MCM", "GL-MCM")}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _cfg(name, *opts):
    cfg = get_cfg_default()
    merge_cfg(cfg, DS_CFG, ZS[name], {}, list(opts))
    return cfg


@pytest.mark.parametrize("name", ["MCM", "GL-MCM"])
def test_prompt_is_the_papers_literal_string(name):
    cfg = _cfg(name)
    template = cfg.TRAINER.ZSCLIP.PROMPT_TEMPLATE
    # MCM utils/detection_util.py and GL-MCM utils/detection_util.py: f"a photo of a {c}"
    assert template.format("goldfish") == "a photo of a goldfish"
    assert template.format("great white shark") == "a photo of a great white shark"
    assert cfg.TRAINER.NAME == "ZeroshotCLIP" and cfg.OOD.T == 1.0 and cfg.MODEL.BACKBONE.NAME == "ViT-B/16"
    assert cfg.TRAINER.LOCOOP.PREC == {"MCM": "fp32", "GL-MCM": "fp16"}[name]
    assert cfg.OOD.LAMBDA_LOCAL == {"MCM": 1.0, "GL-MCM": 0.5}[name]
    assert get_cfg_default().TRAINER.ZSCLIP.PROMPT_TEMPLATE == "a photo of a {}."  # CoOp's ZeroshotCLIP default


@pytest.mark.parametrize("name", ["MCM", "GL-MCM"])
def test_test_transform_is_torchvision_resize_224_and_center_crop(tmp_path, name):
    reference = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    ours = build_transform(_cfg(name), is_train=False)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(500, 375), (333, 500), (224, 224), (640, 427), (97, 300)]):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        with Image.open(path) as im:  # as torchvision's ImageFolder reads it
            pil = im.convert("RGB")
        a, b = ours(read_image(str(path))), reference(pil)
        assert a.shape == (3, 224, 224)
        assert torch.equal(a, b), (w, h)
    bicubic = build_transform(_cfg(name, "INPUT.INTERPOLATION", "bicubic"), is_train=False)
    assert not torch.equal(bicubic(pil), reference(pil))  # the check above can tell the difference


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs_data")
    make_imagenet_like(str(root), num_classes=3, train_per_class=0, val_per_class=3, image_size=(40, 40))
    make_ood_sets(str(root), per_set=3, image_size=(40, 40), seed=2)
    return root


def test_zeroshot_clip_uses_the_configured_prompt(data_root, tiny_vit_path):
    from locoop.engine.registry import build_trainer

    cfg = _cfg("MCM", "DATASET.ROOT", str(data_root), "MODEL.BACKBONE.NAME", tiny_vit_path, "INPUT.SIZE", "(32, 32)",
               "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", "", "VERBOSE", "False")
    trainer = build_trainer(cfg, need_train=False)
    names = trainer.dm.dataset.classnames
    with torch.no_grad():
        expected = F.normalize(trainer.clip_model.encode_text(clip.tokenize([f"a photo of a {c}" for c in names])), dim=-1)
        with_stop = F.normalize(trainer.clip_model.encode_text(clip.tokenize([f"a photo of a {c}." for c in names])),
                                dim=-1)
    assert trainer.template == "a photo of a {}"
    torch.testing.assert_close(trainer.text_features(), expected)
    assert not torch.allclose(trainer.text_features(), with_stop)
    bad = _cfg("MCM", "TRAINER.ZSCLIP.PROMPT_TEMPLATE", "a photo of a dog")
    with pytest.raises(ValueError, match="PROMPT_TEMPLATE must contain"):
        trainer.check_cfg(bad)


def test_glmcm_config_scores_with_its_lambda_local(tmp_path, data_root, tiny_vit_path, capsys):
    out = tmp_path / "glmcm"
    rc = cli_main(["eval", "--root", str(data_root), "--trainer", "ZeroshotCLIP", "--dataset-config-file", DS_CFG,
                   "--config-file", ZS["GL-MCM"], "--output-dir", str(out), "MODEL.BACKBONE.NAME", tiny_vit_path,
                   "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "OOD.PLOT", "False"])
    assert rc == 0, capsys.readouterr().err
    npz = np.load(out / "ood_scores.npz")
    for group in ("ID", "iNaturalist", "Texture"):
        np.testing.assert_allclose(npz[f"{group}/GL-MCM"], npz[f"{group}/MCM"] + 0.5 * npz[f"{group}/L-MCM"],
                                   rtol=1e-6, atol=1e-7)
    assert not np.allclose(npz["ID/GL-MCM"], npz["ID/MCM"] + npz["ID/L-MCM"])

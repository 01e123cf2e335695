"""LoCoOp / CoOp / ZeroshotCLIP trainers on a generated ImageNet-like folder with a tiny CLIP checkpoint."""
import os

import pytest
import torch
import torch.nn.functional as F

import clip
from clip.naive import encode_text_full_naive
from locoop.config import get_cfg_default
from locoop.data.synthetic import make_imagenet_like
from locoop.engine.registry import build_trainer
from locoop.trainers import CustomCLIP
from locoop.trainers.loss import locoop_loss

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
NUM_CLASSES = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: a second thread only adds synchronisation cost (large on a shared, busy CPU).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_imagenet_like(str(root), num_classes=NUM_CLASSES, train_per_class=4, val_per_class=2, image_size=(32, 32),
                       seed=0)
    return str(root)


def _cfg(data_root, backbone, out, trainer="LoCoOp", epochs=2, **locoop):
    cfg = get_cfg_default()
    cfg.SEED = 1
    cfg.VERBOSE = False
    cfg.OUTPUT_DIR = str(out)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.TRAINER.NAME = trainer
    cfg.DATASET.ROOT = data_root
    cfg.DATASET.NAME = "ImageNet"
    cfg.DATASET.NUM_SHOTS = 4
    cfg.INPUT.SIZE = (32, 32)
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.TRANSFORMS = ["normalize"]
    cfg.INPUT.PIXEL_MEAN = MEAN
    cfg.INPUT.PIXEL_STD = STD
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 4
    cfg.DATALOADER.TEST.BATCH_SIZE = 8
    cfg.OPTIM.NAME = "sgd"
    cfg.OPTIM.LR = 0.5
    cfg.OPTIM.MAX_EPOCH = epochs
    cfg.OPTIM.LR_SCHEDULER = "cosine"
    cfg.TEST.NO_TEST = True
    cfg.TRAINER.LOCOOP.N_CTX = 4
    cfg.TRAINER.LOCOOP.TOPK = 2
    for k, v in locoop.items():
        setattr(cfg.TRAINER.LOCOOP, k, v)
    return cfg


def _train_loss(trainer):
    """LoCoOp loss of the whole training set with the current prompts (no update)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in trainer.train_loader_x:
            image, label = trainer.parse_batch_train(batch)
            logits, local = trainer.model(image)
            loss, _, _ = locoop_loss(logits, local, label, trainer.lam or 0.25, trainer.top_k)
            total, n = total + loss.item() * len(label), n + len(label)
    return total / n


def _accuracy_by_hand(trainer, text):
    """Top-1 accuracy (%) of the test split from CLIP's image features and ``text``, outside the trainer."""
    correct = total = 0
    with torch.no_grad():
        for batch in trainer.test_loader:
            feats = F.normalize(trainer.clip_model.encode_image(batch["img"]).float(), dim=-1)
            correct += int(((feats @ F.normalize(text.float(), dim=-1).t()).argmax(-1) == batch["label"]).sum())
            total += len(batch["label"])
    return 100.0 * correct / total


def test_locoop_trains_saves_and_reloads(data_root, tiny_vit_path, tmp_path):
    from locoop.engine.seed import set_random_seed

    cfg = _cfg(data_root, tiny_vit_path, tmp_path / "run")
    set_random_seed(int(cfg.SEED))  # as prepare_run does: the initial context must not depend on earlier tests
    trainer = build_trainer(cfg)
    assert type(trainer).__name__ == "LoCoOp" and trainer.precision == "fp32"  # fp16 falls back on the CPU
    assert trainer.clip_model is trainer.model.clip_model
    assert [n for n, p in trainer.model.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]
    assert trainer.model.text_encoder.resolve_mode(trainer.model.prompt_learner) == "shared_prefix"
    frozen = {k: v.clone() for k, v in trainer.clip_model.state_dict().items()}
    before = _train_loss(trainer)  # with the initial context

    batch = next(iter(trainer.train_loader_x))
    with torch.no_grad():  # the batch's accuracy with the prompts before the step
        image, label = trainer.parse_batch_train(batch)
        expected_acc = 100.0 * (trainer.model(image, return_local=False).argmax(-1) == label).float().mean().item()
    trainer.batch_idx, trainer.num_batches = 0, 99
    summary = trainer.forward_backward(batch)
    assert set(summary) == {"loss", "loss_id", "loss_en", "acc"}
    assert summary["loss"] == pytest.approx(summary["loss_id"] + 0.25 * summary["loss_en"], abs=1e-5)
    assert summary["loss_en"] <= 0 and summary["acc"] == pytest.approx(expected_acc)

    trainer.train()
    after = _train_loss(trainer)
    assert after < before
    for k, v in trainer.clip_model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen CLIP weight {k} changed"

    ckpt_path = tmp_path / "run" / "prompt_learner" / "model.pth.tar-2"
    assert ckpt_path.is_file()
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert list(ckpt["state_dict"]) == ["ctx"] and ckpt["trainer"] == "LoCoOp"

    feats = trainer.text_features()
    assert feats.shape == (NUM_CLASSES, 32) and not feats.requires_grad
    assert torch.allclose(feats.norm(dim=-1), torch.ones(NUM_CLASSES), atol=1e-5)

    fresh = build_trainer(_cfg(data_root, tiny_vit_path, tmp_path / "eval"))
    assert not torch.equal(fresh.text_features(), feats)
    fresh.load_model(str(tmp_path / "run"), epoch=2)
    assert torch.equal(fresh.text_features(), feats)
    assert fresh.test() == pytest.approx(_accuracy_by_hand(fresh, feats))

    init_cfg = _cfg(data_root, tiny_vit_path, tmp_path / "init")
    init_cfg.MODEL.INIT_WEIGHTS = str(ckpt_path)
    assert torch.equal(build_trainer(init_cfg).text_features(), feats)

    wrong = build_trainer(_cfg(data_root, tiny_vit_path, tmp_path / "wrong", N_CTX=8))
    with pytest.raises(ValueError, match=r"N_CTX=4, CSC=False.*N_CTX=8, CSC=False"):
        wrong.load_model(str(tmp_path / "run"), epoch=2)
    csc = build_trainer(_cfg(data_root, tiny_vit_path, tmp_path / "csc", CSC=True))
    with pytest.raises(ValueError, match="CSC=True"):
        csc.load_model(str(tmp_path / "run"), epoch=2)


def test_coop_is_locoop_without_local_term(data_root, tiny_vit_path, tmp_path):
    trainer = build_trainer(_cfg(data_root, tiny_vit_path, tmp_path / "coop", trainer="CoOp", epochs=1, LAMBDA=0.25))
    assert trainer.lam == 0.0
    batch = next(iter(trainer.train_loader_x))
    image, label = trainer.parse_batch_train(batch)
    with torch.no_grad():
        expected = F.cross_entropy(trainer.model(image, return_local=False), label).item()
    trainer.batch_idx, trainer.num_batches = 0, 99
    summary = trainer.forward_backward(batch)
    assert summary["loss_en"] == 0.0
    assert summary["loss"] == pytest.approx(expected, abs=1e-5) == summary["loss_id"]
    trainer.train()
    ckpt = torch.load(tmp_path / "coop" / "prompt_learner" / "model.pth.tar-1", weights_only=True)
    assert ckpt["trainer"] == "CoOp"


@pytest.mark.parametrize("csc, position", [(True, "middle"), (False, "front")])
def test_fallback_prompt_layouts_train(data_root, tiny_vit_path, tmp_path, csc, position):
    trainer = build_trainer(_cfg(data_root, tiny_vit_path, tmp_path / "r", epochs=1, CSC=csc,
                                 CLASS_TOKEN_POSITION=position))
    pl = trainer.model.prompt_learner
    assert trainer.model.text_encoder.resolve_mode(pl) == "truncate"
    start = pl.ctx.detach().clone()
    trainer.train()
    assert not torch.equal(pl.ctx, start)


def test_resnet_backbone_gives_local_logits(data_root, tiny_rn_path, tmp_path):
    cfg = _cfg(data_root, tiny_rn_path, tmp_path / "rn", epochs=1)
    cfg.INPUT.SIZE = (64, 64)
    trainer = build_trainer(cfg)
    image, _ = trainer.parse_batch_train(next(iter(trainer.train_loader_x)))
    image = F.interpolate(image, size=(64, 64))
    logits, local = trainer.model(image)
    assert logits.shape == (4, NUM_CLASSES) and local.shape == (4, 4, NUM_CLASSES)  # 2x2 grid at 64 px


def test_custom_clip_logits_are_scaled_cosines(data_root, tiny_vit_path, tmp_path):
    trainer = build_trainer(_cfg(data_root, tiny_vit_path, tmp_path / "c"))
    model: CustomCLIP = trainer.model
    image, _ = trainer.parse_batch_train(next(iter(trainer.train_loader_x)))
    logits, local = model(image)
    glob_f, local_f = trainer.clip_model.encode_image(image, return_local=True)
    text = F.normalize(trainer.clip_model.encode_text_embeddings(model.prompt_learner(), model.prompt_learner.eot_idx),
                       dim=-1)
    scale = trainer.clip_model.logit_scale.exp()
    assert torch.allclose(logits, scale * F.normalize(glob_f, dim=-1) @ text.t(), atol=1e-4)
    assert torch.allclose(local, scale * F.normalize(local_f, dim=-1) @ text.t(), atol=1e-4)
    assert torch.allclose(model(image, return_local=False), logits, atol=1e-5)


def test_zeroshot_clip(data_root, tiny_vit_path, tmp_path):
    import clip
    from clip.naive import encode_text_full_naive

    trainer = build_trainer(_cfg(data_root, tiny_vit_path, tmp_path / "zs", trainer="ZeroshotCLIP"))
    names = trainer.dm.dataset.classnames
    model = trainer.clip_model
    # the prompts "a photo of a <name>." through an independent full-context encoder
    with torch.no_grad():
        ref = F.normalize(encode_text_full_naive(model, clip.tokenize([f"a photo of a {n.replace('_', ' ')}."
                                                                      for n in names])), dim=-1)
    assert torch.allclose(trainer.text_features(), ref, atol=1e-6)
    assert torch.equal(trainer.class_prompts().tokens, clip.tokenize([f"a photo of a {n.replace('_', ' ')}."
                                                                       for n in names]))
    # logits = 100 * cos, and the Dassl test's accuracy is the argmax accuracy of those logits
    correct = n = 0
    for batch in trainer.test_loader:
        image, label = trainer.parse_batch_test(batch)
        glob, local = trainer.model_inference(image, return_local=True)
        with torch.no_grad():
            g, loc = model.encode_image(image, return_local=True)
        scale = model.logit_scale.detach().exp()
        torch.testing.assert_close(glob, scale * F.normalize(g, dim=-1) @ ref.t(), rtol=0, atol=2e-4)
        torch.testing.assert_close(local, scale * F.normalize(loc, dim=-1) @ ref.t(), rtol=0, atol=2e-4)
        assert local.shape == (len(image), 16, NUM_CLASSES)
        correct += int((glob.argmax(-1) == label).sum())
        n += len(label)
    assert trainer.test() == pytest.approx(100.0 * correct / n)
    with pytest.raises(ValueError, match="eval-only"):
        trainer.train()


def test_setar_zero_shot_trainer_uses_the_setar_template(data_root, tiny_vit_path, tmp_path):
    import clip

    cfg = _cfg(data_root, tiny_vit_path, tmp_path / "szs", trainer="SeTARZeroshotCLIP")
    cfg.SETAR.PROMPT_TEMPLATE = "a photo of a {}"  # SeTAR's code: no full stop
    trainer = build_trainer(cfg)
    names = trainer.dm.dataset.classnames
    assert torch.equal(trainer.class_prompts().tokens,
                       clip.tokenize([f"a photo of a {n.replace('_', ' ')}" for n in names]))
    assert trainer.prompt_template() == "a photo of a {}"


@pytest.mark.parametrize("key, value, msg", [
    ("PREC", "bf16", "PREC"),
    ("CLASS_TOKEN_POSITION", "start", "CLASS_TOKEN_POSITION"),
    ("TOPK", 0, "TOPK"),
    ("LAMBDA", -1.0, "LAMBDA"),
])
def test_bad_config_fails_before_loading(data_root, tmp_path, key, value, msg):
    cfg = _cfg(data_root, "/nonexistent/model.pt", tmp_path / "bad")
    setattr(cfg.TRAINER.LOCOOP, key, value)
    with pytest.raises(ValueError, match=msg):
        build_trainer(cfg)


def test_missing_backbone_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(ValueError, match="neither one of the available models"):
        build_trainer(_cfg(data_root, str(tmp_path / "missing.pt"), tmp_path / "m"))
    cfg = _cfg(data_root, "", tmp_path / "m2")
    with pytest.raises(ValueError, match="MODEL.BACKBONE.NAME"):
        build_trainer(cfg)
    assert not os.path.exists(tmp_path / "m2" / "prompt_learner")

"""The GPU defaults on a CPU: fp16 weights and amp autocast (``LOCOOP_HALF_ON_CPU=1``) for the tiny models.

GPU users run ``TRAINER.LOCOOP.PREC fp16`` (LoCoOp's default, CLIP's fp16 weights) or ``amp``, and
SeTAR+FT's ``SETAR.FT.PREC amp``; on a CPU these silently fall back to fp32. The test mode of
:mod:`locoop.engine.precision` keeps them, so a dtype mistake in that code fails here. Every
result is compared with the same run in fp32, within an fp16 tolerance:

* ``FP16_RTOL`` = 2e-2 on losses, scores and gradient norms: fp16's unit roundoff is 2**-11 (about
  5e-4) per operation, and a tiny CLIP stacks about 20 matmuls, softmaxes and LayerNorms
  (4 blocks, attention, projections) between the input and the loss;
* gradients also point the same way (cosine > 0.99).
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.tiny import create_tiny_model, make_tiny_checkpoint
from locoop.data.synthetic import make_imagenet_like, make_ood_sets
from locoop.engine.precision import HALF_ON_CPU_ENV, autocast, grad_scaler, half_on_cpu, resolve_precision
from locoop.engine.registry import build_trainer
from tiny_setup import tiny_trainer_cfg

FP16_RTOL = 2e-2
NUM_CLASSES = 4
OOD_SETS = ["iNaturalist", "Texture"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def half_mode(monkeypatch):
    monkeypatch.setenv(HALF_ON_CPU_ENV, "1")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16_data")
    make_imagenet_like(str(root), num_classes=NUM_CLASSES, train_per_class=4, val_per_class=2, image_size=(40, 40),
                       seed=0)
    make_ood_sets(str(root), names=OOD_SETS, per_set=3, image_size=(40, 40), seed=1)
    return root


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16_ckpt")
    return {name: make_tiny_checkpoint(d / f"{name}.pt", like=name, seed=0) for name in ("tiny-vit", "tiny-rn")}


def _cfg(root, backbone, out, trainer="LoCoOp", prec="fp32", size=32, **extra):
    return tiny_trainer_cfg(root, backbone, out, trainer, size, **{
        "TEST.NO_TEST": False,  # the final test runs too
        "TRAINER.LOCOOP.PREC": prec, "OOD.DATASETS": list(OOD_SETS), "OOD.PLOT": False, "OOD.USE_CACHE": False,
        **extra})


def _first_step(trainer):
    """Loss and gradients of the trainer's own ``forward_backward`` on its first batch (no update)."""
    captured = []
    trainer.model_backward_and_update = lambda loss, names=None: captured.append(loss)
    trainer.set_model_mode("train")
    trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 2  # not the last batch: no lr update
    trainer.forward_backward(next(iter(trainer.train_loader_x)))
    del trainer.model_backward_and_update
    (loss,) = captured
    params = [p for p in trainer._models[trainer.get_model_names()[0]].parameters() if p.requires_grad]
    # Under amp the backward runs through fp16 activations: scale the loss as a GradScaler does (2**10 is
    # about where one settles), or small gradients underflow.
    scale = 2.0 ** 10 if trainer.scaler is not None else 1.0
    grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).float().reshape(-1) / scale
                      for p, g in zip(params, grads)])
    return float(loss.detach()), flat


def _assert_close_step(ref, got):
    (l32, g32), (l16, g16) = ref, got
    assert np.isfinite(l16) and torch.isfinite(g16).all()
    assert l16 == pytest.approx(l32, rel=FP16_RTOL)
    assert g32.norm() > 0 and float(g16.norm()) == pytest.approx(float(g32.norm()), rel=FP16_RTOL)
    assert float(F.cosine_similarity(g16, g32, dim=0)) > 0.99


# ------------------------------------------------------------------------------------ the switch
def test_precision_rules_and_the_test_mode(monkeypatch):
    monkeypatch.delenv(HALF_ON_CPU_ENV, raising=False)
    assert not half_on_cpu()
    assert resolve_precision("fp16", "cpu") == resolve_precision("amp", "cpu") == "fp32"
    assert grad_scaler("cpu") is None
    with autocast("cpu", True):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="SETAR.FT.PREC must be one of"):
        resolve_precision("bf16", "cpu", key="SETAR.FT.PREC")
    monkeypatch.setenv(HALF_ON_CPU_ENV, "1")
    assert half_on_cpu()
    assert resolve_precision("fp16", "cpu") == "fp16" and resolve_precision("amp", "cpu") == "amp"
    assert isinstance(grad_scaler("cpu"), torch.amp.GradScaler) and grad_scaler("cpu", enabled=False) is None
    with autocast("cpu", True):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16
    monkeypatch.setenv(HALF_ON_CPU_ENV, "0")
    assert not half_on_cpu()


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("trainer_name, arch", [("LoCoOp", "tiny-vit"), ("CoOp", "tiny-vit"), ("LoCoOp", "tiny-rn")])
@pytest.mark.parametrize("prec", ["fp16", "amp"])
def test_prompt_training_in_fp16_and_amp_matches_fp32(half_mode, data_root, backbones, tmp_path, trainer_name, arch,
                                                      prec):
    size = 64 if arch == "tiny-rn" else 32
    torch.manual_seed(0)  # the same initial context for both
    ref = build_trainer(_cfg(data_root, backbones[arch], tmp_path / "fp32", trainer_name, "fp32", size))
    torch.manual_seed(0)
    run = build_trainer(_cfg(data_root, backbones[arch], tmp_path / prec, trainer_name, prec, size))
    assert run.precision == prec and ref.precision == "fp32"
    ctx = run.model.prompt_learner.ctx
    if prec == "fp16":  # CLIP's fp16 weights, and the learned context in fp16 (as the papers' code)
        assert run.clip_model.dtype == torch.float16 and ctx.dtype == torch.float16 and run.scaler is None
    else:  # amp: fp32 weights, fp16 autocast, a grad scaler
        assert run.clip_model.dtype == torch.float32 and ctx.dtype == torch.float32
        assert isinstance(run.scaler, torch.amp.GradScaler)
    torch.testing.assert_close(ctx.detach().float(), ref.model.prompt_learner.ctx.detach(), rtol=0, atol=1e-3)
    _assert_close_step(_first_step(ref), _first_step(run))

    # Test-time logits (the classifier of the final test) agree before training.
    batch = next(iter(run.test_loader))
    with torch.no_grad():
        ref._eval_text_features, run._eval_text_features = ref.text_features(), run.text_features()
        cos = [t.model_inference(t.parse_batch_test(batch)[0]).float() / t.clip_model.logit_scale.exp().float()
               for t in (ref, run)]
    torch.testing.assert_close(cos[1], cos[0], rtol=0, atol=FP16_RTOL * cos[0].abs().max().item())

    # The real loop: steps (GradScaler included), schedule, checkpoint, final test in this precision.
    run.train()
    assert torch.isfinite(run.model.prompt_learner.ctx).all()
    assert run.model.prompt_learner.ctx.dtype == ctx.dtype
    assert (tmp_path / prec / "prompt_learner" / "model.pth.tar-1").is_file()
    acc = run.test()
    with torch.no_grad():  # the evaluator's accuracy is the argmax of this precision's logits
        run._eval_text_features = run.text_features()
        correct = sum(int((run.model_inference(x).argmax(-1) == y).sum())
                      for x, y in map(run.parse_batch_test, run.test_loader))
    assert acc == pytest.approx(100.0 * correct / len(run.dm.dataset.test))


# ------------------------------------------------------------------------------------ evaluation
def _eval(root, backbone, out, trainer, prec, model_dir=None):
    from locoop.cli import main

    args = ["eval", "--root", str(root), "--trainer", trainer, "--backbone", backbone, "--output-dir", str(out),
            "--dataset-config-file", "configs/datasets/imagenet.yaml",
            "--config-file", "configs/trainers/LoCoOp/vit_b16_ep50.yaml"]
    if model_dir:
        args += ["--model-dir", str(model_dir)]
    args += ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "TRAINER.LOCOOP.PREC", prec,
             "TRAINER.LOCOOP.N_CTX", "4", "OOD.DATASETS", str(OOD_SETS), "OOD.PLOT", "False",
             "OOD.USE_CACHE", "False", "VERBOSE", "False"]
    assert main(args) == 0
    import json

    doc = json.loads((out / "ood_results.json").read_text())
    return doc, np.load(out / "ood_scores.npz")


def _assert_scores_close(a, b):
    doc_a, npz_a = a
    doc_b, npz_b = b
    assert set(npz_a.files) == set(npz_b.files)
    for k in npz_a.files:
        if "/" in k:
            np.testing.assert_allclose(npz_b[k], npz_a[k], rtol=FP16_RTOL, atol=1e-3, err_msg=k)
    assert np.mean(npz_a["id_predictions"] == npz_b["id_predictions"]) >= 0.75


@pytest.mark.parametrize("prec", ["fp16", "amp"])
def test_zero_shot_and_prompt_evaluation_in_fp16_and_amp_match_fp32(half_mode, data_root, backbones, tmp_path, prec):
    vit = backbones["tiny-vit"]
    ref = _eval(data_root, vit, tmp_path / "zs32", "ZeroshotCLIP", "fp32")
    got = _eval(data_root, vit, tmp_path / f"zs{prec}", "ZeroshotCLIP", prec)
    # ZeroshotCLIP runs amp as fp16 weights (nothing to train), and the record says what ran.
    assert got[0]["meta"]["precision"] == "fp16" and ref[0]["meta"]["precision"] == "fp32"
    _assert_scores_close(ref, got)

    # A LoCoOp checkpoint trained in fp32, evaluated with the learned prompts in this precision.
    trainer = build_trainer(_cfg(data_root, vit, tmp_path / "run", "LoCoOp", "fp32", **{"TEST.NO_TEST": True}))
    trainer.train()
    ref = _eval(data_root, vit, tmp_path / "lo32", "LoCoOp", "fp32", tmp_path / "run")
    got = _eval(data_root, vit, tmp_path / f"lo{prec}", "LoCoOp", prec, tmp_path / "run")
    assert got[0]["meta"]["precision"] == prec
    _assert_scores_close(ref, got)


# ------------------------------------------------------------------------------------ SeTAR
def test_setar_criterion_on_fp16_weights_matches_fp32(half_mode):
    """The search's criterion (the LoCoOp loss of the class prompts) and its choices on CLIP's fp16 weights."""
    from locoop.models.head import ClassPrompts
    from locoop.setar.search import SearchData, run_search

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 32, 32, generator=g), torch.randint(0, 6, (5,), generator=g)) for _ in range(2)]
    tokens = clip.tokenize([f"a photo of a thing{i}." for i in range(6)])
    data = SearchData(batches, ClassPrompts(tokens=tokens, chunk_size=4))
    kw = dict(top_k=3, ratios=[0.0, 0.1, 0.2], verbose=False)
    ref = run_search(create_tiny_model("tiny-vit"), data, mode="fast", **kw)
    results = {mode: run_search(create_tiny_model("tiny-vit", half=True), data, mode=mode, **kw)
               for mode in ("fast", "naive")}
    for res in results.values():
        assert res.settings == ref.settings
        assert res.baseline == pytest.approx(ref.baseline, rel=FP16_RTOL)
        assert res.final == pytest.approx(ref.final, rel=FP16_RTOL)
        crit = np.array([r["criterion"] for r in res.log])
        np.testing.assert_allclose(crit, [r["criterion"] for r in ref.log], rtol=FP16_RTOL)


@pytest.mark.parametrize("trainer_name", ["SeTARFT", "LoRA"])
def test_setar_ft_in_amp_matches_fp32(half_mode, data_root, backbones, tmp_path, trainer_name):
    import json

    import locoop.setar.finetune  # noqa: F401  (registers the trainers)

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps([["visual", "W_up", 1, 0.25], ["text", "W_q", 0, 0.2]]))

    def build(prec):
        torch.manual_seed(0)  # LoRA's random A: the same in both
        return build_trainer(_cfg(data_root, backbones["tiny-vit"], tmp_path / prec, trainer_name, **{
            "SETAR.SETTINGS_FILE": str(settings), "SETAR.FT.PREC": prec, "SETAR.FT.TOPK": 2,
            "SETAR.FT.LORA_RANK": 4, "OPTIM.LR": 0.01}))

    ref, run = build("fp32"), build("amp")
    assert run.precision == "amp" and isinstance(run.scaler, torch.amp.GradScaler) and ref.scaler is None
    assert run.clip_model.dtype == torch.float32  # the SVD split and SGD need fp32 weights
    ref_step, run_step = _first_step(ref), _first_step(run)
    if trainer_name == "LoRA":  # B = 0 at the start: only B has a gradient
        assert ref_step[1].count_nonzero() > 0
    _assert_close_step(ref_step, run_step)
    run.train()
    assert all(torch.isfinite(p).all() for p in run.adapters.params.values())
    text = run.text_features()
    assert text.dtype == torch.float32 and torch.isfinite(text).all()
    assert (tmp_path / "amp" / "adapters" / "model.pth.tar-1").is_file()

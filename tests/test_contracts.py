"""Contract tests over the registries (timm's habit): a new entry is covered by registering it.

* every tiny CLIP architecture: forward (global, local, text, logits) without NaN; backward reaches
  every parameter, and only the unfrozen ones when a tower is frozen;
* every OOD score: finite, one value per image, higher for an ID-like image than for a flat one;
* every SeTAR searcher: a valid visiting order (each matrix once) and a full search on a tiny model;
* every trainer of the library: it builds from a tiny config, its text features and logits are
  finite, and (when it trains) one ``forward_backward`` has a finite loss whose gradients reach
  exactly the parameters it registered as trainable.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.configs import get_config, list_tiny_models
from clip.tiny import create_tiny_model
from locoop.data.synthetic import make_imagenet_like
from locoop.engine.registry import build_trainer, get_trainer_class, list_trainers
from locoop.ood.neglabel import NegativeLabelSpec, NegLabelParams
from locoop.ood.scores import compute_scores, get_score, list_scores
from locoop.setar.searchers import build_steps, get_searcher, list_searchers
from tiny_setup import tiny_trainer_cfg

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ tiny models
def _inputs(model, batch=2):
    res = model.visual.input_resolution
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, res, res, generator=g), clip.tokenize(["a photo of a dog.", "a cat", "x"])


@pytest.mark.parametrize("name", list_tiny_models())
def test_tiny_model_forward_and_backward(name):
    model = create_tiny_model(name)
    cfg = get_config(name)
    images, tokens = _inputs(model)
    glob, local = model.encode_image(images, return_local=True)
    text = model.encode_text(tokens)
    logits_per_image, _ = model(images, tokens)
    assert glob.shape == (2, cfg.embed_dim) and local.shape == (2, cfg.grid_size ** 2, cfg.embed_dim)
    assert text.shape == (3, cfg.embed_dim) and logits_per_image.shape == (2, 3)
    for t in (glob, local, text, logits_per_image):
        assert torch.isfinite(t).all()
    loss = logits_per_image.logsumexp(-1).sum() + local.pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    # Frozen text tower: the gradients reach exactly the image tower (and the logit scale).
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("visual.") or n == "logit_scale")
    logits_per_image, _ = model(images, tokens)
    logits_per_image.sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------ scores
def _cosines(n=3, c=5, p=4, peak=0.0):
    """Cosines of flat (``peak`` 0) or ID-like images: class 0 stands out by ``peak``, globally and locally."""
    g = torch.full((n, c), 0.2)
    g[:, 0] += peak
    loc = torch.full((n, p, c), 0.2)
    loc[:, :, 0] += peak
    return g, loc


def _negative_label_bank(name, m=12, d=8):
    """A NegLabel / CSP text side with m negative labels in 3 groups, scored against the class cosines."""
    from locoop.ood.neglabel import NegativeLabelBank, NegativeLabelScorer, group_columns

    spec = get_score(name).text_bank
    params = NegLabelParams.for_recipe(spec.recipe, ngroup=3)
    feats = F.normalize(torch.randn(m, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    bank = NegativeLabelBank(feats, [f"w{i}" for i in range(m)], ["noun"] * m, group_columns(m, 3), params, "k", {})
    return NegativeLabelScorer(name, bank, "trainer")

# How the contract builds the extra text of every kind of text bank (a new kind must add its own here).
BANK_EXAMPLES = {NegativeLabelSpec: _negative_label_bank}


def _bank_inputs(spec, n, peak=None):
    """``(bank_sim, banks)`` for a text-bank score: cosines to the bank (0.2 everywhere when ``peak`` is given,
    i.e. an image no closer to the negatives than to the classes; else random)."""
    if spec.text_bank is None:
        return {}, {}
    assert type(spec.text_bank) in BANK_EXAMPLES, f"{spec.name}: add its text-bank kind to BANK_EXAMPLES"
    bank = BANK_EXAMPLES[type(spec.text_bank)](spec.name)
    m = bank.features.shape[0]
    sim = torch.full((n, m), 0.2) if peak is not None else torch.rand(n, m, generator=torch.Generator().manual_seed(2))
    return {spec.name: sim}, {spec.name: bank}


@pytest.mark.parametrize("name", list_scores())
def test_score_contract(name):
    spec = get_score(name)
    gen = torch.Generator().manual_seed(0)
    g = F.normalize(torch.randn(6, 5, generator=gen), dim=-1)
    loc = F.normalize(torch.randn(6, 4, 5, generator=gen), dim=-1)
    bank_sim, banks = _bank_inputs(spec, 6)
    out = compute_scores(g, loc if spec.needs_local else None, names=[name], T=1.0, bank_sim=bank_sim,
                         banks=banks)[spec.name]
    assert out.shape == (6,) and out.dtype == np.float32 and np.isfinite(out).all()
    # Higher = more in-distribution: one class standing out beats a flat distribution.
    id_like = compute_scores(*_cosines(peak=0.5), names=[name], **dict(zip(("bank_sim", "banks"),
                                                                           _bank_inputs(spec, 3, 0.5))))[spec.name]
    flat = compute_scores(*_cosines(peak=0.0), names=[name], **dict(zip(("bank_sim", "banks"),
                                                                        _bank_inputs(spec, 3, 0.0))))[spec.name]
    assert (id_like > flat).all(), f"{name}: an ID-like image must score higher than a flat one"
    # Rows are independent: chunking changes nothing.
    whole = compute_scores(g, loc, names=[name], bank_sim=bank_sim, banks=banks)[spec.name]
    chunked = compute_scores(g, loc, names=[name], chunk_elements=1, bank_sim=bank_sim, banks=banks)[spec.name]
    np.testing.assert_array_equal(whole, chunked)


def test_a_newly_registered_score_is_in_every_listing():
    from locoop.ood.scores import SCORE_REGISTRY, register_score

    @register_score("contract-test-score", description="temporary")
    def _s(stats):
        return stats.mcm * 2

    try:
        assert "contract-test-score" in list_scores(local=False)
        assert compute_scores(*_cosines(peak=0.5)[:1], names=["Contract_Test_Score"])["contract-test-score"].shape == (3,)
    finally:
        SCORE_REGISTRY.unregister("contract-test-score")
    assert "contract-test-score" not in list_scores()


# ------------------------------------------------------------------------------------ searchers
def _swin_searcher_contract(name, freeze_proj):
    """A searcher of a block-addressed classifier (Swin-V2): every [stage, block] matrix once, a finite search."""
    pytest.importorskip("transformers")
    from locoop.models.swinv2 import SwinV2Classifier, make_tiny_swinv2
    from locoop.setar.lowrank import get_linear
    from locoop.setar.search import SearchData, run_search

    depths = [2, 2]
    if not freeze_proj:
        with pytest.raises(ValueError, match="W_p"):
            build_steps(name, {"visual": depths}, ["W_q", "W_up"], freeze_proj=False)
        return
    steps = build_steps(name, {"visual": depths}, ["W_q", "W_up"])
    expected = {("visual", w, (s, b)) for w in ("W_q", "W_up") for s in range(2) for b in range(2)}
    assert len(steps) == len(set(steps)) and set(steps) == expected
    model = SwinV2Classifier(make_tiny_swinv2(num_labels=NUM_CLASSES, seed=0)).eval()
    gen = torch.Generator().manual_seed(0)
    data = SearchData([(torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 3]))], None)
    res = run_search(model, data, searcher=name, ratios=[0.0, 0.25], top_k=2, verbose=False)
    assert {tuple(s[:3]) for s in res.settings} == {tuple(s) for s in build_steps(name, {"visual": depths})}
    assert math.isfinite(res.baseline) and math.isfinite(res.final) and res.final <= res.baseline
    for tower, wt, layer, ratio in res.settings:
        lin = get_linear(model, tower, wt, layer)
        assert torch.linalg.matrix_rank(lin.weight.detach()).item() <= min(lin.weight.shape) - round(
            ratio * min(lin.weight.shape))


@pytest.mark.parametrize("name", list_searchers())
@pytest.mark.parametrize("freeze_proj", [True, False])
def test_searcher_contract(name, freeze_proj):
    from locoop.setar.lowrank import get_linear
    from locoop.models.head import ClassPrompts
    from locoop.setar.search import SearchData, run_search

    if get_searcher(name).backbone == "swin":
        return _swin_searcher_contract(name, freeze_proj)
    layers = {"visual": 2, "text": 3}
    steps = build_steps(name, layers, ["W_q", "W_up"], freeze_proj=freeze_proj)
    towers = set(layers) if name not in ("visual_only", "text_only") else {name.split("_")[0]}
    expected = {(t, w, l) for t in towers for w in ("W_q", "W_up") for l in range(layers[t])}
    if not freeze_proj:
        expected |= {(t, "W_p", None) for t in towers}
    assert len(steps) == len(set(steps)) and set(steps) == expected  # every matrix exactly once

    model = create_tiny_model("tiny-vit")
    gen = torch.Generator().manual_seed(0)
    data = SearchData([(torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 3]))],
                      ClassPrompts(tokens=clip.tokenize([f"a photo of a thing{i}." for i in range(NUM_CLASSES)]),
                                 chunk_size=4))
    res = run_search(model, data, searcher=name, ratios=[0.0, 0.25], top_k=2, verbose=False,
                     freeze_proj=freeze_proj)
    n_layers = {"visual": 2, "text": 2}
    visited = build_steps(name, n_layers, ["W_up"], freeze_proj=freeze_proj)
    assert [tuple(s[:3]) for s in res.settings] == [tuple(s) for s in visited] or get_searcher(name).exhaustive
    assert {tuple(s[:3]) for s in res.settings} == {tuple(s) for s in visited}
    assert math.isfinite(res.baseline) and math.isfinite(res.final) and res.final <= res.baseline
    assert all(math.isfinite(r["criterion"]) for r in res.log)
    for tower, wt, layer, ratio in res.settings:  # the model holds the chosen settings
        lin = get_linear(model, tower, wt, layer)
        rank = torch.linalg.matrix_rank(lin.weight.detach().float()).item()
        assert rank <= min(lin.weight.shape) - round(ratio * min(lin.weight.shape))


# ------------------------------------------------------------------------------------ trainers
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract_data")
    make_imagenet_like(str(root), num_classes=NUM_CLASSES, train_per_class=2, val_per_class=1, image_size=(32, 32),
                       seed=0)
    (root / "settings.json").write_text(json.dumps([["visual", "W_up", 1, 0.25], ["text", "W_q", 0, 0.2]]))
    return root


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from clip.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("contract_ckpt") / "tiny-vit.pt", like="tiny-vit")


# What a trainer needs beyond the common tiny config (a new trainer adds its entry here if it needs one).
def _tiny_swin(root) -> dict:
    """A tiny Swin-V2 snapshot of NUM_CLASSES classes under ``root`` (built once), as MODEL.BACKBONE.NAME."""
    from locoop.models.swinv2 import make_tiny_swinv2, save_snapshot

    snap = root / "tiny-swinv2"
    if not (snap / "config.json").is_file():
        save_snapshot(make_tiny_swinv2(num_labels=NUM_CLASSES, seed=0), snap)
    return {"MODEL.BACKBONE.NAME": str(snap)}


EXTRA_KEYS = {"SeTARFT": lambda root: {"SETAR.SETTINGS_FILE": str(root / "settings.json")},
              "SeTARSwin": _tiny_swin}


def _library_trainers():
    return [n for n in list_trainers() if get_trainer_class(n).__module__.startswith("locoop.")]


def _cfg(root, backbone, out, name):
    return tiny_trainer_cfg(root, backbone, out, name, **{"DATASET.NUM_SHOTS": 2,
                                                           **EXTRA_KEYS.get(name, lambda r: {})(root)})


def test_the_library_trainers_are_all_covered():
    assert {"LoCoOp", "CoOp", "ZeroshotCLIP", "SeTARFT", "LoRA"} <= set(_library_trainers())


@pytest.mark.parametrize("name", _library_trainers())
def test_trainer_contract(name, data_root, backbone, tmp_path):
    torch.manual_seed(0)
    trainer = build_trainer(_cfg(data_root, backbone, tmp_path, name))
    with torch.no_grad():
        text = trainer.text_features()
    if text is None:  # a classifier without a text side: its outputs are the class logits (locoop.ood.heads)
        from locoop.ood.heads import outputs_logits

        assert outputs_logits(trainer.clip_model) and trainer.clip_model.num_classes == NUM_CLASSES
    else:
        assert text.shape == (NUM_CLASSES, trainer.clip_model.embed_dim) and torch.isfinite(text).all()
        torch.testing.assert_close(text.float().norm(dim=-1), torch.ones(NUM_CLASSES), rtol=0, atol=1e-4)
    batch = next(iter(trainer.test_loader))
    image, _ = trainer.parse_batch_test(batch)
    trainer._eval_text_features = text
    with torch.no_grad():
        logits = trainer.model_inference(image)
    assert logits.shape == (len(image), NUM_CLASSES) and torch.isfinite(logits).all()

    names = trainer.get_model_names()
    optimised = {id(p) for n in names if trainer._optims[n] is not None
                 for group in trainer._optims[n].param_groups for p in group["params"]}
    if not optimised:  # evaluation only (zero-shot): nothing may be trainable
        assert not any(p.requires_grad for p in trainer.clip_model.parameters())
        return
    trainable = {id(p) for n in names for p in trainer._models[n].parameters() if p.requires_grad}
    assert trainable == optimised  # the optimisers hold exactly the trainable parameters
    params = {id(p): (n, p) for n, p in trainer.clip_model.named_parameters()}
    for n in names:
        params.update({id(p): (f"{n}.{k}", p) for k, p in trainer._models[n].named_parameters()})

    captured = []
    trainer.model_backward_and_update = lambda loss, names=None: captured.append(loss)
    trainer.set_model_mode("train")
    trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 2
    summary = trainer.forward_backward(next(iter(trainer.train_loader_x)))
    assert summary and all(math.isfinite(v) for v in summary.values())
    (loss,) = captured
    assert loss.ndim == 0 and torch.isfinite(loss)
    for _, p in params.values():
        p.grad = None
    loss.backward()
    reached = {i for i, (_, p) in params.items() if p.grad is not None}
    assert reached == trainable, (f"gradients reach {sorted(params[i][0] for i in reached - trainable)} (frozen) "
                                  f"and miss {sorted(params[i][0] for i in trainable - reached)}")
    grads = [params[i][1].grad for i in trainable]
    assert all(torch.isfinite(g).all() for g in grads) and sum(float(g.norm()) for g in grads) > 0

"""LoCoOp loss and OOD-patch selection against hand-computed values (2 images, 3 patches, 4 classes)."""
import math

import pytest
import torch
import torch.nn.functional as F

from locoop.trainers.loss import entropy, locoop_loss, ood_entropy_loss, select_ood_patches

# Patch class probabilities; logits = log(p) so that softmax(logits) gives p back.
PROBS = [
    [[0.70, 0.10, 0.10, 0.10],   # image 0 (label 0): label first -> rank 0
     [0.10, 0.60, 0.20, 0.10],   # two classes strictly above the label, class 3 tied -> rank 2
     [0.04, 0.06, 0.10, 0.80]],  # three above -> rank 3
    [[0.25, 0.25, 0.25, 0.25],   # image 1 (label 2): all tied -> rank 0
     [0.40, 0.30, 0.20, 0.10],   # rank 2
     [0.10, 0.20, 0.60, 0.10]],  # rank 0
]
LABELS = torch.tensor([0, 2])
GLOBAL = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]])


def _local() -> torch.Tensor:
    return torch.tensor(PROBS, dtype=torch.float64).log().float()


def _h(p):
    return -sum(x * math.log(x + 1e-5) for x in p)


def _ce():
    row0 = -(2.0 - math.log(math.e ** 2 + math.e + 1 + 1))
    row1 = -(3.0 - math.log(1 + 1 + math.e ** 3 + math.e))
    return (row0 + row1) / 2


@pytest.mark.parametrize("top_k, expected", [
    (1, [[False, True, True], [False, True, False]]),
    (2, [[False, True, True], [False, True, False]]),
    (3, [[False, False, True], [False, False, False]]),
    (4, [[False] * 3, [False] * 3]),
    (200, [[False] * 3, [False] * 3]),  # top_k >= C is clamped: the label is always in the top C
])
def test_select_ood_patches(top_k, expected):
    mask = select_ood_patches(_local(), LABELS, top_k)
    assert mask.dtype == torch.bool and mask.shape == (2, 3)
    assert mask.tolist() == expected
    # Ranking probabilities or logits selects the same patches.
    assert select_ood_patches(torch.tensor(PROBS), LABELS, top_k).tolist() == expected


def test_entropy_formula():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    expected = [-2 * 0.5 * math.log(0.5 + 1e-5), -math.log(1 + 1e-5)]
    assert torch.allclose(entropy(p), torch.tensor(expected), atol=1e-7)


def test_locoop_loss_hand_computed():
    lam = 0.25
    total, loss_id, loss_ood = locoop_loss(GLOBAL, _local(), LABELS, lam=lam, top_k=2)
    exp_ood = -(_h(PROBS[0][1]) + _h(PROBS[0][2]) + _h(PROBS[1][1])) / 3  # one mean over all selected patches
    assert loss_id.item() == pytest.approx(_ce(), abs=1e-6)
    assert loss_ood.item() == pytest.approx(exp_ood, abs=1e-6)
    assert total.item() == pytest.approx(_ce() + lam * exp_ood, abs=1e-6)
    _, _, ood3 = locoop_loss(GLOBAL, _local(), LABELS, lam=lam, top_k=3)
    assert ood3.item() == pytest.approx(-_h(PROBS[0][2]), abs=1e-6)


def test_no_patch_selected_is_zero_with_zero_gradient():
    local = _local().requires_grad_(True)
    glob = GLOBAL.clone().requires_grad_(True)
    total, loss_id, loss_ood = locoop_loss(glob, local, LABELS, lam=0.25, top_k=4)
    assert loss_ood.item() == 0.0
    assert total.item() == pytest.approx(_ce(), abs=1e-6)
    total.backward()
    assert local.grad is not None and torch.equal(local.grad, torch.zeros_like(local))
    assert torch.isfinite(glob.grad).all()


def test_gradient_only_on_selected_patches():
    local = _local().requires_grad_(True)
    mask = select_ood_patches(local, LABELS, 2)
    ood_entropy_loss(local, mask).backward()
    g = local.grad.abs().sum(-1)
    assert (g[~mask] == 0).all() and (g[mask] > 0).all()
    # Gradient of -H/3 wrt the logits of a selected patch: dH/dz_j = -p_j (log p_j - sum p log p)
    # (the 1e-5 guard shifts it by ~1e-5 only).
    p = torch.tensor(PROBS[1][1], dtype=torch.float64)
    dh = -p * (p.log() - (p * p.log()).sum())
    assert torch.allclose(local.grad[1, 1].double(), -dh / 3, atol=1e-4)


def test_matches_reference_style_topk_on_random_logits():
    g = torch.Generator().manual_seed(0)
    local = torch.randn(3, 10, 50, generator=g) * 5
    labels = torch.tensor([1, 7, 49])
    for k in (1, 5, 20):
        probs = F.softmax(local.view(-1, 50), dim=-1)
        top = probs.topk(k, dim=1).indices
        contains = top.eq(labels.repeat_interleave(10).unsqueeze(1)).any(dim=1)
        assert torch.equal(select_ood_patches(local, labels, k).view(-1), ~contains)
        sel = probs[~contains]
        ref = -(-(sel * torch.log(sel + 1e-5)).sum(1).mean())
        assert ood_entropy_loss(local, ~contains.view(3, 10)).item() == pytest.approx(ref.item(), abs=1e-5)


def test_fp16_logits_give_float32_losses():
    total, loss_id, loss_ood = locoop_loss(GLOBAL.half(), _local().half(), LABELS, 0.25, 2)
    assert total.dtype == loss_id.dtype == loss_ood.dtype == torch.float32
    assert total.item() == pytest.approx(locoop_loss(GLOBAL, _local(), LABELS, 0.25, 2)[0].item(), abs=2e-3)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(top_k=0), "top_k"),
    (dict(labels=torch.tensor([0, 4])), "labels must lie"),
    (dict(labels=torch.tensor([0])), "labels must be"),
    (dict(local=torch.zeros(2, 4)), "logits_local"),
])
def test_bad_input(kwargs, msg):
    local = kwargs.get("local", _local())
    labels = kwargs.get("labels", LABELS)
    with pytest.raises(ValueError, match=msg):
        select_ood_patches(local, labels, kwargs.get("top_k", 2))

"""Scores of locoop/ood/scores.py against hand-computed values (3 images, 3 classes, 2 patches)."""
import math

import numpy as np
import pytest
import torch

from locoop.ood.scores import (
    ScoreAccumulator,
    accuracy,
    compute_scores,
    get_score,
    list_scores,
    predict,
)

L2, L3, L4, L5, L8 = (math.log(v) for v in (2, 3, 4, 5, 8))

# Global cosine similarities chosen so that exp() gives small integers.
#   row 0: exp = [2, 1, 1] -> softmax [1/2, 1/4, 1/4]
#   row 1: exp = [1, 1, 1] -> softmax [1/3, 1/3, 1/3]
#   row 2: exp = [3, 3, 1] -> softmax [3/7, 3/7, 1/7]
G = np.array([[L2, 0.0, 0.0], [0.0, 0.0, 0.0], [L3, L3, 0.0]])

# Local similarities, 2 patches per image.
#   image 0: p0 exp [1,1,1] -> max 1/3;  p1 exp [4,1,1] -> max 4/6 = 2/3      => L-MCM 2/3
#   image 1: p0 exp [1,5,1] -> max 5/7;  p1 exp [2,2,1] -> max 2/5            => L-MCM 5/7
#   image 2: p0 exp [1,1,8] -> max 8/10; p1 exp [1,1,1] -> max 1/3           => L-MCM 4/5
# (A wrong softmax over all patches and classes jointly would give 4/9 for image 0.)
LOC = np.array([
    [[0.0, 0.0, 0.0], [L4, 0.0, 0.0]],
    [[0.0, L5, 0.0], [L2, L2, 0.0]],
    [[0.0, 0.0, L8], [0.0, 0.0, 0.0]],
])

HAND = {
    "MCM": [1 / 2, 1 / 3, 3 / 7],
    "L-MCM": [2 / 3, 5 / 7, 4 / 5],
    "GL-MCM": [1 / 2 + 2 / 3, 1 / 3 + 5 / 7, 3 / 7 + 4 / 5],
    # T * logsumexp(cos / T), T = 1: ln(sum of the exps above) = ln 4, ln 3, ln 7
    "energy": [math.log(4), math.log(3), math.log(7)],
    # max cosine: ln 2, 0, ln 3
    "max-logit": [L2, 0.0, L3],
    # -H(p): row 0: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 3/2 ln 2; row 1: ln 3;
    # row 2: H = -(2 * 3/7 ln(3/7) + 1/7 ln(1/7)) = ln 7 - 6/7 ln 3
    "entropy": [-1.5 * L2, -L3, 6 / 7 * L3 - math.log(7)],
    # population variance around 1/3: row 0: ((1/6)^2 + 2 (1/12)^2) / 3 = (1/24) / 3 = 1/72;
    # row 1: 0; row 2: (2 (2/21)^2 + (4/21)^2) / 3 = (24/441) / 3 = 8/441
    "variance": [1 / 72, 0.0, 8 / 441],
}


def test_every_score_matches_hand_values():
    out = compute_scores(G, LOC, names=list(HAND), T=1.0)
    assert list(out) == list(HAND)
    for name, expected in HAND.items():
        assert out[name].dtype == np.float32 and out[name].shape == (3,)
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_temperature_is_applied_to_the_cosine():
    # T = 0.5: row 0 cos / T = [2 ln 2, 0, 0], exp [4, 1, 1] -> MCM 4/6; energy = 0.5 ln 6.
    # max-logit ignores T (MCM code: raw cosine maximum).
    out = compute_scores(G[:1], LOC[:1], names=["MCM", "energy", "max-logit", "L-MCM"], T=0.5)
    np.testing.assert_allclose(out["MCM"], [2 / 3], rtol=1e-6)
    np.testing.assert_allclose(out["energy"], [0.5 * math.log(6)], rtol=1e-6)
    np.testing.assert_allclose(out["max-logit"], [L2], rtol=1e-6)
    # image 0, p1: cos / T = [2 ln 4, 0, 0] -> exp [16, 1, 1] -> 16/18
    np.testing.assert_allclose(out["L-MCM"], [16 / 18], rtol=1e-6)


def test_energy_logit_uses_logit_scale_and_lambda_local_weights_glmcm():
    # logit_scale 2, row 0: exp(2 * [ln 2, 0, 0]) = [4, 1, 1] -> ln 6
    out = compute_scores(G[:1], LOC[:1], names=["energy-logit", "GL-MCM"], logit_scale=2.0, lambda_local=0.5)
    np.testing.assert_allclose(out["energy-logit"], [math.log(6)], rtol=1e-6)
    np.testing.assert_allclose(out["GL-MCM"], [1 / 2 + 0.5 * 2 / 3], rtol=1e-6)


def test_chunking_and_input_types_do_not_change_scores():
    rng = np.random.default_rng(0)
    g = rng.uniform(-0.3, 0.4, (11, 7)).astype(np.float32)
    loc = rng.uniform(-0.3, 0.4, (11, 5, 7)).astype(np.float32)
    whole = compute_scores(g, loc, T=0.7)
    one_row = compute_scores(torch.from_numpy(g), torch.from_numpy(loc), T=0.7, chunk_elements=1)
    for k in whole:
        np.testing.assert_allclose(one_row[k], whole[k], rtol=1e-6, err_msg=k)
    half = compute_scores(torch.from_numpy(g).half(), None, names=["MCM"])  # fp16 input is upcast
    assert half["MCM"].dtype == np.float32
    np.testing.assert_allclose(half["MCM"], compute_scores(g, names="MCM")["MCM"], rtol=2e-3)


def test_default_names_depend_on_local_features_and_text_banks():
    # without their extra text features (a negative-label bank), NegLabel and CSP are not computable
    assert set(compute_scores(G)) == set(list_scores(local=False, text_bank=False))
    assert set(compute_scores(G, LOC)) == set(list_scores(text_bank=False))
    assert {"MCM", "L-MCM", "GL-MCM", "energy", "max-logit", "entropy", "variance"} <= set(list_scores())
    assert list_scores(local=True) == ["L-MCM", "GL-MCM"]
    assert list_scores(text_bank=True) == ["NegLabel", "CSP"]
    assert set(list_scores()) == set(list_scores(text_bank=False)) | {"NegLabel", "CSP"}
    with pytest.raises(ValueError, match="'NegLabel' needs its negative labels"):
        compute_scores(G, names=["MCM", "neglabel"])


def test_get_score_accepts_spellings_and_rejects_unknown_names():
    assert get_score("gl_mcm").name == "GL-MCM"
    assert get_score("mcm").name == "MCM"
    assert get_score("var").name == "variance"
    assert get_score("MaxLogit").name == "max-logit"
    with pytest.raises(ValueError, match="unknown OOD score 'msp'.*valid scores: MCM, L-MCM, GL-MCM"):
        get_score("msp")


@pytest.mark.parametrize("kwargs, match", [
    (dict(names=["L-MCM"]), "needs per-patch similarities"),
    (dict(names=["MCM", "mcm"]), "requested twice"),
    (dict(T=0.0), "temperature T must be a finite number > 0"),
    (dict(T=float("nan")), "temperature T"),
    (dict(logit_scale=-1.0), "logit_scale"),
    (dict(names=["nope"]), "unknown OOD score"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_scores(G, **kwargs)


def test_bad_shapes_and_nan_inputs_raise():
    with pytest.raises(ValueError, match=r"global_sim must be \[N, C\]"):
        compute_scores(G[0])
    with pytest.raises(ValueError, match="does not match global_sim"):
        compute_scores(G, LOC[:, :, :2])
    with pytest.raises(ValueError, match=r"local_sim must be \[N, P, C\]"):
        compute_scores(G, LOC[0])
    bad = G.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="score 'MCM' is NaN/inf for 1 of 3 images \\(first at index 1\\)"):
        compute_scores(bad, names=["MCM"])


def test_accuracy_and_predict():
    # argmax: row 0 -> 0; row 1 all equal -> first index 0; row 2 tie of 0 and 1 -> 0
    np.testing.assert_array_equal(predict(G), [0, 0, 0])
    assert accuracy(G, [0, 2, 1]) == pytest.approx(1 / 3)
    assert accuracy(torch.from_numpy(G), torch.tensor([0, 0, 0])) == 1.0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        accuracy(G, [0, -1, 1])
    with pytest.raises(ValueError, match="labels has 2 entries but global_sim has 3 rows"):
        accuracy(G, [0, 1])


def test_accumulator_equals_one_call():
    acc = ScoreAccumulator(["MCM", "GL-MCM"], T=1.0)
    acc.update(G[:2], LOC[:2], labels=[0, 2])
    acc.update(G[2:], LOC[2:], labels=[1])
    res = acc.result()
    np.testing.assert_allclose(res["MCM"], HAND["MCM"], rtol=1e-6)
    np.testing.assert_allclose(res["GL-MCM"], HAND["GL-MCM"], rtol=1e-6)
    assert acc.accuracy == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="needs per-patch"):
        ScoreAccumulator(["L-MCM"], have_local=False)  # checked before any image is encoded

"""NegLabel / CSP: NegMining, grouping and score against hand-computed values and naive twins;
the negative-label bank built with a tiny CLIP, and its cache."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import clip
from locoop.ood import neglabel as nl
from locoop.ood.lexicon import read_lexicon
from locoop.ood.neglabel import (CSP_ADJ_TEMPLATES, CSP_MODIFIERS, CSP_NOUN_TEMPLATES, NegLabelParams,
                                 build_negative_bank, candidate_prompts, encode_prompt_ensembles, group_columns,
                                 mining_quantiles, neglabel_score, recipe_id_text_features, score_feature_batches,
                                 score_from_stats, select_negatives)


def _features_with_cosines(cos_rows):
    """ID features = basis vectors e_0..e_{K-1}; candidate i has exactly cos_rows[i] with them."""
    cos_rows = np.asarray(cos_rows, dtype=np.float64)
    n, k = cos_rows.shape
    ids = np.eye(k + 1)[:k]
    rest = np.sqrt(1.0 - (cos_rows ** 2).sum(axis=1, keepdims=True))
    cand = np.concatenate([cos_rows, rest], axis=1)
    return torch.tensor(cand, dtype=torch.float32), torch.tensor(ids, dtype=torch.float32)


COS = [[0.1, 0.5, 0.2, 0.7, 0.3],   # sorted .1 .2 .3 .5 .7 -> q95 at 3.8: .5 + .8 * .2 = .66
       [0.0, 0.1, 0.0, 0.2, 0.1],   # 0 0 .1 .1 .2 -> .1 + .8 * .1 = .18
       [0.3, 0.3, 0.3, 0.3, 0.3],   # .3
       [0.96, 0.0, 0.0, 0.0, 0.0]]  # 0 0 0 0 .96 -> .8 * .96 = .768; its max .96 > .95


def test_mining_quantiles_hand_values():
    cand, ids = _features_with_cosines(COS)
    q = mining_quantiles(cand, ids, percentile=0.95)
    assert torch.allclose(q, torch.tensor([0.66, 0.18, 0.30, 0.768]), atol=1e-6)
    q_csp = mining_quantiles(cand, ids, percentile=0.95, exclude_above=0.95)
    assert torch.allclose(q_csp, torch.tensor([0.66, 0.18, 0.30, 1.0]), atol=1e-6)
    # chunking does not change anything; numpy's linear percentile is the same definition
    assert torch.equal(mining_quantiles(cand, ids, 0.95, chunk=1), q)
    assert np.allclose(q.numpy(), np.percentile(np.asarray(COS), 95, axis=1), atol=1e-6)


def test_select_negatives_per_part_of_speech():
    q = torch.tensor([0.5, 0.2, 0.1, 0.9, 0.3, 0.1, 0.4])
    pos = ["noun", "adj", "noun", "noun", "adj", "noun", "adj"]
    # nouns 0 2 3 5 (q .5 .1 .9 .1): int(4 * .6) = 2 -> 2, 5 (tie at .1 keeps candidate order)
    # adjectives 1 4 6 (q .2 .3 .4): int(3 * .6) = 1 -> 1
    assert select_negatives(q, pos, ratio=0.6).tolist() == [2, 5, 1]
    assert select_negatives(q, pos, ratio=1.0).tolist() == [2, 5, 0, 3, 1, 4, 6]
    assert select_negatives(q[[0, 2]], ["noun", "noun"], ratio=0.4).tolist() == []


def test_group_columns_follow_the_reference_procedure():
    groups = group_columns(10, ngroup=3, seed=0, device="cpu")
    # reference: drop 10 % 3 = 1 column, torch.manual_seed(0), randperm over the 9 left, 3 consecutive groups
    torch.manual_seed(0)
    ref = torch.randperm(9)
    assert groups.shape == (3, 3) and torch.equal(groups.reshape(-1), ref)
    assert group_columns(10, ngroup=1) is None and group_columns(10, ngroup=0) is None
    assert not torch.equal(group_columns(10, 3, seed=1).reshape(-1), ref)
    with pytest.raises(ValueError, match="cannot form 20 groups"):
        group_columns(19, ngroup=20)


def test_neglabel_score_hand_values():
    id_cos = torch.tensor([[0.3, 0.1]])
    neg_cos = torch.tensor([[0.2, 0.0, -0.4, 0.6]])
    # (e^.6 + e^.2) / (e^.6 + e^.2 + e^.4 + e^0 + e^-.8 + e^1.2) at tau = 0.5
    s = neglabel_score(id_cos, neg_cos, temperature=0.5)
    assert s.item() == pytest.approx(0.32709183738460695, rel=1e-6)
    # groups {0, 3} and {2, 1}: A / (A + e^.4 + e^1.2) = .38744..., A / (A + e^-.8 + e^0) = .67741...
    g = neglabel_score(id_cos, neg_cos, temperature=0.5, groups=torch.tensor([[0, 3], [2, 1]]))
    assert g.item() == pytest.approx((0.38744011514363974 + 0.6774143816259003) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="same rows"):
        neglabel_score(id_cos, neg_cos[:, :2].repeat(2, 1))
    with pytest.raises(ValueError, match="columns"):
        neglabel_score(id_cos, neg_cos, groups=torch.tensor([[0, 4]]))


def _reference_grouped_score(pos, neg, ngroup, tau):
    """NegLabel's ScalableClassifier.grouping, step by step: drop, permute with the global seed,
    one softmax over [ID, group negatives] per group, sum of the ID mass, mean over groups."""
    drop = neg.shape[1] % ngroup
    if drop > 0:
        neg = neg[:, :-drop]
    torch.manual_seed(0)
    idx = torch.randperm(neg.shape[1])
    negs = neg.T[idx].T.reshape(pos.shape[0], ngroup, -1)
    scores = []
    for i in range(ngroup):
        full = torch.cat([pos, negs[:, i, :]], dim=-1) / tau
        scores.append(full.softmax(dim=-1)[:, :pos.shape[1]].sum(dim=-1))
    return torch.stack(scores, dim=-1).mean(dim=-1)


@pytest.mark.parametrize("num_neg,ngroup", [(37, 4), (40, 4), (23, 1)])
def test_grouped_score_matches_reference_loop(num_neg, ngroup):
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(16, 11, generator=g) * 0.6 - 0.1
    neg = torch.rand(16, num_neg, generator=g) * 0.6 - 0.1
    groups = group_columns(num_neg, ngroup, seed=0, device="cpu")
    ours = neglabel_score(pos, neg, temperature=0.01, groups=groups)
    if ngroup > 1:
        ref = _reference_grouped_score(pos, neg, ngroup, 0.01)
    else:  # the paper's score over all negatives
        ref = (torch.cat([pos, neg], dim=-1) / 0.01).softmax(dim=-1)[:, :pos.shape[1]].sum(dim=-1)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_params_recipes_and_validation():
    p = NegLabelParams()
    assert (p.ratio, p.percentile, p.ngroup, p.group_seed, p.temperature, p.exclude_above) == \
        (0.15, 0.95, 100, 0, 0.01, None)
    assert p.noun_templates == ("the nice {}",) and p.adj_templates == ("This is a {} photo",)
    c = NegLabelParams.for_recipe("csp")
    assert c.exclude_above == 0.95 and c.noun_templates == CSP_NOUN_TEMPLATES and len(c.adj_modifiers) == 14
    assert c.lexicon_exclude == ("noun.person.txt", "noun.quantity.txt", "noun.group.txt", "adj.pert.txt")
    assert NegLabelParams.for_recipe("neglabel", ngroup=5).ngroup == 5
    for bad in ({"recipe": "adaneg"}, {"ratio": 0}, {"ratio": 1.5}, {"percentile": 2}, {"temperature": 0},
                {"noun_templates": ("no slot",)}, {"adj_templates": "This is a {} photo"}, {"ngroup": 2.5}):
        with pytest.raises(ValueError):
            NegLabelParams(**bad)


def _lexicon_dir(tmp_path, with_person=False):
    d = tmp_path / "txtfiles"
    d.mkdir(parents=True)
    (d / "noun.artifact.txt").write_text("tractor\nhammer\nviolin\nbicycle\nlamp\nkettle\numbrella\nrocket\n")
    (d / "noun.plant.txt").write_text("oak\nmoss\nfern\ntulip\n")
    (d / "adj.all.txt").write_text("gigantic\nwooden\nshiny\nfurry\nbitter\nsilent\n")
    if with_person:
        (d / "noun.person.txt").write_text("sailor\n")
    return d


def test_csp_candidate_prompts_follow_its_draws(tmp_path):
    lex = read_lexicon(_lexicon_dir(tmp_path))
    labels, pos, prompts = candidate_prompts(lex, NegLabelParams.for_recipe("csp"))
    adjs = lex.of("adj")
    random.seed(0)  # CSP: random.seed(seed), then one random.choice per adjective in reading order
    phrases = [random.choice(CSP_MODIFIERS).format(a) for a in adjs]
    assert [lab for lab, p in zip(labels, pos) if p == "adj"] == phrases
    assert prompts[labels.index(phrases[0])] == [t.format(phrases[0]) for t in CSP_ADJ_TEMPLATES]
    assert prompts[labels.index("oak")] == [t.format("oak") for t in CSP_NOUN_TEMPLATES]
    labels, pos, prompts = candidate_prompts(lex, NegLabelParams())
    assert prompts[labels.index("oak")] == ["the nice oak"]
    assert prompts[labels.index("wooden")] == ["This is a wooden photo"]
    with pytest.raises(ValueError, match="excludes"):
        candidate_prompts(read_lexicon(_lexicon_dir(tmp_path / "b", with_person=True)),
                          NegLabelParams.for_recipe("csp"))


@pytest.fixture(scope="module")
def tiny_model(tiny_vit_path):
    model, _ = clip.load(tiny_vit_path, device="cpu")
    return model.eval()


def _encode_one(model, text):
    with torch.no_grad():
        return model.encode_text(clip.tokenize([text]))[0].float()


def test_prompt_ensembles_are_raw_means(tiny_model):
    ens = [["a photo of the nice oak.", "the oak", "oak"], ["This is a wooden photo"]]
    got = encode_prompt_ensembles(tiny_model, ens, device="cpu", batch_size=2)
    for row, prompts in zip(got, ens):
        raw = torch.stack([_encode_one(tiny_model, p) for p in prompts]).mean(dim=0)
        assert torch.allclose(row, raw / raw.norm(), atol=1e-5)
    ids = recipe_id_text_features(tiny_model, ["red_panda", "oak"], NegLabelParams())
    assert torch.allclose(ids[0], torch.nn.functional.normalize(_encode_one(tiny_model, "the nice red panda"), dim=0),
                          atol=1e-5)


def _expected_selection(model, lex, ids, ratio):
    """Independent twin: one prompt at a time, numpy percentile, numpy stable argsort per part of speech."""
    prompts = [("the nice {}" if p == "noun" else "This is a {} photo").format(w) for w, p in zip(lex.words, lex.pos)]
    feats = torch.stack([torch.nn.functional.normalize(_encode_one(model, t), dim=0) for t in prompts]).numpy()
    q = np.percentile(feats @ ids.numpy().T, 95, axis=1)
    keep = []
    for part in ("noun", "adj"):
        idx = np.array([i for i, p in enumerate(lex.pos) if p == part])
        keep += idx[np.argsort(q[idx], kind="stable")[: int(len(idx) * ratio)]].tolist()
    return [lex.words[i] for i in keep], feats[keep]


def test_bank_selection_against_twin_and_cache(tiny_model, tmp_path, monkeypatch):
    lex = read_lexicon(_lexicon_dir(tmp_path))
    ids = recipe_id_text_features(tiny_model, ["red striped thing", "blue striped thing", "green striped thing"],
                                  NegLabelParams())
    params = NegLabelParams(ratio=0.5, ngroup=2)
    cache = tmp_path / "cache"
    bank = build_negative_bank(tiny_model, ids, lex, params, cache_dir=cache, device="cpu", verbose=False)
    words, feats = _expected_selection(tiny_model, lex, ids, 0.5)
    assert bank.labels == words and len(bank) == 6 + 3
    assert bank.pos == ["noun"] * 6 + ["adj"] * 3
    assert torch.allclose(bank.features, torch.tensor(feats), atol=1e-5)
    assert bank.groups.shape == (2, 4) and bank.meta["dropped_by_grouping"] == 1
    assert bank.params.perm_device == "cpu" and bank.meta["selected_counts"] == {"noun": 6, "adj": 3}
    files = sorted(p.name for p in (cache / "neglabel").iterdir())
    assert len(files) == 2 and files[0].startswith("bank-") and files[1].startswith("candidates-")

    # the same request is served from the bank cache, a new ID side from the cached candidates
    def boom(*a, **k):
        raise AssertionError("the text encoder ran although the candidates are cached")

    monkeypatch.setattr(nl, "encode_prompt_ensembles", boom)
    again = build_negative_bank(tiny_model, ids, lex, params, cache_dir=cache, device="cpu", verbose=False)
    assert again.key == bank.key and again.labels == bank.labels and torch.equal(again.features, bank.features)
    assert torch.equal(again.groups, bank.groups)
    other_ids = torch.nn.functional.normalize(ids + 0.3 * torch.randn_like(ids), dim=-1)
    other = build_negative_bank(tiny_model, other_ids, lex, params, cache_dir=cache, device="cpu", verbose=False)
    assert other.key != bank.key
    assert other.labels == _expected_selection(tiny_model, lex, other_ids, 0.5)[0]
    # another lexicon, or another prompt recipe, needs the text encoder again
    (tmp_path / "more.txt").write_text("cloud\nriver\n")
    with pytest.raises(AssertionError, match="text encoder ran"):
        build_negative_bank(tiny_model, ids, read_lexicon(tmp_path / "more.txt"), params, cache_dir=cache,
                            device="cpu", verbose=False)
    with pytest.raises(AssertionError, match="text encoder ran"):
        build_negative_bank(tiny_model, ids, lex, NegLabelParams(ratio=0.5, ngroup=2, noun_templates=("a {}",)),
                            cache_dir=cache, device="cpu", verbose=False)
    assert not [p for p in (cache / "neglabel").iterdir() if p.name.startswith(".")]  # no temporary left


def test_corrupt_cache_is_rebuilt_and_score_end_to_end(tiny_model, tmp_path):
    lex = read_lexicon(_lexicon_dir(tmp_path))
    ids = recipe_id_text_features(tiny_model, ["red striped thing", "blue striped thing"], NegLabelParams())
    params = NegLabelParams(ratio=0.5, ngroup=3)
    cache = tmp_path / "cache"
    bank = build_negative_bank(tiny_model, ids, lex, params, cache_dir=cache, device="cpu", verbose=False)
    for f in (cache / "neglabel").iterdir():
        f.write_bytes(b"not a torch file")
    rebuilt = build_negative_bank(tiny_model, ids, lex, params, cache_dir=cache, device="cpu", verbose=False)
    assert rebuilt.labels == bank.labels and torch.allclose(rebuilt.features, bank.features)

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, ids.shape[1], generator=gen), dim=-1)
    id_cos, neg_cos = img @ ids.t(), img @ bank.features.t()
    got = score_from_stats(SimpleNamespace(global_cos=id_cos, neg_cos=neg_cos, neg_bank=bank))
    # numpy twin of the grouped score
    a, b = id_cos.double().numpy() / 0.01, neg_cos.double().numpy() / 0.01
    per_group = []
    for cols in bank.groups.numpy():
        ea, eb = np.exp(a - a.max(1, keepdims=True)), np.exp(b[:, cols] - a.max(1, keepdims=True))
        per_group.append(ea.sum(1) / (ea.sum(1) + eb.sum(1)))
    assert np.allclose(got.numpy(), np.mean(per_group, axis=0), rtol=1e-5, atol=1e-7)
    assert torch.equal(bank.score(id_cos, neg_cos), got)
    own = score_from_stats(SimpleNamespace(global_cos=torch.zeros_like(id_cos), neg_id_cos=id_cos, neg_cos=neg_cos,
                                           neg_bank=bank))
    assert torch.equal(own, got)  # the recipe's own ID cosines take precedence over the trainer's
    # streamed FeatureSet batches (as the runner or the feature cache yields them), small chunks
    from locoop.ood.features import FeatureSet

    batches = [FeatureSet(img[:3], None, torch.full((3,), -1), ["a"] * 3),
               FeatureSet(img[3:], None, torch.full((2,), -1), ["b"] * 2)]
    streamed = score_feature_batches(batches, ids, bank, chunk_elements=2 * (ids.shape[0] + len(bank)))
    assert torch.allclose(streamed, got, atol=1e-6)


def test_bank_errors(tiny_model, tmp_path):
    lex = read_lexicon(_lexicon_dir(tmp_path))
    ids = recipe_id_text_features(tiny_model, ["red striped thing"], NegLabelParams())
    with pytest.raises(ValueError, match="cannot form 100 groups"):
        build_negative_bank(tiny_model, ids, lex, NegLabelParams(), device="cpu", verbose=False)
    with pytest.raises(ValueError, match="no negative label selected"):
        build_negative_bank(tiny_model, ids, lex, NegLabelParams(ratio=0.01, ngroup=1), device="cpu", verbose=False)
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        build_negative_bank(tiny_model, ids[0], lex, NegLabelParams(ngroup=1), device="cpu", verbose=False)

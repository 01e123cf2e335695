"""SeTAR searchers, greedy search (fast == naive), settings files (locoop/setar)."""
import copy
import json
import math

import pytest
import torch

import clip
from clip.configs import CLIPConfig
from clip.model import build_model
from clip.tiny import random_state_dict
from locoop.setar.lowrank import LowRankEditor
from clip.naive import encode_image_value_path_every_block
from locoop.models.head import ClassPrompts
from locoop.setar.search import SearchData, check_ratios, run_search
from locoop.setar.searchers import Step, build_steps, get_searcher, list_searchers
from locoop.setar.settings import apply_settings, load_settings, save_settings, validate_settings

torch.set_num_threads(1)
C = 6  # classes


def tiny(name="tiny-vit"):
    return build_model(random_state_dict(name, seed=0))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 32, 32, generator=g), torch.randint(0, C, (5,), generator=g)) for _ in range(3)]
    ood = [torch.randn(4, 3, 32, 32, generator=g) + 1.0 for _ in range(2)]
    tokens = clip.tokenize([f"a photo of a thing{i}." for i in range(C)])
    return SearchData(batches, ClassPrompts(tokens=tokens, chunk_size=4), ood_batches=ood)


# ------------------------------------------------------------------------------------ searchers
LN = {"visual": 2, "text": 2}
V, T_ = "visual", "text"


def test_searcher_registry():
    assert list_searchers() == ["visual_text", "text_visual", "visual_only", "text_only", "modality_interleaved",
                                "layer_exhaustive", "visual_only_swin"]
    with pytest.raises(ValueError, match="valid searchers: visual_text, text_visual, visual_only"):
        get_searcher("visual-text")


def test_visual_text_order():
    assert build_steps("visual_text", LN) == [Step(V, "W_up", 1), Step(V, "W_up", 0), Step(T_, "W_up", 1),
                                              Step(T_, "W_up", 0)]
    assert build_steps("visual_text", LN, freeze_proj=False) == [
        Step(V, "W_p", None), Step(V, "W_up", 1), Step(V, "W_up", 0),
        Step(T_, "W_p", None), Step(T_, "W_up", 1), Step(T_, "W_up", 0)]


def test_other_orders():
    assert build_steps("text_visual", LN) == [Step(T_, "W_up", 1), Step(T_, "W_up", 0), Step(V, "W_up", 1),
                                              Step(V, "W_up", 0)]
    assert build_steps("visual_only", LN, freeze_proj=False) == [Step(V, "W_p", None), Step(V, "W_up", 1),
                                                                 Step(V, "W_up", 0)]
    assert build_steps("text_only", {"text": 2}) == [Step(T_, "W_up", 1), Step(T_, "W_up", 0)]
    assert build_steps("modality_interleaved", LN, freeze_proj=False) == [
        Step(V, "W_p", None), Step(T_, "W_p", None), Step(V, "W_up", 1), Step(T_, "W_up", 1),
        Step(V, "W_up", 0), Step(T_, "W_up", 0)]
    # towers of different depth: the deeper one's remaining layers follow
    assert build_steps("modality_interleaved", {"visual": 3, "text": 1}) == [
        Step(V, "W_up", 2), Step(T_, "W_up", 0), Step(V, "W_up", 1), Step(V, "W_up", 0)]
    assert get_searcher("layer_exhaustive").exhaustive
    assert build_steps("layer_exhaustive", LN) == build_steps("visual_text", LN)


def test_several_weight_types_per_layer():
    assert build_steps("visual_only", LN, ["W_q", "W_down"]) == [
        Step(V, "W_q", 1), Step(V, "W_down", 1), Step(V, "W_q", 0), Step(V, "W_down", 0)]


@pytest.mark.parametrize("types, match", [(["W_x"], "valid weight types: W_q, W_k, W_v, W_o, W_up, W_down"),
                                          (["W_p"], "FREEZE_PROJ"), ([], "at least one"),
                                          (["W_up", "W_up"], "twice")])
def test_bad_weight_types(types, match):
    with pytest.raises(ValueError, match=match):
        build_steps("visual_text", LN, types)


# ------------------------------------------------------------------------------------ search
def _search(data, mode, **kw):
    model = tiny(kw.pop("arch", "tiny-vit"))
    kw.setdefault("ratios", [0.0, 0.1, 0.3, 0.5, 0.7])
    kw.setdefault("top_k", 2)
    kw.setdefault("lam", 0.5)
    return model, run_search(model, data, mode=mode, verbose=False, **kw)


# The naive mode shares no arithmetic with the fast one (full 77-token text with an explicit mask,
# the value path in every block): their fp32 cosines differ by ~1e-7, i.e. ~1e-5 in logits = 100 cos
# and a few 1e-6 in the loss. Settings must be identical regardless.
CRIT_TOL = dict(abs=1e-5, rel=1e-5)


def _same(fast, naive):
    assert fast.settings == naive.settings
    assert len(fast.log) == len(naive.log)
    for a, b in zip(fast.log, naive.log):
        assert (a["step"], a["tower"], a["weight_type"], a["layer"], a["ratio"], a["chosen"]) == \
               (b["step"], b["tower"], b["weight_type"], b["layer"], b["ratio"], b["chosen"])
        for k in ("criterion", "loss", "loss_id", "loss_ood", "acc", "auroc", "aupr", "fpr95"):
            if k in a:
                assert a[k] == pytest.approx(b[k], **CRIT_TOL), (a, b)
    assert fast.final == pytest.approx(naive.final, **CRIT_TOL)


@pytest.mark.parametrize("searcher, freeze_proj, types", [
    ("visual_text", False, ["W_up", "W_q"]),
    ("text_visual", True, ["W_down"]),
    ("modality_interleaved", False, ["W_up"]),
    ("layer_exhaustive", False, ["W_up"]),
])
def test_fast_equals_naive(data, searcher, freeze_proj, types):
    _, fast = _search(data, "fast", searcher=searcher, freeze_proj=freeze_proj, weight_types=types)
    _, naive = _search(data, "naive", searcher=searcher, freeze_proj=freeze_proj, weight_types=types)
    _same(fast, naive)
    assert any(s[3] > 0 for s in fast.settings)  # the test exercises commits, not only ratio 0
    assert fast.counters["visual_layer_passes"] < naive.counters["visual_layer_passes"]
    assert fast.counters["text_layer_passes"] < naive.counters["text_layer_passes"]
    assert naive.counters["candidates_reused"] == 0


def test_fast_equals_naive_with_a_tiny_cache_budget(data):
    # A budget below one layer keeps only the stem output: every block input is recomputed from it.
    arch = build_model(random_state_dict(CLIPConfig("tiny-vit-3", embed_dim=32, image_resolution=32, vision_layers=3,
                                                    vision_width=64, vision_patch_size=8, transformer_width=64,
                                                    transformer_layers=3), seed=0))
    results = {}
    for mode, cache in (("fast", 1e-9), ("fast-full", 8.0), ("naive", 8.0)):
        model = copy.deepcopy(arch)
        results[mode] = run_search(model, data, searcher="layer_exhaustive", ratios=[0.0, 0.3, 0.6], top_k=2,
                                   lam=0.5, mode=mode.split("-")[0], verbose=False, cache_gib=cache)
    _same(results["fast"], results["naive"])
    _same(results["fast-full"], results["naive"])
    # the small budget costs recomputation, never a different result
    assert results["fast"].counters["visual_layer_passes"] > results["fast-full"].counters["visual_layer_passes"]


def test_reference_image_path_matches_ours():
    model = tiny()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        g_ref, l_ref = encode_image_value_path_every_block(model, x)
        g, loc = model.encode_image(x, return_local=True)
    assert torch.allclose(g_ref, g, atol=1e-5) and torch.allclose(l_ref, loc, atol=1e-5)


def test_fast_equals_naive_metric_criterion(data):
    for crit in ("auroc", "fpr95"):
        _, fast = _search(data, "fast", criterion=crit, score="GL-MCM", freeze_proj=False)
        _, naive = _search(data, "naive", criterion=crit, score="GL-MCM", freeze_proj=False)
        _same(fast, naive)
        assert {"auroc", "aupr", "fpr95"} <= set(fast.log[0])


def test_fast_equals_naive_with_learned_prompts(data):
    from locoop.trainers.prompt_learner import PromptLearner

    torch.manual_seed(1)
    model = tiny()
    pl = PromptLearner([f"thing{i}" for i in range(C)], model, n_ctx=4)
    text = ClassPrompts(embeddings=pl().detach(), eot_idx=pl.eot_idx, chunk_size=4)
    d = SearchData(data.id_batches, text)
    _, fast = _search(d, "fast")
    _, naive = _search(d, "naive")
    _same(fast, naive)


def test_resnet_text_only(data):
    d = SearchData([(im.new_zeros(im.shape[0], 3, 64, 64) + im.mean(), lbl) for im, lbl in data.id_batches],
                   data.text)
    _, fast = _search(d, "fast", arch="tiny-rn", searcher="text_only")
    _, naive = _search(d, "naive", arch="tiny-rn", searcher="text_only")
    _same(fast, naive)
    with pytest.raises(ValueError, match="ModifiedResNet"):
        _search(d, "fast", arch="tiny-rn", searcher="visual_text")


def test_greedy_selection_rule(data):
    _, res = _search(data, "fast", freeze_proj=False)
    incumbent = math.inf
    for i, setting in enumerate(res.settings):
        rows = [r for r in res.log if r["step"] == i]
        assert [r["ratio"] for r in rows] == [0.0, 0.1, 0.3, 0.5, 0.7]
        # ratio 0 is the incumbent (the unpruned model at step 0)
        assert rows[0]["criterion"] == (res.baseline if i == 0 else incumbent)
        best = min(rows, key=lambda r: (r["criterion"], r["ratio"]))  # smallest ratio on ties
        assert setting == [best["tower"], best["weight_type"], best["layer"], best["ratio"]]
        assert [r["chosen"] for r in rows].count(True) == 1 and best["chosen"]
        incumbent = best["criterion"]
    assert res.final == incumbent <= res.baseline
    assert [s[:3] for s in res.settings] == [list(s) for s in build_steps("visual_text", LN, freeze_proj=False)]


def test_final_model_has_the_settings_applied(data):
    model, res = _search(data, "fast")
    fresh = tiny()
    apply_settings(LowRankEditor(fresh), res.settings)
    for (a, pa), (b, pb) in zip(model.named_parameters(), fresh.named_parameters()):
        assert a == b and torch.equal(pa, pb)
    # the reported final criterion is the pruned model's criterion
    check = run_search(fresh, data, ratios=[0.0], top_k=2, lam=0.5, mode="fast", verbose=False)
    assert check.baseline == res.final  # the same operations on the same weights: bit for bit
    check = run_search(fresh, data, ratios=[0.0], top_k=2, lam=0.5, mode="naive", verbose=False)
    assert check.baseline == pytest.approx(res.final, **CRIT_TOL)


def test_outputs_written(data, tmp_path):
    _, res = _search(data, "fast", output_dir=tmp_path)
    rows = (tmp_path / "search_log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,tower,weight_type,layer,ratio,n_removed,criterion,loss,loss_id,loss_ood,acc")
    assert len(rows) == 1 + len(res.log) == 1 + 4 * 5
    assert json.loads((tmp_path / "search_log.json").read_text())[3]["ratio"] == 0.5
    assert [list(s) for s in load_settings(tmp_path / "best_settings.json")] == res.settings
    summary = json.loads((tmp_path / "search_summary.json").read_text())
    assert summary["mode"] == "fast" and summary["final"] == res.final


@pytest.mark.parametrize("kw, match", [
    ({"criterion": "auroc", "no_ood": True}, "needs OOD validation images"),
    ({"criterion": "accuracy"}, "valid criteria: loss"),
    ({"top_k": 7}, r"top-K 7 .* 1\.\.6"),
    ({"mode": "quick"}, "valid modes: fast, naive"),
    ({"ratios": [0.1, 1.2]}, r"not in \[0, 1\)"),
    ({"ratios": [0.995]}, "all of them"),
    ({"prune_type": "minor"}, "valid prune types"),
    ({"searcher": "greedy"}, "valid searchers"),
    ({"weight_types": ["W_z"]}, "valid weight types"),
])
def test_bad_input_is_refused_before_work(data, kw, match):
    if kw.pop("no_ood", False):
        data = SearchData(data.id_batches, data.text)
    mode = kw.pop("mode", "fast")
    with pytest.raises(ValueError, match=match):
        _search(data, mode, **kw)


def test_check_ratios():
    assert check_ratios([0.4, 0.1, 0.1]) == [0.0, 0.1, 0.4]  # 0 always included, sorted, unique
    assert check_ratios([0, 0.05]) == [0.0, 0.05]


# ------------------------------------------------------------------------------------ settings
def test_settings_round_trip(tmp_path):
    settings = [["visual", "W_up", 1, 0.35], ["visual", "W_up", 0, 0.0], ["text", "W_p", None, 0.1]]
    path = save_settings(tmp_path / "s.json", settings)
    text = path.read_text()
    assert json.loads(text) == settings and '"text", "W_p", null, 0.1' in text
    model = tiny()
    assert [list(s) for s in load_settings(path, model)] == settings
    ed = LowRankEditor(model)
    apply_settings(ed, load_settings(path))
    assert ed.applied == {("visual", "W_up", 1): 0.35, ("text", "W_p", None): 0.1}


@pytest.mark.parametrize("settings, match", [
    ([["vision", "W_up", 0, 0.1]], "unknown tower 'vision'; valid towers: visual, text"),
    ([["visual", "W_mlp", 0, 0.1]], "unknown weight type 'W_mlp'; valid weight types: W_q"),
    ([["visual", "W_up", 5, 0.1]], r"layer index in 0\.\.1"),
    ([["visual", "W_up", "5", 0.1]], "block index"),
    ([["visual", "W_up", 0, 1.5]], r"\[0, 1\) .* or a whole number >= 1"),
    ([["visual", "W_up", 0, 64]], r"which has 64; give at most 63"),  # an absolute rank (SeTAR's) too large
    ([["visual", "W_up", 0, 0.999]], "all of them"),
    ([["text", "W_p", 3, 0.1]], "W_p has no layer"),
    ([["visual", "W_up", 0, 0.1], ["visual", "W_up", 0, 0.2]], "already set by entry 0"),
    ([["visual", "W_up", 0]], r"\[tower, weight_type, layer, ratio\]"),
    ({"visual": 1}, "expected a list"),
])
def test_settings_validation(settings, match):
    with pytest.raises(ValueError, match=match):
        validate_settings(settings, tiny(), source="best_settings.json")


def test_settings_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="setar-search"):
        load_settings(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_settings(bad)
    bad.write_text('"visual"')
    with pytest.raises(ValueError, match="expected a list"):
        load_settings(bad)


# ------------------------------------------------------------------------------------ end to end
def _make_data(root):
    from clip.tiny import make_tiny_checkpoint
    from locoop.data.synthetic import make_imagenet_like, make_ood_sets, make_val_split

    make_imagenet_like(str(root), num_classes=5, train_per_class=2, val_per_class=3, image_size=(40, 40))
    make_ood_sets(str(root), per_set=4, image_size=(40, 40))
    make_val_split(str(root / "val_split.json"), str(root / "imagenet" / "images" / "train"), per_class=2)
    return make_tiny_checkpoint(root / "tiny-vit.pt", like="tiny-vit", seed=0)


def _script(root, config, out, *extra, env_extra=None, model_dir=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, **(env_extra or {}))
    opts = ["MODEL.BACKBONE.NAME", str(root / "tiny-vit.pt"), "DATASET.VAL_SPLIT_FILE", str(root / "val_split.json"),
            "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4",
            "SETAR.TOPK", "2", "OOD.PLOT", "False", "VERBOSE", "False", *extra]
    args = [str(root), config, str(out)] + ([str(model_dir)] if model_dir else []) + opts
    return subprocess.run(["bash", str(repo / "scripts" / "setar" / "search.sh"), *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_search_script_end_to_end(tmp_path):
    _make_data(tmp_path)
    out = tmp_path / "run"
    p = _script(tmp_path, "configs/setar/imagenet/SeTAR.yaml", out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = (out / "search_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 * 9  # 2 visual + 2 text W_up steps x 9 ratios
    marked = json.loads((out / "best_settings.json").read_text())
    assert marked["complete"] is True and marked["format"] == "locoop.setar.settings"
    settings = marked["settings"]
    assert [s[:3] for s in settings] == [["visual", "W_up", 1], ["visual", "W_up", 0], ["text", "W_up", 1],
                                         ["text", "W_up", 0]]
    progress = json.loads((out / "search_progress.json").read_text())
    assert progress["complete"] is True and progress["settings"] == settings
    # the same settings in SeTAR's config_best.json shape, read back by --settings
    setar_best = json.loads((out / "config_best.json").read_text())
    assert setar_best["lora_settings"] == settings and setar_best["id_dataset"] == "ID_ImageNet1K"
    assert setar_best["temperature"] == 100.0 and setar_best["scorers"] == ["mcm_score", "gl_mcm_score"]
    assert [list(s) for s in load_settings(out / "config_best.json")] == settings
    summary = json.loads((out / "search_summary.json").read_text())
    assert summary["final"] <= summary["baseline"]
    results = json.loads((out / "ood_results.json").read_text())
    assert results["meta"]["setar"]["settings"] == settings
    assert set(results["scores"]) == {"MCM", "GL-MCM"}
    assert set(results["scores"]["MCM"]) >= {"iNaturalist", "SUN", "Places", "Texture"}
    import numpy as np

    npz = np.load(out / "ood_scores.npz")
    assert results["id_accuracy"] == pytest.approx(100.0 * float((npz["id_predictions"] == npz["id_labels"]).mean()))

    # naive mode: same settings, same criteria
    out_naive = tmp_path / "run_naive"
    p = _script(tmp_path, "configs/setar/imagenet/SeTAR.yaml", out_naive, env_extra={"MODE": "naive", "NO_TEST": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((out_naive / "best_settings.json").read_text())["settings"] == settings
    log_f = json.loads((out / "search_log.json").read_text())
    log_n = json.loads((out_naive / "search_log.json").read_text())
    assert [r["criterion"] for r in log_f] == pytest.approx([r["criterion"] for r in log_n], rel=1e-5, abs=1e-6)

    # the saved settings applied again (no search) give the same test results
    out_apply = tmp_path / "run_apply"
    p = _script(tmp_path, "configs/setar/imagenet/SeTAR.yaml", out_apply,
                env_extra={"SETTINGS": str(out / "best_settings.json")})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    again = json.loads((out_apply / "ood_results.json").read_text())
    assert again["scores"] == results["scores"]
    assert not (out_apply / "search_log.csv").exists()


@pytest.mark.slow
def test_search_script_errors(tmp_path):
    _make_data(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('[["visual", "W_up", 7, 0.1]]')
    p = _script(tmp_path, "configs/setar/imagenet/Vanilla_MCM.yaml", tmp_path / "o1", env_extra={"SETTINGS": str(bad)})
    assert p.returncode == 2 and "layer index in 0..1" in p.stderr
    p = _script(tmp_path, "configs/setar/imagenet/SeTAR.yaml", tmp_path / "o2", "SETAR.SEARCHER", "greedy")
    assert p.returncode == 2 and "valid searchers: visual_text" in p.stderr
    p = _script(tmp_path, "configs/setar/imagenet/SeTAR.yaml", tmp_path / "o3", "DATASET.VAL_SPLIT_FILE", "")
    assert p.returncode == 2 and "validation split is the test split" in p.stderr
    # vanilla MCM: no search, the unpruned model's benchmark
    p = _script(tmp_path, "configs/setar/imagenet/Vanilla_MCM.yaml", tmp_path / "o4")
    assert p.returncode == 0, p.stderr[-3000:]
    vanilla = json.loads((tmp_path / "o4" / "ood_results.json").read_text())
    assert set(vanilla["scores"]) == {"MCM"} and vanilla["meta"]["setar"]["settings"] == []


def _prompt_run(run_dir, ctx):
    from locoop.engine.checkpoint import save_checkpoint

    trained_with = "SEED: 2\nOUTPUT_DIR: somewhere\nTRAINER:\n  LOCOOP:\n    LAMBDA: 0.3\n"  # what train records
    save_checkpoint({"state_dict": {"ctx": ctx}, "epoch": 2, "trainer": "LoCoOp", "config": trained_with},
                    str(run_dir / "prompt_learner"), is_best=False)
    return run_dir


@pytest.mark.slow
def test_search_script_with_learned_prompts(tmp_path):
    _make_data(tmp_path)
    run_dir = _prompt_run(tmp_path / "locoop_run", torch.randn(4, 64) * 0.02)
    out = tmp_path / "run"
    p = _script(tmp_path, "configs/setar/imagenet/SeTAR.yaml", out, "TRAINER.LOCOOP.N_CTX", "4", model_dir=run_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads((out / "ood_results.json").read_text())
    assert results["meta"]["prompts"] == "learned"
    assert results["meta"]["prompt_checkpoint"].endswith("prompt_learner/model.pth.tar-2")
    assert len(json.loads((out / "best_settings.json").read_text())["settings"]) == 4
    assert results["meta"]["trainer"] == "LoCoOp"
    # the prompts' training config, as their checkpoint records it (training keys only)
    assert results["meta"]["training_config"] == {"SEED": 2, "TRAINER.LOCOOP.LAMBDA": 0.3}


@pytest.mark.slow
def test_search_in_a_folder_another_process_holds_is_refused(tmp_path, lock_holder):
    import os

    from locoop.engine.runlock import LOCK_FILE

    _make_data(tmp_path)
    out = tmp_path / "run"
    holder = lock_holder(out, "another-search --output-dir x")
    p = _script(tmp_path, "configs/setar/imagenet/SeTAR.yaml", out)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    line = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(line) == 1 and f"pid {holder.pid}" in line[0] and "another-search" in line[0]
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # no search log, progress or settings of the refused run


def test_learned_prompts_of_another_class_count(tmp_path):
    from types import SimpleNamespace

    from locoop.commands.setar_search import check_prompt_checkpoint, prompt_trainer_name

    dataset = SimpleNamespace(num_classes=5, classnames_hash=None)
    run_dir = _prompt_run(tmp_path / "csc6", torch.randn(6, 4, 64) * 0.02)  # class-specific, 6 classes
    with pytest.raises(ValueError, match="learned for 6 classes, but the dataset ImageNet has 5"):
        check_prompt_checkpoint(str(run_dir), None, dataset, "ImageNet")
    ok = _prompt_run(tmp_path / "csc5", torch.randn(5, 4, 64) * 0.02)
    meta = check_prompt_checkpoint(str(ok), None, dataset, "ImageNet")
    assert meta["prompts"] == "learned" and meta["prompt_checkpoint"].endswith("model.pth.tar-2")
    assert meta["prompt_epoch"] == 2 and prompt_trainer_name(str(ok)) == "LoCoOp"
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        check_prompt_checkpoint(str(tmp_path), None, dataset, "ImageNet")


@pytest.mark.parametrize("key, value, match", [
    ("SEARCHER", "greedy", "valid searchers"),
    ("WEIGHT_TYPES", ["W_p"], "FREEZE_PROJ"),
    ("RATIOS", [0.1, 1.0], r"not in \[0, 1\)"),
    ("PRUNE_TYPE", "minor", r"SETAR.PRUNE_TYPE = 'minor' is not valid; choose one of \['small', 'large', 'random'\]"),
    ("MODE", "quick", "SETAR.MODE"),
    ("CRITERION", "acc", "SETAR.CRITERION"),
    ("CRITERION", "auroc", "SETAR.OOD_VAL_DATASETS"),
    ("TOPK", 0, "SETAR.TOPK"),
    ("PROMPT_TEMPLATE", "a photo", "PROMPT_TEMPLATE"),
    ("CACHE_GB", -1.0, "CACHE_GB"),
])
def test_setar_config_checks(key, value, match):
    from locoop.commands.setar_search import check_setar_cfg
    from locoop.config import get_cfg_default

    cfg = get_cfg_default()
    cfg.SETAR[key] = value
    with pytest.raises(ValueError, match=match):
        check_setar_cfg(cfg, search=True)


def test_setar_config_defaults_are_setars():
    from locoop.commands.setar_search import check_setar_cfg
    from locoop.config import get_cfg_default, merge_from_file

    cfg = get_cfg_default()
    assert check_setar_cfg(cfg, search=True) == {"weight_types": ["W_up"], "criterion": "loss",
                                                 "ratios": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]}
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs" / "setar"
    voc = merge_from_file(get_cfg_default(), str(configs / "voc" / "SeTAR.yaml"))
    assert (voc.SETAR.LAMBDA, voc.SETAR.TOPK, voc.DATASET.NAME) == (0.05, 4, "PascalVOC")
    imagenet = merge_from_file(get_cfg_default(), str(configs / "imagenet" / "SeTAR.yaml"))
    assert (imagenet.SETAR.LAMBDA, imagenet.SETAR.TOPK, imagenet.SETAR.SEARCHER) == (0.10, 300, "visual_text")
    assert list(imagenet.OOD.SCORES) == ["MCM", "GL-MCM"]


def test_search_trainer_checks():
    from locoop.commands.setar_search import check_search_trainer

    assert check_search_trainer("SeTARZeroshotCLIP", None).__name__ == "SeTARZeroshotCLIP"
    assert check_search_trainer("CoOp", "run").__name__ == "CoOp"
    with pytest.raises(ValueError, match="learns its prompts: give its run folder with --model-dir"):
        check_search_trainer("LoCoOp", None)
    with pytest.raises(ValueError, match="no learned prompts to load from --model-dir"):
        check_search_trainer("ZeroshotCLIP", "run")
    with pytest.raises(ValueError, match="unknown trainer"):
        check_search_trainer("Nope", None)

"""Feature cache: hits agree with uncached runs (global scores bit-identical, local ones within the
float16 bound, everything bit-identical from float32 entries); files, weights and preprocessing
invalidate; interrupted or corrupt entries are never used."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import clip
from locoop.config import get_cfg_default, merge_cfg
from locoop.data import build_ood_datasets, build_transform
from locoop.data.synthetic import make_imagenet_like, make_ood_sets
from locoop.ood.cache import (MANIFEST, FeatureCache, extract_to_cache, files_fingerprint, make_key,
                              visual_fingerprint)
from locoop.engine.fileio import is_temp_name, temp_owner
from locoop.ood.runner import eval_loader, run_ood_benchmark

OOD_SETS = ["iNaturalist", "Texture"]
SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def data_root(tmp_path):
    root = tmp_path / "data"
    make_imagenet_like(str(root), num_classes=3, train_per_class=0, val_per_class=3, image_size=(40, 40), seed=0)
    make_ood_sets(str(root), names=OOD_SETS, per_set=5, image_size=(40, 40), seed=1)
    return root


@pytest.fixture(scope="module")
def model(tiny_vit_path):
    m, _ = clip.load(tiny_vit_path, device="cpu")
    return m.eval()


def _text(model):
    torch.manual_seed(0)
    return torch.randn(3, model.embed_dim)


def make_cfg(root, cache_dir, opts=()):
    cfg = get_cfg_default()
    merge_cfg(cfg, "configs/datasets/imagenet.yaml", "configs/trainers/LoCoOp/vit_b16_ep50.yaml",
              {"DATASET.ROOT": str(root)},
              ["INPUT.SIZE", f"({SIZE}, {SIZE})", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4",
               "OOD.DATASETS", str(OOD_SETS), "OOD.SCORES", "['MCM', 'GL-MCM', 'energy']", "OOD.PLOT", "False",
               "OOD.CACHE_DIR", str(cache_dir), "VERBOSE", "False"] + list(opts))
    return cfg


def _extract(cfg, model, names=("ID",) + tuple(OOD_SETS), chunk_images=10000):
    """Write cache entries as `python -m locoop extract` does (same names, loader and key)."""
    from locoop.data import build_dataset
    from locoop.ood.runner import cache_local_dtype, cache_set_name

    cache = FeatureCache(cfg.OOD.CACHE_DIR, verbose=False)
    tfm = build_transform(cfg, is_train=False)
    sets = build_ood_datasets(cfg.DATASET.ROOT, [n for n in names if n != "ID"])
    if "ID" in names:
        sets = {"ID": build_dataset(cfg, need_train=False).test, **sets}
    with torch.inference_mode():
        for name, items in sets.items():
            extract_to_cache(cache, cache_set_name(cfg, name), items, model,
                             lambda it, idx: eval_loader(cfg, it, tfm, idx), tfm, "cpu", chunk_images=chunk_images,
                             batch_size=int(cfg.DATALOADER.TEST.BATCH_SIZE), local_dtype=cache_local_dtype(cfg))
    return cache


def _run(cfg, model, out, use_cache=None, capsys=None):
    res = run_ood_benchmark(cfg, model, _text(model), out, verbose=True, use_cache=use_cache)
    text = capsys.readouterr().out if capsys is not None else ""
    return res, text


LOCAL_SCORES = ("L-MCM", "GL-MCM")
# Bound on how far float16 storage of the (unit-norm) local features moves a local score at T = 1
# (documented in locoop/ood/cache.py): each cosine moves by at most 2**-11.
FP16_LOCAL_BOUND = 2.0 ** -11


def _same(a, b, local_atol=0.0):
    """Equal results; with ``local_atol`` the local scores may differ by that much (a float16 entry)."""
    assert a["id_accuracy"] == b["id_accuracy"]
    for s in a["metrics"]:
        if s not in LOCAL_SCORES or not local_atol:
            assert a["metrics"][s] == b["metrics"][s], s
    pairs = [(a["id_scores"], b["id_scores"])] + [(per, b["ood_scores"][o]) for o, per in a["ood_scores"].items()]
    for x, y in pairs:
        for s, v in x.items():
            if s in LOCAL_SCORES and local_atol:
                np.testing.assert_allclose(v, y[s], rtol=0, atol=local_atol)
            else:
                np.testing.assert_array_equal(v, y[s])


def _fp16_moved(a, b):
    """Largest difference of a local score between two results (0 when bit-identical)."""
    pairs = [(a["id_scores"], b["id_scores"])] + [(per, b["ood_scores"][o]) for o, per in a["ood_scores"].items()]
    return max(float(np.abs(x[s] - y[s]).max()) for x, y in pairs for s in x if s in LOCAL_SCORES)


def test_hit_is_identical_to_uncached_and_says_so(tmp_path, data_root, model, capsys):
    cfg = make_cfg(data_root, tmp_path / "cache")
    ref, _ = _run(cfg, model, tmp_path / "ref", use_cache=False, capsys=capsys)
    # Several parts per set (chunk of 4 images = one batch) exercise reading across part files.
    cache = _extract(cfg, model, chunk_images=4)
    assert len(cache.entries()) == 3
    manifest = json.loads((cache.entries("ID-ImageNet")[0] / MANIFEST).read_text())
    assert manifest["num_rows"] == 9 and [p["rows"] for p in manifest["parts"]] == [4, 4, 1]
    assert manifest["with_local"] and manifest["local_dtype"] == "torch.float16"

    calls = []
    import locoop.ood.runner as runner_mod
    orig = runner_mod.iter_feature_batches
    runner_mod.iter_feature_batches = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        hit, out = _run(cfg, model, tmp_path / "hit", capsys=capsys)
    finally:
        runner_mod.iter_feature_batches = orig
    assert calls == []  # no image was encoded
    assert out.count("using cached features from") == 3
    # float16 local features (the default): global scores bit-identical, local ones within the fp16 bound.
    _same(ref, hit, local_atol=FP16_LOCAL_BOUND)
    assert 0.0 < _fp16_moved(ref, hit)
    npz_ref, npz_hit = np.load(ref["files"]["npz"]), np.load(hit["files"]["npz"])
    assert all(np.array_equal(npz_ref[k], npz_hit[k]) for k in npz_ref.files if not k.endswith("/GL-MCM"))

    # float32 local features (OOD.CACHE_LOCAL_DTYPE float32): bit-identical in everything, in their own
    # entries (a float32 request never reads a float16 entry).
    cfg32 = make_cfg(data_root, tmp_path / "cache", ["OOD.CACHE_LOCAL_DTYPE", "float32"])
    _, out = _run(cfg32, model, tmp_path / "miss32", capsys=capsys)
    assert "using cached" not in out and "local-feature dtype differ" in out
    _extract(cfg32, model)
    dtypes = sorted(json.loads((p / MANIFEST).read_text())["local_dtype"] for p in cache.entries("ID-ImageNet"))
    assert dtypes == ["torch.float16", "torch.float32"]
    hit32, out = _run(cfg32, model, tmp_path / "hit32", capsys=capsys)
    assert out.count("using cached features from") == 3
    _same(ref, hit32)
    npz32 = np.load(hit32["files"]["npz"])
    assert all(np.array_equal(npz_ref[k], npz32[k]) for k in npz_ref.files)

    # use_cache=False / OOD.USE_CACHE False bypass it.
    _, out = _run(make_cfg(data_root, tmp_path / "cache", ["OOD.USE_CACHE", "False"]), model, tmp_path / "off",
                  capsys=capsys)
    assert "cached" not in out


def test_changed_file_weights_or_preprocessing_invalidate(tmp_path, data_root, model, capsys):
    cfg = make_cfg(data_root, tmp_path / "cache")
    _extract(cfg, model)
    ref, _ = _run(cfg, model, tmp_path / "ref", use_cache=False, capsys=capsys)

    # 1. One OOD image rewritten (new content and modification time): only that set is re-encoded.
    items = build_ood_datasets(str(data_root), ["Texture"])["Texture"]
    before = files_fingerprint(items)
    path = items[2].impath
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 10, 10)).save(path, format="JPEG")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert files_fingerprint(items) != before
    res, out = _run(cfg, model, tmp_path / "file", capsys=capsys)
    assert "ID: using cached" in out and "iNaturalist: using cached" in out
    assert "Texture: using cached" not in out
    assert "ignored (stale or foreign): image files differ" in out
    assert not np.array_equal(res["ood_scores"]["Texture"]["MCM"], ref["ood_scores"]["Texture"]["MCM"])
    fresh, _ = _run(cfg, model, tmp_path / "fresh", use_cache=False, capsys=capsys)
    _same(fresh, res, local_atol=FP16_LOCAL_BOUND)

    # 2. Another image encoder (a SeTAR-like edit of one visual weight) never matches.
    import copy

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.visual.transformer.resblocks[-1].mlp.c_fc.weight[0, 0] += 1e-3
    assert visual_fingerprint(pruned) != visual_fingerprint(model)
    res, out = _run(cfg, pruned, tmp_path / "pruned", capsys=capsys)
    assert "using cached" not in out
    assert out.count("image-encoder weights differ") >= 2
    # The text tower is not part of the key: a text-only change still hits.
    text_only = copy.deepcopy(model)
    with torch.no_grad():
        text_only.transformer.resblocks[0].mlp.c_fc.weight[0, 0] += 1.0
    assert visual_fingerprint(text_only) == visual_fingerprint(model)

    # 3. Other preprocessing (interpolation) never matches.
    cfg_bil = make_cfg(data_root, tmp_path / "cache", ["INPUT.INTERPOLATION", "bilinear"])
    res, out = _run(cfg_bil, model, tmp_path / "bilinear", capsys=capsys)
    assert "using cached" not in out and "preprocessing differ" in out

    # 4. An encoder with forward hooks is not keyed at all.
    h = model.visual.register_forward_hook(lambda m, i, o: None)
    try:
        assert visual_fingerprint(model) is None
        _, out = _run(cfg, model, tmp_path / "hooked", capsys=capsys)
        assert "using cached" not in out and "forward hooks" in out
    finally:
        h.remove()


def test_interrupted_and_corrupt_entries_are_never_used(tmp_path, data_root, model, capsys):
    cfg = make_cfg(data_root, tmp_path / "cache")
    tfm = build_transform(cfg, is_train=False)
    cache = FeatureCache(cfg.OOD.CACHE_DIR, verbose=True)
    items = build_ood_datasets(str(data_root), ["iNaturalist"])["iNaturalist"]
    key = make_key(model, tfm, items, "cpu", amp=False)

    # A writer that never commits (the process died): its parts sit in a temporary folder.
    from locoop.ood.features import extract_features
    w = cache.writer("iNaturalist", key)
    w.add_part(0, extract_features(model, eval_loader(cfg, items, tfm), "cpu"))
    assert cache.entries() == [] and cache.lookup("iNaturalist", key) is None

    # A complete entry whose part was truncated afterwards, then one with a broken manifest.
    cache = _extract(cfg, model, names=("iNaturalist",))
    entry = cache.entries("iNaturalist")[0]
    assert cache.lookup("iNaturalist", key) is not None
    part = entry / "part-00000.pt"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert FeatureCache(cache.directory).lookup("iNaturalist", key) is None
    assert "ignored: its part part-00000.pt has" in capsys.readouterr().out
    part.write_bytes(data)
    assert cache.lookup("iNaturalist", key) is not None
    (entry / MANIFEST).write_text("{ not json")
    assert FeatureCache(cache.directory).lookup("iNaturalist", key) is None
    assert "manifest is unreadable" in capsys.readouterr().out
    # A foreign entry: a valid manifest under a folder of another key.
    _extract(cfg, model, names=("iNaturalist",))
    other = cache.directory / "iNaturalist-00000000000000000000"
    os.rename(cache.entries("iNaturalist")[0], other)
    assert cache.lookup("iNaturalist", key) is None
    # An entry of an older cache format says so (its weights were keyed another way).
    old = cache.directory / "iNaturalist-11111111111111111111"
    old.mkdir()
    (old / MANIFEST).write_text(json.dumps({"format": 1, "components": {}}))
    capsys.readouterr()
    assert FeatureCache(cache.directory).lookup("iNaturalist", key) is None
    assert "written in cache format 1, this version reads 2; run extract again" in capsys.readouterr().out

    # The benchmark falls back to encoding and gives the uncached numbers.
    res, out = _run(cfg, model, tmp_path / "run", capsys=capsys)
    assert "iNaturalist: using cached" not in out and "Encoding iNaturalist" in out


@pytest.mark.slow
def test_sigkill_during_extraction_leaves_no_usable_entry(tmp_path, data_root, model, tiny_vit_path, capsys):
    """A real `python -m locoop.commands.extract` killed (SIGKILL) while writing its second part file."""
    cache_dir = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.argv = ["extract", "--root", {str(data_root)!r}, "--dataset-config-file", "configs/datasets/imagenet.yaml",
                    "--config-file", "configs/trainers/LoCoOp/vit_b16_ep50.yaml", "--backbone", {tiny_vit_path!r},
                    "--datasets", "ID", "--chunk-images", "4", "INPUT.SIZE", "({SIZE}, {SIZE})",
                    "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4",
                    "OOD.CACHE_DIR", {str(cache_dir)!r}, "VERBOSE", "False"]
        real_save, calls = torch.save, []
        def dying_save(obj, f, *a, **k):
            calls.append(1)
            if len(calls) == 2:  # half of the second part reaches the disk, then the process dies
                real_save(obj, f, *a, **k)
                f.flush()
                f.truncate(f.tell() // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        torch.save = dying_save
        from locoop.commands.extract import main
        main(sys.argv[1:])
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    temps = [p for p in cache_dir.iterdir() if is_temp_name(p.name)]
    assert len(temps) == 1 and temps[0].is_dir() and temp_owner(temps[0].name)[1] != os.getpid()
    assert (temps[0] / "part-00000.pt").is_file() and not (temps[0] / MANIFEST).exists()
    assert [p.name for p in temps[0].iterdir() if is_temp_name(p.name)]  # the part being written when killed
    cfg = make_cfg(data_root, cache_dir)
    cache = FeatureCache(cache_dir)
    assert cache.entries() == []
    res, out = _run(cfg, model, tmp_path / "run", capsys=capsys)
    assert "using cached" not in out
    # The next extraction removes the dead writer's folder and publishes a complete entry.
    cache = _extract(cfg, model, names=("ID",))
    assert [p.name for p in cache_dir.iterdir() if is_temp_name(p.name)] == []
    res2, out = _run(cfg, model, tmp_path / "run2", capsys=capsys)
    assert "ID: using cached" in out
    _same(res, res2, local_atol=FP16_LOCAL_BOUND)

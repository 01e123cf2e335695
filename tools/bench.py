#!/usr/bin/env python
"""Run every benchmark of the project and print one table of ratios with their targets.

Benchmarks (each a ratio measured side by side in one run, random weights of real shapes):

* ``clip``  -- tools/bench_clip.py: image encoder with local features, text encoder (ours vs naive);
* ``train`` -- tools/bench_train.py: one LoCoOp training step (ours vs the reference computation);
* ``setar`` -- tools/bench_setar.py: a SeTAR greedy search (fast exact vs naive);
* ``cache`` -- this file: the OOD evaluation of one prompt checkpoint, a full pass (encode every
  image, text side, scores, result files) vs a re-evaluation from the feature cache (key check,
  memory-mapped features, text side, scores, result files). Target: at least 20x. The scores of
  both must be identical. The one-time extraction is reported beside it. A second case does the
  same with a negative-label score (``NegLabel`` next to MCM, on the prompt checkpoint's class text
  features, a generated lexicon of ``--neglabel-words`` words): the full pass also encodes every word
  of the lexicon; the re-evaluation reads the image features (extracted once with global features
  only, as ``extract --no-local`` does for scores that need no local features) and the negative-label
  bank from the cache and recomputes only the text side (the prompts, the cosines, the scores). It
  checks that no image and no word was encoded again and that the scores are identical.

Each tool is imported from ``tools/`` and its ``main(argv)`` called with ``--json``; a tool that
fails is reported as such and the others still run. ``--quick`` shrinks every benchmark to a
smoke run (its ratios are not comparable with the targets).

    python tools/bench.py --json bench.json                 # everything (tens of minutes on 2 CPU cores)
    python tools/bench.py --only cache --threads 2          # one benchmark
    python tools/bench.py --quick                           # smoke run

Writes ``{"results": [...], "settings": {...}}`` like every tool, each result tagged with its
``benchmark``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

BENCHMARKS = ("clip", "train", "setar", "cache")
CACHE_TARGET = 20.0


# ------------------------------------------------------------------------------------ cache benchmark
def _pseudo_words(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct pronounceable pseudo-words (a generated lexicon: no word list is shipped)."""
    import random

    rng = random.Random(seed)
    onsets, vowels, codas = "b c d f g h k l m n p r s t v w z br tr pl st".split(), "a e i o u ai ou".split(), \
        ["", "n", "r", "s", "t", "l", "m"]
    words: List[str] = []
    seen = set()
    while len(words) < n:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _max_abs_diff(a: dict, b: dict) -> float:
    diff = 0.0
    for sc, v in a["id_scores"].items():
        diff = max(diff, float(abs(v.astype("float64") - b["id_scores"][sc]).max()))
    for o, per in a["ood_scores"].items():
        for sc, v in per.items():
            diff = max(diff, float(abs(v.astype("float64") - b["ood_scores"][o][sc]).max()))
    return diff


def run_cache_bench(model_name: str = "ViT-B/16", classes: int = 100, id_per_class: int = 2, ood_per_set: int = 50,
                    ood_sets: tuple = ("iNaturalist", "Texture"), batch: int = 50, image_size: int = 256,
                    repeats: int = 3, device: str = "cpu", workers: int = 0, workdir: Optional[str] = None,
                    neglabel_words: int = 2000) -> dict:
    """Full pass vs cached re-evaluation of one prompt checkpoint (see the module docstring).

    Args:
        model_name: architecture whose shapes the random CLIP gets.
        classes: ID classes (prompts).
        id_per_class: ID test images per class.
        ood_per_set: images per OOD set.
        ood_sets: OOD set folders to generate.
        batch: evaluation batch size.
        image_size: side of the generated images (resized and cropped by CLIP's preprocessing).
        repeats: cached re-evaluations timed (median); the full pass runs once after a warm-up.
        device: where the model runs.
        workers: data-loader workers.
        workdir: where data, cache and results go (default: a temporary folder, removed).
        neglabel_words: words of the generated lexicon of the NegLabel case (0 skips the case).
    """
    from clip.model import build_model
    from clip.tiny import random_state_dict
    from locoop.config import get_cfg_default, merge_cfg
    from locoop.data import build_dataset, build_ood_datasets, build_transform
    from locoop.data.synthetic import make_imagenet_like, make_ood_sets
    from locoop.engine.checkpoint import load_checkpoint, save_checkpoint
    from locoop.ood.cache import FeatureCache, extract_to_cache
    from locoop.ood.runner import cache_set_name, eval_loader, run_ood_benchmark
    from locoop.trainers.locoop import CustomCLIP

    tmp = tempfile.TemporaryDirectory() if workdir is None else contextlib.nullcontext(workdir)
    with tmp as work:
        work = Path(work)
        data = work / "data"
        t0 = time.perf_counter()
        make_imagenet_like(str(data), num_classes=classes, train_per_class=0, val_per_class=id_per_class,
                           image_size=(image_size, image_size), seed=0)
        make_ood_sets(str(data), names=list(ood_sets), per_set=ood_per_set, image_size=(image_size, image_size),
                      seed=1)
        data_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        clip_model = build_model(random_state_dict(model_name, seed=0)).to(device).eval()
        build_s = time.perf_counter() - t0
        cfg = get_cfg_default()
        merge_cfg(cfg, str(REPO / "configs/datasets/imagenet.yaml"), str(REPO / "configs/trainers/LoCoOp/vit_b16_ep50.yaml"),
                  {"DATASET.ROOT": str(data)},
                  ["DATALOADER.TEST.BATCH_SIZE", str(batch), "DATALOADER.NUM_WORKERS", str(workers),
                   "OOD.DATASETS", str(list(ood_sets)), "OOD.PLOT", "False", "OOD.CACHE_DIR", str(work / "cache"),
                   "INPUT.SIZE", f"({clip_model.visual.input_resolution}, {clip_model.visual.input_resolution})",
                   "VERBOSE", "False"])
        dataset = build_dataset(cfg, need_train=False)
        # "One checkpoint": learned prompts saved as the trainer saves them, loaded by every evaluation.
        torch.manual_seed(0)
        custom = CustomCLIP(dataset.classnames, clip_model, n_ctx=16).to(device).eval()
        ckpt = work / "prompt_learner" / "model.pth.tar-50"
        save_checkpoint({"state_dict": custom.prompt_learner.state_dict(), "epoch": 50}, str(ckpt.parent),
                        model_name=ckpt.name)

        def evaluate(out: Path, use_cache: bool, run_cfg=None) -> tuple:
            t = time.perf_counter()
            custom.prompt_learner.load_state_dict(load_checkpoint(str(ckpt))["state_dict"])
            with torch.no_grad():
                text = custom.text_features()
            text_s = time.perf_counter() - t
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                res = run_ood_benchmark(run_cfg or cfg, clip_model, text, out, device=device, dataset=dataset,
                                        verbose=True, use_cache=use_cache)
            return time.perf_counter() - t, text_s, res, buf.getvalue()

        n_images = len(dataset.test) + ood_per_set * len(ood_sets)
        # Warm-up on a few images (first-call allocations, thread pools), then the full pass.
        with torch.no_grad():
            clip_model.encode_image(torch.randn(2, 3, clip_model.visual.input_resolution,
                                                clip_model.visual.input_resolution, device=device), return_local=True)
        full_s, full_text_s, full, _ = evaluate(work / "full", use_cache=False)

        t0 = time.perf_counter()
        cache = FeatureCache(cfg.OOD.CACHE_DIR, verbose=False)
        tfm = build_transform(cfg, is_train=False)
        sets = {"ID": list(dataset.test), **build_ood_datasets(str(data), list(ood_sets))}
        with torch.inference_mode():
            for name, items in sets.items():
                extract_to_cache(cache, cache_set_name(cfg, name), items, clip_model,
                                 lambda it, idx: eval_loader(cfg, it, tfm, idx), tfm, device, batch_size=batch,
                                 progress=False)
        extract_s = time.perf_counter() - t0

        cached_runs, text_runs, log = [], [], ""
        for i in range(max(1, repeats)):
            s, ts, cached, log = evaluate(work / f"cached{i}", use_cache=True)
            cached_runs.append(s)
            text_runs.append(ts)
        hits = log.count("using cached features from")
        diff = _max_abs_diff(full, cached)
        cached_s = statistics.median(cached_runs)
        result = {
            "name": f"OOD eval: cached vs full pass ({n_images} images, {classes} classes)",
            "ratio": full_s / cached_s,
            "target": CACHE_TARGET,
            "max_abs_diff": diff if hits == len(sets) else None,
            "max_abs_diff_target": 1e-6,
            "full_s": full_s,
            "cached_s": cached_s,
            "cached_s_all": cached_runs,
            "text_side_s": statistics.median(text_runs),
            "extract_once_s": extract_s,
            "cache_hits": hits,
            "sets": len(sets),
            "cache_bytes": cache.disk_usage(),
            "metrics_identical": full["metrics"] == cached["metrics"],
            "full_s_per_image": full_s / n_images,
            "model_build_s": build_s,
            "data_generation_s": data_s,
        }
        results = [result]
        if neglabel_words > 0:
            def extract_global() -> None:
                # What `extract --no-local` writes: global features only, as a global-only evaluation computes
                # them (CLIP's global output with and without the local path can differ by float rounding).
                with torch.inference_mode():
                    for name, items in sets.items():
                        extract_to_cache(cache, cache_set_name(cfg, name), items, clip_model,
                                         lambda it, idx: eval_loader(cfg, it, tfm, idx), tfm, device,
                                         batch_size=batch, progress=False, with_local=False)

            results.append(_neglabel_case(work, cfg, evaluate, extract_global, neglabel_words, len(sets), repeats,
                                          n_images, classes))
        settings = {"model": model_name, "classes": classes, "images": n_images, "id_images": len(dataset.test),
                    "ood_sets": list(ood_sets), "ood_per_set": ood_per_set, "batch": batch, "image_size": image_size,
                    "scores": list(cfg.OOD.SCORES), "repeats": repeats, "device": device, "workers": workers,
                    "neglabel_words": neglabel_words, "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "timed": "text side + run_ood_benchmark (scores of all sets, result files, no plots); "
                             "process start and model loading (equal in both) excluded"}
    return {"results": results, "settings": settings}


def _neglabel_case(work: Path, cfg: Any, evaluate: Any, extract_global: Any, words: int, n_sets: int, repeats: int,
                   n_images: int, classes: int) -> dict:
    """NegLabel (with MCM) from the feature cache vs a full pass (see the module docstring)."""
    import locoop.ood.neglabel as nl
    import locoop.ood.runner as runner

    lexicon = work / "lexicon.txt"
    lexicon.write_text("\n".join(_pseudo_words(words)) + "\n")
    neg_cfg = cfg.clone()
    neg_cfg.defrost()
    neg_cfg.merge_from_list(["OOD.SCORES", "['MCM', 'NegLabel']", "OOD.NEGLABEL.LEXICON", str(lexicon),
                             "OOD.NEGLABEL.NGROUP", "10", "OOD.NEGLABEL.ID_TEXT", "trainer"])
    full_s, _, full, _ = evaluate(work / "neg_full", False, neg_cfg)  # every image and every word encoded
    t0 = time.perf_counter()
    extract_global()
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(work / "neg_warm", True, neg_cfg)  # writes the negative-label bank into the cache
    bank_once_s = time.perf_counter() - t0

    calls = {"images": 0, "words": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    real_images, real_words = runner.iter_feature_batches, nl.build_candidates
    runner.iter_feature_batches = counting("images", real_images)
    nl.build_candidates = counting("words", real_words)
    try:
        runs, text_runs, log = [], [], ""
        for i in range(max(1, repeats)):
            s, ts, cached, log = evaluate(work / f"neg_cached{i}", True, neg_cfg)
            runs.append(s)
            text_runs.append(ts)
    finally:
        runner.iter_feature_batches, nl.build_candidates = real_images, real_words
    hits = log.count("using cached features from")
    bank_hit = "from the cache" in log and calls["words"] == 0
    text_only = hits == n_sets and calls["images"] == 0 and bank_hit
    cached_s = statistics.median(runs)
    meta = full["text_banks"]["NegLabel"].bank.meta
    return {
        "name": f"NegLabel eval: cached vs full pass ({n_images} images, {words} words, {classes} classes)",
        "ratio": full_s / cached_s,
        "target": CACHE_TARGET,
        "max_abs_diff": _max_abs_diff(full, cached) if text_only else None,
        "max_abs_diff_target": 1e-6,
        "full_s": full_s,
        "cached_s": cached_s,
        "cached_s_all": runs,
        "text_side_s": statistics.median(text_runs),
        "bank_once_s": bank_once_s,
        "extract_global_once_s": extract_s,
        "cache_hits": hits,
        "sets": n_sets,
        "bank_from_cache": bank_hit,
        "images_encoded_on_reeval": calls["images"],
        "words_encoded_on_reeval": calls["words"],
        "only_text_side": text_only,
        "negatives": meta["num_negatives"],
        "metrics_identical": full["metrics"] == cached["metrics"],
    }


def print_cache_report(report: dict) -> None:
    r = report["results"][0]
    print(f"{r['name']}: full {r['full_s']:.1f} s, cached {r['cached_s']:.2f} s (text side {r['text_side_s']:.2f} s), "
          f"ratio {r['ratio']:.1f}x; one-time extraction {r['extract_once_s']:.1f} s, cache {r['cache_bytes'] / 2**20:.1f}"
          f" MB; {r['cache_hits']}/{r['sets']} sets from the cache; identical metrics: {r['metrics_identical']}")
    for r in report["results"][1:]:
        diff = "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        print(f"{r['name']}: full {r['full_s']:.1f} s, cached {r['cached_s']:.2f} s "
              f"(prompts {r['text_side_s']:.2f} s), ratio {r['ratio']:.1f}x; {r['negatives']} negative labels, "
              f"bank built once in {r['bank_once_s']:.1f} s, "
              f"global features extracted once in {r['extract_global_once_s']:.1f} s; "
              f"re-evaluation: {r['cache_hits']}/{r['sets']} sets from the cache, bank from the cache: "
              f"{r['bank_from_cache']}, images encoded {r['images_encoded_on_reeval']}, words encoded "
              f"{r['words_encoded_on_reeval']} (only the text side: {r['only_text_side']}); scores identical: "
              f"{r['max_abs_diff'] == 0.0} (max |diff| {diff}), identical metrics: {r['metrics_identical']}")


# ------------------------------------------------------------------------------------ driver
def _load_tool(name: str):
    path = HERE / f"bench_{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool_argv(name: str, args: argparse.Namespace) -> List[str]:
    dev = ["--device", args.device]
    threads = ["--threads", str(args.threads)]
    if name == "clip":
        return dev + threads + (["--batch", "2", "--prompts", "100", "--repeats", "1"] if args.quick else [])
    if name == "train":
        return dev + threads + (["--batch", "2", "--repeats", "1"] if args.quick else [])
    if name == "setar":
        return dev + threads + (["--layers", "2", "--classes", "20", "--images", "20", "--batch-size", "20"]
                                if args.quick else [])
    raise KeyError(name)


def run_tool(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Run one benchmark; ``{"results": [...], "settings": {...}}`` or ``{"error": ...}``."""
    t0 = time.perf_counter()
    try:
        if name == "cache":
            kw = dict(device=args.device)
            kw["neglabel_words"] = args.neglabel_words
            if args.quick:
                kw.update(classes=10, id_per_class=2, ood_per_set=10, batch=10, image_size=224, repeats=1,
                          neglabel_words=min(args.neglabel_words, 300))
            report = run_cache_bench(**kw)
            print_cache_report(report)
        else:
            module = _load_tool(name)
            out = tmp / f"{name}.json"
            rc = module.main(_tool_argv(name, args) + ["--json", str(out)])
            if rc not in (0, None):
                raise RuntimeError(f"bench_{name}.py exited with {rc}")
            report = json.loads(out.read_text())
    except BaseException as e:  # noqa: BLE001 - one failing benchmark must not hide the others
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    report["seconds"] = time.perf_counter() - t0
    return report


def _ok(r: dict) -> bool:
    diff = r.get("max_abs_diff")
    diff_ok = diff is not None and diff <= r.get("max_abs_diff_target", 1e-5)
    return r["ratio"] >= r["target"] and diff_ok


def print_summary(reports: Dict[str, dict], quick: bool) -> None:
    """One table: benchmark, ratio, target, max |diff|, met."""
    print("\n" + "=" * 108)
    print(f"{'':<6} {'benchmark':<62} {'ratio':>8} {'target':>7} {'max|diff|':>10}  met")
    print("-" * 108)
    for name, rep in reports.items():
        if "error" in rep:
            print(f"{name:<6} {'FAILED: ' + rep['error'][:90]:<62}")
            continue
        for r in rep["results"]:
            diff = "n/a" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"
            met = "(quick)" if quick else ("yes" if _ok(r) else "NO")
            print(f"{name:<6} {r['name'][:62]:<62} {r['ratio']:>7.2f}x {r['target']:>6.1f}x {diff:>10}  {met}")
    print("=" * 108)
    if quick:
        print("--quick: smoke sizes; the ratios are not comparable with the targets.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, help="run only these benchmarks")
    p.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[], help="skip these benchmarks")
    p.add_argument("--quick", action="store_true", help="smoke sizes (minutes, not comparable with the targets)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--neglabel-words", type=int, default=2000,
                   help="words of the generated lexicon of the cache benchmark's NegLabel case (0 skips it)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but CUDA is not available here")
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    reports: Dict[str, dict] = {}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"\n### {name}", flush=True)
            reports[name] = run_tool(name, args, Path(tmp))
            torch.set_num_threads(args.threads)  # a tool may have changed it
    print_summary(reports, args.quick)
    device_name = (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
                   else f"CPU ({os.cpu_count()} logical cores visible)")
    results = []
    for name, rep in reports.items():
        if "error" in rep:
            results.append({"benchmark": name, "name": name, "error": rep["error"], "ratio": None, "target": None,
                            "max_abs_diff": None})
        else:
            results.extend({"benchmark": name, **r} for r in rep["results"])
    out = {"results": results,
           "settings": {"benchmarks": names, "quick": args.quick, "threads": args.threads, "device": args.device,
                        "device_name": device_name, "torch": torch.__version__, "started": started,
                        "per_benchmark": {n: rep.get("settings") for n, rep in reports.items()},
                        "seconds": {n: rep.get("seconds") for n, rep in reports.items()}}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")
    return 1 if any("error" in rep for rep in reports.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

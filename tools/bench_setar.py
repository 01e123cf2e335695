#!/usr/bin/env python
"""Benchmark a full SeTAR search: fast (cached, exact) vs naive (as the reference), in one run.

Both modes run the same greedy search (searcher ``visual_text`` by default, ``W_up``, the nine
default ratios 0 .. 0.40, LoCoOp-loss criterion) on the same random-weight model and random
validation images, each on a fresh copy of the model. Reported: wall-time ratio naive / fast,
transformer-block forward passes per sample of each mode (images through visual blocks, prompts
through text blocks), whether the chosen settings are identical, and the largest difference
between the two modes' criterion values over all candidates.

``--preset swin``: the vision-only Swin-V2-B classifier (random weights, 1000 classes, searcher
``visual_only_swin`` over all 24 blocks, SeTAR's Swin lambda 0.01 and top-K 700 of 1000); on a CPU
the resolution (128 px), images (4) and ratios (0 .. 0.4 in steps of 0.1) are reduced and the
reduction printed; on CUDA or with ``--full`` SeTAR's sizes (256 px, nine ratios, ``--images``).

The default size fits a 2-core CPU in a few minutes: the depth and token count of ViT-B/32
(12 blocks per tower, 224 px in 32 px patches = 50 tokens) with width 128, 100 classes and 50
validation images (SeTAR's ImageNet split has one image per class). ``--preset vit-b32`` /
``vit-b16`` use the real widths (for a GPU, or patience). Timings include the SVDs (computed once
per matrix in both modes). The validation images are JPEG files of ImageNet's typical size
(500x375) decoded with CLIP's preprocessing: the fast mode decodes them once, the naive mode for
every candidate, as the reference's data loader does (``--no-image-files``: random tensors, no
decoding counted in either mode).

ratio = naive wall time / fast wall time (each the fastest of ``--repeats`` alternating runs);
the CPU-time ratio is printed next to it because a shared machine disturbs wall times (other
processes) far more than CPU times. Prints a table; ``--json PATH`` writes
``{"results": [...], "settings": {...}}``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from clip.configs import CLIPConfig
from clip.model import build_model
from clip.tiny import random_state_dict
from clip.tokenizer import tokenize
from clip.transform import build_preprocess
from locoop.setar.search import DEFAULT_RATIOS, ClassPrompts, SearchData, run_search

PRESETS = {
    # name: (layers, vision width, text width, embed dim, resolution, patch)
    "small": (12, 128, 128, 128, 224, 32),
    "vit-b32": (12, 768, 512, 512, 224, 32),
    "vit-b16": (12, 768, 512, 512, 224, 16),
    "swin": None,  # Swin-V2-B (SWIN_B): a vision-only classifier, see run_swin
}

# Swin-V2-B (microsoft/swinv2-base-patch4-window16-256): depths, heads, width, window, patch, 256 px, 1000 classes.
SWIN_B = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=16, patch_size=4,
              mlp_ratio=4.0, image_size=256)
# What --preset swin reduces on a CPU (all overridable): resolution, images, ratios.
SWIN_CPU = dict(resolution=128, images=4, batch_size=4, ratios=[0.0, 0.1, 0.2, 0.3, 0.4])


def _class_names(n: int) -> list:
    path = Path(__file__).resolve().parents[1] / "locoop" / "data" / "imagenet_classnames.txt"
    names = [x.strip() for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    while len(names) < n:
        names.append(f"class number {len(names)} of some kind")
    return names[:n]


def _write_jpegs(folder: Path, n: int, g: torch.Generator) -> list:
    """Smooth random 500x375 JPEGs (ImageNet's typical size), so decoding costs what it does there."""
    from PIL import Image

    files = []
    for i in range(n):
        low = torch.rand(1, 3, 12, 16, generator=g)
        img = torch.nn.functional.interpolate(low, size=(375, 500), mode="bilinear", align_corners=False)[0]
        img = (img + 0.05 * torch.rand(img.shape, generator=g)).clamp(0, 1)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray((img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(path, quality=90)
        files.append(path)
    return files


def _decode(files: list, res: int) -> torch.Tensor:
    from PIL import Image

    preprocess = build_preprocess(res)
    return torch.stack([preprocess(Image.open(f)) for f in files])


def _validation_batches(image_files: bool, n: int, b: int, labels: torch.Tensor, res: int, g: torch.Generator,
                        decode_files) -> tuple:
    """``(batches, reload)``: JPEG files decoded by ``decode_files(files, res)`` (``reload`` decodes them
    again, for the naive mode), or random tensors (``reload`` None)."""
    if not image_files:
        images = torch.randn(n, 3, res, res, generator=g)
        return [(images[i:i + b], labels[i:i + b]) for i in range(0, n, b)], None
    files = _write_jpegs(Path(tempfile.mkdtemp(prefix="bench_setar_")), n, g)

    def decode():
        images = decode_files(files, res)
        return [(images[i:i + b], labels[i:i + b]) for i in range(0, n, b)], []

    return decode()[0], decode


def _decode_swin(files: list, res: int) -> torch.Tensor:
    from PIL import Image

    from locoop.models.swinv2 import build_swin_preprocess

    preprocess = build_swin_preprocess(res)
    return torch.stack([preprocess(Image.open(f)) for f in files])


def _timed_modes(args, make_model, data, kw, device) -> tuple:
    """Alternate the modes ``--repeats`` times on fresh models; ``(wall times, CPU times, results)``."""
    times = {"fast": [], "naive": []}
    cpu = {"fast": [], "naive": []}
    results = {}
    for rep in range(args.repeats):
        for mode in ("fast", "naive"):
            model = make_model()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            res_ = run_search(model, data, mode=mode, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
            results[mode] = res_
            print(f"[{rep + 1}/{args.repeats}] {mode}: {times[mode][-1]:.1f} s wall, {cpu[mode][-1]:.1f} s CPU, "
                  f"ratios chosen {[s[3] for s in res_.settings]}", flush=True)
            del model
    return times, cpu, results


def _result(args, name: str, times, cpu, results) -> dict:
    tf, tn = min(times["fast"]), min(times["naive"])
    fast, naive = results["fast"], results["naive"]
    diffs = [abs(a["criterion"] - b["criterion"]) for a, b in zip(fast.log, naive.log)]
    same_log = len(fast.log) == len(naive.log) and all(
        (a["tower"], a["layer"], a["ratio"]) == (b["tower"], b["layer"], b["ratio"])
        for a, b in zip(fast.log, naive.log))
    fc, nc = fast.counters, naive.counters
    fast_passes = fc["visual_layer_passes"] + fc["text_layer_passes"]
    naive_passes = nc["visual_layer_passes"] + nc["text_layer_passes"]
    return {
        "name": name, "ratio": tn / tf, "target": 5.0 if args.preset != "swin" else 3.0,
        "max_abs_diff": max(diffs) if same_log else None, "max_abs_diff_target": 1e-4,
        "settings_identical": fast.settings == naive.settings, "fast_s": tf, "naive_s": tn,
        "fast_s_all": times["fast"], "naive_s_all": times["naive"],
        "cpu_ratio": min(cpu["naive"]) / min(cpu["fast"]), "fast_cpu_s": min(cpu["fast"]),
        "naive_cpu_s": min(cpu["naive"]), "fast_layer_passes": fast_passes, "naive_layer_passes": naive_passes,
        "layer_pass_ratio": naive_passes / fast_passes, "fast_counters": fc, "naive_counters": nc,
        "baseline_criterion": fast.baseline, "final_criterion": fast.final,
        "chosen_settings": [[t, w, list(l) if isinstance(l, tuple) else l, r] for t, w, l, r in fast.settings],
    }


def run_swin(args) -> dict:
    """The search on a random-weight Swin-V2-B classifier (``visual_only_swin``, every stage's blocks).

    On a CPU the resolution, the number of images and of ratios are reduced (:data:`SWIN_CPU`,
    printed); depths, heads, widths, window and the 1000 classes stay Swin-V2-B's. ``--full``
    keeps SeTAR's sizes (256 px, the nine ratios, ``--images``): for a GPU.
    """
    from locoop.models.swinv2 import SwinV2Classifier, make_tiny_swinv2

    device = torch.device(args.device)
    reduced = {}
    res = args.resolution or (SWIN_B["image_size"] if args.full or device.type == "cuda" else SWIN_CPU["resolution"])
    n, b, ratios = args.images, args.batch_size, list(args.ratios)
    if not (args.full or device.type == "cuda"):
        for key, default in (("images", SWIN_CPU["images"]), ("batch_size", SWIN_CPU["batch_size"]),
                             ("ratios", SWIN_CPU["ratios"])):
            if getattr(args, key) == args.parser_defaults[key]:
                reduced[key] = default
        n, b = reduced.get("images", n), reduced.get("batch_size", b)
        ratios = reduced.get("ratios", ratios)
        if res != SWIN_B["image_size"]:
            reduced["resolution"] = res
    if reduced:
        print(f"CPU sizes (reduced from Swin-V2-B / SeTAR: 256 px, the nine ratios, 50 images): {reduced}; "
              "depths / heads / widths / window / 1000 classes unchanged; --full for SeTAR's sizes")
    c = args.classes if args.classes != args.parser_defaults["classes"] else 1000
    fields = dict(SWIN_B, image_size=res)
    hf = make_tiny_swinv2(num_labels=c, seed=args.seed, **fields)
    state = {k: v.clone() for k, v in hf.state_dict().items()}

    def make_model():
        model = SwinV2Classifier(make_tiny_swinv2(num_labels=c, seed=args.seed, **fields))
        model.to_hf().load_state_dict(state)
        return model.to(device).eval()

    g = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(n) % c
    batches, reload = _validation_batches(args.image_files, n, b, labels, res, g, _decode_swin)
    data = SearchData(batches, None, reload=reload)
    top_k = args.topk if args.topk else max(1, round(0.7 * c))  # SeTAR's Swin: 700 of 1000 classes
    lam = args.lam if args.lam != args.parser_defaults["lam"] else 0.01  # SeTAR's Swin lambda
    kw = dict(searcher="visual_only_swin", weight_types=args.weight_types, ratios=ratios, lam=lam, top_k=top_k,
              verbose=args.verbose, device=device)
    times, cpu, results = _timed_modes(args, make_model, data, kw, device)
    name = (f"SeTAR search on Swin-V2-B (visual_only_swin, {'+'.join(args.weight_types)}, "
            f"{len(results['fast'].settings)} steps x {len(set(ratios) | {0.0})} ratios)")
    result = _result(args, name, times, cpu, results)
    settings = {"preset": "swin", **{k: v for k, v in fields.items()}, "classes": c, "images": n,
                "image_files": bool(args.image_files), "batch_size": b, "ratios": ratios, "top_k": top_k,
                "lambda": lam, "reduced_for_cpu": reduced, "repeats": args.repeats, "device": str(device),
                "threads": torch.get_num_threads(), "torch": torch.__version__}
    return {"results": [result], "settings": settings}


def run(args) -> dict:
    if args.preset == "swin":
        return run_swin(args)
    layers, vw, tw, ed, res, patch = PRESETS[args.preset]
    layers = args.layers or layers
    vw = args.width or vw
    tw = args.text_width or tw
    cfg = CLIPConfig("bench-setar", embed_dim=args.embed_dim or ed, image_resolution=res, vision_layers=layers,
                     vision_width=vw, vision_patch_size=patch, transformer_width=tw, transformer_layers=layers)
    device = torch.device(args.device)
    sd = random_state_dict(cfg, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    n, c, b = args.images, args.classes, args.batch_size
    labels = torch.arange(n) % c
    tokens = tokenize([f"a photo of a {name}." for name in _class_names(c)])
    batches, reload = _validation_batches(args.image_files, n, b, labels, res, g, _decode)
    data = SearchData(batches, ClassPrompts(tokens=tokens, chunk_size=args.text_chunk), reload=reload)
    top_k = args.topk if args.topk else max(1, round(0.3 * c))  # SeTAR: 300 of 1000 classes
    kw = dict(searcher=args.searcher, weight_types=args.weight_types, ratios=args.ratios, lam=args.lam, top_k=top_k,
              freeze_proj=not args.search_proj, verbose=args.verbose, device=device)

    # Modes alternate and the fastest of --repeats runs counts: on a shared machine the minimum
    # is the least disturbed measurement of each. CPU time (all threads of this process) is
    # recorded too: it hardly changes when other processes compete for the cores.
    times, cpu, results = _timed_modes(args, lambda: build_model(sd).to(device).eval(), data, kw, device)
    result = _result(args, f"SeTAR search ({args.searcher}, {'+'.join(args.weight_types)}, "
                           f"{len(results['fast'].settings)} steps x {len(set(args.ratios) | {0.0})} ratios)",
                     times, cpu, results)
    settings = {"preset": args.preset, "layers": layers, "vision_width": vw, "text_width": tw,
                "embed_dim": cfg.embed_dim, "resolution": res, "patch": patch, "tokens": (res // patch) ** 2 + 1,
                "classes": c, "images": n, "image_files": bool(args.image_files), "batch_size": b, "ratios": list(args.ratios), "top_k": top_k,
                "lambda": args.lam, "repeats": args.repeats, "device": str(device), "threads": torch.get_num_threads(),
                "torch": torch.__version__}
    return {"results": [result], "settings": settings}


def print_report(report: dict) -> None:
    print(f"\n{'benchmark':<58} {'ratio':>7} {'target':>7} {'CPU':>7} {'passes':>7} {'same':>5} {'max|diff|':>10}  ok")
    for r in report["results"]:
        diff = "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        ok = (r["ratio"] >= r["target"] and r["settings_identical"] and r["max_abs_diff"] is not None
              and r["max_abs_diff"] < r["max_abs_diff_target"])
        print(f"{r['name']:<58} {r['ratio']:>6.2f}x {r['target']:>6.1f}x {r['cpu_ratio']:>6.2f}x "
              f"{r['layer_pass_ratio']:>6.2f}x "
              f"{'yes' if r['settings_identical'] else 'NO':>5} {diff:>10}  {'yes' if ok else 'NO'}")
        print(f"  fast  {r['fast_s']:8.1f} s wall {r['fast_cpu_s']:8.1f} s CPU  {r['fast_counters']}")
        print(f"  naive {r['naive_s']:8.1f} s wall {r['naive_cpu_s']:8.1f} s CPU  {r['naive_counters']}")
    print("settings:", json.dumps(report["settings"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (default: small)")
    p.add_argument("--layers", type=int, default=None, help="blocks per tower (overrides the preset)")
    p.add_argument("--width", type=int, default=None, help="vision width, a multiple of 64")
    p.add_argument("--text-width", type=int, default=None, help="text width, a multiple of 64")
    p.add_argument("--embed-dim", type=int, default=None, help="joint embedding size")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--images", type=int, default=50, help="validation images (labels cycle over the classes)")
    p.add_argument("--no-image-files", dest="image_files", action="store_false",
                   help="random tensors instead of JPEG files decoded per candidate by the naive mode")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--text-chunk", type=int, default=1000, help="prompts per text forward pass")
    p.add_argument("--searcher", default="visual_text")
    p.add_argument("--weight-types", nargs="+", default=["W_up"])
    p.add_argument("--search-proj", action="store_true", help="also search W_p (FREEZE_PROJ False)")
    p.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    p.add_argument("--lam", type=float, default=0.10)
    p.add_argument("--topk", type=int, default=None, help="default: 30%% of the classes (SeTAR: 300 of 1000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating; the fastest counts")
    p.add_argument("--verbose", action="store_true", help="progress bars")
    p.add_argument("--resolution", type=int, default=None, help="--preset swin: input side (CPU default 128)")
    p.add_argument("--full", action="store_true", help="--preset swin: SeTAR's sizes on any device (256 px, ...)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.parser_defaults = {k: p.get_default(k) for k in ("images", "batch_size", "ratios", "classes", "lam")}
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

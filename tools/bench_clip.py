#!/usr/bin/env python
"""Benchmark the CLIP fast paths against their naive twins, side by side in one run.

* image encoder with local features: ours (value path in the last block only, CLS-only query
  there) vs. the reference way (value path computed in every block);
* text encoder over N prompts ``"X X ... X <classname>."``: truncated after the longest EOT
  vs. the full 77-token context.

Random weights with real architecture shapes (ViT-B/16 by default). ratio = naive time / our
time (median of ``--repeats`` runs after a warm-up). Prints a table and writes JSON in the
project's benchmark shape with ``--json PATH``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from clip.configs import get_config
from clip.model import CLIP
from clip.naive import encode_image_local_naive, encode_text_full_naive
from clip.tokenizer import tokenize


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    out = fn()  # warm-up (also the output compared)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _max_diff(a, b) -> float:
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return (a.float() - b.float()).abs().max().item()


def _class_names(n: int) -> list[str]:
    path = Path(__file__).resolve().parents[1] / "locoop" / "data" / "imagenet_classnames.txt"
    names = path.read_text().splitlines() if path.exists() else []
    names = [x for x in names if x.strip()]
    while len(names) < n:  # fall back to synthetic names of realistic token lengths
        names.append(f"class number {len(names)} of some kind")
    return names[:n]


def run(model_name: str, batch: int, prompts: int, repeats: int, device: torch.device, threads: int) -> dict:
    torch.manual_seed(0)
    model = CLIP(**get_config(model_name).model_kwargs()).to(device).eval()
    res = model.visual.input_resolution
    images = torch.randn(batch, 3, res, res, device=device)
    ctx = " ".join(["X"] * 16)
    tokens = tokenize([f"{ctx} {c}." for c in _class_names(prompts)]).to(device)
    results = []
    with torch.no_grad():
        t_ours, out_ours = _time(lambda: model.encode_image(images, return_local=True), repeats, device)
        t_naive, out_naive = _time(lambda: encode_image_local_naive(model, images), repeats, device)
        results.append({"name": "image encoder + local features", "ratio": t_naive / t_ours, "target": 1.7,
                        "max_abs_diff": _max_diff(out_ours, out_naive), "max_abs_diff_target": 1e-5,
                        "ours_s": t_ours, "naive_s": t_naive})
        t_ours, out_ours = _time(lambda: model.encode_text(tokens), repeats, device)
        t_naive, out_naive = _time(lambda: encode_text_full_naive(model, tokens), repeats, device)
        results.append({"name": f"text encoder, {prompts} prompts (truncated vs 77 tokens)",
                        "ratio": t_naive / t_ours, "target": 2.5, "max_abs_diff": _max_diff(out_ours, out_naive),
                        "max_abs_diff_target": 1e-5, "ours_s": t_ours, "naive_s": t_naive,
                        "truncated_length": int(tokens.argmax(-1).max()) + 1})
    settings = {"model": model_name, "batch": batch, "prompts": prompts, "repeats": repeats,
                "device": str(device), "threads": threads, "dtype": "float32", "torch": torch.__version__}
    return {"results": results, "settings": settings}


def print_table(report: dict) -> None:
    print(f"{'benchmark':<52} {'ratio':>7} {'target':>7} {'max|diff|':>10}  ok")
    for r in report["results"]:
        ok = r["ratio"] >= r["target"] and (r["max_abs_diff"] is None or r["max_abs_diff"] < r.get("max_abs_diff_target", 1e-5))
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        print(f"{r['name']:<52} {r['ratio']:>6.2f}x {r['target']:>6.1f}x {diff:>10}  {'yes' if ok else 'NO'}")
    print("settings:", json.dumps(report["settings"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B/16", help="architecture shape (any OpenAI or tiny model name)")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass")
    p.add_argument("--prompts", type=int, default=1000, help="number of class prompts for the text benchmark")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args.model, args.batch, args.prompts, args.repeats, torch.device(args.device), args.threads)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

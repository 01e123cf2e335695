"""``python -m locoop demo [--output DIR] [--epochs N]``: the whole pipeline in about a minute on a CPU.

Needs nothing but the repository: it generates a small ImageNet-like ID set and the four OOD sets
in the real folder layouts (:mod:`locoop.data.synthetic`) and a tiny random-weight CLIP checkpoint
in OpenAI's format (:mod:`clip.tiny`), then runs, as separate processes through the same CLI a
user calls::

    python -m locoop train      (LoCoOp, a few epochs)
    python -m locoop eval       (MCM, GL-MCM, ... on iNaturalist/SUN/Places/Texture folders)
    python -m locoop visualize  (OOD regions of one training image)

and prints the results table and where the files are. The numbers are a smoke test of the code
path on random weights and synthetic images; they say nothing about LoCoOp's accuracy.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

DEMO_CLASSES = 5
DEMO_TOPK = 2  # of 5 classes (the paper: 200 of 1000)
DEMO_SIZE = 64  # input resolution: a 4x4 grid of 16 px patches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's arguments."""
    parser.add_argument("--output", default="demo_output", metavar="DIR",
                        help="folder for the generated data, checkpoint and run (default: ./demo_output)")
    parser.add_argument("--epochs", type=int, default=5, metavar="N", help="training epochs (default: 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the data, weights and training (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="do not print each step's command line")


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _configs() -> tuple:
    root = _repo_root()
    ds = root / "configs" / "datasets" / "imagenet.yaml"
    method = root / "configs" / "trainers" / "LoCoOp" / "vit_b16_ep50.yaml"
    missing = [str(p) for p in (ds, method) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the demo uses the repository's configs, not found: {', '.join(missing)}; "
                                "run it from a clone of the repository")
    return str(ds), str(method)


def _run_step(name: str, cmd: Sequence[str], log_dir: Path, quiet: bool) -> float:
    """Run one CLI step as its own process; its output goes to ``log_dir/<name>.txt``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.txt"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(_repo_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The tiny model's matmuls are too small to gain from threads; on a busy machine extra OpenMP
    # threads only wait for each other (batch times jump 10x). An explicit setting wins.
    env.setdefault("OMP_NUM_THREADS", "1")
    if not quiet:
        shown = ["python"] + list(cmd[1:]) if cmd[0] == sys.executable else list(cmd)
        print(f"\n$ {shlex.join(shown)}", flush=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(_repo_root()))
    seconds = time.time() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise RuntimeError(f"demo step '{name}' failed (exit {proc.returncode}); last lines of {log}:\n"
                           + "\n".join(tail))
    print(f"  {name}: done in {seconds:.1f} s (log: {log})", flush=True)
    return seconds


def _training_losses(log_txt: Path) -> List[float]:
    """Average loss per epoch from the training log lines (``epoch [e/N] ... loss v (avg)``)."""
    import re

    per_epoch: dict = {}
    pat = re.compile(r"epoch \[(\d+)/\d+\].*?\bloss [-\d.e+]+ \(([-\d.e+]+)\)")
    if not log_txt.is_file():
        return []
    for line in log_txt.read_text(encoding="utf-8", errors="replace").splitlines():
        m = pat.search(line)
        if m:
            per_epoch[int(m.group(1))] = float(m.group(2))  # the last line of an epoch has its average
    return [per_epoch[e] for e in sorted(per_epoch)]


def _run(args: argparse.Namespace) -> int:
    from clip.tiny import make_tiny_checkpoint
    from locoop.data.synthetic import make_imagenet_like, make_ood_sets

    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    t_start = time.time()
    out = Path(args.output).resolve()
    data, run_dir, logs = out / "data", out / "run", out / "logs"
    ckpt = out / "tiny-clip-vit-p16.pt"
    ds_cfg, method_cfg = _configs()
    if run_dir.is_dir():  # a fresh run each time (a left-over one would be resumed, not retrained)
        shutil.rmtree(run_dir)

    print("LoCoOp demo: SMOKE RUN on synthetic images with a tiny random-weight CLIP.\n"
          "Its numbers only show that the pipeline works; they say nothing about LoCoOp's accuracy.\n"
          "For the real benchmark see README.md (ImageNet-1K + ViT-B/16).")
    print(f"\n[1/4] generating data and a tiny CLIP checkpoint under {out}")
    info = make_imagenet_like(str(data), num_classes=DEMO_CLASSES, train_per_class=8, val_per_class=8,
                              image_size=(DEMO_SIZE, DEMO_SIZE), seed=args.seed)
    make_ood_sets(str(data), per_set=10, image_size=(DEMO_SIZE, DEMO_SIZE), seed=args.seed + 1)
    if not ckpt.is_file():
        make_tiny_checkpoint(str(ckpt), like="tiny-vit-p16", fmt="state_dict", seed=args.seed)

    py = [sys.executable, "-m", "locoop"]
    common = ["--root", str(data), "--dataset-config-file", ds_cfg, "--config-file", method_cfg]
    opts = ["MODEL.BACKBONE.NAME", str(ckpt), "INPUT.SIZE", f"({DEMO_SIZE}, {DEMO_SIZE})",
            "TRAINER.LOCOOP.N_CTX", "4", "TRAINER.LOCOOP.PREC", "fp32", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TEST.BATCH_SIZE", "50"]
    train_opts = opts + ["OPTIM.MAX_EPOCH", str(args.epochs), "DATASET.NUM_SHOTS", "8",
                         "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.LR", "0.02", "OPTIM.WARMUP_EPOCH", "-1",
                         "TRAIN.PRINT_FREQ", "5"]
    times = {}
    print(f"\n[2/4] training LoCoOp for {args.epochs} epochs -> {run_dir}")
    times["train"] = _run_step("train", py + ["train"] + common + [
        "--seed", str(args.seed), "--trainer", "LoCoOp", "--output-dir", str(run_dir),
        "--lambda_value", "0.25", "--topk", str(DEMO_TOPK)] + train_opts, logs, args.quiet)
    losses = _training_losses(run_dir / "log.txt")
    if losses:
        print("  average loss per epoch: " + ", ".join(f"{v:.4f}" for v in losses))

    print("\n[3/4] OOD evaluation (ID: the generated ImageNet-like val set; OOD: 4 generated sets)")
    times["eval"] = _run_step("eval", py + ["eval"] + common + [
        "--trainer", "LoCoOp", "--model-dir", str(run_dir), "--output-dir", str(run_dir),
        "--load-epoch", str(args.epochs), "--T", "1"] + opts, logs, args.quiet)

    image = sorted((Path(info["dataset_dir"]) / "images" / "train" / info["wnids"][0]).glob("*"))[0]
    print(f"\n[4/4] visualising the OOD regions of {image.relative_to(data)} (label 0)")
    times["visualize"] = _run_step("visualize", py + ["visualize"] + common + [
        "--trainer", "LoCoOp", "--model-dir", str(run_dir), "--load-epoch", str(args.epochs),
        "--topk", str(DEMO_TOPK), "--image_path", str(image), "--label", "0"] + opts, logs, args.quiet)

    from locoop.commands._common import final_checkpoint
    from locoop.ood.results import format_table, read_results
    from locoop.viz.regions import visualization_path

    doc = read_results(run_dir)
    keep = {s: {o: {k: v / 100.0 for k, v in m.items()} for o, m in rows.items() if o != "Average"}
            for s, rows in doc["scores"].items() if s in ("MCM", "GL-MCM")}
    acc = doc.get("id_accuracy")
    print("\nResults (SMOKE RUN: random weights, synthetic data -- not LoCoOp's accuracy):\n")
    print(format_table(keep, None if acc is None else acc / 100.0))
    vis = visualization_path(image, run_dir, data)
    print(f"\nFiles:\n  results      {run_dir / 'ood_results.md'} (+ .csv, .json; all {len(doc['scores'])} scores)"
          f"\n  histograms   {run_dir / 'plots'}/"
          f"\n  checkpoint   {final_checkpoint(str(run_dir), args.epochs)}"
          f"\n  training log {run_dir / 'log.txt'}"
          f"\n  OOD regions  {vis}\n               {vis.with_name(vis.stem + '_regions.png')}"
          f"\n  step logs    {logs}/")
    total = time.time() - t_start
    print(f"\nDemo finished in {total:.0f} s (train {times['train']:.0f} s, eval {times['eval']:.0f} s, "
          f"visualise {times['visualize']:.0f} s). Again: a smoke run; the numbers are meaningless.")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the demo; 1 if a step failed, 2 on bad input."""
    from locoop.commands._common import run_command

    try:
        return run_command("demo", _run, args)
    except RuntimeError as e:
        print(f"python -m locoop demo: {e}", file=sys.stderr)
        return 1

"""``python -m locoop demo [--output DIR] [--epochs N]``: the whole pipeline in about a minute on a CPU.

Needs nothing but the repository. It writes, under ``DIR`` (default ``./demo_output``):

* ``data/``: a small ImageNet-like ID set and the four OOD sets in the real folder layouts
  (:mod:`locoop.data.synthetic`), SeTAR's validation list ``imagenet/imagenet1k_val_data.json``
  (one training image per class), and ``scenes/``: one image per class with the class pattern
  in the middle and an OOD background around it, for the visualisation;
* ``tiny-clip-vit-p16.pt``: a random-weight CLIP in OpenAI's format with ViT-B/16's input geometry
  (224 px, a 14x14 grid of 16 px patches) and a tiny width and depth (:mod:`clip.tiny`);
* ``configs/SeTAR.yaml`` and ``configs/SeTAR+FT.yaml``: the shipped ImageNet SeTAR configs with the
  few changes a 5-class tiny model needs (listed at the top of each file);

then runs, as separate processes through the same CLI a user calls::

    python -m locoop train      (LoCoOp, a few epochs)              -> DIR/run
    python -m locoop eval       (MCM, GL-MCM, ... on the 4 OOD sets)
    python -m locoop visualize  (OOD regions of the scene of the class the model recognises best)

and prints the results table, where the files are, and the script commands to try next (the
LoCoOp scripts on the demo run, the SeTAR search and SeTAR+FT on the demo data). The numbers are a
smoke test of the code path on random weights and synthetic images; they say nothing about
LoCoOp's accuracy.
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
from typing import Dict, List, Sequence

DEMO_CLASSES = 5
DEMO_TOPK = 2  # of 5 classes (the paper: 200 of 1000); SeTAR's 300 and SeTAR+FT's 300 become this too
DEMO_SIZE = 224  # ViT-B/16's input: a 14x14 grid of 16 px patches, enough to show ID and OOD regions
DEMO_CKPT = "tiny-clip-vit-p16.pt"
VAL_SPLIT = "imagenet1k_val_data.json"  # SeTAR's file name, looked up in the dataset folder
# The shipped SeTAR configs and what the demo changes in them (a tiny model, 5 classes, a CPU).
SETAR_DEMO_CONFIGS = {
    "SeTAR.yaml": ("configs/setar/imagenet/SeTAR.yaml", {
        "DATASET.VAL_SPLIT_FILE": VAL_SPLIT,
        "DATALOADER.TEST.BATCH_SIZE": 50,
        "DATALOADER.NUM_WORKERS": 0,
        "SETAR.TOPK": DEMO_TOPK,
        "SETAR.RATIOS": [0.0, 0.1, 0.2, 0.3],
    }),
    "SeTAR+FT.yaml": ("configs/setar/finetune/imagenet/SeTAR+FT.yaml", {
        "DATASET.VAL_SPLIT_FILE": VAL_SPLIT,
        "DATALOADER.TRAIN_X.BATCH_SIZE": 5,
        "DATALOADER.TEST.BATCH_SIZE": 50,
        "DATALOADER.NUM_WORKERS": 0,
        "OPTIM.MAX_EPOCH": 2,
        "TRAIN.PRINT_FREQ": 1,
        "SETAR.FT.TOPK": DEMO_TOPK,
    }),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's arguments."""
    parser.add_argument("--output", default="demo_output", metavar="DIR",
                        help="folder for the generated data, checkpoint, configs and run (default: ./demo_output)")
    parser.add_argument("--epochs", type=int, default=5, metavar="N", help="training epochs (default: 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the data, weights and training (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="do not print each step's command line")


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _configs() -> tuple:
    root = _repo_root()
    ds = root / "configs" / "datasets" / "imagenet.yaml"
    method = root / "configs" / "trainers" / "LoCoOp" / "vit_b16_ep50.yaml"
    missing = [str(p) for p in [ds, method] + [root / src for src, _ in SETAR_DEMO_CONFIGS.values()]
               if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the demo uses the repository's configs, not found: {', '.join(missing)}; "
                                "run it from a clone of the repository")
    return str(ds), str(method)


def write_setar_configs(out_dir: Path, backbone: str) -> Dict[str, Path]:
    """Write the demo's SeTAR configs (``out_dir/configs/*.yaml``): the shipped ones plus the demo's changes.

    Args:
        out_dir: the demo folder.
        backbone: the checkpoint the configs use (``MODEL.BACKBONE.NAME``).

    Returns:
        ``{file name: path}``; each file is checked to load with the config system.
    """
    import yaml

    from locoop.config import load_cfg
    from locoop.engine.fileio import atomic_write_text

    written = {}
    for name, (source, changes) in SETAR_DEMO_CONFIGS.items():
        changes = dict(changes, **{"MODEL.BACKBONE.NAME": str(backbone)})
        with open(_repo_root() / source, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        for key, value in changes.items():
            node = doc
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        header = [f"# The demo's copy of {source}, changed for a tiny random-weight CLIP on 5 generated classes:"]
        header += [f"#   {k}: {v}" for k, v in changes.items()]
        header += ["# Written by `python -m locoop demo`; its numbers are a smoke test, not SeTAR's accuracy.", ""]
        path = out_dir / "configs" / name
        atomic_write_text(path, "\n".join(header) + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
        load_cfg(str(path))  # fails here, naming the key, if a change no longer fits the config
        written[name] = path
    return written


def prepare_demo(out: Path, seed: int = 1) -> Dict[str, object]:
    """Write the demo's data, checkpoint and SeTAR configs under ``out`` (what the steps and scripts read).

    Returns:
        ``{"data", "checkpoint", "configs": {name: path}, "val_split", "scenes": [path by label], "wnids"}``.
    """
    from clip.tiny import make_tiny_checkpoint
    from locoop.data.synthetic import make_imagenet_like, make_ood_sets, make_scenes, make_val_split

    data, ckpt = out / "data", out / DEMO_CKPT
    size = (DEMO_SIZE, DEMO_SIZE)
    info = make_imagenet_like(str(data), num_classes=DEMO_CLASSES, train_per_class=8, val_per_class=8,
                              image_size=size, seed=seed)
    make_ood_sets(str(data), per_set=10, image_size=size, seed=seed + 1)
    val_split = Path(info["dataset_dir"]) / VAL_SPLIT
    make_val_split(str(val_split), os.path.join(info["dataset_dir"], "images", "train"), per_class=1, seed=seed)
    scenes = make_scenes(str(data), DEMO_CLASSES, size, seed=seed + 2)
    if not ckpt.is_file():
        make_tiny_checkpoint(str(ckpt), like="tiny-vit-p16", fmt="state_dict", seed=seed)
    return {"data": data, "checkpoint": ckpt, "configs": write_setar_configs(out, str(ckpt)), "val_split": val_split,
            "scenes": [Path(p) for p in scenes], "wnids": info["wnids"]}


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


def best_recognised_class(run_dir: Path, num_classes: int) -> int:
    """The class with the highest ID test accuracy in the run's ``ood_scores.npz`` (ties: the lowest label)."""
    import numpy as np

    from locoop.ood.runner import SCORES_NPZ

    with np.load(run_dir / SCORES_NPZ) as z:
        labels, preds = z["id_labels"], z["id_predictions"]
    acc = [float((preds[labels == c] == c).mean()) if (labels == c).any() else -1.0 for c in range(num_classes)]
    return int(np.argmax(acc))


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (shorter commands to copy)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def next_commands(out: Path, prepared: Dict[str, object], image: Path, label: int) -> List[str]:
    """The script commands to try on the demo's data and run, as a user types them from the repository."""
    data, run_dir = _shown(prepared["data"]), _shown(out / "run")
    cfgs = {k: _shown(v) for k, v in prepared["configs"].items()}
    search_out = _shown(out / "setar" / "SeTAR")
    return [
        f"bash scripts/locoop/eval.sh {data} imagenet vit_b16_ep50 1 {run_dir}",
        f"bash scripts/locoop/demo_visualization.sh {data} imagenet vit_b16_ep50 {run_dir} {_shown(image)} {label}",
        f"bash scripts/setar/search.sh {data} {cfgs['SeTAR.yaml']} {search_out}",
        f"bash scripts/setar/search.sh {data} {cfgs['SeTAR.yaml']} {_shown(out / 'setar' / 'LoCoOp+SeTAR')} {run_dir}",
        f"bash scripts/setar/finetune.sh {data} {cfgs['SeTAR+FT.yaml']} {_shown(out / 'setar' / 'SeTAR+FT')} "
        f"{search_out}/best_settings.json",
    ]


def _run(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    t_start = time.time()
    out = Path(args.output).resolve()
    run_dir, logs = out / "run", out / "logs"
    ds_cfg, method_cfg = _configs()
    if run_dir.is_dir():  # a fresh run each time (a left-over one would be resumed, not retrained)
        shutil.rmtree(run_dir)

    print("LoCoOp demo: SMOKE RUN on synthetic images with a tiny random-weight CLIP.\n"
          "Its numbers only show that the pipeline works; they say nothing about LoCoOp's accuracy.\n"
          "For the real benchmark see README.md (ImageNet-1K + ViT-B/16).")
    print(f"\n[1/4] generating data, a SeTAR validation split, configs and a tiny CLIP checkpoint under {out}")
    prepared = prepare_demo(out, args.seed)
    data, ckpt = prepared["data"], prepared["checkpoint"]

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

    label = best_recognised_class(run_dir, DEMO_CLASSES)
    image = prepared["scenes"][label]
    print(f"\n[4/4] visualising the OOD regions of {image.relative_to(data)}: the pattern of class {label} "
          "(the class the model recognises best) on an OOD background")
    times["visualize"] = _run_step("visualize", py + ["visualize"] + common + [
        "--trainer", "LoCoOp", "--model-dir", str(run_dir), "--load-epoch", str(args.epochs),
        "--topk", str(DEMO_TOPK), "--image_path", str(image), "--label", str(label)] + opts, logs, args.quiet)

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
    regions_line = [ln for ln in (logs / "visualize.txt").read_text(encoding="utf-8", errors="replace").splitlines()
                    if " regions (" in ln]
    if regions_line:
        print(f"\n{regions_line[-1]}")
    print(f"\nFiles:\n  results      {run_dir / 'ood_results.md'} (+ .csv, .json; all {len(doc['scores'])} scores)"
          f"\n  histograms   {run_dir / 'plots'}/"
          f"\n  checkpoint   {final_checkpoint(str(run_dir), args.epochs)}"
          f"\n  training log {run_dir / 'log.txt'}"
          f"\n  OOD regions  {vis}\n               {vis.with_name(vis.stem + '_regions.png')}"
          f"\n  SeTAR        {prepared['val_split']} (validation split)"
          + "".join(f"\n               {p}" for p in prepared["configs"].values())
          + f"\n  step logs    {logs}/")
    total = time.time() - t_start
    print(f"\nDemo finished in {total:.0f} s (train {times['train']:.0f} s, eval {times['eval']:.0f} s, "
          f"visualise {times['visualize']:.0f} s). Again: a smoke run; the numbers are meaningless.")
    print("\nNext, the scripts on the demo's data (from the repository folder; each a few tens of seconds on a CPU):"
          "\n  "
          + "\n  ".join(next_commands(out, prepared, image, label)))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the demo; 1 if a step failed, 2 on bad input."""
    from locoop.commands._common import run_command

    try:
        return run_command("demo", _run, args)
    except RuntimeError as e:
        print(f"python -m locoop demo: {e}", file=sys.stderr)
        return 1

#!/usr/bin/env python
"""Benchmark one LoCoOp training step: our fast path vs the reference (naive) path, side by side.

A step = forward (image global + local features, text features of the learned prompts, logits),
the LoCoOp loss, backward to the context vectors and an SGD update.

* ours: image encoder with the value path in the last block only (clip.model); text encoder with
  the shared prefix computed once, the per-class suffixes packed, truncated after each EOT
  (locoop.trainers.text_encoder).
* naive: what the reference LoCoOp code computes: the value path in every ViT block
  (clip.naive.encode_image_local_naive) and every prompt over the full 77 tokens
  (clip.naive.encode_text_embeddings_full_naive).

Weights are random with ViT-B/16's shapes (clip.tiny.random_state_dict, logit scale 100); class
names are the first N shipped ImageNet names. Both variants start from the same context and
images; the loss and context gradient of the first step are compared (max abs difference).

Memory: each variant runs one step alone in its own subprocess, so its peak is its own.
CPU: the peak resident set size (``VmHWM`` of /proc/self/status) during that step, after the model
and inputs are built, freed heap memory is returned to the OS (``malloc_trim``) and the high-water
mark is reset (``/proc/self/clear_refs``); reported as the peak RSS and as the increase over the
RSS before the step (= what the step itself needs). CUDA: ``torch.cuda.max_memory_allocated``
during the step and its increase over the memory allocated before it. That step starts from the
common context, so it also gives the loss and gradient that are compared.

Time: a third subprocess holds one model and alternates naive and ours steps (one warm-up round,
then ``--repeats`` rounds), so the load changes of a shared machine hit both alike. Step time =
median over the rounds; ratio = naive / ours. The process CPU time per step and the load average
are reported too: on a CPU shared with other busy processes, multi-threaded runs lose time at every
parallel region waiting for a descheduled thread, which costs the fast path (many mid-sized ops)
relatively more than the naive one (few huge matmuls); ``--threads 1`` is immune to that.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET = 4.0


def class_names(n: int) -> list[str]:
    """The first ``n`` shipped ImageNet class names (synthetic names beyond them or if absent)."""
    path = ROOT / "locoop" / "data" / "imagenet_classnames.txt"
    names = [x.strip() for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    while len(names) < n:
        names.append(f"class number {len(names)} of some kind")
    return names[:n]


# ---------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, inflating the RSS baseline)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- workers
def _setup(s: dict):
    """Model, inputs and one prompt learner + optimiser per requested variant (same start for all)."""
    torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    from clip.model import build_model, convert_weights_fp16
    from clip.tiny import random_state_dict
    from locoop.trainers.prompt_learner import PromptLearner

    model = build_model(random_state_dict(s["model"], seed=0)).to(device)
    if s["dtype"] == "fp16":
        convert_weights_fp16(model)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    pl = PromptLearner(class_names(s["classes"]), model, n_ctx=s["n_ctx"]).to(device)
    res = model.visual.input_resolution
    g = torch.Generator().manual_seed(2)
    images = torch.randn(s["batch"], 3, res, res, generator=g).to(device)
    labels = torch.randint(0, s["classes"], (s["batch"],), generator=g).to(device)
    return model, pl, images, labels


def _make_step(variant: str, s: dict, model, pl, images, labels):
    """A closure running one training step of ``variant``; returns (loss, context gradient)."""
    from clip.naive import encode_image_local_naive
    from locoop.trainers.loss import locoop_loss
    from locoop.trainers.text_encoder import TextEncoder

    optim = torch.optim.SGD(pl.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    encoder = TextEncoder(model, "shared_prefix" if variant == "ours" else "naive")
    scale = model.logit_scale.exp()

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        if variant == "ours":
            with torch.no_grad():
                glob, local = model.encode_image(images, return_local=True)
        else:
            glob, local = encode_image_local_naive(model, images)
        text = F.normalize(encoder(pl), dim=-1)
        logits = scale * F.normalize(glob, dim=-1) @ text.t()
        logits_local = scale * F.normalize(local, dim=-1) @ text.t()
        loss, _, _ = locoop_loss(logits, logits_local, labels, s["lam"], s["topk"])
        optim.zero_grad()
        loss.backward()
        grad = pl.ctx.grad.detach().clone()
        optim.step()
        return loss.detach(), grad

    return step, encoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _memory_worker(variant: str, s: dict, out: str) -> None:
    """One step of ``variant`` alone in this process: its loss, gradient and peak memory."""
    import gc

    device = torch.device(s["device"])
    model, pl, images, labels = _setup(s)
    step, encoder = _make_step(variant, s, model, pl, images, labels)
    gc.collect()
    _trim_heap()
    rss_before = _proc_status_kb("VmRSS")
    reset_ok = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        alloc_before = torch.cuda.memory_allocated()
    loss0, grad0 = step()
    _sync(device)
    result = {"variant": variant, "text_mode": encoder.resolve_mode(pl), "text_tokens": _text_tokens(variant, pl)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result.update(memory="cuda max_memory_allocated during one step", peak_mb=peak / 2 ** 20,
                      peak_increase_mb=(peak - alloc_before) / 2 ** 20)
    else:
        hwm = _proc_status_kb("VmHWM")
        how = "after reset" if reset_ok else "process lifetime (reset not permitted)"
        result.update(memory=f"VmHWM = peak RSS during one step, {how}",
                      peak_mb=None if hwm is None else hwm / 1024,
                      peak_increase_mb=None if hwm is None or rss_before is None else (hwm - rss_before) / 1024)
    torch.save({"loss": loss0.float().cpu(), "grad": grad0.float().cpu()}, out + ".pt")
    with open(out, "w") as f:
        json.dump(result, f)


def _timing_worker(s: dict, out: str) -> None:
    """Both variants in one process, steps interleaved, so load changes of a shared machine hit both alike."""
    device = torch.device(s["device"])
    model, pl, images, labels = _setup(s)
    pl_naive = copy.deepcopy(pl)
    steps = {"ours": _make_step("ours", s, model, pl, images, labels)[0],
             "naive": _make_step("naive", s, model, pl_naive, images, labels)[0]}
    times: dict[str, list] = {"ours": [], "naive": [], "ours_cpu": [], "naive_cpu": []}
    for i in range(s["repeats"] + 1):  # round 0 is the warm-up
        for name in ("naive", "ours"):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            _sync(device)
            if i:
                times[name].append(time.perf_counter() - t0)
                times[name + "_cpu"].append(time.process_time() - c0)
    with open(out, "w") as f:
        json.dump(times, f)


def _text_tokens(variant: str, pl) -> int:
    """Token rows per text-tower layer: full 77 per prompt (naive) or prefix + packed suffixes (ours)."""
    if variant == "naive":
        return int(pl.n_cls * pl.tokenized_prompts.shape[1])
    p = 1 + pl.n_ctx
    return int(p + (pl.eot_idx - p + 1).sum())


def _subprocess(args: list, what: str) -> None:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())] + args, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"the {what} run failed (exit code {proc.returncode})")


def run(settings: dict) -> dict:
    """Run the memory/equality subprocess of each variant, then the interleaved timing subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        mem = {}
        for variant in ("naive", "ours"):
            out = os.path.join(tmp, f"{variant}.json")
            _subprocess(["--worker", variant, "--settings", json.dumps(settings), "--out", out], variant)
            with open(out) as f:
                mem[variant] = json.load(f)
            mem[variant]["tensors"] = torch.load(out + ".pt", weights_only=True)
        out = os.path.join(tmp, "timing.json")
        _subprocess(["--worker", "timing", "--settings", json.dumps(settings), "--out", out], "timing")
        with open(out) as f:
            times = json.load(f)
    ours, naive = mem["ours"], mem["naive"]
    loss_diff = (ours["tensors"]["loss"] - naive["tensors"]["loss"]).abs().item()
    grad_diff = (ours["tensors"]["grad"] - naive["tensors"]["grad"]).abs().max().item()
    ours_s, naive_s = statistics.median(times["ours"]), statistics.median(times["naive"])
    result = {
        "name": f"LoCoOp train step ({settings['model']}, {settings['classes']} classes, batch {settings['batch']})",
        "ratio": naive_s / ours_s,
        "target": TARGET,
        "max_abs_diff": max(loss_diff, grad_diff),
        "loss_abs_diff": loss_diff,
        "grad_abs_diff": grad_diff,
        "grad_max_abs": naive["tensors"]["grad"].abs().max().item(),
        "loss": naive["tensors"]["loss"].item(),
        "ours_s": ours_s,
        "naive_s": naive_s,
        "ours_steps_s": times["ours"],
        "naive_steps_s": times["naive"],
        "step_ratios": [n / o for n, o in zip(times["naive"], times["ours"])],
        # CPU seconds used by the process per step: less sensitive to other users of a shared machine.
        "cpu_ratio": statistics.median(times["naive_cpu"]) / statistics.median(times["ours_cpu"]),
        "ours_cpu_s": statistics.median(times["ours_cpu"]),
        "naive_cpu_s": statistics.median(times["naive_cpu"]),
        "memory": ours["memory"],
        "ours_peak_mb": ours["peak_mb"],
        "naive_peak_mb": naive["peak_mb"],
        "ours_peak_increase_mb": ours["peak_increase_mb"],
        "naive_peak_increase_mb": naive["peak_increase_mb"],
        "ours_text_tokens": ours["text_tokens"],
        "naive_text_tokens": naive["text_tokens"],
        "ours_text_mode": ours["text_mode"],
    }
    return {"results": [result], "settings": {**settings, "torch": torch.__version__}}


def print_table(report: dict) -> None:
    s = report["settings"]
    print(f"settings: {s['model']} random weights, {s['classes']} classes, batch {s['batch']}, N_CTX {s['n_ctx']}, "
          f"{s['dtype']}, device {s['device']}, {s['threads']} threads, median of {s['repeats']} steps after 1 warm-up; "
          f"load average before/after {s.get('loadavg_1min_before_after')} on {s.get('cpu_count')} CPUs")
    for r in report["results"]:
        def mb(x):
            return "-" if x is None else f"{x:,.0f} MB"
        print(f"\n{r['name']}")
        print(f"{'':<8} {'step':>9} {'peak memory':>14} {'increase':>12} {'text rows/layer':>16}")
        print(f"{'naive':<8} {r['naive_s']:>8.2f}s {mb(r['naive_peak_mb']):>14} {mb(r['naive_peak_increase_mb']):>12} "
              f"{r['naive_text_tokens']:>16,}")
        print(f"{'ours':<8} {r['ours_s']:>8.2f}s {mb(r['ours_peak_mb']):>14} {mb(r['ours_peak_increase_mb']):>12} "
              f"{r['ours_text_tokens']:>16,}")
        print(f"process CPU time per step: naive {r['naive_cpu_s']:.2f}s, ours {r['ours_cpu_s']:.2f}s "
              f"(ratio {r['cpu_ratio']:.2f}x); per-round wall ratios "
              + ", ".join(f"{x:.2f}x" for x in r["step_ratios"]))
        ok = r["ratio"] >= r["target"]
        print(f"ratio {r['ratio']:.2f}x (target {r['target']:.1f}x: {'met' if ok else 'NOT met'}); "
              f"|loss diff| {r['loss_abs_diff']:.2e} (loss {r['loss']:.4f}); "
              f"max |grad diff| {r['grad_abs_diff']:.2e} (max |grad| {r['grad_max_abs']:.2e}); memory: {r['memory']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B/16", help="architecture shape (OpenAI model name)")
    p.add_argument("--classes", type=int, default=100, help="number of classes (prompts); >= 100 for the figure")
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights (fp16 needs CUDA)")
    p.add_argument("--lam", type=float, default=0.25, help="LoCoOp lambda")
    p.add_argument("--topk", type=int, default=200, help="LoCoOp top-K")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=("ours", "naive", "timing"), help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "timing":
        _timing_worker(json.loads(args.settings), args.out)
        return 0
    if args.worker:
        _memory_worker(args.worker, json.loads(args.settings), args.out)
        return 0
    if args.classes < 1 or args.batch < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--classes, --batch, --repeats and --threads must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but CUDA is not available here")
    if args.dtype == "fp16" and not args.device.startswith("cuda"):
        p.error("--dtype fp16 needs a CUDA device")
    settings = {"model": args.model, "classes": args.classes, "batch": args.batch, "n_ctx": args.n_ctx,
                "repeats": args.repeats, "threads": args.threads, "device": args.device, "dtype": args.dtype,
                "lam": args.lam, "topk": args.topk}
    print(f"Benchmarking: {json.dumps(settings)}", flush=True)
    load_before = _loadavg()
    report = run(settings)
    # Other processes on a shared CPU slow small multi-threaded ops most (threads wait for each other).
    report["settings"]["loadavg_1min_before_after"] = [load_before, _loadavg()]
    report["settings"]["cpu_count"] = os.cpu_count()
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

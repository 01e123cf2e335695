#!/usr/bin/env python
"""Benchmark the bootstrap intervals: vectorised replicates vs a loop over the metric functions.

Scores of ImageNet's size (50,000 ID, 10,000 OOD by default, continuous, so every score is a
threshold), ``--resamples`` replicates (1000) of every metric of both conventions (fpr95, auroc,
aupr, fpr95_openood, auroc_openood, aupr_in, aupr_out). The loop (what a straightforward
implementation does: draw, call ``locoop.ood.metrics.ood_metrics(..., include_openood=True)``) is
timed on ``--loop-resamples`` replicates and scaled to the full count; both use the same draws,
and the first ``--loop-resamples`` replicates are compared (FPRs identical, areas to 1e-12). Run
twice: for the papers' three metrics and for all seven. Times are CPU seconds (``process_time``;
wall time is printed too) because the development machines are shared.

    python tools/bench_bootstrap.py [--id 50000 --ood 10000 --resamples 1000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from locoop.ood.bootstrap import MCM_METRICS, METRICS, bootstrap_metrics  # noqa: E402
from locoop.ood.metrics import ood_metrics  # noqa: E402


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def run(n_id: int, n_ood: int, resamples: int, loop_resamples: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(123)
    id_s, ood_s = rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)
    rows = []
    for metrics, openood in ((MCM_METRICS, False), (METRICS, True)):
        res, wall, cpu = _timed(lambda: bootstrap_metrics(id_s, {"OOD": ood_s}, resamples, seed, metrics=metrics,
                                                          keep_samples=True))

        def loop():
            draw = np.random.default_rng(seed)
            vals = {m: [] for m in metrics}
            for _ in range(loop_resamples):
                ii, oo = draw.integers(0, n_id, n_id), draw.integers(0, n_ood, n_ood)
                for m, v in ood_metrics(id_s[ii], ood_s[oo], include_openood=openood).items():
                    vals[m].append(v)
            return vals

        vals, lwall, lcpu = _timed(loop)
        scale = resamples / loop_resamples
        worst = {m: float(np.max(np.abs(res["samples"]["OOD"][m][:loop_resamples] - np.array(vals[m]))))
                 for m in metrics}
        rows.append({"benchmark": "bootstrap", "metrics": list(metrics), "n_id": n_id, "n_ood": n_ood,
                     "resamples": resamples, "vectorised_wall_s": wall, "vectorised_cpu_s": cpu,
                     "loop_wall_s_estimated": lwall * scale, "loop_cpu_s_estimated": lcpu * scale,
                     "loop_resamples_timed": loop_resamples, "ratio": (lcpu * scale) / cpu, "max_abs_diff": worst})
    return {"results": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--id", type=int, default=50000, help="ID scores")
    p.add_argument("--ood", type=int, default=10000, help="OOD scores")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--loop-resamples", type=int, default=20, help="replicates the loop is timed on")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    report = run(args.id, args.ood, args.resamples, args.loop_resamples)
    for r in report["results"]:
        print(f"bootstrap, {r['resamples']} replicates of {r['n_id']:,} ID + {r['n_ood']:,} OOD scores, metrics "
              f"{', '.join(r['metrics'])}")
        print(f"  vectorised: {r['vectorised_cpu_s']:.2f} s CPU ({r['vectorised_wall_s']:.2f} s wall)   loop "
              f"(scaled from {r['loop_resamples_timed']}): {r['loop_cpu_s_estimated']:.1f} s CPU   "
              f"ratio {r['ratio']:.1f}x")
        print("  max |difference| on the compared replicates: "
              + ", ".join(f"{m} {v:.1e}" for m, v in r["max_abs_diff"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

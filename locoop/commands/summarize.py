"""``python -m locoop summarize RUN_DIR [RUN_DIR ...] [--glob PATTERN] [--output DIR] [--paper ROW]
[--paper-file FILE] [--bootstrap N] [--bootstrap-seed S] [--confidence C]``.

Averages several runs' ``ood_results.json`` (mean and population std by default) and
writes ``summary.md`` / ``summary.json``; prints the tables. Bootstrap confidence intervals (N = 1000
replicates, from each run's ``ood_scores.npz``) are added: over images, and over seeds when there are
several runs; ``--bootstrap 0`` skips them. ``--paper ROW`` puts the runs' mean next to a published
result (``locoop/data/paper_results.json``) with the difference, in the printed table and in both
files; ``--paper list`` lists the rows. ``--paper-file FILE`` takes the rows from a file of the same
format instead (a table typed in from a paper), checked before any run is read.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the summarize command's arguments."""
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="run folders containing ood_results.json (or the JSON files)")
    parser.add_argument("--glob", dest="pattern", default=None, metavar="PATTERN",
                        help="glob for more runs, e.g. 'output/**/seed*/ood_results.json' (quote it)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="where summary.md / summary.json go (default: the runs' common parent folder)")
    parser.add_argument("--sample-std", action="store_true",
                        help="sample standard deviation (ddof=1) instead of population (ddof=0)")
    parser.add_argument("--paper", default=None, metavar="ROW",
                        help="compare with a published result row, e.g. setar-gl-imagenet ('list' lists them)")
    parser.add_argument("--paper-file", default=None, metavar="FILE",
                        help="take --paper's rows from FILE (the format of locoop/data/paper_results.json) "
                             "instead of the shipped ones")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="replicates of the bootstrap confidence intervals from each run's ood_scores.npz "
                             "(over images, and over seeds with several runs); 0 = none (default 1000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, metavar="S",
                        help="seed of the bootstrap (numpy.random.default_rng; default 0), recorded in the summary")
    parser.add_argument("--confidence", type=float, default=0.95, metavar="C",
                        help="coverage of the intervals (default 0.95)")


def run(args: argparse.Namespace) -> int:
    """Summarise the runs; returns 0, or 2 with a message on bad input."""
    from locoop.ood.summarize import (find_result_files, format_paper_list, get_paper_row, format_summary_table,
                                      list_paper_rows, summarize_runs)

    paper, paper_file = getattr(args, "paper", None), getattr(args, "paper_file", None)
    try:
        if paper_file is not None and not paper:
            raise ValueError(f"--paper-file {paper_file} needs --paper ROW (or --paper list) to say which row")
        if paper == "list":
            print(format_paper_list(list_paper_rows(paper_file)))
            return 0
        if paper:
            get_paper_row(paper, paper_file)  # a bad file or an unknown row fails before any run is read
        files = find_result_files(args.runs, args.pattern)
        if not files:
            print("summarize: give RUN_DIR arguments or --glob PATTERN", file=sys.stderr)
            return 2
        output = args.output
        if output is None:
            # Run folders are typically .../seed1, .../seed2: the summary goes next to them.
            output = os.path.commonpath([str(f.resolve().parent.parent) for f in files])
        if args.bootstrap >= 2:
            print(f"Bootstrap intervals: {args.bootstrap} replicates per run and score (--bootstrap 0 skips them)",
                  file=sys.stderr, flush=True)
        summary = summarize_runs(files, output_dir=Path(output), ddof=1 if args.sample_std else 0, paper=paper,
                                 bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
                                 confidence=args.confidence, paper_file=paper_file)
    except (OSError, ValueError) as e:
        print(f"summarize: {e}", file=sys.stderr)
        return 2
    print(format_summary_table(summary))
    print(f"\nwrote {summary['files']['md']}\nwrote {summary['files']['json']}")
    return 0

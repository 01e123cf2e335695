"""Command-line entry point: ``python -m locoop <command> [args]``.

Each command lives in its own module under :mod:`locoop.commands` exposing
``add_arguments(parser)`` and ``run(args) -> int | None``. Modules are imported only
when their command is chosen, so ``--help`` stays fast and a command's heavy imports
never slow the others.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import List, Optional, Sequence

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("locoop.commands.train", "Train a prompt learner (LoCoOp, CoOp) with the papers' train.py flags"),
    "eval": ("locoop.commands.eval", "OOD benchmark (MCM, GL-MCM, ...) of a trained or zero-shot model"),
    "visualize": ("locoop.commands.visualize", "Shade the regions LoCoOp treats as OOD in one image"),
    "demo": ("locoop.commands.demo", "Smoke demo on generated data with a tiny CLIP: train -> eval -> visualise"),
    "setar-search": ("locoop.commands.setar_search", "SeTAR: training-free low-rank search, then the OOD benchmark"),
    "setar-finetune": ("locoop.commands.setar_finetune", "SeTAR+FT / LoRA fine-tuning with the LoCoOp loss, then the OOD benchmark"),
    "extract": ("locoop.commands.extract", "Cache the image features of the ID/OOD sets (fast re-evaluation)"),
    "summarize": ("locoop.commands.summarize", "Average several seeds' ood_results.json (mean and std)"),
    "check-data": ("locoop.commands.check_data", "Check a dataset folder layout and report what to fix"),
    "run-settings": ("locoop.commands.run_settings", "What a training run folder was trained with (N_CTX, CSC, epochs, ...)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m locoop",
        description="CLIP-based few-shot and training-free OOD detection (LoCoOp, MCM, GL-MCM, SeTAR).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


# A trailing config override's key: dotted upper-case names (OPTIM.LR, TRAINER.LOCOOP.TOPK).
_CFG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def _flag_values(action: argparse.Action, tokens: Sequence[str], known: set) -> int:
    """How many of ``tokens`` (following the flag of ``action``) are its values."""
    nargs = action.nargs
    if nargs is None:
        return min(1, len(tokens))
    if isinstance(nargs, int):
        return min(nargs, len(tokens))
    if nargs == "?":
        return 1 if tokens and not tokens[0].startswith("--") and not _CFG_KEY.match(tokens[0]) else 0
    n = 0  # "+" / "*": up to the next flag or config key
    while n < len(tokens) and tokens[n] not in known and not _CFG_KEY.match(tokens[n]):
        n += 1
    return n


def parse_command_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command's arguments with flags accepted anywhere, also after ``KEY VALUE`` overrides.

    Left to argparse, everything after the first override goes to ``opts`` (``REMAINDER``), flags
    included, and a list-valued flag (``extract --datasets``) swallows the overrides after it. So
    the command line is sorted first, with the parser's own flag table: each flag takes its values
    (a list flag stops at the next flag or config key), everything else is an override, and an
    unknown ``--flag`` is refused with the command's flags listed. argparse then parses
    ``flags + overrides`` (types, choices and required flags are still its checks).
    """
    argv = list(argv)
    if not any(a.dest == "opts" and not a.option_strings for a in parser._actions):
        return parser.parse_args(argv)
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    known = set(by_flag)
    flags: List[str] = []
    opts: List[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if name in by_flag:
            n = 0 if "=" in tok else _flag_values(by_flag[name], argv[i + 1:], known)
            flags += argv[i:i + 1 + n]
            i += 1 + n
        elif tok == "--":  # `... -- KEY VALUE`: the separator is accepted and dropped
            i += 1
        elif tok.startswith("--"):
            parser.error(f"unknown flag {tok}; this command's flags are: "
                         + ", ".join(sorted(s for s in known if s.startswith("--"))))
        else:
            opts.append(tok)
            i += 1
    return parser.parse_args(flags + opts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere (also among the trailing KEY VALUE overrides), for every command.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # Parse the command name first, then let the command module add its own arguments.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or a "invalid choice" error listing valid commands
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"python -m locoop {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    try:
        args = parse_command_args(cmd_parser, argv[1:])
    except SystemExit as e:  # argparse's usage error (already printed) or --help: its status, as a return value
        return int(e.code or 0)
    args.debug = debug
    rc = module.run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Command-line entry point: ``python -m locoop <command> [args]``.

Each command lives in its own module under :mod:`locoop.commands` exposing
``add_arguments(parser)`` and ``run(args) -> int | None``. Modules are imported only
when their command is chosen, so ``--help`` stays fast and a command's heavy imports
never slow the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

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


def _late_flag(parser: argparse.ArgumentParser, opts: Sequence[str]) -> Optional[str]:
    """The first token of the trailing ``KEY VALUE`` overrides that is one of the command's flags."""
    known = set(parser._option_string_actions)  # noqa: SLF001  (argparse has no public listing)
    for tok in opts:
        if tok.split("=", 1)[0] in known:
            return tok
    return None


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
    args = cmd_parser.parse_args(argv[1:])
    args.debug = debug
    late = _late_flag(cmd_parser, getattr(args, "opts", None) or [])
    if late is not None:
        # argparse would hand it to the config as a key; say so instead of a confusing config error.
        print(f"python -m locoop {name}: error: {late.split('=', 1)[0]} comes after the trailing KEY VALUE config "
              f"overrides, where it would be read as a config key; put the flags first, then the KEY VALUE pairs",
              file=sys.stderr)
        return 2
    rc = module.run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Console + ``log.txt`` logging (Dassl's stdout tee) and the meters of the training line."""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from typing import Any, Optional, TextIO

__all__ = ["Logger", "setup_logger", "close_logger", "silence_stdout", "AverageMeter", "MetricMeter"]


class Logger:
    """A stdout replacement writing to the console and to a file (appending)."""

    def __init__(self, fpath: str, console: TextIO):
        self.console = console
        self.fpath = fpath
        os.makedirs(os.path.dirname(os.path.abspath(fpath)), exist_ok=True)
        self.file = open(fpath, "a", encoding="utf-8")

    def write(self, msg: str) -> int:
        self.console.write(msg)
        if self.file is not None and not self.file.closed:
            self.file.write(msg)
            if "\n" in msg:  # whole lines reach the OS at once, so a killed run keeps its log
                self.file.flush()
        return len(msg)

    def flush(self) -> None:
        self.console.flush()
        if self.file is not None and not self.file.closed:
            self.file.flush()

    def isatty(self) -> bool:
        return getattr(self.console, "isatty", lambda: False)()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.console, "encoding", "utf-8")

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()


def setup_logger(output: Optional[str]) -> Optional[Logger]:
    """Tee ``sys.stdout`` into ``output/log.txt`` (or into ``output`` if it ends in .txt/.log).

    A resumed run appends to the same file. Calling it again switches to the new file.

    Under torchrun only rank 0 writes ``log.txt``; the other ranks' stdout is silenced.

    Returns:
        The installed :class:`Logger`, or None when ``output`` is empty or this is not rank 0.
    """
    if not output:
        return None
    from .dist import is_main_process

    if not is_main_process():
        silence_stdout()
        return None
    fpath = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
    current = sys.stdout
    console = current.console if isinstance(current, Logger) else current
    if isinstance(current, Logger):
        if os.path.abspath(current.fpath) == os.path.abspath(fpath):
            return current
        current.close()
    logger = Logger(fpath, console)
    sys.stdout = logger
    print(f"\n===== log opened {time.strftime('%Y-%m-%d %H:%M:%S')} =====")
    return logger


class _SilentLogger(Logger):
    """Stdout of non-zero ranks: prints nothing; ``console`` keeps the real stdout for :func:`close_logger`."""

    def __init__(self, console: TextIO):
        self.console = console
        self.fpath = os.devnull
        self.file = None

    def write(self, msg: str) -> int:
        return len(msg)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def silence_stdout() -> None:
    """Discard everything printed to stdout from now on (undone by :func:`close_logger`)."""
    current = sys.stdout
    if isinstance(current, _SilentLogger):
        return
    console = current.console if isinstance(current, Logger) else current
    if isinstance(current, Logger):
        current.close()
    sys.stdout = _SilentLogger(console)


def close_logger() -> None:
    """Restore the original stdout and close ``log.txt``."""
    current = sys.stdout
    if isinstance(current, Logger):
        current.flush()
        sys.stdout = current.console
        current.close()


class AverageMeter:
    """Current value and running average."""

    def __init__(self, ema: bool = False, momentum: float = 0.1):
        self.ema = ema
        self.momentum = momentum
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: Any, n: int = 1) -> None:
        if hasattr(val, "item"):
            val = val.item()
        self.val = float(val)
        self.sum += self.val * n
        self.count += n
        if self.ema:
            self.avg = self.val if self.count == n else self.avg * (1 - self.momentum) + self.val * self.momentum
        else:
            self.avg = self.sum / self.count


class MetricMeter:
    """A group of :class:`AverageMeter` keyed by loss name; prints ``name val (avg)``."""

    def __init__(self, delimiter: str = " "):
        self.meters: dict[str, AverageMeter] = defaultdict(AverageMeter)
        self.delimiter = delimiter

    def update(self, input_dict: Optional[dict]) -> None:
        if input_dict is None:
            return
        if not isinstance(input_dict, dict):
            raise TypeError(f"forward_backward must return a dict of floats (e.g. {{'loss': 0.5}}), "
                            f"got {type(input_dict).__name__}.")
        for k, v in input_dict.items():
            self.meters[k].update(v)

    def __str__(self) -> str:
        return self.delimiter.join(f"{name} {m.val:.4f} ({m.avg:.4f})" for name, m in self.meters.items())

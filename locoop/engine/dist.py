"""torch.distributed set-up and collectives for runs launched by ``torchrun``.

Launch::

    torchrun --nproc_per_node 2 -m locoop train ...     # also eval, setar-search, setar-finetune

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` reads them and joins the process group (NCCL for CUDA devices, gloo for
the CPU; ``LOCOOP_DIST_BACKEND`` overrides). Without those variables it is a no-op, so a plain
``python -m locoop ...`` is the single-process default and every helper below degrades to the
identity (rank 0 of 1). The engine calls it lazily (trainer construction, the OOD runner), so
commands need no change.

Conventions used by the engine:

* Training: every rank holds a full copy of the trainable modules; gradients are averaged
  over ranks before each optimiser step (:func:`all_reduce_mean_`), initial weights are
  broadcast from rank 0 (:func:`broadcast_module_`). The global batch is
  ``DATALOADER.TRAIN_X.BATCH_SIZE * world size``.
* Evaluation: each rank takes a contiguous shard of the images (:func:`shard_indices`), results
  are gathered in rank order, which is the dataset order, so every image is scored exactly once.
* Only rank 0 prints, logs, shows progress bars and writes files (:func:`is_main_process`).
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_distributed", "get_rank", "get_world_size", "get_local_rank", "is_main_process",
           "barrier", "all_gather_object", "broadcast_object", "all_gather_tensor", "all_reduce_mean_",
           "broadcast_module_", "shard_indices", "env_world_size", "backend_for"]

Device = Union[str, torch.device]
_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when absent or unparsable)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def backend_for(device: Optional[Device]) -> str:
    """``LOCOOP_DIST_BACKEND`` if set, else ``nccl`` for a CUDA device and ``gloo`` otherwise."""
    env = os.environ.get("LOCOOP_DIST_BACKEND", "").strip()
    if env:
        return env
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


_FAILED = [False]  # set by the exception hook: an uncaught exception is ending this process


def _record_failure(hook):
    def excepthook(*args):
        _FAILED[0] = True
        hook(*args)
    return excepthook


def _destroy() -> None:
    """At exit: wait for the other ranks (normal exit only), then leave the process group.

    Tearing down while a peer still finishes its last collective can abort gloo's threads
    (SIGABRT, "terminate called without an active exception"); a process ending with an uncaught
    exception skips the wait, so it exits at once and torchrun stops the others.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if not _FAILED[0] and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=120), wait_all_ranks=True)
            else:
                barrier()
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at interpreter exit
        pass


def init_from_env(device: Optional[Device] = None, backend: Optional[str] = None,
                  timeout_s: Optional[float] = None) -> bool:
    """Join the process group described by torchrun's environment variables (idempotent).

    Args:
        device: the device this process computes on; picks the backend (see :func:`backend_for`)
            and, for CUDA, makes ``cuda:LOCAL_RANK`` the current device (NCCL needs it).
        backend: force a backend ("gloo", "nccl").
        timeout_s: collective timeout (default: torch's).

    Returns:
        True when running distributed (world size > 1) after the call, else False.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 but ``RANK``/``MASTER_ADDR``/``MASTER_PORT`` are missing
            (not started by torchrun), or a CUDA backend without CUDA.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    missing = [v for v in _ENV_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; launch with "
                         f"`torchrun --nproc_per_node N -m locoop ...` (or unset WORLD_SIZE for one process)")
    backend = backend or backend_for(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("the NCCL backend needs CUDA; run on GPUs, or use MODEL.DEVICE cpu (gloo) / "
                             "LOCOOP_DIST_BACKEND=gloo")
        torch.cuda.set_device(get_local_rank())
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    sys.excepthook = _record_failure(sys.excepthook)
    atexit.register(_destroy)
    if not is_main_process():
        # torchrun would otherwise show every line N times; errors still reach stderr.
        from .logger import silence_stdout

        silence_stdout()
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Rank in the process group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    """``LOCAL_RANK`` (the GPU index on this node; 0 when not set)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """Whether this process may print and write files: rank 0.

    Before the process group is initialised, torchrun's ``RANK`` variable decides, so code that
    runs early (log set-up) already keeps quiet on the other ranks.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order.

    Ranks may hold different numbers of rows (uneven shards): each is padded to the largest
    count for the collective, then cut back to its own length, so the result has exactly the
    sum of the rows. Other dimensions and the dtype must agree. The tensor must be on a device
    the backend supports (CUDA for NCCL, CPU for gloo).
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    bufs = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(bufs, padded)
    return torch.cat([b[:c] for b, c in zip(bufs, counts)])


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over ranks in place, in one collective (flattened bucket).

    All ranks must pass tensors of the same shapes in the same order.
    """
    tensors = list(tensors)
    if not tensors or not is_distributed():
        return
    # One collective per dtype: fewer, larger messages, as DDP's buckets.
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    world = dist.get_world_size()
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for t in group:
            k = t.numel()
            t.copy_(flat[offset:offset + k].view_as(t))
            offset += k


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (as DDP does at start)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data.is_contiguous():
            dist.broadcast(t.data, src=src)
        else:  # e.g. an expanded buffer: broadcast a packed copy
            buf = t.data.contiguous()
            dist.broadcast(buf, src=src)
            t.data.copy_(buf)


def shard_indices(n: int, rank: Optional[int] = None, world_size: Optional[int] = None,
                  mode: str = "contiguous", align: int = 1) -> range:
    """Indices of ``range(n)`` handled by ``rank`` of ``world_size`` (defaults: this process).

    ``contiguous``: the ``ceil(n / align)`` blocks of ``align`` indices are split into W runs
    whose sizes differ by at most one block; no padding, and concatenating the shards in rank
    order restores ``range(n)``. With ``align`` = the batch size every rank sees exactly the
    batches one process would, so batched results are bit-identical to a single process's.
    ``strided``: ``range(r, n, W)`` (``align`` ignored).

    Raises:
        ValueError: negative ``n``, rank out of range, ``align`` < 1, unknown mode.
    """
    rank = get_rank() if rank is None else int(rank)
    world_size = get_world_size() if world_size is None else int(world_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if int(align) < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if mode == "contiguous":
        align = int(align)
        blocks = -(-n // align)
        lo, hi = blocks * rank // world_size, blocks * (rank + 1) // world_size
        return range(min(n, lo * align), min(n, hi * align))
    if mode == "strided":
        return range(rank, n, world_size)
    raise ValueError(f"mode must be 'contiguous' or 'strided', got {mode!r}")

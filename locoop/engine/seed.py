"""Seeding and RNG-state capture for reproducible, resumable runs.

Determinism across a kill + resume rests on two things:

1. The global RNG states (Python ``random``, NumPy, torch CPU and CUDA) are saved in every epoch
   checkpoint (:func:`get_rng_states`) and restored on resume (:func:`set_rng_states`), so epoch
   ``e + 1`` draws the same random numbers (dropout, augmentation in the main process, default
   DataLoader shuffling, worker base seeds) as in an uninterrupted run.
2. A DataLoader given its own ``torch.Generator`` is re-seeded at the start of every epoch with
   :func:`epoch_seed` (seed, epoch) by the trainer, because such a generator lives outside the global
   state. Workers are seeded from their loader's base seed by :func:`seed_worker` (pass it as
   ``worker_init_fn``); do not use ``persistent_workers`` (their RNG state cannot be restored).
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

__all__ = ["set_random_seed", "seed_worker", "epoch_seed", "get_rng_states", "set_rng_states"]


def set_random_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices).

    Args:
        seed: Non-negative seed.
        deterministic: Also ask torch for deterministic algorithms (cuDNN benchmark off); slower.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (got {seed}); a negative SEED means 'do not seed', so skip this call.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls; set before CUDA work starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy and ``random`` from the worker's torch seed.

    torch seeds each worker with ``base_seed + worker_id`` (base seed drawn from the loader's
    generator, or the global RNG), but NumPy and ``random`` are not seeded, so augmentations using
    them would repeat across workers and runs without this.
    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of a loader's generator for one epoch; well apart across (seed, epoch) pairs.

    ``seed + epoch`` would make run seed 1 epoch 1 shuffle like run seed 2 epoch 0.
    """
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


def get_rng_states() -> dict[str, Any]:
    """Capture all global RNG states in ``torch.load(weights_only=True)``-safe types."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states captured by :func:`get_rng_states` (missing entries are left alone)."""
    if "python" in states:
        p = states["python"]
        random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:  # resumed on a different number of GPUs: restore what matches
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)

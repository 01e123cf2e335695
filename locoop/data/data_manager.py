"""Dataset construction and data loaders (Dassl's ``build_dataset``, ``build_data_loader``, ``DataManager``).

Loaders are deterministic for a seed: each epoch's order and every image's augmentation come from
a generator seeded with ``(cfg.SEED, epoch)`` (when the run is not seeded, the loader seed is drawn
from torch's global generator, so ``torch.manual_seed`` alone also fixes it). The same seed gives the
same batches with 0 or N workers, and a resumed run gets the same epochs after ``set_epoch``.

Distributed runs (torchrun, :mod:`locoop.engine.dist`): a training loader shards the data with a
``DistributedSampler`` (same permutation on every rank, seeded by the loader seed and the epoch;
each rank takes every W-th index), and :class:`DataManager`'s validation/test loaders read
contiguous shards whose outputs the trainer gathers.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from ..engine import dist
from ..engine.registry import DATASET_REGISTRY
from ..engine.seed import seed_worker
from .datum import DatasetBase, Datum
from .image_io import CorruptImageWarning, DatasetWrapper, collate_skipping, list_images
from .transforms import build_transform

# Dassl sampler names -> whether the loader shuffles.
_SAMPLERS = {"RandomSampler": True, "SequentialSampler": False}


def _mix(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, stream, epoch); distinct values give unrelated generators."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return int(np.random.SeedSequence([int(seed) % 2**63, int(stream), int(epoch)]).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1, 2**32])) % 2**63


class SeededSampler(Sampler):
    """Wraps an index sampler so it yields ``(index, per-sample seed)`` pairs, one epoch per pass.

    At the start of every pass the generator is reseeded from ``(base_seed, epoch)``; the order
    (for a random base sampler) and the per-sample seeds are then drawn from it. An epoch's
    batches and augmentations therefore depend only on the seed and the epoch number: not on the
    number of workers, on persistent workers, or on whether the run was resumed. Epochs count
    from 0; :meth:`set_epoch` sets the next one (as ``DistributedSampler.set_epoch``, and it is
    forwarded to a base sampler that has it).
    """

    def __init__(self, base: Sampler, generator: torch.Generator, base_seed: int) -> None:
        self.base = base
        self.generator = generator
        self.base_seed = int(base_seed)
        self._next_epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._next_epoch = int(epoch)

    def __iter__(self):
        epoch = self._next_epoch
        self._next_epoch += 1
        self.generator.manual_seed(_mix(self.base_seed, epoch))
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        seeds = torch.randint(0, 2**62, (len(self.base),), generator=self.generator, dtype=torch.int64).tolist()
        for i, idx in enumerate(self.base):
            yield int(idx), seeds[i]


class SkippingDataLoader(DataLoader):
    """A ``DataLoader`` that drops unreadable images, warns once per file and counts them.

    Batches come from :func:`~locoop.data.image_io.collate_skipping`; the bookkeeping happens
    here in the main process, so the count is complete with any number of workers. A batch
    whose every image was unreadable is not yielded.

    Built by :func:`build_data_loader` with a :class:`SeededSampler`, so every pass is one
    epoch seeded from ``(base_seed, epoch)``; :meth:`set_epoch` (or ``loader.sampler.set_epoch``)
    sets the next epoch, e.g. when resuming.

    Attributes:
        skipped: image path -> reason, for every unreadable image met so far.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: dict = {}

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def base_seed(self) -> Optional[int]:
        return getattr(self.sampler, "base_seed", None)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``."""
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for batch in super().__iter__():
            for path, reason in zip(batch["skipped"], batch["skip_reasons"]):
                if path not in self.skipped:
                    warnings.warn(f"skipped unreadable image {path} ({reason})", CorruptImageWarning, stacklevel=2)
                self.skipped[path] = reason
            if batch["img"] is None:
                continue
            yield batch


_WORKER_NOTE_SHOWN = False


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one; what torch's loader checks)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def cap_num_workers(num_workers: int) -> int:
    """``DATALOADER.NUM_WORKERS`` capped to the CPUs available, with one note per process.

    Workers only decode and transform images (every random draw comes from per-sample seeds), so
    the cap changes no number; it avoids torch's warning on every loader and oversubscribed cores.
    ``config.yaml`` keeps the requested value.
    """
    global _WORKER_NOTE_SHOWN
    num_workers = int(num_workers)
    cpus = available_cpus()
    if num_workers <= cpus:
        return num_workers
    if not _WORKER_NOTE_SHOWN and dist.is_main_process():
        print(f"Note: DATALOADER.NUM_WORKERS {num_workers} > the {cpus} CPU(s) available; using {cpus} "
              "worker(s) per loader (results do not depend on the worker count)")
        _WORKER_NOTE_SHOWN = True
    return cpus


def build_data_loader(
    data_source: Sequence[Datum],
    batch_size: int,
    tfm: Optional[Callable],
    is_train: bool,
    num_workers: int = 0,
    drop_last: Optional[bool] = None,
    sampler: Optional[Sampler] = None,
    seed: Optional[int] = None,
    strict: bool = False,
    shuffle: Optional[bool] = None,
) -> SkippingDataLoader:
    """A loader of Dassl-style batch dicts over ``data_source``.

    Args:
        data_source: the items.
        batch_size: images per batch.
        tfm: transform applied to each RGB PIL image.
        is_train: training loader (shuffled, drops the last incomplete batch when the data
            holds at least one full batch, as Dassl) or evaluation loader (ordered, keeps all).
        num_workers: worker processes (``persistent_workers`` when > 0), capped to the CPUs
            available (:func:`cap_num_workers`).
        drop_last: override the default above.
        sampler: an explicit index sampler (e.g. ``DistributedSampler(data_source)``); replaces
            ``shuffle``. Its ``set_epoch`` is called at every epoch. In a distributed run a
            training loader without one gets a ``DistributedSampler`` (this rank's share of each
            epoch, ``shuffle`` as above, padded by repetition to equal shares).
        seed: the loader seed (order and augmentations of every epoch); ``None`` draws it from
            torch's global generator.
        strict: raise on an unreadable image instead of skipping it.
        shuffle: override the default (``is_train``).

    Raises:
        ValueError: empty ``data_source`` or a non-positive batch size.
    """
    if len(data_source) == 0:
        raise ValueError("cannot build a data loader over an empty list of images")
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if shuffle is None:
        shuffle = bool(is_train)
    auto_drop_last = drop_last is None
    if drop_last is None:
        drop_last = bool(is_train) and len(data_source) >= batch_size
    if seed is None or seed < 0:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    sampler_generator = torch.Generator()
    sample_seed = seed
    if sampler is None and is_train and dist.is_distributed():
        seed = int(dist.broadcast_object(seed))  # one permutation for all ranks, also when unseeded
        sampler = DistributedSampler(range(len(data_source)), num_replicas=dist.get_world_size(),
                                     rank=dist.get_rank(), shuffle=bool(shuffle), seed=_mix(seed, 0, stream=2))
        # Per-sample augmentation seeds are drawn by position: a rank-specific stream keeps the
        # ranks' augmentations independent.
        sample_seed = _mix(seed, dist.get_rank(), stream=3)
        if auto_drop_last:
            drop_last = len(sampler) >= batch_size  # this rank's share decides, as the data size does above
    if sampler is None:
        sampler = (RandomSampler(range(len(data_source)), generator=sampler_generator) if shuffle
                   else SequentialSampler(range(len(data_source))))
    # The loader's own generator only seeds the workers' global generators (Python/NumPy via
    # seed_worker); every random choice of ours comes from the per-sample seeds.
    loader_generator = torch.Generator()
    loader_generator.manual_seed(_mix(seed, 0, stream=1))
    num_workers = cap_num_workers(num_workers)
    return SkippingDataLoader(
        DatasetWrapper(data_source, tfm, strict=strict),
        batch_size=int(batch_size),
        sampler=SeededSampler(sampler, sampler_generator, sample_seed),
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        collate_fn=collate_skipping,
        worker_init_fn=seed_worker,
        generator=loader_generator,
    )


def build_eval_loader(cfg, items: Sequence[Datum], tfm: Optional[Callable], indices: Optional[Sequence[int]] = None,
                      shuffle: bool = False, seed: Optional[int] = 0) -> SkippingDataLoader:
    """The evaluation loader of ``items``: every consumer of test or validation images uses this one.

    Args:
        cfg: ``DATALOADER.TEST.BATCH_SIZE``, ``DATALOADER.NUM_WORKERS``, ``DATASET.STRICT``.
        items: the images, in order.
        tfm: the test transform.
        indices: restrict to these positions (a rank's shard, or a cache part), in order.
        shuffle: ``DATALOADER.TEST.SAMPLER RandomSampler`` (the trainers' loaders honour it).
        seed: the loader seed (test transforms draw nothing; it seeds the workers).
    """
    return build_data_loader(items, int(cfg.DATALOADER.TEST.BATCH_SIZE), tfm, is_train=False,
                             num_workers=int(cfg.DATALOADER.NUM_WORKERS), seed=seed,
                             strict=bool(cfg.DATASET.STRICT), shuffle=shuffle, sampler=indices)


def list_datasets() -> list:
    """Names of the registered datasets (importing the built-in ones)."""
    from . import datasets  # noqa: F401  (registers the built-in datasets)

    return DATASET_REGISTRY.registered_names()


def get_dataset_class(name: str) -> type:
    """The dataset class registered as ``name``.

    Raises:
        RegistryError (a KeyError and a ValueError): unknown name, naming the closest and all datasets.
    """
    from . import datasets  # noqa: F401

    return DATASET_REGISTRY.get(name)


def check_every_class_has_images(dataset: DatasetBase, cfg: Any = None) -> None:
    """Refuse a training split in which a class has no image (training would silently drop it).

    Args:
        dataset: the dataset, its ``train_x`` built; ``class_keys`` and ``train_dir`` name the folder
            when the dataset has them.
        cfg: the run config (for the few-shot count in the message); optional.

    Raises:
        FileNotFoundError: the classes without a training image, with their folders and the fix.
    """
    have = {int(d.label) for d in dataset.train_x}
    missing = [i for i in range(int(dataset.num_classes)) if i not in have]
    if not missing:
        return
    keys = list(getattr(dataset, "class_keys", None) or [])
    train_dir = getattr(dataset, "train_dir", None)
    names = list(dataset.classnames)

    def where(i: int) -> str:
        name = names[i] if i < len(names) else str(i)
        if i < len(keys):
            folder = os.path.join(train_dir, keys[i]) if train_dir else keys[i]
            return f"{name!r} (label {i}, folder {folder})"
        return f"{name!r} (label {i})"

    shown = ", ".join(where(i) for i in missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
    split = getattr(dataset, "split_file", None)
    if split:
        # A few-shot split is drawn from the images found and then cached: one drawn while a folder was
        # empty never holds that class, however many images the folder gets later.
        def has_images(i: int) -> bool:
            if not (train_dir and i < len(keys)) or not os.path.isdir(os.path.join(train_dir, keys[i])):
                return False
            return bool(list_images(os.path.join(train_dir, keys[i])))

        if all(has_images(i) for i in missing):
            raise FileNotFoundError(
                f"the few-shot split {split} has no image of {len(missing)} of {dataset.num_classes} classes: "
                f"{shown}, though their folders hold images now (it was drawn while they were empty); delete "
                f"{split} so that the next run draws it again")
        redraw = f"; then delete the few-shot split {split}, drawn without them, so that it is drawn again"
    else:
        redraw = ""
    raise FileNotFoundError(
        f"{len(missing)} of {dataset.num_classes} classes have no training images: {shown}; training would "
        f"silently ignore them. Put images into the folder (or remove the class from the class names){redraw}, "
        f"then check with `python -m locoop check-data`")


def build_dataset(cfg, need_train: Optional[bool] = None) -> DatasetBase:
    """Instantiate the dataset named by ``cfg.DATASET.NAME`` from ``DATASET_REGISTRY``.

    Args:
        cfg: the config.
        need_train: passed to the dataset when given (``False``: evaluation only, the training
            folder is neither required nor read).

    Raises:
        ValueError: empty ``DATASET.NAME``; RegistryError: unknown name (lists the registered ones).
    """
    name = cfg.DATASET.NAME
    if not name:
        raise ValueError(f"DATASET.NAME is empty; set it to one of {list_datasets()} "
                         "(e.g. with --dataset-config-file configs/datasets/imagenet.yaml)")
    cls = get_dataset_class(name)
    if getattr(cfg, "VERBOSE", True):
        print(f"Loading dataset: {name}")
    return cls(cfg) if need_train is None else cls(cfg, need_train=need_train)


def _sampler_shuffles(name: str, key: str) -> bool:
    if name not in _SAMPLERS:
        raise ValueError(f"{key}={name!r} is not supported; choose one of {list(_SAMPLERS)}")
    return _SAMPLERS[name]


class DataManager:
    """Builds the dataset, transforms and loaders from the config (Dassl's ``DataManager``).

    Args:
        cfg: the config.
        dataset: a ready dataset (default: :func:`build_dataset`).
        custom_tfm_train / custom_tfm_test: transforms replacing the ones built from the config.
        need_train: see :func:`build_dataset`.
        verbose: print the dataset summary.

    Attributes:
        dataset, train_loader_x (None without training items), train_loader_u (always None),
        val_loader (None without validation items), test_loader, tfm_train, tfm_test,
        num_classes, lab2cname, classnames, num_source_domains.
    """

    def __init__(self, cfg, dataset: Optional[DatasetBase] = None, custom_tfm_train: Optional[Callable] = None,
                 custom_tfm_test: Optional[Callable] = None, *, need_train: Optional[bool] = None,
                 verbose: bool = True) -> None:
        shuffle_train = _sampler_shuffles(cfg.DATALOADER.TRAIN_X.SAMPLER, "DATALOADER.TRAIN_X.SAMPLER")
        shuffle_test = _sampler_shuffles(cfg.DATALOADER.TEST.SAMPLER, "DATALOADER.TEST.SAMPLER")
        self.tfm_train = custom_tfm_train if custom_tfm_train is not None else build_transform(cfg, is_train=True)
        self.tfm_test = custom_tfm_test if custom_tfm_test is not None else build_transform(cfg, is_train=False)
        if dataset is None:
            dataset = build_dataset(cfg, need_train=need_train)
        self.dataset = dataset
        seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else None
        workers = int(cfg.DATALOADER.NUM_WORKERS)
        strict = bool(cfg.DATASET.STRICT)
        test_bs = int(cfg.DATALOADER.TEST.BATCH_SIZE)

        def eval_loader(items):
            if not items:
                return None
            # Distributed: a contiguous shard per rank; SimpleTrainer.test gathers the outputs in order.
            shard = dist.shard_indices(len(items), align=test_bs) if dist.is_distributed() else None
            return build_eval_loader(cfg, items, self.tfm_test, shard, shuffle=shuffle_test, seed=seed)

        self.train_loader_x = None
        if dataset.train_x:
            self.train_loader_x = build_data_loader(
                dataset.train_x, int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE), self.tfm_train, is_train=True,
                num_workers=workers, seed=seed, strict=strict, shuffle=shuffle_train)
        self.train_loader_u = None
        self.val_loader = eval_loader(dataset.val)
        self.test_loader = eval_loader(dataset.test)
        self.num_source_domains = 1
        if verbose:
            self.show_dataset_summary()

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def lab2cname(self) -> dict:
        return self.dataset.lab2cname

    @property
    def classnames(self) -> list:
        return self.dataset.classnames

    @property
    def skipped(self) -> dict:
        """Unreadable images skipped so far by any of the loaders (path -> reason)."""
        out: dict = {}
        for loader in (self.train_loader_x, self.val_loader, self.test_loader):
            if loader is not None:
                out.update(loader.skipped)
        return out

    def summary_rows(self) -> list:
        """(field, value) rows of the dataset summary."""
        ds = self.dataset
        rows = [("Dataset", type(ds).__name__), ("# classes", f"{ds.num_classes:,}"),
                ("# train_x", f"{len(ds.train_x):,}"), ("# val", f"{len(ds.val):,}"),
                ("# test", f"{len(ds.test):,}")]
        if getattr(ds, "classnames_file", None):
            rows.append(("Class names", f"{ds.classnames_file} (sha256 {str(ds.classnames_hash)[:12]})"))
        if getattr(ds, "split_file", None):
            rows.append(("Few-shot split", f"{ds.split_file} (sha256 {str(ds.split_hash)[:12]})"))
        if getattr(ds, "val_split_file", None):
            rows.append(("Val split", f"{ds.val_split_file} (sha256 {str(ds.val_split_hash)[:12]})"))
        return rows

    def show_dataset_summary(self) -> None:
        """Print the summary table."""
        rows = self.summary_rows()
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 2 + max(len(v) for _, v in rows))
        print(line)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print(line)

"""Trainer base classes with Dassl's structure: ``TrainerBase`` < ``SimpleTrainer`` < ``TrainerX``.

A trainer subclass implements ``build_model()`` (build, then ``register_model(name, model, optim,
sched)``) and ``forward_backward(batch) -> dict`` (compute the loss, call
``model_backward_and_update(loss)``, return ``{"loss": float, ...}``), and registers itself with
``@TRAINER_REGISTRY.register()``.

Loop: ``train()`` -> ``before_train`` (resume) -> per epoch ``before_epoch``, ``run_epoch``,
``after_epoch`` (best-val test, checkpoints) -> ``after_train`` (final test).

Learning-rate schedulers step once per epoch. As in Dassl a trainer may call ``update_lr()`` itself
on the last batch; if it did not during an epoch, ``run_epoch`` does it after the last batch.

Resume: ``OUTPUT_DIR/<model name>/model.pth.tar-<epoch>`` (every ``TRAIN.CHECKPOINT_FREQ`` epochs and
the last) and ``model-last.pth.tar`` (after the other epochs, ``TRAIN.SAVE_LAST``) hold weights, optimiser,
scheduler, AMP scaler, RNG states and the resolved config; a run started again in the same folder
continues from the newer of them, after checking that its training keys match the recorded config
(:func:`locoop.engine.checkpoint.check_recorded_config`). With the same seed a killed and resumed run
ends bitwise equal (on CPU) to an uninterrupted one. See :mod:`locoop.engine.seed` for what the data
loaders must respect. Ctrl-C stops with a ``KeyboardInterrupt`` naming the epoch a resume starts from.

Distributed (``torchrun --nproc_per_node N``, see :mod:`locoop.engine.dist`): the trainer joins the
process group when it is built; every rank trains a full copy of the registered models on its
shard of the training data (a ``DistributedSampler`` inside the training loader), the registered
models' weights are broadcast from rank 0 once, and their gradients are averaged over the ranks
before every optimiser step (:meth:`TrainerBase.sync_gradients`, one bucketed all-reduce), which
is what ``DistributedDataParallel`` computes. The modules are not wrapped in DDP because LoCoOp's
text encoder reads the prompt learner's tensors without calling its ``forward``, and DDP's
reducer silently skips the all-reduce when the forward bypasses the wrapper. The global batch is
``DATALOADER.TRAIN_X.BATCH_SIZE * world size`` (keep the product, or scale ``OPTIM.LR``, when
changing the number of processes). A loss that is a mean over the batch equals its single-process
value with the global batch (CoOp's cross-entropy); a mean over a data-dependent subset (LoCoOp's
entropy over the selected patches) becomes the average of per-rank means, exactly as under DDP. Validation/test loaders are sharded and the outputs gathered,
so every image is evaluated once. Only rank 0 logs, shows progress bars and writes checkpoints.

How to add a trainer: docs/ARCHITECTURE.md, "How to add ...".
"""
from __future__ import annotations

import datetime
import os
import os.path as osp
import sys
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import dist
from .checkpoint import (LAST_FILE, check_trainer, latest_checkpoint, load_checkpoint, resume_checkpoint,
                         resume_from_checkpoint, save_checkpoint)
from .evaluator import build_evaluator as _build_evaluator
from .logger import AverageMeter, MetricMeter, setup_logger
from .precision import grad_scaler
from .seed import epoch_seed, get_rng_states

__all__ = ["TrainerBase", "SimpleTrainer", "TrainerX", "select_device"]


def _tolist(names: Union[str, Iterable[str]]) -> list:
    return [names] if isinstance(names, str) else list(names)


def _is_main_process() -> bool:
    return dist.is_main_process()


def select_device(cfg: Any) -> torch.device:
    """Device from ``MODEL.DEVICE`` ("" = cuda if available and ``USE_CUDA``, else cpu).

    Under torchrun (``LOCAL_RANK`` set) the automatic choice is ``cuda:<LOCAL_RANK>``.

    Raises:
        ValueError: a CUDA device is requested but not available.
    """
    requested = getattr(getattr(cfg, "MODEL", None), "DEVICE", "") or ""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise ValueError(f"MODEL.DEVICE={requested!r} is not a device name (use '', 'cpu', 'cuda', 'cuda:1').") from e
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"MODEL.DEVICE={requested!r} but CUDA is not available here; "
                                 f"use MODEL.DEVICE cpu (or '' for automatic).")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"MODEL.DEVICE={requested!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
        return device
    if torch.cuda.is_available() and cfg.USE_CUDA:
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device(f"cuda:{int(local_rank)}") if local_rank is not None else torch.device("cuda")
    return torch.device("cpu")


class TrainerBase:
    """Model/optimiser/scheduler registry, checkpointing and the generic epoch loop."""

    def __init__(self):
        self._models: "OrderedDict[str, nn.Module]" = OrderedDict()
        self._optims: "OrderedDict[str, Any]" = OrderedDict()
        self._scheds: "OrderedDict[str, Any]" = OrderedDict()
        self._writer = None
        self.scaler: Optional[Any] = None  # torch.amp.GradScaler when AMP is on (see init_amp_scaler)
        self._lr_updated_epoch: Optional[int] = None
        #: The config YAML each model's loaded checkpoint records (load_model), by model name.
        self.loaded_configs: Dict[str, str] = {}

    # ------------------------------------------------------------------ registration
    @property
    def trainer_name(self) -> str:
        """Name recorded in checkpoints (the class name)."""
        return type(self).__name__

    def checkpoint_trainer_names(self) -> list:
        """Trainer names whose checkpoints this trainer accepts (first = own name)."""
        return [self.trainer_name]

    def register_model(self, name: str = "model", model: Optional[nn.Module] = None,
                       optim: Optional[Any] = None, sched: Optional[Any] = None) -> None:
        """Register a model (and its optimiser / scheduler) for training, saving and loading."""
        if self.__dict__.get("_models") is None:
            raise AttributeError("Cannot register a model before TrainerBase.__init__() has run (call super().__init__).")
        if name in self._models:
            raise KeyError(f"A model named '{name}' is already registered; use another name.")
        if model is None:
            raise ValueError(f"register_model('{name}') got no model.")
        self._models[name] = model
        self._optims[name] = optim
        self._scheds[name] = sched

    def get_model_names(self, names: Optional[Union[str, Iterable[str]]] = None) -> list:
        real = list(self._models.keys())
        if names is None:
            return real
        names = _tolist(names)
        unknown = [n for n in names if n not in real]
        if unknown:
            raise KeyError(f"Unknown model name(s) {unknown}; registered: {real}.")
        return names

    def init_amp_scaler(self, enabled: bool = True) -> None:
        """Create a GradScaler for mixed precision on CUDA (none on a CPU, unless the fp16-on-CPU test
        mode of :mod:`locoop.engine.precision` is on)."""
        device = getattr(self, "device", torch.device("cpu"))
        self.scaler = grad_scaler(device, enabled)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_provenance(self, name: str) -> Optional[dict]:
        """What the checkpoints of model ``name`` record about what it was made on (None: nothing).

        Saved as the checkpoint's ``provenance`` entry and checked by :meth:`check_provenance`
        when one is loaded (prompt learners: :func:`locoop.engine.provenance.prompt_provenance`).
        """
        return None

    def check_provenance(self, name: str, ckpt: dict, path: str) -> None:
        """Refuse a checkpoint of model ``name`` made on another backbone or other class names
        (:func:`locoop.engine.provenance.check_prompt_provenance`; keys ``MODEL.ALLOW_OTHER_*``)."""
        expected = self.checkpoint_provenance(name)
        if expected is None:
            return
        from locoop.engine.provenance import check_prompt_provenance

        model_cfg = getattr(getattr(self, "cfg", None), "MODEL", None)
        check_prompt_provenance(ckpt.get("provenance"), expected, path,
                                allow_other_backbone=bool(getattr(model_cfg, "ALLOW_OTHER_BACKBONE", False)),
                                allow_other_classnames=bool(getattr(model_cfg, "ALLOW_OTHER_CLASSNAMES", False)))

    def save_model(self, epoch: int, directory: str, is_best: bool = False, val_result: Optional[float] = None,
                   model_name: str = "") -> None:
        """Save every registered model to ``directory/<name>/`` (file ``model.pth.tar-<epoch + 1>``)."""
        if not _is_main_process():
            dist.barrier()  # matches rank 0's barrier below: nobody reads a checkpoint being written
            return
        rng_states = get_rng_states()  # one capture for all models: saving consumes no randomness
        for name in self.get_model_names():
            model = self._models[name]
            model = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
            optim, sched = self._optims[name], self._scheds[name]
            cfg = getattr(self, "cfg", None)
            state = {
                "state_dict": model.state_dict(),
                "epoch": int(epoch) + 1,
                "optimizer": optim.state_dict() if optim is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "val_result": None if val_result is None else float(val_result),
                "trainer": self.trainer_name,
                "rng_states": rng_states,
            }
            if cfg is not None:  # what a resume or --skip-finished compares its config with
                from locoop.config.training_keys import config_text

                state["config"] = config_text(cfg)
            provenance = self.checkpoint_provenance(name)
            if provenance is not None:
                state["provenance"] = provenance
            save_checkpoint(state, osp.join(directory, name), is_best=is_best, model_name=model_name)
        dist.barrier()

    def resume_model_if_exist(self, directory: str) -> int:
        """Resume all registered models from their latest checkpoints in ``directory``.

        Returns:
            The epoch to start from; 0 when no model has a checkpoint.

        Raises:
            ValueError: only some models have checkpoints, or they disagree on the epoch.
        """
        names = self.get_model_names()
        found = {n: resume_checkpoint(osp.join(directory, n)) is not None for n in names}
        if not any(found.values()):
            print("No checkpoint found, train from scratch")
            return 0
        if not all(found.values()):
            missing = [n for n, ok in found.items() if not ok]
            raise ValueError(f"Checkpoints in '{directory}' exist for some models but not for {missing}; "
                             f"cannot resume consistently. Remove the folder or use another OUTPUT_DIR.")
        print(f"Found checkpoint at {directory} (will resume training)")
        epochs = {}
        for name in names:
            epochs[name] = resume_from_checkpoint(
                osp.join(directory, name), self._models[name], self._optims[name], self._scheds[name],
                scaler=self.scaler, trainer_names=self.checkpoint_trainer_names(), config=getattr(self, "cfg", None))
        if len(set(epochs.values())) > 1:
            raise ValueError(f"Checkpoints in '{directory}' are from different epochs {epochs}; "
                             f"the run was interrupted while saving. Delete the newer files to resume.")
        self._restore_best_result(directory)
        return next(iter(epochs.values()))

    def _restore_best_result(self, directory: str) -> None:
        # So that a resumed best_val run does not overwrite a better model-best with a worse one.
        name = self.get_model_names()[0]
        path = osp.join(directory, name, "model-best.pth.tar")
        if osp.isfile(path):
            val = load_checkpoint(path).get("val_result")
            if val is not None:
                self.best_result = float(val)

    def before_load_state_dict(self, name: str, state_dict: dict, path: str) -> dict:
        """Hook to adapt a loaded state dict (e.g. drop fixed buffers) before ``load_state_dict``."""
        return state_dict

    def load_model(self, directory: str, epoch: Optional[int] = None, strict: bool = True) -> None:
        """Load weights of every registered model from ``directory/<name>/``.

        Args:
            directory: Run folder (``OUTPUT_DIR`` of training); "" skips loading with a note.
            epoch: Load ``model.pth.tar-<epoch>``; None loads ``model-best.pth.tar`` or, if absent,
                the latest epoch checkpoint.
            strict: Passed to ``load_state_dict``.

        Raises:
            FileNotFoundError: no such checkpoint. ValueError: foreign or other-trainer checkpoint, or one
                made on another backbone or other class names (:meth:`check_provenance`).
        """
        if not directory:
            print("Note that load_model() is skipped as no pretrained model is given")
            return
        for name in self.get_model_names():
            folder = osp.join(directory, name)
            if epoch is not None:
                path = osp.join(folder, f"model.pth.tar-{epoch}")
            else:
                path = osp.join(folder, "model-best.pth.tar")
                if not osp.isfile(path):
                    path = latest_checkpoint(folder) or path
            if not osp.isfile(path):
                have = sorted(os.listdir(folder)) if osp.isdir(folder) else []
                raise FileNotFoundError(f"No model at '{path}'" + (f"; that folder has {have}" if have else
                                        f"; expected the layout <run dir>/{name}/model.pth.tar-<epoch>") + ".")
            ckpt = load_checkpoint(path)
            check_trainer(ckpt, self.checkpoint_trainer_names(), path)
            self.check_provenance(name, ckpt, path)
            if isinstance(ckpt.get("config"), str):  # what the model was trained with, for the results' record
                self.loaded_configs[name] = ckpt["config"]
            state_dict = self.before_load_state_dict(name, ckpt["state_dict"], path)
            print(f"Load {path} to {name} (epoch={ckpt.get('epoch')}"
                  + (f", val_result={ckpt['val_result']:.1f}" if ckpt.get("val_result") is not None else "") + ")")
            model = self._models[name]
            model = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
            model.load_state_dict(state_dict, strict=strict)

    # ------------------------------------------------------------------ modes, lr, writer
    def set_model_mode(self, mode: str = "train", names: Optional[Union[str, Iterable[str]]] = None) -> None:
        if mode not in ("train", "eval", "test"):
            raise ValueError(f"mode must be 'train', 'eval' or 'test', got {mode!r}.")
        for name in self.get_model_names(names):
            self._models[name].train(mode == "train")

    def update_lr(self, names: Optional[Union[str, Iterable[str]]] = None) -> None:
        """Step the schedulers (once per epoch)."""
        for name in self.get_model_names(names):
            if self._scheds[name] is not None:
                self._scheds[name].step()
        self._lr_updated_epoch = getattr(self, "epoch", None)

    def get_current_lr(self, names: Optional[Union[str, Iterable[str]]] = None) -> float:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                return self._optims[name].param_groups[0]["lr"]
        return 0.0

    def init_writer(self, log_dir: str) -> None:
        """Open a tensorboard writer (needs the optional ``tensorboard`` package)."""
        if self._writer is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("TRAIN.USE_TENSORBOARD is True but the 'tensorboard' package is not installed: "
                              "pip install tensorboard, or set TRAIN.USE_TENSORBOARD False.") from e
        print(f"Initialize tensorboard (log_dir={log_dir})")
        self._writer = SummaryWriter(log_dir=log_dir)

    def close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write_scalar(self, tag: str, scalar_value: float, global_step: Optional[int] = None) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, scalar_value, global_step)

    # ------------------------------------------------------------------ loop
    def train(self, start_epoch: int, max_epoch: int) -> None:
        """Generic training loop."""
        self.start_epoch = start_epoch
        self.max_epoch = max_epoch
        self.before_train()
        self._saved_epochs = self.start_epoch  # finished epochs that a checkpoint holds
        try:
            for self.epoch in range(self.start_epoch, self.max_epoch):
                self.before_epoch()
                self.run_epoch()
                self.after_epoch()
        except KeyboardInterrupt as e:
            # One line for the user (run_command prints e.args[0]); resuming restarts the unfinished epoch.
            resume = (f"the same command resumes from epoch {self._saved_epochs + 1}" if self._saved_epochs
                      else "no epoch was saved, so the same command starts again from epoch 1")
            raise KeyboardInterrupt(f"stopped at epoch {self.epoch + 1}; {resume}") from e
        self.after_train()

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def run_epoch(self) -> None:
        raise NotImplementedError

    def test(self, split: Optional[str] = None) -> Any:
        raise NotImplementedError

    def parse_batch_train(self, batch: dict) -> Any:
        raise NotImplementedError

    def parse_batch_test(self, batch: dict) -> Any:
        raise NotImplementedError

    def forward_backward(self, batch: dict) -> dict:
        """Compute the loss, update the models, return ``{"loss": float, ...}`` for logging."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_backward(batch).")

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation steps
    def precision_key(self) -> Optional[str]:
        """Config key of this trainer's precision setting, named in NaN/inf errors.

        Default: ``TRAINER.<TRAINER.NAME upper-cased>.PREC`` when it exists; override for others.
        """
        cfg = getattr(self, "cfg", None)
        try:
            section = str(cfg.TRAINER.NAME).upper()
            if section and "PREC" in cfg.TRAINER[section]:
                return f"TRAINER.{section}.PREC"
        except (AttributeError, KeyError, TypeError):
            pass
        return None

    def _precision_setting(self) -> Optional[tuple]:
        key = self.precision_key()
        if key is None:
            return None
        node: Any = self.cfg
        for part in key.split("."):
            node = node[part]
        return key, node

    def detect_anomaly(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss with the epoch, batch and precision setting."""
        if torch.isfinite(loss).all():
            return
        where = []
        if hasattr(self, "epoch"):
            where.append(f"epoch {self.epoch + 1}/{getattr(self, 'max_epoch', '?')}")
        if hasattr(self, "batch_idx"):
            where.append(f"batch {self.batch_idx + 1}/{getattr(self, 'num_batches', '?')}")
        prec = self._precision_setting()
        prec_txt = f" ({prec[0]} = {prec[1]!r})" if prec else ""
        hint = ("fp16 training can overflow: try " + f"{prec[0]} amp or fp32, " if prec and prec[1] == "fp16"
                else "try ")
        raise FloatingPointError(
            f"Loss is {'NaN' if torch.isnan(loss).any() else 'infinite'} at {', '.join(where) or 'this step'}"
            f"{prec_txt}. Hint: {hint}a lower OPTIM.LR, and check the inputs for NaN/inf values."
        )

    def model_zero_grad(self, names: Optional[Union[str, Iterable[str]]] = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].zero_grad()

    def model_backward(self, loss: torch.Tensor) -> None:
        self.detect_anomaly(loss)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def sync_gradients(self, names: Optional[Union[str, Iterable[str]]] = None) -> None:
        """Average the trainable parameters' gradients over the ranks (no-op in one process).

        Called by :meth:`model_update` before the optimiser steps. A parameter without a gradient
        on this rank contributes zeros, so every rank joins the same collective.
        """
        if not dist.is_distributed():
            return
        grads = []
        for name in self.get_model_names(names):
            if self._optims[name] is None:
                continue
            for p in self._models[name].parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
        dist.all_reduce_mean_(grads)

    def broadcast_models(self) -> None:
        """Give every rank rank 0's weights of the registered models (as DDP does when it starts)."""
        if not dist.is_distributed():
            return
        for name in self.get_model_names():
            dist.broadcast_module_(self._models[name], src=0)

    def model_update(self, names: Optional[Union[str, Iterable[str]]] = None) -> None:
        self.sync_gradients(names)
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                if self.scaler is not None:
                    self.scaler.step(self._optims[name])
                else:
                    self._optims[name].step()
        if self.scaler is not None:
            self.scaler.update()

    def model_backward_and_update(self, loss: torch.Tensor, names: Optional[Union[str, Iterable[str]]] = None) -> None:
        self.model_zero_grad(names)
        self.model_backward(loss)
        self.model_update(names)

    def autocast(self):
        """Autocast context for the forward pass: active only when the AMP scaler is on."""
        if self.scaler is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.float16)


class SimpleTrainer(TrainerBase):
    """Builds data, model and evaluator from ``cfg``; implements the generic train/test hooks."""

    def __init__(self, cfg: Any, need_train: bool = True):
        super().__init__()
        self.need_train = need_train
        self.check_cfg(cfg)
        self.device = select_device(cfg)
        dist.init_from_env(self.device)  # no-op without torchrun's environment variables
        self.start_epoch = self.epoch = 0
        self.max_epoch = cfg.OPTIM.MAX_EPOCH
        self.output_dir = cfg.OUTPUT_DIR
        self.cfg = cfg
        self.best_result = -np.inf
        if _is_main_process() and self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            setup_logger(self.output_dir)
        self.build_data_loader()
        self.build_model()
        self.broadcast_models()
        if dist.is_distributed() and cfg.VERBOSE:
            # An evaluation-only trainer (eval, setar-search) runs no training batch: report the one it runs.
            training = getattr(self, "train_loader_x", None) is not None
            w = dist.get_world_size()
            b = int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE if training else cfg.DATALOADER.TEST.BATCH_SIZE)
            print(f"Distributed: {w} processes ({dist.backend_for(self.device)}), "
                  f"global {'training' if training else 'evaluation'} batch {b * w} = {b} per process x {w}")
        self.build_evaluator()

    #: Config sections this trainer reads; their rules (:mod:`locoop.config.checks`), required keys
    #: included, run when the trainer is created, before any data or model is loaded.
    CFG_SECTIONS: tuple = ()

    def check_cfg(self, cfg: Any) -> None:
        """Check the settings before anything is built: the rules of :attr:`CFG_SECTIONS`.

        Override only for a check that no config section can state (and call ``super()``).

        Raises:
            ConfigError (a ValueError): the key, the bad value and what is valid.
        """
        from locoop.config.checks import check_sections

        check_sections(cfg, ("ENGINE",) + tuple(self.CFG_SECTIONS))

    def build_data_loader(self) -> None:
        """Create ``self.dm`` and the loaders with :class:`locoop.data.DataManager`.

        A re-implementation must set ``train_loader_x``, ``val_loader`` (may be None),
        ``test_loader``, ``num_classes`` and ``lab2cname``.
        """
        from locoop.data import DataManager  # imported here: the data layer is heavy and optional for tests

        # need_train=None lets the dataset decide (its default); False skips the training split.
        dm = DataManager(self.cfg, need_train=None if self.need_train else False)
        if self.need_train and dm.dataset.train_x:
            from locoop.data.data_manager import check_every_class_has_images

            check_every_class_has_images(dm.dataset, self.cfg)
        self.dm = dm
        self.train_loader_x = dm.train_loader_x
        self.val_loader = dm.val_loader
        self.test_loader = dm.test_loader
        self.num_classes = dm.num_classes
        self.lab2cname = dm.lab2cname
        self.classnames = getattr(dm, "classnames", None)

    def build_model(self) -> None:
        """Build the model(s), optimiser(s) and scheduler(s), then ``register_model``."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_model() and call register_model().")

    def build_evaluator(self) -> None:
        self.evaluator = _build_evaluator(self.cfg, lab2cname=getattr(self, "lab2cname", None))

    def train(self) -> None:  # type: ignore[override]
        super().train(self.start_epoch, self.max_epoch)

    def before_train(self) -> None:
        directory = self.cfg.OUTPUT_DIR
        if self.cfg.RESUME:
            directory = self.cfg.RESUME
            if not osp.isdir(directory):
                raise FileNotFoundError(f"RESUME='{directory}' does not exist; give the OUTPUT_DIR of the run to resume.")
        self.start_epoch = self.resume_model_if_exist(directory)
        if self.cfg.TRAIN.USE_TENSORBOARD and _is_main_process():
            self.init_writer(osp.join(self.output_dir, "tensorboard"))
        self.time_start = time.time()

    def after_epoch(self) -> None:
        last_epoch = (self.epoch + 1) == self.max_epoch
        do_test = not self.cfg.TEST.NO_TEST
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        meet_checkpoint_freq = (self.epoch + 1) % freq == 0 if freq > 0 else False
        if do_test and self.cfg.TEST.FINAL_MODEL == "best_val":
            curr_result = self.test(split="val")
            if curr_result > self.best_result:
                self.best_result = curr_result
                self.save_model(self.epoch, self.output_dir, val_result=curr_result, model_name="model-best.pth.tar")
        if meet_checkpoint_freq or last_epoch:
            self.save_model(self.epoch, self.output_dir)
            self._remove_last_checkpoints()  # the numbered file holds the same state, and is newer
        elif self.cfg.TRAIN.SAVE_LAST:
            self.save_model(self.epoch, self.output_dir, model_name=LAST_FILE)
        if meet_checkpoint_freq or last_epoch or self.cfg.TRAIN.SAVE_LAST:
            self._saved_epochs = self.epoch + 1

    def _remove_last_checkpoints(self) -> None:
        if not _is_main_process():
            return
        for name in self.get_model_names():
            path = osp.join(self.output_dir, name, LAST_FILE)
            if osp.isfile(path):
                os.remove(path)

    def after_train(self) -> None:
        print("Finish training")
        if not self.cfg.TEST.NO_TEST:
            if self.cfg.TEST.FINAL_MODEL == "best_val":
                print("Deploy the model with the best val performance")
                self.load_model(self.output_dir)
            else:
                print("Deploy the last-epoch model")
            self.test()
        elapsed = str(datetime.timedelta(seconds=round(time.time() - self.time_start)))
        print(f"Elapsed: {elapsed}")
        self.close_writer()

    def _use_progress_bar(self) -> bool:
        return bool(self.cfg.VERBOSE) and sys.stderr.isatty() and _is_main_process()

    @torch.no_grad()
    def test(self, split: Optional[str] = None) -> float:
        """Evaluate on ``split`` ("val" or "test"; default TEST.SPLIT) and return the first metric."""
        self.set_model_mode("eval")
        self.evaluator.reset()
        split = split or self.cfg.TEST.SPLIT
        if split == "val" and getattr(self, "val_loader", None) is not None:
            loader = self.val_loader
        else:
            split = "test"  # no validation data: Dassl falls back to the test set
            loader = getattr(self, "test_loader", None)
        if loader is None:
            raise ValueError("No test data loader; set test_loader in build_data_loader().")
        print(f"Evaluate on the *{split}* set")
        # Distributed: the loaders hold contiguous shards (DataManager); outputs are gathered in rank
        # order, which is the data order, and every rank evaluates all of them.
        gather = dist.is_distributed()
        pending = []
        for batch in tqdm(loader, desc=f"test ({split})", disable=not self._use_progress_bar(), leave=False):
            input, label = self.parse_batch_test(batch)
            output = self.model_inference(input)
            if gather:
                pending.append((output.detach().cpu(), label.detach().cpu()))
            else:
                self.evaluator.process(output, label)
        if gather:
            for shard in dist.all_gather_object(pending):
                for output, label in shard:
                    self.evaluator.process(output, label)
        results = self.evaluator.evaluate()
        for k, v in results.items():
            self.write_scalar(f"{split}/{k}", v, self.epoch)
        return list(results.values())[0]

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)

    def parse_batch_train(self, batch: dict) -> tuple:
        return batch["img"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)

    def parse_batch_test(self, batch: dict) -> tuple:
        return batch["img"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)

    def prepare_loader_for_epoch(self, loader: Any) -> None:
        """Make the loader's randomness a function of (SEED, epoch) so resumed runs match.

        Calls ``set_epoch(epoch)`` on samplers that have it (DistributedSampler, locoop.data's
        SeededSampler) and re-seeds a loader's or sampler's own ``torch.Generator`` with
        :func:`locoop.engine.seed.epoch_seed`. Loaders without their own generator draw from the
        global RNG, which checkpoints save and restore.
        """
        sampler = getattr(loader, "sampler", None)
        for s in (sampler, getattr(loader, "batch_sampler", None)):
            if hasattr(s, "set_epoch"):
                s.set_epoch(self.epoch)
        if self.cfg.SEED < 0:
            return
        # An epoch-aware sampler (set_epoch, like locoop.data's SeededSampler) seeds augmentations itself;
        # otherwise persistent workers carry RNG state across epochs that no checkpoint holds.
        if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0 \
                and not hasattr(sampler, "set_epoch") and not getattr(self, "_warned_persistent", False):
            self._warned_persistent = True
            warnings.warn("The training loader uses persistent_workers: its workers' RNG states live across epochs "
                          "and are not in checkpoints, so a resumed run will not repeat the augmentations exactly.")
        gens = {}
        for g in (getattr(loader, "generator", None), getattr(sampler, "generator", None)):
            if isinstance(g, torch.Generator):
                gens[id(g)] = g
        for g in gens.values():
            g.manual_seed(epoch_seed(self.cfg.SEED, self.epoch))


class TrainerX(SimpleTrainer):
    """Trainer on labelled data only (``train_loader_x``)."""

    def run_epoch(self) -> None:
        self.set_model_mode("train")
        losses = MetricMeter()
        batch_time = AverageMeter()
        data_time = AverageMeter()
        if getattr(self, "train_loader_x", None) is None:
            raise ValueError("No training data: the dataset has no training images (check DATASET.ROOT, DATASET.NAME "
                             "and the train folder), or this trainer is meant for evaluation only.")
        self.num_batches = len(self.train_loader_x)
        if self.num_batches == 0:
            raise ValueError("The training loader is empty: no training images (check DATASET.ROOT / NUM_SHOTS) "
                             "or a batch size larger than the data with drop_last.")
        self.prepare_loader_for_epoch(self.train_loader_x)
        use_bar = self._use_progress_bar()
        bar = tqdm(total=self.num_batches, desc=f"epoch {self.epoch + 1}/{self.max_epoch}", disable=not use_bar,
                   leave=False, dynamic_ncols=True)
        print_freq = self.cfg.TRAIN.PRINT_FREQ
        end = time.time()
        for self.batch_idx, batch in enumerate(self.train_loader_x):
            data_time.update(time.time() - end)
            loss_summary = self.forward_backward(batch)
            batch_time.update(time.time() - end)
            losses.update(loss_summary)

            meet_freq = (self.batch_idx + 1) % print_freq == 0
            only_few_batches = self.num_batches < print_freq
            if meet_freq or only_few_batches:
                nb_remain = (self.num_batches - self.batch_idx - 1) + (self.max_epoch - self.epoch - 1) * self.num_batches
                eta = str(datetime.timedelta(seconds=int(batch_time.avg * nb_remain)))
                line = " ".join([
                    f"epoch [{self.epoch + 1}/{self.max_epoch}]",
                    f"batch [{self.batch_idx + 1}/{self.num_batches}]",
                    f"time {batch_time.val:.3f} ({batch_time.avg:.3f})",
                    f"data {data_time.val:.3f} ({data_time.avg:.3f})",
                    f"{losses}",
                    f"lr {self.get_current_lr():.4e}",
                    f"eta {eta}",
                ])
                if use_bar:
                    tqdm.write(line, file=sys.stdout)
                else:
                    print(line)

            n_iter = self.epoch * self.num_batches + self.batch_idx
            for name, meter in losses.meters.items():
                self.write_scalar("train/" + name, meter.avg, n_iter)
            self.write_scalar("train/lr", self.get_current_lr(), n_iter)
            bar.update(1)
            end = time.time()
        bar.close()
        if self._lr_updated_epoch != self.epoch:
            self.update_lr()

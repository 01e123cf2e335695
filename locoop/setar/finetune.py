"""SeTAR+FT and the plain-LoRA baseline as engine trainers (registered as ``"SeTARFT"`` and ``"LoRA"``).

Both fine-tune low-rank adapters on CLIP (:mod:`locoop.setar.adapters`) with the LoCoOp loss
(``CE(global logits, y) + SETAR.FT.LAMBDA * L_ood`` with top-``SETAR.FT.TOPK`` OOD patches,
:func:`locoop.trainers.loss.locoop_loss`), logits ``logit_scale.exp() * cos`` of the normalised
image features (global and local) and the class-name prompts ``SETAR.FT.PROMPT_TEMPLATE``
(default SeTAR's ``finetune.py`` prompt ``"a photo of a <class>"``; empty: ``SETAR.PROMPT_TEMPLATE``), all through the CLIP head (:class:`locoop.models.head.CLIPHead`):

* ``SeTARFT``: adapters from a SeTAR search's settings (``SETAR.SETTINGS_FILE``, the search's
  ``best_settings.json``): the minor singular components of every pruned matrix, scaling 1, so the
  model starts equal to the unpruned one. ``SETAR.PRUNE_TYPE`` / ``SEED`` choose the components
  as in the search.
* ``LoRA``: rank ``SETAR.FT.LORA_RANK`` (alpha ``SETAR.FT.LORA_ALPHA``) on every block's
  ``SETAR.WEIGHT_TYPES`` in both towers (plus ``W_p`` with ``SETAR.FREEZE_PROJ False``), peft's
  default initialisation (``B = 0``).

Backbones (:func:`locoop.models.swinv2.is_swinv2_backbone` on ``MODEL.BACKBONE.NAME`` chooses; the
trainer itself is one, the backbone-specific part is a small target object):

* CLIP (:class:`CLIPTarget`): as above.
* Swin-V2 classifier (:class:`SwinTarget`, SeTAR's ``model_type SwinTransformerV2``): the adapters sit
  on its block matrices (SeTAR's ``[stage, block]`` layers; no ``W_p``, no text tower); the LoCoOp loss
  takes the classifier's global logits and its local logits (the last block's value path) as they
  are -- no scale, no normalisation, as SeTAR's ``finetune.py`` feeds ``outputs.logits`` /
  ``outputs.logits_local``; no class-name prompts. Its transforms are SeTAR's for Swin at
  ``INPUT.SIZE`` (``build_transform`` chooses them for a Swin-V2 backbone:
  :func:`~locoop.models.swinv2.build_swin_train_preprocess`, :func:`~locoop.models.swinv2.build_swin_preprocess`);
  and while training the
  whole classifier is in train mode (SeTAR calls ``model.train()``: the snapshot's stochastic depth /
  dropout are active), in eval mode otherwise. The dataset's classes must be the classifier's.

Only adapter parameters are trainable (checked at build time). The text features are recomputed
through the adapted text tower at every step when a text-tower matrix carries an adapter, else
computed once. The image tower runs without a graph when it has no adapter.

Data: ``SETAR.FT.TRAIN_SPLIT`` ``train`` = the few-shot training split (``DATASET.NUM_SHOTS``);
``val`` = the ID validation split (``DATASET.VAL_SPLIT_FILE``), which is what SeTAR's
``finetune.py`` trains on (its ImageNet split is one training image per class). The schedule steps
per optimiser step (``SETAR.FT.LR_STEP iter``, as SeTAR's ``get_scheduler``) or per epoch.

Checkpoints (``OUTPUT_DIR/adapters/model.pth.tar-<epoch>``) hold only the adapters and their
description (base-weight SHA-256, settings, ranks): resuming and loading check it. Loading a
SeTARFT checkpoint without ``SETAR.SETTINGS_FILE`` rebuilds the adapters from that description.

Evaluation interface (as the LoCoOp trainer): ``trainer.clip_model`` -- CLIP with the adapters in
place, so its ``encode_image`` / ``encode_text`` are the adapted model -- ``trainer.text_features()``
and ``trainer.class_prompts()``. On a Swin-V2, as the runner's classifier interface
(:mod:`locoop.ood.heads`) expects: ``trainer.clip_model`` is the adapted
:class:`~locoop.models.swinv2.SwinV2Classifier` (also ``trainer.swin_model``), ``text_features()``
is None, ``class_prompts()`` raises. ``trainer.adapted_model`` is the adapted model of either kind.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from locoop.config.checks import FT_LR_STEPS, FT_PRECISIONS, FT_TRAIN_SPLITS
from locoop.engine.registry import TRAINER_REGISTRY
from locoop.models.head import CLIPHead, ClassPrompts, accuracy, zero_shot_prompts
from locoop.trainers.base import PromptTrainer

from .adapters import (AdapterSet, add_lora_adapters, add_setar_adapters, adapters_from_meta,
                       base_weights_sha256)

Tensor = torch.Tensor

__all__ = ["AdapterTrainer", "SeTARFT", "LoRA", "CLIPTarget", "SwinTarget", "FT_PRECISIONS", "TRAIN_SPLITS",
           "LR_STEPS"]

TRAIN_SPLITS = FT_TRAIN_SPLITS
LR_STEPS = FT_LR_STEPS
MODEL_NAME = "adapters"  # registered model name = checkpoint sub-folder


class CLIPTarget:
    """The CLIP side of SeTAR+FT / LoRA: class prompts, text features and ``logit_scale * cos`` logits.

    Args:
        model: the CLIP model (adapters are injected into it later).
        prompts: the tokenized class prompts.
        device: where the tokens go.
    """

    kind = "clip"

    def __init__(self, model, prompts: ClassPrompts, device) -> None:
        self.model = model
        self.head = CLIPHead(model)
        self.prompts = prompts
        self.tokens = prompts.tokens.to(device)
        self._fixed_text: Optional[Tensor] = None

    def reset(self) -> None:
        """Forget the cached text features (after adapters were loaded)."""
        self._fixed_text = None

    def train_text_features(self, text_adapted: bool) -> Tensor:
        if text_adapted:
            return self.head.text_features(self.prompts)  # through the adapted text tower: differentiable, every step
        if self._fixed_text is None:
            with torch.no_grad():
                self._fixed_text = self.head.text_features(self.prompts)
        return self._fixed_text

    def text_features(self) -> Tensor:
        return self.head.text_features(self.prompts)

    def train_logits(self, image: Tensor, text_adapted: bool):
        """``(global [B, C], local [B, P, C])`` logits for the LoCoOp loss."""
        return self.head(image, self.train_text_features(text_adapted), True)

    def logits(self, image: Tensor, text: Optional[Tensor], return_local: bool = True):
        return self.head(image, text, return_local)

    def train(self, mode: bool) -> None:
        """CLIP stays as it is (no dropout in the towers); only the adapters switch mode."""


class SwinTarget:
    """The Swin-V2 side: the classifier's own global and local logits, no text.

    Args:
        model: a :class:`~locoop.models.swinv2.SwinV2Classifier`.
    """

    kind = "swinv2"
    prompts = None

    def __init__(self, model) -> None:
        self.model = model

    def reset(self) -> None:
        pass

    def text_features(self) -> None:
        return None

    def train_logits(self, image: Tensor, text_adapted: bool = False):
        """``(global [B, K], local [B, N, K])``: raw classifier logits, as SeTAR's loss takes them."""
        return self.model(image, return_local=True)

    def logits(self, image: Tensor, text: Optional[Tensor] = None, return_local: bool = True):
        return self.model(image, return_local=return_local)

    def train(self, mode: bool) -> None:
        """The whole classifier follows the trainer's mode (SeTAR's ``model.train()`` while fine-tuning)."""
        self.model.train(mode)


class AdapterTrainer(PromptTrainer):
    """Shared machinery of :class:`SeTARFT` and :class:`LoRA` (``adapter_kind`` selects the adapters)."""

    adapter_kind: str = ""
    NEEDS_CHECKPOINT = True

    #: Set to False to skip the Dassl classification test after training (the setar-finetune
    #: command does: its OOD benchmark reports the same ID accuracy).
    final_test: bool = True

    # ------------------------------------------------------------------ config
    def precision_key(self) -> Optional[str]:
        return "SETAR.FT.PREC"

    #: Checked when the trainer is created (locoop/config/checks.py).
    CFG_SECTIONS = ("MODEL.BACKBONE", "SETAR.FT")

    # ------------------------------------------------------------------ data
    def build_data_loader(self) -> None:
        """The few-shot train split, or (``TRAIN_SPLIT val``) the ID validation split as training data."""
        if self.cfg.SETAR.FT.TRAIN_SPLIT == "train":
            super().build_data_loader()
            return
        from locoop.data import DataManager, build_data_loader, build_dataset

        cfg = self.cfg
        dataset = build_dataset(cfg, need_train=False)
        val = list(dataset.val or [])
        test_paths = {d.impath for d in (dataset.test or [])}
        if not val or dataset.val is dataset.test or (test_paths and all(d.impath in test_paths for d in val)):
            raise ValueError(
                "SETAR.FT.TRAIN_SPLIT val trains on the ID validation split, but this dataset's validation split is "
                "its test split; set DATASET.VAL_SPLIT_FILE to SeTAR's split JSON (imagenet1k_val_data.json / "
                "voc_val_data.json) or give the dataset a val/ folder -- or use SETAR.FT.TRAIN_SPLIT train "
                "with DATASET.NUM_SHOTS")
        dm = DataManager(cfg, dataset=dataset, verbose=bool(cfg.VERBOSE))
        seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else None
        self.dm = dm
        self.train_loader_x = build_data_loader(
            val, int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE), dm.tfm_train, is_train=True,
            num_workers=int(cfg.DATALOADER.NUM_WORKERS), seed=seed, strict=bool(cfg.DATASET.STRICT),
            shuffle=cfg.DATALOADER.TRAIN_X.SAMPLER != "SequentialSampler")
        self.val_loader = None  # the validation images are the training images here
        self.test_loader = dm.test_loader
        self.num_classes = dm.num_classes
        self.lab2cname = dm.lab2cname
        self.classnames = dm.classnames
        if cfg.VERBOSE:
            print(f"Training on the validation split: {len(val)} images")

    # ------------------------------------------------------------------ backbone kind
    @property
    def is_swin(self) -> bool:
        """Whether ``MODEL.BACKBONE.NAME`` is a Swin-V2 classifier (the one rule: ``is_swinv2_backbone``)."""
        from locoop.models.swinv2 import is_swinv2_backbone

        return is_swinv2_backbone(str(self.cfg.MODEL.BACKBONE.NAME))

    # ------------------------------------------------------------------ model
    def prompt_template(self) -> str:
        """The class-prompt template: ``SETAR.FT.PROMPT_TEMPLATE``, or the search's ``SETAR.PROMPT_TEMPLATE`` if empty."""
        return str(self.cfg.SETAR.FT.PROMPT_TEMPLATE) or str(self.cfg.SETAR.PROMPT_TEMPLATE)

    def build_model(self) -> None:
        from locoop.engine.precision import resolve_precision
        from locoop.trainers.clip_backbone import load_clip

        cfg = self.cfg
        ft = cfg.SETAR.FT
        verbose = bool(cfg.VERBOSE)
        self.lam = float(ft.LAMBDA)
        self.top_k = int(ft.TOPK)
        if self.need_train and self.lam != 0:  # before CLIP is loaded: the shipped 300 on a small class set selects nothing
            from locoop.trainers.loss import check_top_k

            check_top_k("SETAR.FT.TOPK", self.top_k, int(self.dm.num_classes), str(cfg.DATASET.NAME))
        self.backbone = str(cfg.MODEL.BACKBONE.NAME).strip()
        # Weights stay fp32 whatever the precision: the SVD split and SGD on the adapters need it.
        if self.is_swin:
            from locoop.models.swinv2 import load_swinv2

            if verbose:
                print(f"Loading Swin-V2 (backbone: {self.backbone})")
            model = load_swinv2(self.backbone, device=self.device, dtype=torch.float32)
            n = int(self.dm.num_classes)
            if model.num_classes != n:
                raise ValueError(f"the Swin-V2 classifier {self.backbone} has {model.num_classes} classes but the "
                                 f"dataset has {n}; its classifier head must be the dataset's (ImageNet-1K for "
                                 f"{'microsoft/swinv2-base-patch4-window16-256'})")
            # the attribute every command hands the runner; a classifier is scored on its own logits
            self.clip_model, self.swin_model = model, model
        else:
            model, _ = load_clip(cfg, self.device, "fp32", verbose=verbose)
            self.clip_model, self.swin_model = model, None
        self.precision = resolve_precision(ft.PREC, self.device, key="SETAR.FT.PREC")
        if verbose and self.precision != ft.PREC:
            print(f"Note: SETAR.FT.PREC={ft.PREC!r} needs CUDA; running in fp32 on {self.device}")
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapted_model = model
        self.base_sha256 = base_weights_sha256(model)
        if self.is_swin:
            self.target = SwinTarget(model)
            self.head = self.prompts = self.tokens = None
        else:
            self.prompts = self.class_prompts()
            self.target = CLIPTarget(model, self.prompts, self.device)
            self.head, self.tokens = self.target.head, self.target.tokens

        self.adapters = AdapterSet()
        self._build_adapters()
        optim = sched = None
        if self.adapters.attached:
            self._check_trainable()
            from locoop.engine.optim import build_optimizer

            optim = build_optimizer(list(self.adapters.params.values()), cfg.OPTIM)
            sched = self._build_scheduler(optim)
        self.optim, self.sched = optim, sched
        self.register_model(MODEL_NAME, self.adapters, optim, sched)
        self.init_amp_scaler(self.precision == "amp")

    def _build_adapters(self) -> None:
        """Create the adapters from the config (may leave them empty, see :class:`SeTARFT`)."""
        raise NotImplementedError

    def _dropout(self) -> float:
        return float(self.cfg.SETAR.FT.LORA_DROPOUT)

    def _check_trainable(self) -> None:
        trainable = {id(p) for p in self.adapted_model.parameters() if p.requires_grad}
        adapter = {id(p) for p in self.adapters.params.values()}
        if trainable != adapter or not all(p.requires_grad for p in self.adapters.params.values()):
            extra = [n for n, p in self.adapted_model.named_parameters() if p.requires_grad and id(p) not in adapter]
            raise RuntimeError(f"only adapter parameters may be trainable; also trainable: {extra[:5]}")
        if self.cfg.VERBOSE:
            ranks = self.adapters.ranks()
            print(f"{type(self).__name__}: {len(ranks)} adapters, trainable parameters: "
                  f"{self.adapters.num_parameters():,} (of {sum(p.numel() for p in self.adapted_model.parameters()):,}); "
                  f"towers: {', '.join(sorted(self.adapters.towers()))}")
            for (tower, wt, layer), r in ranks.items():
                print(f"  {tower} {wt}{'' if layer is None else ' ' + str(layer)}: rank {r}")

    def _build_scheduler(self, optim: torch.optim.Optimizer):
        from locoop.engine.lr_scheduler import build_lr_scheduler

        cfg = self.cfg
        if cfg.SETAR.FT.LR_STEP == "epoch" or getattr(self, "train_loader_x", None) is None:
            return build_lr_scheduler(optim, cfg.OPTIM)
        # Per optimiser step, as SeTAR (transformers' get_scheduler): the epoch counts of the
        # schedule become step counts.
        n = max(len(self.train_loader_x), 1)
        oc = cfg.OPTIM.clone()
        oc.defrost()
        oc.MAX_EPOCH = int(cfg.OPTIM.MAX_EPOCH) * n
        if int(oc.WARMUP_EPOCH) > 0:
            oc.WARMUP_EPOCH = int(cfg.OPTIM.WARMUP_EPOCH) * n
        if isinstance(oc.STEPSIZE, (list, tuple)):
            oc.STEPSIZE = type(oc.STEPSIZE)(int(s) * n if int(s) > 0 else int(s) for s in oc.STEPSIZE)
        elif int(oc.STEPSIZE) > 0:
            oc.STEPSIZE = int(oc.STEPSIZE) * n
        return build_lr_scheduler(optim, oc)

    @property
    def lr_per_iter(self) -> bool:
        return self.cfg.SETAR.FT.LR_STEP == "iter"

    # ------------------------------------------------------------------ text / image features
    def class_prompts(self, chunk_size: Optional[int] = None) -> ClassPrompts:
        """The tokenized class prompts ``prompt_template().format(<class>)`` (CLIP only)."""
        if self.is_swin:
            raise ValueError("a Swin-V2 classifier has no text tower and uses no class prompts")
        kw = {} if chunk_size is None else {"chunk_size": int(chunk_size)}
        return zero_shot_prompts(list(self.dm.dataset.classnames), self.prompt_template(),
                                 int(self.clip_model.context_length), **kw)

    def _text_adapted(self) -> bool:
        return "text" in self.adapters.towers()

    @torch.no_grad()
    def text_features(self) -> Optional[Tensor]:
        """Normalised float32 ``[C, D]`` features of the class prompts through the (adapted) text tower.

        None on a Swin-V2 (no text tower).
        """
        with self.autocast():
            return self.target.text_features()

    def encode_image(self, image: Tensor, return_local: bool = True):
        """Normalised global (and local) image features (CLIP); a graph only when the image tower has adapters."""
        if self.is_swin:
            raise ValueError("a Swin-V2 classifier gives logits, not CLIP image features; use trainer.logits")
        return self.head.encode_image(image, return_local)

    def logits(self, image: Tensor, text: Optional[Tensor] = None, return_local: bool = True):
        """``(global [B, C], local [B, P, C])`` or global only.

        CLIP: ``logit_scale.exp() * cos`` against ``text``; Swin-V2: the classifier's logits (``text`` unused).
        """
        return self.target.logits(image, text, return_local)

    # ------------------------------------------------------------------ training
    def before_train(self) -> None:
        if not self.adapters.attached:
            raise ValueError(f"{type(self).__name__} has no adapters to train: " + self._no_adapters_hint())
        super().before_train()

    def _no_adapters_hint(self) -> str:
        return "check the adapter settings"

    def forward_backward(self, batch: dict) -> dict:
        from locoop.trainers.loss import locoop_loss

        image, label = self.parse_batch_train(batch)
        with self.autocast():
            logits, logits_local = self.target.train_logits(image, self._text_adapted())
            loss, loss_id, loss_ood = locoop_loss(logits, logits_local, label, self.lam, self.top_k)
        self.model_backward_and_update(loss)
        if self.lr_per_iter and self.sched is not None:
            self.sched.step()
        return {"loss": loss.item(), "loss_id": loss_id.item(), "loss_ood": loss_ood.item(),
                "acc": accuracy(logits.detach(), label)}

    def set_model_mode(self, mode: str = "train", names=None) -> None:
        super().set_model_mode(mode, names)
        if getattr(self, "target", None) is not None and names is None:
            self.target.train(mode == "train")

    def update_lr(self, names=None) -> None:
        if self.lr_per_iter:
            self._lr_updated_epoch = getattr(self, "epoch", None)  # stepped after every batch instead
            return
        super().update_lr(names)

    def after_train(self) -> None:
        if self.final_test:
            super().after_train()
            return
        import datetime
        import time

        print("Finish training")
        if self.cfg.TEST.FINAL_MODEL == "best_val" and not self.cfg.TEST.NO_TEST:
            print("Deploy the model with the best val performance")
            self.load_model(self.output_dir)
        print(f"Elapsed: {datetime.timedelta(seconds=round(time.time() - self.time_start))}")
        self.close_writer()

    # ------------------------------------------------------------------ evaluation / loading
    def model_inference(self, input: Tensor) -> Tensor:
        if self.is_swin:
            with self.autocast():
                return self.logits(input, None, return_local=False)
        text = self._eval_text_features if self._eval_text_features is not None else self.text_features()
        with self.autocast():
            return self.logits(input, text, return_local=False)

    def before_load_state_dict(self, name: str, state_dict: dict, path: str) -> dict:
        if name == MODEL_NAME:
            self.adapters.source = f"'{path}'"
        if name == MODEL_NAME and not self.adapters.attached:
            meta = state_dict.get("_extra_state")
            if not isinstance(meta, dict) or not meta:
                raise ValueError(f"'{path}' holds no adapter description; it was not written by SeTARFT / LoRA")
            if self.cfg.VERBOSE:
                print(f"Rebuilding the {meta.get('kind')} adapters described in {path}")
            adapters_from_meta(self.adapted_model, meta, dropout=self._dropout(), backbone=self.backbone,
                               base_sha256=self.base_sha256, target=self.adapters)
            self._check_trainable()
        return state_dict

    def load_model(self, directory: str, epoch: Optional[int] = None, strict: bool = True) -> None:
        super().load_model(directory, epoch=epoch, strict=strict)
        self.target.reset()  # text features may have changed with the loaded adapters

    def describe(self) -> dict:
        """The adapters' description (kind, settings, ranks, base hash) for result files."""
        meta = dict(self.adapters.meta or {})
        meta["num_parameters"] = self.adapters.num_parameters()
        return meta


@TRAINER_REGISTRY.register("SeTARFT")
class SeTARFT(AdapterTrainer):
    """SeTAR+FT: fine-tune the minor singular components of the matrices a SeTAR search pruned.

    The settings come from ``SETAR.SETTINGS_FILE`` (a ``best_settings.json``); with it empty the
    trainer can only load a checkpoint (the adapters are rebuilt from its description).
    """

    adapter_kind = "setar"

    def _settings_file(self) -> str:
        path = str(self.cfg.SETAR.SETTINGS_FILE or "").strip()
        return "" if path.lower() == "none" else path

    def _no_adapters_hint(self) -> str:
        return ("set SETAR.SETTINGS_FILE (--settings) to the best_settings.json of a SeTAR search "
                "(`python -m locoop setar-search`)")

    def _build_adapters(self) -> None:
        from locoop.setar.settings import load_settings

        path = self._settings_file()
        if not path:
            if self.cfg.VERBOSE:
                print("Note: no SETAR.SETTINGS_FILE; the adapters will be rebuilt from the checkpoint that is loaded")
            return
        settings = load_settings(path, self.adapted_model)
        built = add_setar_adapters(self.adapted_model, settings, prune_type=self.cfg.SETAR.PRUNE_TYPE,
                                   seed=max(int(self.cfg.SEED), 0), dropout=self._dropout(), backbone=self.backbone,
                                   base_sha256=self.base_sha256)
        self.adapters.attach(built.meta, built._layers, built._names)
        self.settings_file = os.path.abspath(path)


@TRAINER_REGISTRY.register("LoRA")
class LoRA(AdapterTrainer):
    """Plain LoRA baseline: one rank on ``SETAR.WEIGHT_TYPES`` of every block of both towers."""

    adapter_kind = "lora"

    def _build_adapters(self) -> None:
        c = self.cfg
        built = add_lora_adapters(self.adapted_model, list(c.SETAR.WEIGHT_TYPES), int(c.SETAR.FT.LORA_RANK),
                                  float(c.SETAR.FT.LORA_ALPHA), include_proj=not bool(c.SETAR.FREEZE_PROJ),
                                  dropout=self._dropout(), backbone=self.backbone, base_sha256=self.base_sha256)
        self.adapters.attach(built.meta, built._layers, built._names)

"""LoCoOp and CoOp trainers (CoOp = LoCoOp with LAMBDA 0).

``CustomCLIP`` = prompt learner + the CLIP head (:class:`locoop.models.head.CLIPHead`: fast exact
text encoder, normalised image features, ``logit_scale.exp() * cosine`` logits); its forward gives
``(logits_global [B, C], logits_local [B, P, C])``. Only the prompt learner is trained and
checkpointed (``OUTPUT_DIR/prompt_learner/model.pth.tar-<epoch>``).

Public interface for evaluation code: ``trainer.clip_model`` (the frozen CLIP),
``trainer.text_features()`` (normalised ``[C, D]`` features of the learned prompts) and
``trainer.class_prompts()`` (the learned prompts as token embeddings, for SeTAR).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from locoop.engine.registry import TRAINER_REGISTRY
from locoop.models.head import CLIPHead, ClassPrompts, ImageClassifier, accuracy

from .base import PromptTrainer
from .clip_backbone import load_clip
from .loss import locoop_loss
from .prompt_learner import PromptLearner
from .text_encoder import TextEncoder

Tensor = torch.Tensor

__all__ = ["CustomCLIP", "LoCoOp", "CoOp", "compute_accuracy"]

compute_accuracy = accuracy  # the reference's name (Dassl's ``compute_accuracy``)


class CustomCLIP(ImageClassifier):
    """CLIP with learned prompts.

    Args:
        classnames: class names in label order.
        clip_model: the frozen CLIP model (a submodule of this one; nothing is copied).
        n_ctx, ctx_init, csc, class_token_position: see :class:`PromptLearner`.
        text_mode: text encoding, see :class:`TextEncoder` ("auto" = shared prefix when possible).
        verbose: print the prompt initialisation.
    """

    def __init__(self, classnames: Sequence[str], clip_model: nn.Module, n_ctx: int = 16, ctx_init: str = "",
                 csc: bool = False, class_token_position: str = "end", text_mode: str = "auto",
                 verbose: bool = False):
        super().__init__()
        self.prompt_learner = PromptLearner(classnames, clip_model, n_ctx=n_ctx, ctx_init=ctx_init, csc=csc,
                                            class_token_position=class_token_position, verbose=verbose)
        self.head = CLIPHead(clip_model, text_mode)

    @property
    def clip_model(self) -> nn.Module:
        return self.head.clip_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.head.text_encoder

    @property
    def image_encoder(self) -> nn.Module:
        return self.clip_model.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip_model.logit_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.clip_model.dtype

    @property
    def num_classes(self) -> int:
        return int(self.prompt_learner.n_cls)

    def text_features(self) -> Tensor:
        """L2-normalised float32 features of the learned prompts ``[C, D]`` (differentiable wrt the context)."""
        return self.head.text_features(self.prompt_learner)

    def class_prompts(self, chunk_size: Optional[int] = None) -> ClassPrompts:
        """The learned prompts as token embeddings ``[C, 77, W]`` (detached), e.g. for SeTAR's search."""
        pl = self.prompt_learner
        with torch.no_grad():
            embeddings = pl().detach()
        kw = {} if chunk_size is None else {"chunk_size": int(chunk_size)}
        return ClassPrompts(embeddings=embeddings, eot_idx=pl.eot_idx.detach().clone(), **kw)

    def encode_image(self, image: Tensor, return_local: bool = True) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Normalised float32 global ``[B, D]`` (and local ``[B, P, D]``) image features (see :class:`CLIPHead`)."""
        return self.head.encode_image(image, return_local)

    def forward(self, image: Tensor, return_local: bool = True, text_features: Optional[Tensor] = None
                ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Logits ``logit_scale.exp() * cos``: ``(global [B, C], local [B, P, C])``, or global only.

        Args:
            image: ``[B, 3, H, W]``.
            return_local: also return the local logits.
            text_features: precomputed normalised text features (evaluation); default: from the prompts.
        """
        text = self.text_features() if text_features is None else text_features
        return self.head(image, text, return_local)


@TRAINER_REGISTRY.register("LoCoOp")
class LoCoOp(PromptTrainer):
    """Local regularised context optimisation (LoCoOp, NeurIPS 2023).

    Loss ``CE(global logits, y) + TRAINER.LOCOOP.LAMBDA * L_ood`` with ``L_ood`` the negative mean
    entropy of the patches whose top-``TRAINER.LOCOOP.TOPK`` classes miss the label
    (:func:`locoop.trainers.loss.locoop_loss`).
    """

    #: Text encoding used for training ("auto": shared prefix when the prompts allow it).
    text_mode = "auto"

    # ------------------------------------------------------------------ config
    def lambda_value(self) -> float:
        return float(self.cfg.TRAINER.LOCOOP.LAMBDA)

    #: Checked when the trainer is created (locoop/config/checks.py).
    CFG_SECTIONS = ("MODEL.BACKBONE", "TRAINER.LOCOOP")

    # ------------------------------------------------------------------ model
    def build_model(self) -> None:
        cfg = self.cfg
        c = cfg.TRAINER.LOCOOP
        classnames = list(self.dm.dataset.classnames)
        self.lam = self.lambda_value()
        self.top_k = int(c.TOPK)
        if self.need_train and self.lam != 0:  # before CLIP is loaded: K >= C would silently train CoOp
            from locoop.trainers.loss import check_top_k

            check_top_k("TRAINER.LOCOOP.TOPK", self.top_k, len(classnames), str(cfg.DATASET.NAME),
                        f"--topk {max(1, len(classnames) - 1)}")
        verbose = bool(cfg.VERBOSE)
        clip_model, self.precision = load_clip(cfg, self.device, c.PREC, verbose=verbose)
        res = int(getattr(clip_model.visual, "input_resolution", cfg.INPUT.SIZE[0]))
        if verbose and tuple(cfg.INPUT.SIZE) != (res, res):
            print(f"Note: INPUT.SIZE {tuple(cfg.INPUT.SIZE)} differs from the backbone's {res}x{res}; "
                  f"positional embeddings are interpolated")
        for p in clip_model.parameters():
            p.requires_grad_(False)
        self.clip_model = clip_model
        if verbose:
            print("Building custom CLIP")
        self.model = CustomCLIP(classnames, clip_model, n_ctx=c.N_CTX, ctx_init=c.CTX_INIT, csc=c.CSC,
                                class_token_position=c.CLASS_TOKEN_POSITION, text_mode=self.text_mode,
                                verbose=verbose).to(self.device)
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if trainable != ["prompt_learner.ctx"]:
            raise RuntimeError(f"only the prompt learner's context should be trainable, found {trainable}")
        if verbose:
            n = self.model.prompt_learner.ctx.numel()
            print(f"Trainable parameters: {n:,} (prompt_learner.ctx {tuple(self.model.prompt_learner.ctx.shape)}, "
                  f"{self.precision}); text encoding: {self.model.text_encoder.resolve_mode(self.model.prompt_learner)}")
        if cfg.MODEL.INIT_WEIGHTS:
            self.load_pretrained_prompt(cfg.MODEL.INIT_WEIGHTS)

        from locoop.engine.lr_scheduler import build_lr_scheduler
        from locoop.engine.optim import build_optimizer

        self.optim = build_optimizer(self.model.prompt_learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.model.prompt_learner, self.optim, self.sched)
        self.init_amp_scaler(self.precision == "amp")

    def checkpoint_provenance(self, name: str) -> Optional[dict]:
        """The prompt learner's checkpoints record the backbone (name, weight hash) and the class-name hash."""
        if name != "prompt_learner":
            return None
        from locoop.engine.provenance import prompt_provenance

        return prompt_provenance(self.cfg.MODEL.BACKBONE.NAME, self.clip_model, self.model.prompt_learner.classnames)

    def load_pretrained_prompt(self, path: str) -> None:
        """Initialise the prompt learner from a checkpoint file (``MODEL.INIT_WEIGHTS``), checked as
        :meth:`load_model` checks one (backbone and class names, ``MODEL.ALLOW_OTHER_*``)."""
        from locoop.engine.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        self.check_provenance("prompt_learner", ckpt, path)  # another backbone / class names: refused
        state = ckpt["state_dict"]
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        self.model.prompt_learner.load_state_dict(state)
        print(f"Initialised the prompt learner from {path}")

    # ------------------------------------------------------------------ training
    def forward_backward(self, batch: dict) -> dict:
        image, label = self.parse_batch_train(batch)
        with self.autocast():
            if self.lam > 0:
                logits, logits_local = self.model(image)
                loss, loss_id, loss_en = locoop_loss(logits, logits_local, label, self.lam, self.top_k)
            else:  # CoOp: the local term is 0, so the local features are not computed at all
                logits = self.model(image, return_local=False)
                loss_id = F.cross_entropy(logits.float(), label)
                loss, loss_en = loss_id, torch.zeros((), device=loss_id.device)
        self.model_backward_and_update(loss)
        summary = {
            "loss": loss.item(),
            "loss_id": loss_id.item(),
            "loss_en": loss_en.item(),
            "acc": compute_accuracy(logits, label),
        }
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def text_features(self) -> Tensor:
        """Normalised float32 text features ``[C, D]`` of the learned prompts (no gradient)."""
        with self.autocast():
            return self.model.text_features()

    def class_prompts(self, chunk_size: Optional[int] = None) -> ClassPrompts:
        """The learned prompts as token embeddings (see :meth:`CustomCLIP.class_prompts`)."""
        return self.model.class_prompts(chunk_size)

    def model_inference(self, input: Tensor) -> Tensor:
        """Global logits ``[B, C]`` (under the same autocast as ``text_features``: with ``amp`` both are fp16)."""
        with self.autocast():
            return self.model(input, return_local=False, text_features=self._eval_text_features)


@TRAINER_REGISTRY.register("CoOp")
class CoOp(LoCoOp):
    """Context optimisation (CoOp): the LoCoOp trainer with LAMBDA forced to 0."""

    def lambda_value(self) -> float:
        if float(self.cfg.TRAINER.LOCOOP.LAMBDA) != 0 and self.cfg.VERBOSE:
            print(f"Note: CoOp ignores TRAINER.LOCOOP.LAMBDA={self.cfg.TRAINER.LOCOOP.LAMBDA} (uses 0)")
        return 0.0

"""LoCoOp and CoOp trainers (CoOp = LoCoOp with LAMBDA 0).

``CustomCLIP`` = prompt learner + fast exact text encoder + CLIP's image encoder; its forward gives
``(logits_global [B, C], logits_local [B, P, C])`` with ``logit_scale.exp() * cosine``. Only the
prompt learner is trained and checkpointed (``OUTPUT_DIR/prompt_learner/model.pth.tar-<epoch>``).

Public interface for evaluation code: ``trainer.clip_model`` (the frozen CLIP) and
``trainer.text_features()`` (normalised ``[C, D]`` features of the learned prompts).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from locoop.engine.registry import TRAINER_REGISTRY

from .base import PromptTrainer
from .clip_backbone import load_clip
from .loss import locoop_loss
from .prompt_learner import PromptLearner
from .text_encoder import TextEncoder

Tensor = torch.Tensor

__all__ = ["CustomCLIP", "LoCoOp", "CoOp", "compute_accuracy"]


def compute_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return (logits.argmax(dim=-1) == labels).float().mean().item() * 100.0


class CustomCLIP(nn.Module):
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
        self.clip_model = clip_model
        self.text_encoder = TextEncoder(clip_model, text_mode)

    @property
    def image_encoder(self) -> nn.Module:
        return self.clip_model.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip_model.logit_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.clip_model.dtype

    def text_features(self) -> Tensor:
        """L2-normalised features of the learned prompts ``[C, D]`` (differentiable wrt the context)."""
        return F.normalize(self.text_encoder(self.prompt_learner), dim=-1)

    def encode_image(self, image: Tensor, return_local: bool = True) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Normalised global ``[B, D]`` (and local ``[B, P, D]``) image features.

        Computed without a graph unless some image-tower parameter is trainable: CLIP is frozen, so
        nothing upstream of the features needs a gradient and the activations need not be kept.
        """
        visual = self.clip_model.visual
        track = torch.is_grad_enabled() and any(p.requires_grad for p in visual.parameters())
        with torch.set_grad_enabled(track):
            out = self.clip_model.encode_image(image.to(self.dtype), return_local=return_local)
        if not return_local:
            return F.normalize(out, dim=-1)
        glob, local = out
        return F.normalize(glob, dim=-1), F.normalize(local, dim=-1)

    def forward(self, image: Tensor, return_local: bool = True, text_features: Optional[Tensor] = None
                ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Logits ``logit_scale.exp() * cos``: ``(global [B, C], local [B, P, C])``, or global only.

        Args:
            image: ``[B, 3, H, W]``.
            return_local: also return the local logits.
            text_features: precomputed normalised text features (evaluation); default: from the prompts.
        """
        feats = self.encode_image(image, return_local)
        text = self.text_features() if text_features is None else text_features
        scale = self.logit_scale.exp()
        if not return_local:
            return scale * feats @ text.t()
        glob, local = feats
        return scale * glob @ text.t(), scale * local @ text.t()


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

    def load_pretrained_prompt(self, path: str) -> None:
        """Initialise the prompt learner from a checkpoint file (``MODEL.INIT_WEIGHTS``)."""
        from locoop.engine.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
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
        """Normalised text features ``[C, D]`` of the learned prompts (no gradient)."""
        with self.autocast():
            return self.model.text_features()

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

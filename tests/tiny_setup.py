"""Shared by the tests that build trainers on generated data: a tiny trainer config.

Every key the tiny models and folders need is set; ``keys`` override or add dotted config keys,
e.g. ``tiny_trainer_cfg(root, ckpt, out, "LoCoOp", **{"TRAINER.LOCOOP.PREC": "amp"})``.
"""
from __future__ import annotations

from typing import Any

from locoop.config import get_cfg_default

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def set_key(cfg: Any, key: str, value: Any) -> None:
    """``cfg.<key> = value`` for a dotted key."""
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def tiny_trainer_cfg(root, backbone, out, trainer: str, size: int = 32, **keys: Any) -> Any:
    """A CPU config for ``trainer`` on the generated ImageNet layout at ``root`` with a tiny CLIP ``backbone``."""
    cfg = get_cfg_default()
    values = {
        "SEED": 1, "VERBOSE": False, "OUTPUT_DIR": str(out),
        "MODEL.DEVICE": "cpu", "MODEL.BACKBONE.NAME": str(backbone), "TRAINER.NAME": trainer,
        "DATASET.ROOT": str(root), "DATASET.NAME": "ImageNet", "DATASET.NUM_SHOTS": 4,
        "INPUT.SIZE": (size, size), "INPUT.TRANSFORMS": ["normalize"], "INPUT.PIXEL_MEAN": CLIP_MEAN,
        "INPUT.PIXEL_STD": CLIP_STD, "DATALOADER.NUM_WORKERS": 0, "DATALOADER.TRAIN_X.BATCH_SIZE": 4,
        "DATALOADER.TEST.BATCH_SIZE": 4, "OPTIM.NAME": "sgd", "OPTIM.LR": 0.002, "OPTIM.MAX_EPOCH": 1,
        "OPTIM.LR_SCHEDULER": "cosine", "TEST.NO_TEST": True, "TRAINER.LOCOOP.N_CTX": 4, "TRAINER.LOCOOP.TOPK": 2,
        "SETAR.FT.TOPK": 2, "SETAR.FT.LORA_RANK": 2,
    }
    values.update(keys)
    for key, value in values.items():
        set_key(cfg, key, value)
    return cfg

"""Dassl-compatible engine: registries, trainer base classes, optimisers, schedulers, checkpoints,
atomic writes, provenance (see docs/ARCHITECTURE.md)."""
from .checkpoint import latest_checkpoint, load_checkpoint, resume_from_checkpoint, save_checkpoint
from .evaluator import EVALUATOR_REGISTRY, build_evaluator
from .logger import AverageMeter, MetricMeter, close_logger, setup_logger
from .lr_scheduler import build_lr_scheduler
from .optim import build_optimizer
from .registry import DATASET_REGISTRY, TRAINER_REGISTRY, Registry, RegistryError, build_trainer, get_trainer_class, list_trainers
from .seed import epoch_seed, seed_worker, set_random_seed
from .trainer import SimpleTrainer, TrainerBase, TrainerX, select_device

__all__ = [
    "Registry", "RegistryError", "TRAINER_REGISTRY", "list_trainers", "get_trainer_class", "DATASET_REGISTRY", "EVALUATOR_REGISTRY", "build_trainer", "build_evaluator",
    "TrainerBase", "SimpleTrainer", "TrainerX", "select_device",
    "build_optimizer", "build_lr_scheduler",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "resume_from_checkpoint",
    "setup_logger", "close_logger", "AverageMeter", "MetricMeter",
    "set_random_seed", "seed_worker", "epoch_seed",
]

"""Optimisers from the OPTIM config keys (Dassl's ``build_optimizer``)."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

__all__ = ["AVAILABLE_OPTIMIZERS", "build_optimizer"]

AVAILABLE_OPTIMIZERS = ("sgd", "adam", "adamw")


def _param_groups(model_or_params: Union[nn.Module, Iterable[Any]], optim_cfg: Any) -> list:
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
        if optim_cfg.STAGED_LR:
            new_layers = optim_cfg.NEW_LAYERS
            if isinstance(new_layers, str):
                new_layers = [new_layers]
            if not new_layers:
                raise ValueError("OPTIM.STAGED_LR is True but OPTIM.NEW_LAYERS is empty; name the new layers.")
            names = dict(model.named_children())
            missing = [n for n in new_layers if n not in names]
            if missing:
                raise ValueError(f"OPTIM.NEW_LAYERS {missing} are not children of the model; "
                                 f"its children are {list(names)}.")
            base, new = [], []
            for name, module in names.items():
                params = [p for p in module.parameters() if p.requires_grad]
                (new if name in new_layers else base).extend(params)
            return [{"params": base, "lr": optim_cfg.LR * optim_cfg.BASE_LR_MULT}, {"params": new}]
        return [p for p in model.parameters() if p.requires_grad]
    params = list(model_or_params)
    if params and isinstance(params[0], dict):
        return params
    return [p for p in params if getattr(p, "requires_grad", True)]


def build_optimizer(model_or_params: Union[nn.Module, Iterable[Any]], optim_cfg: Any,
                    param_groups: Optional[list] = None) -> torch.optim.Optimizer:
    """Build the optimiser named by ``optim_cfg.NAME``.

    Args:
        model_or_params: A module (its trainable parameters are used), parameters, or param-group dicts.
        optim_cfg: The ``cfg.OPTIM`` node (NAME, LR, WEIGHT_DECAY, MOMENTUM, SGD_DAMPNING,
            SGD_NESTEROV, ADAM_BETA1/2, STAGED_LR, NEW_LAYERS, BASE_LR_MULT).
        param_groups: Explicit param groups; overrides ``model_or_params``.

    Raises:
        ValueError: unknown optimiser name (lists the choices) or nothing to optimise.
    """
    name = str(optim_cfg.NAME).lower()
    if name not in AVAILABLE_OPTIMIZERS:
        raise ValueError(f"Unknown optimizer OPTIM.NAME={optim_cfg.NAME!r}; choose one of {list(AVAILABLE_OPTIMIZERS)}.")
    groups = param_groups if param_groups is not None else _param_groups(model_or_params, optim_cfg)
    n_params = sum(len(g["params"]) if isinstance(g, dict) else 1 for g in groups)
    if n_params == 0:
        raise ValueError("No parameters to optimise (none has requires_grad=True); "
                         "check which parts of the model the trainer freezes.")
    lr, wd = optim_cfg.LR, optim_cfg.WEIGHT_DECAY
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.MOMENTUM, weight_decay=wd,
                               dampening=optim_cfg.SGD_DAMPNING, nesterov=optim_cfg.SGD_NESTEROV)
    betas = (optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, betas=betas)

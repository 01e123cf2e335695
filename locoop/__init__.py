"""LoCoOp / MCM / GL-MCM / SeTAR: CLIP-based few-shot and training-free OOD detection."""

__version__ = "0.1.0"

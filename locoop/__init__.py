"""LoCoOp / MCM / GL-MCM / SeTAR: CLIP-based few-shot and training-free OOD detection.

The layers, the data flow of every command and where each idea lives: docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

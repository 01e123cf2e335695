"""Backbones and heads beyond CLIP (each module imports its own heavy dependencies lazily)."""

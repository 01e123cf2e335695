"""Our own CLIP, with OpenAI's public API shape.

    >>> import clip
    >>> clip.available_models()
    >>> model, preprocess = clip.load("ViT-B/16", device="cpu")
    >>> glob, local = model.encode_image(images, return_local=True)
    >>> text = model.encode_text(clip.tokenize(["a photo of a dog."]))

A library of its own (it never imports the framework); see docs/ARCHITECTURE.md, "Layers".
"""
from clip.model import CLIP, build_model
from clip.pretrained import available_models, load
from clip.tokenizer import tokenize

__all__ = ["CLIP", "available_models", "build_model", "load", "tokenize"]

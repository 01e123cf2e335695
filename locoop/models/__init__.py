"""Models on top of a backbone: the CLIP head shared by every method (:mod:`locoop.models.head`)."""

"""Models on top of a backbone: the CLIP head shared by every method (:mod:`locoop.models.head`) and
backbones beyond CLIP (:mod:`locoop.models.swinv2`); each module imports its heavy dependencies lazily."""

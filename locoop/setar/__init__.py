"""SeTAR: training-free low-rank pruning search on CLIP weights, and SeTAR+FT (docs/ARCHITECTURE.md,
"setar-search").

- :mod:`~locoop.setar.lowrank` -- address weight matrices, apply/revert low-rank approximations;
- :mod:`~locoop.setar.searchers` -- the order in which the search visits matrices;
- :mod:`~locoop.setar.search` -- the greedy loop (resumable);
- :mod:`~locoop.setar.criterion` -- the criterion of a candidate (LoCoOp loss or an OOD metric);
- :mod:`~locoop.setar.evaluator` -- the search modes' interface; :mod:`~locoop.setar.fast_evaluator`
  (cached, exact) and :mod:`~locoop.setar.naive_evaluator` (recompute everything);
- :mod:`~locoop.setar.outputs` -- search log, progress, summary;
- :mod:`~locoop.setar.settings` -- ``[[tower, weight_type, layer, ratio], ...]`` and their files.
"""
from locoop.setar.lowrank import (
    BLOCK_WEIGHT_TYPES,
    PRUNE_TYPES,
    TOWERS,
    WEIGHT_TYPES,
    LowRankEditor,
    get_linear,
    n_removed,
    num_layers,
)
from locoop.setar.search import DEFAULT_RATIOS, ClassPrompts, SearchData, SearchResult, run_search
from locoop.setar.searchers import SEARCHERS, Step, build_steps, get_searcher, list_searchers
from locoop.setar.settings import apply_settings, load_settings, save_settings, validate_settings

__all__ = [
    "BLOCK_WEIGHT_TYPES", "PRUNE_TYPES", "TOWERS", "WEIGHT_TYPES", "LowRankEditor", "get_linear", "n_removed",
    "num_layers", "SEARCHERS", "Step", "build_steps", "get_searcher", "list_searchers", "apply_settings",
    "load_settings", "save_settings", "validate_settings", "DEFAULT_RATIOS", "ClassPrompts", "SearchData",
    "SearchResult", "run_search",
]

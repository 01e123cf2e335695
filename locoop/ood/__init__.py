"""OOD detection: scores from CLIP similarities, metrics, result files and seed summaries.

Model-independent: the benchmark runner extracts similarities and calls these functions.
Names are imported lazily (PEP 562) so that e.g. ``python -m locoop summarize`` does not
pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "locoop.ood.scores": ["SCORE_REGISTRY", "ScoreAccumulator", "accuracy", "compute_scores", "get_score",
                          "list_scores", "predict", "register_score"],
    "locoop.ood.metrics": ["FPR_CONVENTION", "FPR_CONVENTION_OPENOOD", "evaluate_all", "fpr_at_recall",
                           "ood_metrics", "ood_metrics_openood"],
    "locoop.ood.results": ["collect_env", "format_table", "read_results", "with_average", "write_results"],
    "locoop.ood.summarize": ["summarize_runs"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'locoop.ood' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + __all__)

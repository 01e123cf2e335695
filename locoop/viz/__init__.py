"""Plots of OOD evaluations (score histograms, ROC curves) and, later, patch visualisations."""
from locoop.viz.plots import plot_all_histograms, plot_overview, plot_roc, plot_score_histograms

__all__ = ["plot_score_histograms", "plot_all_histograms", "plot_overview", "plot_roc"]

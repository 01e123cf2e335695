"""Histograms with AUROC / FPR95 and the FPR95 threshold line, and the one-page overview (locoop/viz/plots.py)."""
import numpy as np
import pytest
from PIL import Image

from locoop.ood.metrics import ood_metrics, operating_point
from locoop.viz import plots
from locoop.viz.plots import plot_all_histograms, plot_overview, plot_score_histograms


@pytest.fixture
def drawn(monkeypatch):
    """Record what every saved figure shows (text, vertical lines per panel) before it is cleared."""
    seen = []
    save = plots._save

    def spy(fig, path):
        panels = []
        for ax in fig.axes:
            if not ax.get_visible() or not ax.patches:
                continue
            legend = ax.get_legend()
            panels.append({"texts": [t.get_text() for t in ax.texts], "title": ax.get_title(),
                           "vlines": [float(ln.get_xdata()[0]) for ln in ax.lines
                                      if len(set(map(float, ln.get_xdata()))) == 1],
                           "legend": [t.get_text() for t in legend.get_texts()] if legend else []})
        seen.append({"path": path, "panels": panels, "suptitle": fig._suptitle.get_text() if fig._suptitle else ""})
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def _scores(seed=0):
    rng = np.random.default_rng(seed)
    idv = rng.normal(1.0, 0.3, 60)
    return idv, {"iNaturalist": rng.normal(0.4, 0.3, 30), "SUN": rng.normal(0.8, 0.3, 25)}


def test_histogram_shows_auroc_fpr95_and_the_threshold(tmp_path, drawn):
    idv, sets = _scores()
    paths = plot_score_histograms(idv, sets, "MCM", tmp_path)
    assert [p.name for p in paths] == ["hist_MCM_iNaturalist.png", "hist_MCM_SUN.png"]
    for (name, ood), record in zip(sets.items(), drawn):
        m, point = ood_metrics(idv, ood), operating_point(idv, ood)
        (panel,) = record["panels"]
        assert panel["vlines"] == [pytest.approx(point["threshold"])]
        assert f"AUROC {100 * m['auroc']:.2f}%" in panel["texts"][0]
        assert f"FPR95 {100 * m['fpr95']:.2f}%" in panel["texts"][0]
        assert any(f"TPR {100 * point['tpr']:.1f}%" in t for t in panel["legend"])
        with Image.open(record["path"]) as im:
            assert im.format == "PNG" and im.width > 300


def test_given_metrics_are_shown_instead_of_recomputed(tmp_path, drawn):
    idv, sets = _scores(1)
    given = {"SUN": {"auroc": 0.1234, "fpr95": 0.5678, "aupr": 0.5}}
    plot_all_histograms({"GL-MCM": idv}, {"GL-MCM": sets}, tmp_path, metrics={"GL-MCM": given})
    by_name = {r["path"].name: r["panels"][0]["texts"][0] for r in drawn}
    assert "AUROC 12.34%" in by_name["hist_GL-MCM_SUN.png"] and "FPR95 56.78%" in by_name["hist_GL-MCM_SUN.png"]
    m = ood_metrics(idv, sets["iNaturalist"])  # no given numbers: computed from the scores
    assert f"AUROC {100 * m['auroc']:.2f}%" in by_name["hist_GL-MCM_iNaturalist.png"]


def test_overview_is_one_page_of_sets_by_main_scores(tmp_path, drawn):
    idv, sets = _scores(2)
    rng = np.random.default_rng(3)
    names = ["MCM", "GL-MCM", "energy"]
    ids = {s: idv + rng.normal(0, 0.05, idv.size) for s in names}
    oods = {s: {o: v + rng.normal(0, 0.05, v.size) for o, v in sets.items()} for s in names}
    path = plot_overview(ids, oods, tmp_path / "plots" / "overview.png")
    assert path == tmp_path / "plots" / "overview.png" and len(drawn) == 1
    panels = drawn[0]["panels"]
    assert len(panels) == 2 * 2  # MCM and GL-MCM (the default rows) x the 2 sets; energy is not a main score
    k = 0
    for score in ("MCM", "GL-MCM"):
        for o in sets:
            m, point = ood_metrics(ids[score], oods[score][o]), operating_point(ids[score], oods[score][o])
            assert panels[k]["vlines"] == [pytest.approx(point["threshold"])]
            assert f"FPR95 {100 * m['fpr95']:.2f}%" in panels[k]["texts"][0]
            k += 1
    assert [p["title"].split(" (")[0] for p in panels[:2]] == list(sets)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height
    # Named rows; without a main score every computed score is a row.
    plot_overview(ids, oods, tmp_path / "o2.png", scores=["energy"])
    assert len(drawn[-1]["panels"]) == 2
    plot_overview({"energy": ids["energy"]}, {"energy": oods["energy"]}, tmp_path / "o3.png")
    assert len(drawn[-1]["panels"]) == 2


def test_overview_refuses_what_it_cannot_draw(tmp_path):
    idv, sets = _scores()
    with pytest.raises(ValueError, match="no scores for \\['L-MCM'\\]"):
        plot_overview({"MCM": idv}, {"MCM": sets}, tmp_path / "o.png", scores=["L-MCM"])
    with pytest.raises(ValueError, match="OOD sets"):
        plot_overview({"MCM": idv, "GL-MCM": idv}, {"MCM": sets, "GL-MCM": {"SUN": sets["SUN"]}}, tmp_path / "o.png")
    with pytest.raises(ValueError, match="NaN"):
        plot_overview({"MCM": [np.nan, 1.0]}, {"MCM": sets}, tmp_path / "o.png")
    assert not (tmp_path / "o.png").exists()

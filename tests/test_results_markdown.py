"""ood_results.md says how many images each set had and how many were skipped (locoop/ood/results.py)."""
from locoop.ood.results import format_markdown, write_results

RESULTS = {"MCM": {"iNaturalist": {"fpr95": 0.30, "auroc": 0.90, "aupr": 0.95},
                   "SUN": {"fpr95": 0.50, "auroc": 0.80, "aupr": 0.85}}}


def test_markdown_has_an_image_table_and_announces_skipped_images(tmp_path):
    meta = {"num_images": {"ID": 38, "iNaturalist": 10, "SUN": 7}, "num_skipped": {"ID": 2, "iNaturalist": 0, "SUN": 3},
            "env": {}}
    files = write_results(tmp_path, RESULTS, meta, id_accuracy=0.5)
    md = files["md"].read_text(encoding="utf-8")
    lines = md.splitlines()
    assert "## Images" in lines
    table = lines[lines.index("## Images") + 2:]
    assert table[:5] == ["| set | images scored | skipped (unreadable) |", "|---|---:|---:|", "| ID | 38 | 2 |",
                         "| iNaturalist | 10 | 0 |", "| SUN | 7 | 3 |"]
    # Announced before the first table, with the count per set.
    warning = [ln for ln in lines if "unreadable images skipped" in ln]
    assert len(warning) == 1 and "**5 unreadable images skipped** (2 ID, 3 SUN)" in warning[0]
    assert lines.index(warning[0]) < lines.index("## MCM")


def test_no_skipped_images_no_warning_and_no_counts_no_table():
    md = format_markdown(RESULTS, num_images={"ID": 4, "SUN": 3}, num_skipped={"ID": 0, "SUN": 0})
    assert "skipped**" not in md and "| ID | 4 | 0 |" in md and "| SUN | 3 | 0 |" in md
    # A set known to one mapping only shows '?' for the other.
    assert "| X | ? | 1 |" in format_markdown(RESULTS, num_images={"ID": 4}, num_skipped={"X": 1})
    plain = format_markdown(RESULTS)
    assert "## Images" not in plain and "skipped" not in plain

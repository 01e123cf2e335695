"""Mean and standard deviation of several runs' ``ood_results.json`` (e.g. seeds 1-3), and the
comparison with a published result.

The papers report the mean over 3 seeds. The standard deviation here is the
**population** one (``ddof=0``, ``numpy.std``'s default, as CoOp/Dassl's
``parse_test_res.py`` does); pass ``ddof=1`` for the sample one. Every summary states
which.

Published results ship as ``locoop/data/paper_results.json``: one row per (method, score, ID dataset,
backbone) with per-OOD-set FPR95 / AUROC / AUPR in percent and the file it was copied from. A summary
made with ``paper=<row id>`` carries ``paper_comparison``: the runs' mean next to the row, and the
difference run - paper. ``paper_file`` takes the row from a user's file of the same format instead
(:func:`check_paper_results` says what a row needs).
"""
from __future__ import annotations

import difflib
import glob as _glob
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from locoop.config.training_keys import flatten_config
from locoop.ood.results import AVERAGE, JSON_NAME, REQUIRED_METRICS, METRIC_TITLES, atomic_write_text, read_results

SUMMARY_FORMAT_VERSION = 1
SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"
PAPER_RESULTS = Path(__file__).resolve().parent.parent / "data" / "paper_results.json"
PathLike = Union[str, Path]


PAPER_METRICS = ("fpr95", "auroc", "aupr")
PAPER_ROW_TEXT_KEYS = ("id", "method", "score", "id_dataset", "backbone")


def load_paper_results(path: Optional[PathLike] = None) -> Dict[str, Any]:
    """The shipped published results (``locoop/data/paper_results.json``), or a user's file of that format.

    Raises:
        ValueError: the file is not JSON, or not a valid paper-results file (:func:`check_paper_results`).
        OSError: it cannot be read.
    """
    p = Path(path) if path is not None else PAPER_RESULTS
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"paper-results file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    check_paper_results(doc, p)
    return doc


def _check_metric_block(block: Any, where: str) -> None:
    if not isinstance(block, dict) or not block:
        raise ValueError(f"{where} must be an object of metrics {', '.join(PAPER_METRICS)} (in percent)")
    unknown = sorted(set(block) - set(PAPER_METRICS))
    if unknown:
        raise ValueError(f"{where} has unknown metric(s) {unknown}; the metrics are {', '.join(PAPER_METRICS)}")
    for k, v in block.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 100.0:
            raise ValueError(f"{where}.{k} = {v!r}: values are numbers in percent, 0-100")
    if "auroc" in block and float(block["auroc"]) <= 1.0:
        # AUROC near 0.9 is a fraction: a percent table never has an AUROC at or below 1.
        raise ValueError(f"{where}.auroc = {block['auroc']}: values are in percent; multiply fractions by 100")


def check_paper_results(doc: Any, where: PathLike = "paper results") -> None:
    """Check a paper-results document before any run is read: the shape ``summarize --paper`` compares with.

    A row needs ``id``, ``method``, ``score`` (a registered score name, as the runs' result files spell it),
    ``id_dataset``, ``backbone`` (as ``MODEL.BACKBONE.NAME``), ``source`` with at least ``paper`` (no number
    without its source), and ``ood``: OOD set -> ``fpr95`` / ``auroc`` / ``aupr`` in percent; ``average``
    (same metrics), ``id_accuracy`` (percent), ``decimals`` (how many the source gives) and ``config``
    (dotted config keys the numbers were computed with) are optional.

    Raises:
        ValueError: naming the file, the row and the key at fault, and what it must be.
    """
    from locoop.ood.scores import list_scores

    if not isinstance(doc, dict) or doc.get("format_version") != 1 or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{where} is not a paper-results file: it must be an object with \"format_version\": 1 "
                         "and \"rows\": [...] (the layout of locoop/data/paper_results.json)")
    if not doc["rows"]:
        raise ValueError(f"{where} has no rows")
    scores, seen = list_scores(), set()
    for i, row in enumerate(doc["rows"]):
        name = f"{where}: row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{name} is not an object")
        for key in PAPER_ROW_TEXT_KEYS:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{name} needs a non-empty text {key!r}")
        name = f"{where}: row {row['id']!r}"
        if row["id"] in seen:
            raise ValueError(f"{name} appears twice; row ids are unique")
        seen.add(row["id"])
        if row["score"] not in scores:
            close = difflib.get_close_matches(row["score"], scores, n=1, cutoff=0.5)
            raise ValueError(f"{name}: unknown score {row['score']!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; the scores are {', '.join(scores)}")
        src = row.get("source")
        if not isinstance(src, dict) or not isinstance(src.get("paper"), str) or not src["paper"].strip():
            raise ValueError(f"{name} needs \"source\": {{\"paper\": ..., \"file\" or \"table\": ...}}: "
                             "every number names where it was copied from")
        if not isinstance(row.get("ood"), dict) or not row["ood"]:
            raise ValueError(f"{name} needs \"ood\": {{OOD set: {{metric: value}}}} with at least one set")
        for o, block in row["ood"].items():
            _check_metric_block(block, f"{name}: ood.{o}")
        if row.get("average") is not None:
            _check_metric_block(row["average"], f"{name}: average")
        acc = row.get("id_accuracy")
        if acc is not None and (isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 <= acc <= 100):
            raise ValueError(f"{name}: id_accuracy = {acc!r}: a number in percent, 0-100")
        conf = row.get("config")
        if conf is not None and (not isinstance(conf, dict) or not all(isinstance(k, str) and "." in k for k in conf)):
            raise ValueError(f"{name}: config must map dotted config keys (e.g. \"OOD.LAMBDA_LOCAL\") to the "
                             "values the row's numbers were computed with")
        dec = row.get("decimals")
        if dec is not None and (isinstance(dec, bool) or not isinstance(dec, int) or not 0 <= dec <= 4):
            raise ValueError(f"{name}: decimals = {dec!r}: the number of decimals the source gives, 0-4")


def list_paper_rows(path: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """Every published row (dicts with ``id``, ``method``, ``score``, ``id_dataset``, ``backbone``, ``source``, ...)."""
    return list(load_paper_results(path)["rows"])


def get_paper_row(row_id: str, path: Optional[PathLike] = None) -> Dict[str, Any]:
    """The published row ``row_id``.

    Raises:
        ValueError: unknown id (the message lists the ids and how to see them).
    """
    rows = list_paper_rows(path)
    for row in rows:
        if row["id"] == row_id:
            return row
    ids = [r["id"] for r in rows]
    close = difflib.get_close_matches(row_id, ids, n=3)
    where = "" if path is None else f" in {path}"
    raise ValueError(f"no published row {row_id!r}{where}" + (f"; did you mean {', '.join(close)}?" if close else "")
                     + f" Rows: {', '.join(ids)} (details: --paper list)")


def format_paper_list(rows: Optional[Sequence[Mapping[str, Any]]] = None) -> str:
    """One line per published row: id, method, score, dataset, backbone, source file."""
    rows = list_paper_rows() if rows is None else rows
    width = max(len(r["id"]) for r in rows)
    lines = [f"{len(rows)} published rows (values in percent; source files named per row):"]
    for r in rows:
        where = _where(r["source"])
        lines.append(f"{r['id']:<{width}}  {r['method']}, {r['score']}, {r['id_dataset']}, {r['backbone']}"
                     f"  [{where}]")
    return "\n".join(lines)


def compare_with_paper(summary: Mapping[str, Any], row: Mapping[str, Any],
                       run_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The runs' means next to a published row: ``sets[set][metric] = {run, std, paper, diff}`` in percent.

    ``Average`` is the runs' mean over the row's OOD sets (so it compares with the published average even
    when the runs have more sets); it is None when a set of the row is missing from the runs. A row's
    ``config`` (dotted keys its numbers were computed with, e.g. ``OOD.LAMBDA_LOCAL``) is checked against
    ``run_config`` (the runs' flattened config): each differing key is a note, with the value to use.

    Raises:
        ValueError: the runs have no results for the row's score.
    """
    score = row["score"]
    if score not in summary["scores"]:
        raise ValueError(f"the runs have no {score!r} results (they have {sorted(summary['scores'])}); paper row "
                         f"{row['id']!r} is {score}: evaluate with it in OOD.SCORES")
    run_rows = summary["scores"][score]
    sets: Dict[str, Dict[str, Any]] = {}
    for o, paper_m in row["ood"].items():
        sets[o] = {}
        for k, p in paper_m.items():
            r = run_rows.get(o, {}).get(k)
            sets[o][k] = {"run": None if r is None else r["mean"], "std": None if r is None else r["std"],
                          "paper": float(p), "diff": None if r is None else r["mean"] - float(p)}
    avg: Dict[str, Any] = {}
    same_sets = set(run_rows) - {AVERAGE} == set(row["ood"])
    for k, p in (row.get("average") or {}).items():
        if same_sets and k in run_rows.get(AVERAGE, {}):  # the runs' own Average row (with its spread)
            r, std = run_rows[AVERAGE][k]["mean"], run_rows[AVERAGE][k]["std"]
        else:
            means = [sets[o][k]["run"] for o in row["ood"] if k in sets[o]]
            r = float(np.mean(means)) if means and all(m is not None for m in means) else None
            std = None
        avg[k] = {"run": r, "std": std, "paper": float(p), "diff": None if r is None else r - float(p)}
    sets[AVERAGE] = avg
    notes = []
    missing = [o for o in row["ood"] if o not in run_rows]
    if missing:
        run_sets = [o for o in run_rows if o != AVERAGE]
        close = {o: difflib.get_close_matches(o, run_sets, n=1, cutoff=0.7) for o in missing}
        hint = "; ".join(f"the runs' {c[0]!r} for the row's {o!r}? (rename it in the row)" for o, c in close.items() if c)
        notes.append(f"the runs have no results for {missing}; evaluate them on the row's OOD sets"
                     + (f" -- or is it {hint}" if hint else ""))
    extra = [o for o in run_rows if o not in row["ood"] and o != AVERAGE]
    if extra:
        notes.append(f"the runs' sets {extra} are not in the row; its Average here is over the row's sets")
    for key, value in (row.get("config") or {}).items():
        if run_config is not None and key in run_config and run_config[key] != value:
            notes.append(f"the row's numbers were computed with {key} {value!r}, the runs' with {run_config[key]!r}: "
                         f"evaluate with {key} {value!r} to compare like with like")
    if row.get("decimals") is not None and int(row["decimals"]) < 2:
        step = 10.0 ** -int(row["decimals"])
        notes.append(f"the row's values are given to {step:g} (rounded): a difference under {step / 2:g} is within "
                     "that rounding")
    for key, label in (("id_dataset", "ID dataset"), ("backbone", "backbone")):
        ours = summary.get(key)
        if ours and row.get(key) and str(ours) != str(row[key]):
            notes.append(f"the runs' {label} is {ours}, the row's is {row[key]}")
    acc = None
    if row.get("id_accuracy") is not None and summary.get("id_accuracy") is not None:
        r = summary["id_accuracy"]["mean"]
        acc = {"run": r, "std": summary["id_accuracy"]["std"], "paper": float(row["id_accuracy"]),
               "diff": r - float(row["id_accuracy"])}
    return {"row": dict(row), "score": score, "sets": sets, "id_accuracy": acc, "notes": notes,
            "n_runs": summary.get("n_runs")}


def _num(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _run_cell(m: Mapping[str, Any], n_runs: int) -> str:
    if m["run"] is None:
        return "—"
    return f"{m['run']:.2f}" + (f" ± {m['std']:.2f}" if n_runs > 1 and m.get("std") is not None else "")


def _places(src: Mapping[str, Any]) -> List[str]:
    """What a source without a repository names of where its numbers are: table, file, url."""
    return [str(src[k]) for k in ("table", "file", "url") if src.get(k)]


def _where(src: Mapping[str, Any]) -> str:
    """Where a row's numbers were copied from: a repository file at a commit, or a table of the paper."""
    if src.get("repository"):
        return f"{src['repository']}@{str(src.get('commit', ''))[:7]} {src.get('file', '')}".strip()
    return " ".join(_places(src)) or str(src.get("paper", ""))


def _source_line(row: Mapping[str, Any]) -> str:
    src = row["source"]
    if src.get("repository"):
        table = f", table \"{src['table']}\"" if src.get("table") else ""
        return (f"{src.get('paper', '')}; {src.get('kind', 'source')}: {src.get('repository', '')} "
                f"(commit {str(src.get('commit', ''))[:12]}) {src.get('file', '')}{table}").strip()
    rest = ", ".join(_places(src))
    return f"{src.get('paper', '')}" + (f"; {src.get('kind', 'source')}: {rest}" if rest else "")


def format_comparison_table(comparison: Mapping[str, Any]) -> str:
    """Console text: every OOD set's run mean, published value and difference (run - paper)."""
    row, n = comparison["row"], int(comparison.get("n_runs") or 1)
    metrics = [k for k in REQUIRED_METRICS if any(k in m for m in comparison["sets"].values())]
    width = max(len(AVERAGE), *(len(o) for o in comparison["sets"]))
    run_w = 15 if n > 1 else 7
    lines = [f"Paper row {row['id']}: {row['method']}, {row['score']}, {row['id_dataset']}, {row['backbone']}",
             f"  {row.get('setting', '')}", f"  source: {_source_line(row)}",
             f"  run = {'mean ± std of ' + str(n) + ' runs' if n > 1 else 'the run'}; diff = run - paper (percent)"]
    head = f"{'OOD set':<{width}}"
    for k in metrics:
        head += f"  {METRIC_TITLES[k] + ' run':>{run_w + 0}} {'paper':>7} {'diff':>7}"
    lines += [head, "-" * len(head)]
    for o, m in comparison["sets"].items():
        line = f"{o:<{width}}"
        for k in metrics:
            c = m.get(k, {"run": None, "paper": None, "diff": None})
            line += f"  {_run_cell(c, n):>{run_w}} {_num(c['paper']):>7} {_num(c['diff'], True):>7}"
        lines.append(line)
    if comparison.get("id_accuracy"):
        a = comparison["id_accuracy"]
        lines.append(f"ID accuracy: run {_run_cell(a, n)}, paper {_num(a['paper'])}, diff {_num(a['diff'], True)}")
    lines += [f"Note: {t}" for t in comparison.get("notes", [])]
    return "\n".join(lines)


def format_comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """The comparison as a Markdown section (for ``summary.md``)."""
    row, n = comparison["row"], int(comparison.get("n_runs") or 1)
    metrics = [k for k in REQUIRED_METRICS if any(k in m for m in comparison["sets"].values())]
    out = [f"## Compared with the paper: {row['id']}", "",
           f"{row['method']}, {row['score']}, {row['id_dataset']}, {row['backbone']}: {row.get('setting', '')}.",
           f"Source: {_source_line(row)}. Difference = run - paper, in percent.", "",
           "| OOD set | " + " | ".join(f"{METRIC_TITLES[k]} run | paper | diff" for k in metrics) + " |",
           "|---|" + "---:|---:|---:|" * len(metrics)]
    for o, m in comparison["sets"].items():
        cells = []
        for k in metrics:
            c = m.get(k, {"run": None, "paper": None, "diff": None})
            cells += [_run_cell(c, n), _num(c["paper"]), _num(c["diff"], True)]
        out.append(f"| {o} | " + " | ".join(cells) + " |")
    if comparison.get("id_accuracy"):
        a = comparison["id_accuracy"]
        out += ["", f"ID accuracy: run {_run_cell(a, n)}, paper {_num(a['paper'])}, diff {_num(a['diff'], True)}."]
    out += [""] + [f"Note: {t}" for t in comparison.get("notes", [])]
    return "\n".join(out).rstrip() + "\n"


def find_result_files(paths: Iterable[PathLike] = (), pattern: Optional[str] = None) -> List[Path]:
    """Result files named by run folders / JSON paths and by a glob pattern, de-duplicated.

    Args:
        paths: run folders containing ``ood_results.json``, or the JSON files themselves.
        pattern: glob (``**`` allowed) matching run folders or JSON files.

    Raises:
        FileNotFoundError: a path without results, or a pattern matching none.
    """
    found: List[Path] = []
    for p in paths:
        p = Path(p)
        f = p / JSON_NAME if p.is_dir() else p
        if not f.is_file():
            hint = (f"; to search below it use --glob '{p}/**/{JSON_NAME}'" if p.is_dir() else "")
            raise FileNotFoundError(f"no {JSON_NAME} at {f}{hint}")
        found.append(f)
    if pattern:
        matches = sorted(_glob.glob(pattern, recursive=True))
        files = [Path(m) / JSON_NAME if Path(m).is_dir() else Path(m) for m in matches]
        files = [f for f in files if f.is_file() and f.name == JSON_NAME]
        if not files:
            raise FileNotFoundError(f"the pattern {pattern!r} matches no {JSON_NAME} (nor folders containing one)")
        found += files
    unique: List[Path] = []
    seen: Dict[Path, Path] = {}
    for f in found:  # the same run twice would silently weigh it double
        key = f.resolve()
        if key in seen:
            if str(f) != str(seen[key]) or not pattern:  # a glob re-matching a named run is expected: no note
                print(f"Note: {f} is the results file of {seen[key]} (the same file); counted once")
            continue
        seen[key] = f
        unique.append(f)
    return unique


def run_identity(doc: Mapping[str, Any]) -> str:
    """SHA-256 of what identifies an evaluated run: its numbers (every score, set and metric, the ID
    accuracy), the model they were measured on (trainer, backbone, model folder and epoch, training
    seed and split) and its method (:func:`method_fields`). A copied run folder, or one checkpoint
    evaluated twice into two folders, has one identity; two seeds (or any two trainings) do not, their
    numbers differ; files of two methods do not either (they are then refused, not merged)."""
    import hashlib

    meta = doc.get("meta") or {}
    training = meta.get("training") or {}
    ident = {"scores": doc.get("scores"), "id_accuracy": doc.get("id_accuracy"),
             "model": [meta.get("trainer"), meta.get("backbone"), meta.get("model_dir"), meta.get("load_epoch"),
                       training.get("seed"), training.get("split_hash")], "method": method_fields(doc)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def dedupe_runs(files: Sequence[Path], docs: Sequence[Mapping[str, Any]]) -> tuple:
    """Drop results files of a run already listed (same :func:`run_identity`), with a printed note per file.

    Returns:
        ``(files, docs)`` of the distinct runs, in the given order.
    """
    kept_f: List[Path] = []
    kept_d: List[Mapping[str, Any]] = []
    seen: Dict[str, Path] = {}
    for f, doc in zip(files, docs):
        key = run_identity(doc)
        if key in seen:
            print(f"Note: {f} holds the same run as {seen[key]} (identical results of the same model); counted once")
            continue
        seen[key] = f
        kept_f.append(f)
        kept_d.append(doc)
    return kept_f, kept_d


#: Results-meta entries that name the method: runs that differ in one are not averaged.
METHOD_META_KEYS = ("trainer", "backbone", "id_dataset", "benchmark", "ood_datasets")
#: Config sections / keys (of the meta's resolved config) that define the method.
METHOD_CONFIG_PREFIXES = ("TRAINER.", "MODEL.BACKBONE.NAME", "OPTIM.", "INPUT.", "OOD.", "SETAR.", "DATASET.NAME",
                          "DATASET.NUM_SHOTS", "DATASET.SUBSAMPLE_CLASSES", "TEST.FINAL_MODEL")
#: Keys under those prefixes that cannot change a run's numbers (paths, caches, plots, speed settings) or that
#: are seeds (what a summary averages over).
METHOD_CONFIG_IGNORED = ("OOD.PLOT", "OOD.CACHE_DIR", "OOD.USE_CACHE", "OOD.BOOTSTRAP", "OOD.BOOTSTRAP_SEED",
                         "OOD.NEGLABEL.PERM_DEVICE", "OOD.NEGLABEL.TEXT_BATCH", "OOD.NEGLABEL.LEXICON",
                         "OOD.NEGLABEL.GROUP_SEED", "SETAR.CACHE_GB", "SETAR.SETTINGS_FILE", "SETAR.MODE")


def method_fields(doc: Mapping[str, Any]) -> Dict[str, Any]:
    """What a results file says about its method: :data:`METHOD_META_KEYS` of its meta, the
    :data:`METHOD_CONFIG_PREFIXES` keys of its resolved config and, as ``training_config.<key>``, those
    of the config the evaluated checkpoint was trained with (``meta.training_config``, where recorded):
    two models trained with other settings are two methods even when evaluated with one config file."""
    meta = doc.get("meta") or {}
    out = {key: meta[key] for key in METHOD_META_KEYS if meta.get(key) is not None}
    config = meta.get("config")
    if isinstance(config, Mapping):
        for key, value in flatten_config(config).items():
            if key.startswith(METHOD_CONFIG_PREFIXES) and key not in METHOD_CONFIG_IGNORED:
                out[key] = value
    trained = meta.get("training_config")
    if isinstance(trained, Mapping):  # already flat: {dotted key: value}
        for key, value in trained.items():
            if str(key).startswith(METHOD_CONFIG_PREFIXES) and key not in METHOD_CONFIG_IGNORED:
                out[f"training_config.{key}"] = value
    return out


def check_same_method(docs: Sequence[Mapping[str, Any]], files: Sequence[Path], limit: int = 4) -> None:
    """Refuse runs whose method differs (:func:`method_fields`; a field only some runs record is not compared).

    Raises:
        ValueError: one line listing each differing field with its value per run, and the fix.
    """
    fields = [method_fields(d) for d in docs]
    keys = sorted({k for f in fields for k in f}, key=lambda k: (k not in METHOD_META_KEYS, k))
    diffs = []
    for key in keys:
        present = [(f[key], path) for f, path in zip(fields, files) if key in f]
        values = {json.dumps(v, sort_keys=True, default=str) for v, _ in present}
        if len(present) < 2 or len(values) < 2:
            continue
        groups: Dict[str, List[str]] = {}
        for v, path in present:
            groups.setdefault(json.dumps(v, default=str), []).append(str(path.parent if path.name == JSON_NAME else path))
        diffs.append(f"{key}: " + "; ".join(f"{v} in {', '.join(ps)}" for v, ps in groups.items()))
    if diffs:
        more = f" (and {len(diffs) - limit} more fields)" if len(diffs) > limit else ""
        raise ValueError(f"the runs are of different methods and cannot be averaged: {' | '.join(diffs[:limit])}{more}; "
                         "summarize each method's runs separately")


def _mean_std(values: Sequence[float], ddof: int) -> Dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=ddof)) if a.size > ddof else float("nan")
    return {"mean": float(a.mean()), "std": std, "values": [float(v) for v in a]}


def _structure(doc: Mapping[str, Any]) -> Dict[str, Dict[str, List[str]]]:
    return {s: {o: sorted(m) for o, m in rows.items()} for s, rows in doc["scores"].items()}


def _check_same(docs: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> None:
    ref, ref_f = docs[0], files[0]
    ref_struct = _structure(ref)
    for doc, f in zip(docs[1:], files[1:]):
        for key in ("units", "positive_class", "fpr_convention"):
            if doc.get(key) != ref.get(key):
                raise ValueError(f"{f} has {key} = {doc.get(key)!r} but {ref_f} has {ref.get(key)!r}; "
                                 "runs evaluated under different conventions cannot be averaged")
        struct = _structure(doc)
        if set(struct) != set(ref_struct):
            raise ValueError(f"{f} has scores {sorted(struct)} but {ref_f} has {sorted(ref_struct)}; "
                             "evaluate every run with the same OOD.SCORES, or summarize them separately")
        for s in ref_struct:
            if set(struct[s]) != set(ref_struct[s]):
                only_a = sorted(set(struct[s]) - set(ref_struct[s]))
                only_b = sorted(set(ref_struct[s]) - set(struct[s]))
                raise ValueError(f"score {s!r}: OOD sets differ between {f} (extra {only_a}) and {ref_f} "
                                 f"(extra {only_b}); evaluate every run on the same OOD.DATASETS, or summarize them "
                                 "separately")
            for o in ref_struct[s]:
                if struct[s][o] != ref_struct[s][o]:
                    raise ValueError(f"score {s!r}, set {o!r}: metrics {struct[s][o]} in {f} but "
                                     f"{ref_struct[s][o]} in {ref_f}")
    has_acc = [d.get("id_accuracy") is not None for d in docs]
    if any(has_acc) and not all(has_acc):
        missing = [str(f) for f, h in zip(files, has_acc) if not h]
        raise ValueError(f"ID accuracy is missing in {missing} but present in the other runs")


# ------------------------------------------------------------------------------------ bootstrap intervals
BOOTSTRAP_RESAMPLES = 1000  # default number of replicates of summarize's intervals
_BOOTSTRAP_TOL = 1e-6  # percent: an interval's estimate must reproduce the run's ood_results.json


def bootstrap_summary(files: Sequence[Path], docs: Sequence[Mapping[str, Any]], n_resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0, confidence: float = 0.95) -> Dict[str, Any]:
    """Bootstrap intervals of a summary, from the runs' per-image scores (``ood_scores.npz`` beside each JSON).

    For every score, OOD set (and ``Average``) and metric of the runs' results:

    * ``images``: the interval of the mean over the runs when each run's images are resampled (the runs
      fixed; with one run, that run's interval over its images);
    * ``seeds`` (several runs): the interval of the mean when the runs are resampled (their estimates
      fixed); with 3 seeds it can take at most 10 distinct values.

    Method and random numbers: :mod:`locoop.ood.bootstrap` (``bootstrap_run_dirs``: run ``r`` draws from
    ``default_rng([seed, r])``). Every interval's estimate is checked against the run's JSON.

    Returns:
        ``{"units": "percent", "n_resamples", "seed", "confidence", "metrics", "n_runs", "method", "rng",
        "scores": {score: {set: {metric: {"images": interval, "seeds": interval or None}}}},
        "per_run": [{"run", "scores": {score: {set: {metric: interval}}}}]}`` (intervals: ``estimate``,
        ``low``, ``high``, ``se``), or ``{"skipped": reason, ...}`` when a run has no ``ood_scores.npz``.

    Raises:
        ValueError: per-image scores that do not reproduce their run's results (another evaluation's file).
    """
    from locoop.ood.bootstrap import METRICS, bootstrap_run_dirs, to_percent

    head = {"units": "percent", "n_resamples": int(n_resamples), "seed": int(seed), "confidence": float(confidence),
            "n_runs": len(files)}
    dirs = [Path(f).parent for f in files]
    missing = [str(d) for d in dirs if not (d / "ood_scores.npz").is_file()]
    if missing:
        return dict(head, skipped=f"no per-image scores (ood_scores.npz) in {', '.join(missing)}; the OOD "
                                  "evaluation writes them next to ood_results.json")
    ref = docs[0]["scores"]
    keys = set(next(iter(next(iter(ref.values())).values())))
    metrics = [m for m in METRICS if m in keys]
    res = bootstrap_run_dirs(dirs, scores=list(ref), n_resamples=n_resamples, seed=seed, confidence=confidence,
                             metrics=metrics)
    res = {s: to_percent(r) for s, r in res.items()}
    for s, r in res.items():  # the npz must be the evaluation the JSON reports
        for f, doc, run in zip(files, docs, r["per_run"]):
            for o, per in run["sets"].items():
                for m, iv in per.items():
                    want = doc["scores"][s][o][m]
                    if abs(iv["estimate"] - want) > _BOOTSTRAP_TOL:
                        raise ValueError(f"{Path(f).parent / 'ood_scores.npz'} does not match {f}: {s} {o} {m} is "
                                         f"{iv['estimate']:.6f} from the per-image scores but {want:.6f} in the "
                                         "results; both must come from the same evaluation (run eval again)")
    several = len(files) > 1
    scores = {s: {o: {m: {"images": r["mean"]["images"][o][m],
                          "seeds": r["mean"]["seeds"][o][m] if several else None} for m in metrics}
                  for o in r["mean"]["images"]} for s, r in res.items()}
    per_run = [{"run": str(f), "scores": {s: r["per_run"][i]["sets"] for s, r in res.items()}}
               for i, f in enumerate(files)]
    first = next(iter(res.values()))
    return dict(head, metrics=metrics, method=first["method"], rng=first["rng"], scores=scores, per_run=per_run)


def format_bootstrap_markdown(block: Mapping[str, Any]) -> str:
    """The ``summary.md`` section of :func:`bootstrap_summary`'s block."""
    from locoop.ood.bootstrap import format_intervals_markdown

    if block.get("skipped"):
        return f"## Bootstrap confidence intervals\n\nNot computed: {block['skipped']}.\n"
    n = int(block["n_runs"])
    what = (f"the mean over the {n} runs, each run's images resampled (the runs fixed)" if n > 1
            else "the run's images resampled")
    out = format_intervals_markdown(block, title="Bootstrap confidence intervals over images", key="images",
                                    note=f"Interval of {what}; ID and each OOD set resampled separately.")
    if n > 1:
        out += "\n" + format_intervals_markdown(
            block, title="Bootstrap confidence intervals over seeds", key="seeds",
            note=f"Interval of the mean over runs resampled with replacement ({n} runs: a coarse interval).")
    return out


def format_bootstrap_table(block: Mapping[str, Any]) -> str:
    """Console text of :func:`bootstrap_summary`'s block."""
    from locoop.ood.bootstrap import format_intervals_table

    if block.get("skipped"):
        return f"Bootstrap intervals not computed: {block['skipped']}"
    conf, n = 100 * float(block["confidence"]), int(block["n_runs"])
    head = (f"Bootstrap {conf:g} % intervals ({block['n_resamples']} resamples, bootstrap seed {block['seed']}); "
            "percent, estimate [low, high]")
    text = format_intervals_table(block, key="images", title=head + "\nover images" + (
        f" (mean of the {n} runs, the runs fixed):" if n > 1 else ":"))
    if n > 1:
        text += "\n\n" + format_intervals_table(block, key="seeds", title=f"over seeds ({n} runs resampled):")
    return text


def summarize_runs(paths: Sequence[PathLike], output_dir: Optional[PathLike] = None, ddof: int = 0,
                   paper: Optional[str] = None, bootstrap: int = BOOTSTRAP_RESAMPLES, bootstrap_seed: int = 0,
                   confidence: float = 0.95, paper_file: Optional[PathLike] = None) -> Dict[str, Any]:
    """Average several runs' ``ood_results.json`` per score, OOD set and metric.

    A run is counted once: a file named twice (a folder given twice, a symlink to it, a glob matching
    it again) and a file holding the same run as an earlier one (:func:`run_identity`: a copied folder,
    one checkpoint evaluated twice) are dropped with a printed note. Runs of different methods are
    refused (:func:`check_same_method`: trainer, backbone, ID dataset, benchmark / OOD sets, the
    method's config keys; and :func:`_check_same`: scores, OOD sets, metrics, conventions).

    Args:
        paths: run folders or ``ood_results.json`` files (at least one).
        output_dir: if given, ``summary.md`` and ``summary.json`` are written there.
        ddof: 0 = population standard deviation (default), 1 = sample.
        paper: id of a published row (:func:`list_paper_rows`) to compare with; the summary then has
            ``paper_comparison`` (:func:`compare_with_paper`), also in the written files.
        bootstrap: replicates of the bootstrap intervals (:func:`bootstrap_summary`; 1000), 0 = none.
        bootstrap_seed: their seed.
        confidence: their coverage (0.95).
        paper_file: a paper-results file of the shipped format to take ``paper`` from instead of
            ``locoop/data/paper_results.json`` (e.g. a table typed in from a paper).

    Returns:
        The summary: ``scores[score][set][metric] = {"mean", "std", "values"}`` in percent
        (the ``Average`` row included), ``id_accuracy`` likewise, the run files, ``bootstrap``
        (intervals, or why they were skipped) unless ``bootstrap`` is 0, and ``files`` (written paths)
        when ``output_dir`` was given.

    Raises:
        ValueError: no runs, or runs of different methods, scores, OOD sets or conventions; an unknown paper row,
            or one whose score the runs lack.
        FileNotFoundError: a path without ``ood_results.json``.
    """
    if paper_file is not None and not paper:
        raise ValueError("a paper-results file was given without a row to compare with: name one with --paper ROW")
    row = get_paper_row(paper, paper_file) if paper else None
    files = find_result_files(paths)
    if not files:
        raise ValueError("no runs given: pass run folders containing ood_results.json")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof}")
    if int(bootstrap) == 1 or int(bootstrap) < 0:
        raise ValueError(f"bootstrap must be 0 (no intervals) or the number of replicates >= 2, got {bootstrap}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(bootstrap_seed) < 0:
        raise ValueError(f"bootstrap_seed must be >= 0, got {bootstrap_seed}")
    docs = [read_results(f) for f in files]
    files, docs = dedupe_runs(files, docs)
    _check_same(docs, files)
    check_same_method(docs, files)

    ref = docs[0]
    scores: Dict[str, Dict[str, Dict[str, Dict[str, Any]]]] = {}
    for s, rows in ref["scores"].items():
        scores[s] = {}
        for o, metrics in rows.items():
            scores[s][o] = {k: _mean_std([d["scores"][s][o][k] for d in docs], ddof) for k in metrics}
    acc = None
    if ref.get("id_accuracy") is not None:
        acc = _mean_std([d["id_accuracy"] for d in docs], ddof)
    summary: Dict[str, Any] = {
        "format_version": SUMMARY_FORMAT_VERSION,
        "units": ref.get("units", "percent"),
        "positive_class": ref.get("positive_class"),
        "fpr_convention": ref.get("fpr_convention"),
        "std": "population (ddof=0)" if ddof == 0 else "sample (ddof=1)",
        "n_runs": len(files),
        "runs": [str(f) for f in files],
        "id_accuracy": acc,
        "scores": scores,
    }
    meta = ref.get("meta") or {}
    for key in ("id_dataset", "backbone"):
        values = {str((d.get("meta") or {}).get(key)) for d in docs if (d.get("meta") or {}).get(key)}
        if len(values) == 1:
            summary[key] = meta.get(key)
    run_config = flatten_config(meta["config"]) if isinstance(meta.get("config"), Mapping) else None
    comparison = (compare_with_paper(summary, row, run_config)  # fails before the bootstrap
                  if row is not None else None)
    if int(bootstrap) >= 2:
        summary["bootstrap"] = bootstrap_summary(files, docs, int(bootstrap), int(bootstrap_seed), float(confidence))
    if comparison is not None:
        summary["paper_comparison"] = comparison
    if output_dir is not None:
        out = Path(output_dir)
        summary["files"] = {
            "md": str(atomic_write_text(out / SUMMARY_MD, format_summary_markdown(summary))),
            "json": str(atomic_write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")),
        }
    return summary


def _cell(ms: Mapping[str, float]) -> str:
    return f"{ms['mean']:.2f} ± {ms['std']:.2f}"


def format_summary_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown tables of a summary: ``mean ± std`` per OOD set and metric, in percent."""
    out = [f"# OOD detection results: mean ± std over {summary['n_runs']} runs", ""]
    if summary.get("id_accuracy") is not None:
        out += [f"ID accuracy: {_cell(summary['id_accuracy'])}%", ""]
    out.append(f"Positive class: {summary.get('positive_class')}. Values in percent. "
               f"Standard deviation: {summary['std']}. FPR95 convention: {summary.get('fpr_convention')}.")
    out += ["", "Runs:"] + [f"- {r}" for r in summary["runs"]]
    for s, rows in summary["scores"].items():
        keys = [k for k in REQUIRED_METRICS if k in next(iter(rows.values()))]
        out += ["", f"## {s}", "",
                "| OOD set | " + " | ".join(METRIC_TITLES.get(k, k) for k in keys) + " |",
                "|---|" + "---:|" * len(keys)]
        for o, m in rows.items():
            out.append(f"| {o} | " + " | ".join(_cell(m[k]) for k in keys) + " |")
    if summary.get("bootstrap"):
        out += ["", format_bootstrap_markdown(summary["bootstrap"]).rstrip()]
    if summary.get("paper_comparison"):
        out += ["", format_comparison_markdown(summary["paper_comparison"]).rstrip()]
    return "\n".join(out) + "\n"


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """Console text of a summary (the ``Average`` row of every score plus all sets)."""
    lines = [f"{summary['n_runs']} runs; values in percent, mean ± std ({summary['std']})"]
    if summary.get("id_accuracy") is not None:
        lines.append(f"ID accuracy: {_cell(summary['id_accuracy'])}")
    for s, rows in summary["scores"].items():
        width = max(len(AVERAGE), *(len(o) for o in rows))
        lines += ["", f"[{s}]",
                  f"{'OOD set':<{width}}  " + "  ".join(f"{METRIC_TITLES[k]:>15}" for k in REQUIRED_METRICS)]
        for o, m in rows.items():
            lines.append(f"{o:<{width}}  " + "  ".join(f"{_cell(m[k]):>15}" for k in REQUIRED_METRICS))
    if summary.get("bootstrap"):
        lines += ["", format_bootstrap_table(summary["bootstrap"])]
    if summary.get("paper_comparison"):
        lines += ["", format_comparison_table(summary["paper_comparison"])]
    return "\n".join(lines)

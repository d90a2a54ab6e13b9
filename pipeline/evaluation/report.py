"""eval.md: the report in Markdown, and confusion.csv."""

from __future__ import annotations

import csv
from pathlib import Path

DEFINITIONS = [
    "Scored rows: ids present in both the run and the gold file, with a gold value. Rows with a status "
    "other than ok/truncated are scored as wrong, with no label ('(none)').",
    "Gold missing: null, blank or an empty list. Gold null-like: only --null-values tokens (compared "
    "after NFKC, casefolding and whitespace collapsing). Neither is scored.",
    "Gold label sets: a list column, or text split on --gold-delimiter (without it: on '|' for a "
    "multi-label run; for a single-label run only when the values holding '|' are not labels of the "
    "run). Set items are stripped; blank and null-like items are dropped.",
    "Single-label run, gold label sets: a row is right when its label is in the row's gold set "
    "(accuracy (label in gold set), also used for calibration); P/R/F1 treat the label as a one-label set.",
    "Per class: precision = right / predicted, recall = right / gold support, 0/0 = 0 (a class never "
    "predicted has precision 0).",
    "Macro F1 = mean per-class F1 over the gold classes; micro P/R/F1 are pooled over the gold classes "
    "(a '(none)' or non-gold prediction costs recall, not precision).",
    "Coverage = share of scored rows with status ok or truncated.",
    "Calibration: rows with a confidence; 10 equal-width bins; ECE = sum |accuracy - mean confidence| "
    "x bin rows / rows. Accepted at t = confidence >= t; share = accepted / all scored rows.",
    "95%-precision threshold: the lowest distinct confidence value at which accepted rows are >= 95% right.",
    "Multi-label: samples-averaged P/R/F1 (0/0 = 0), micro (TP/FP/FN pooled) and macro (mean per "
    "label) over the union of gold and predicted labels, exact-set accuracy.",
    "Extraction: a single-valued attribute's gold values are alternatives (TP if the prediction is one "
    "of them, else FP if predicted and FN if gold has a value); list attributes compare as sets. "
    "Overall = micro over attributes. Gold values that are --null-values tokens are no value.",
    "Exact match: strings character for character, numbers as numbers, a number never equals a string. "
    "Normalised match: Unicode NFKC, casefold, whitespace collapsed and stripped; decimal-number strings "
    "become numbers, compared as floats.",
]


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(report: dict) -> str:
    """eval.md for a report; it shows a picture only if ``report["files"]`` lists it."""
    j, run = report["join"], report["run"]
    statuses = ", ".join(f"{k} {v}" for k, v in run["status_counts"].items())
    lines = [
        f"# labelmill eval: {report['run_folder']}",
        "",
        f"Gold: `{report['gold_file']}` column `{report['gold_column']}`, joined on `{report['on']}` "
        f"(run column `{report['run_id_column']}`). Task: {report['kind']}; model: {run['model']}.",
        *_strategy_md(run),
        "",
        "## Rows",
        "",
        "| | rows |",
        "|---|---:|",
        f"| in the run ({statuses}) | {j['run_rows']} |",
        f"| in the gold file | {j['gold_rows']} |",
        f"| in both | {j['matched']} |",
        f"| only in the run (not scored) | {j['only_in_run']} |",
        f"| only in the gold file (not scored) | {j['only_in_gold']} |",
        f"| in both, gold value missing (not scored) | {j['gold_missing']} |",
    ]
    reading = report["gold_reading"]
    nulls = reading["null_values"]
    if nulls:
        lines.append(
            f"| in both, gold value null-like, `--null-values` (not scored) | {j['gold_null_like']} |"
        )
    lines += [
        f"| **scored** | **{j['scored']}** |",
        "",
        f"Coverage (scored rows with status ok or truncated): {_pct(report['coverage'])}.",
    ]
    if report["kind"] != "extract":
        lines.append(f"Gold read as {reading['reading']}: {reading['source']}.")
    if nulls:
        dropped = (
            report["extraction"]["gold_null_values"]
            if report["kind"] == "extract"
            else reading["null_items_dropped"]
        )
        where = (
            "gold attribute value(s) not counted"
            if report["kind"] == "extract"
            else ("such item(s) removed from gold label sets that also hold labels")
        )
        lines.append(
            f"`--null-values` {', '.join(f'`{t}`' for t in nulls)}: {j['gold_null_like']} row(s) whose "
            f"gold is only such a token not scored; {dropped} {where}."
        )
    if j["only_in_run"]:
        lines.append(f"Only in the run, e.g.: {', '.join(j['only_in_run_examples'])}.")
    if j["only_in_gold"]:
        lines.append(f"Only in the gold file, e.g.: {', '.join(j['only_in_gold_examples'])}.")
    if j["ids_compared_as_text"]:
        lines.append("The id columns have different types; ids were compared as text.")
    if run["chunks_total"] is not None and run["parts"] < run["chunks_total"]:
        lines.append(f"The run is not finished: {run['parts']} of {run['chunks_total']} parts.")
    files = set(report["files"])
    if report["kind"] == "classify":
        lines += _classification_md(report["classification"], files)
    elif report["kind"] == "classify_sets":
        lines += _classification_sets_md(report["classification_sets"], files)
    elif report["kind"] == "multilabel":
        lines += _multilabel_md(report["multilabel"])
    else:
        lines += _extraction_md(report["extraction"], files)
    lines += ["", "## Definitions", ""] + [f"- {d}" for d in report["definitions"]]
    return "\n".join(lines) + "\n"


def _picture(files: set[str], name: str, caption: str) -> list[str]:
    """The image line and its blank line, only for a picture that was written (not with --no-charts)."""
    return [f"![{caption}]({name})", ""] if name in files else []


def _classification_md(m: dict, files: set[str]) -> list[str]:
    lines = [
        "",
        "## Scores",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| accuracy | {_f(m['accuracy'])} |",
        f"| macro F1 (gold classes) | {_f(m['macro_f1'])} |",
        f"| micro precision / recall / F1 (gold classes) | {_f(m['micro_precision'])} / "
        f"{_f(m['micro_recall'])} / {_f(m['micro_f1'])} |",
        f"| rows without a label | {m['unlabelled']} |",
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support | predicted | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in m["per_class"]:
        note = "; ".join(
            n
            for n, flag in (
                ("never predicted: precision 0", c["never_predicted"]),
                ("not in gold: recall 0", c["not_in_gold"]),
            )
            if flag
        )
        lines.append(
            f"| {c['label']} | {_f(c['precision'])} | {_f(c['recall'])} | {_f(c['f1'])} | {c['support']} | "
            f"{c['predicted']} | {note} |"
        )
    if m.get("gold_labels_not_in_label_set"):
        lines += [
            "",
            f"Gold classes not in the run's label set: {', '.join(m['gold_labels_not_in_label_set'])}.",
        ]
    lines += [
        "",
        "## Confusion matrix",
        "",
        "Rows: gold; columns: predicted. Full table: `confusion.csv`.",
    ]
    if "confusion.png" in files:
        lines += ["", "![confusion matrix](confusion.png)"]
    return (
        lines
        + _hierarchy_md(m.get("hierarchy"))
        + _shortlist_md(m.get("shortlist"))
        + _by_source_md(m.get("by_source"))
        + _calibration_md(m["calibration"], files)
        + _label_probs_md(m.get("label_probs"))
    )


def _strategy_md(run: dict) -> list[str]:
    if "strategy" not in run:
        return []
    how = f"Strategy: {run['strategy']}"
    if run.get("retrievers"):
        how += f" (retrievers {' + '.join(run['retrievers'])}, k {run['k']} each)"
    if run.get("prompt_tokens_per_row") is not None:
        how += f"; prompt tokens per row {run['prompt_tokens_per_row']:.0f}"
    if run.get("rows_per_second") is not None:
        how += f"; {run['rows_per_second']} rows/s"
    return [how + "."]


def _shortlist_md(s: dict | None) -> list[str]:
    if not s:
        return []
    return [
        "",
        "## Candidates (shortlist)",
        "",
        f"The right label was among the row's candidates for {_pct(s['recall'])} of the rows (mean "
        f"{_f(s['mean_candidates'])} candidates); where it was, the model picked it for "
        f"{_pct(s['accuracy_when_offered'])}.",
        "",
        "| k (first of the merged list) | recall@k |",
        "|---:|---:|",
        *(f"| {x['k']} | {_f(x['recall'])} |" for x in s["recall_at"]),
    ]


def _by_source_md(by: dict | None) -> list[str]:
    if not by:
        return []
    lines = [
        "",
        "## By source (cascade)",
        "",
        "Where each row's final label came from (`source`; none: never answered). Accuracy is counted as "
        "above: right / scored rows of the source, a row without a label is wrong. Mean confidence over "
        "the scored rows with one.",
        "",
        "| source | rows in the run | scored | labelled | accuracy | mean confidence "
        "| mean student confidence | first label accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {s['run_rows']} | {s['rows']} | {s['labelled']} | {_f(s['accuracy'])} "
            f"| {_f(s['mean_confidence'])} | {_f(s.get('mean_student_confidence'))} "
            f"| {_f(s.get('first_label_accuracy'))} |"
            for name, s in by.items()
        ),
    ]
    escalated = by.get("escalated")
    if escalated and escalated["accuracy"] is not None and escalated["first_label_accuracy"] is not None:
        before, after = escalated["first_label_accuracy"], escalated["accuracy"]
        lines += [
            "",
            f"Escalation: on the {escalated['rows']} scored escalated rows the first backend's label was "
            f"right for {_pct(before)}, the final label for {_pct(after)} "
            f"({(after - before) * 100:+.1f} points).",
        ]
    return lines


def _hierarchy_md(h: dict | None) -> list[str]:
    if not h:
        return []
    return [
        "",
        "## Taxonomy paths",
        "",
        f"Hierarchical precision {_f(h['hierarchical_precision'])}, recall {_f(h['hierarchical_recall'])}, "
        f"F1 **{_f(h['hierarchical_f1'])}** (ancestor sets: a near miss earns part of the credit).",
        "",
        "| level | rows | accuracy (first parts of the path equal) |",
        "|---:|---:|---:|",
        *(f"| {x['level']} | {x['rows']} | {_f(x['accuracy'])} |" for x in h["levels"]),
    ]


def _label_probs_md(lp: dict | None) -> list[str]:
    if not lp or not lp["k"]:
        return []
    lines = [
        "",
        f"## Label probabilities (`label_probs`, top {lp['k']})",
        "",
        f"Rows with label probabilities: {lp['rows_with_label_probs']}. Mean margin (first minus "
        f"second probability): {_f(lp['mean_margin'])}; mean entropy: {_f(lp['mean_entropy'])} nats.",
        "",
        "| gold among the first k | accuracy |",
        "|---:|---:|",
        *(f"| {t['k']} | {_f(t['accuracy'])} |" for t in lp["top_k_accuracy"]),
        "",
        "| accept if margin >= | accepted rows | share of scored rows | accuracy |",
        "|---:|---:|---:|---:|",
        *(
            f"| {t['threshold']:g} | {t['accepted']} | {_pct(t['share'])} | {_f(t['accuracy'])} |"
            for t in lp["margin_thresholds"]
        ),
    ]
    best = lp["lowest_margin_for_target"]
    if best is not None:
        lines += [
            "",
            f"Lowest margin with 95% accuracy on the accepted rows: **{best['threshold']:.4g}**, "
            f"accepting {best['accepted']} rows ({_pct(best['share'])} of scored rows).",
        ]
    return lines


def _calibration_md(cal: dict, files: set[str]) -> list[str]:
    lines = ["", "## Calibration of confidence", ""]
    if not cal["rows_with_confidence"]:
        return [*lines, "No scored row has a confidence."]
    lines += [
        f"Rows with a confidence: {cal['rows_with_confidence']}. Expected calibration error (10 bins): "
        f"**{_f(cal['ece'])}**.",
        "",
        *_picture(files, "reliability.png", "reliability diagram"),
        "| bin | rows | mean confidence | accuracy |",
        "|---|---:|---:|---:|",
    ]
    for b in cal["bins"]:
        lines.append(
            f"| [{b['lower']:.1f}, {b['upper']:.1f}{']' if b['upper'] >= 1 else ')'} | {b['rows']} | "
            f"{_f(b['mean_confidence'])} | {_f(b['accuracy'])} |"
        )
    lines += [
        "",
        "| accept if confidence >= | accepted rows | share of scored rows | accuracy |",
        "|---:|---:|---:|---:|",
    ]
    for t in cal["thresholds"]:
        lines.append(f"| {t['threshold']:g} | {t['accepted']} | {_pct(t['share'])} | {_f(t['accuracy'])} |")
    best = cal["lowest_threshold_for_target"]
    target = f"{cal['precision_target']:.0%}"
    if best is None:
        lines += ["", f"No confidence threshold reaches {target} accuracy on the accepted rows."]
    else:
        lines += [
            "",
            f"Lowest threshold with {target} accuracy on the accepted rows: **{best['threshold']:.4g}**, "
            f"accepting {best['accepted']} rows ({_pct(best['share'])} of scored rows, accuracy "
            f"{_f(best['accuracy'])}).",
        ]
    return lines


def _classification_sets_md(m: dict, files: set[str]) -> list[str]:
    sizes = m["gold_labels_per_row"]
    lines = [
        "",
        "## Scores (single-label run, gold label sets)",
        "",
        "A row is right when its predicted label is one of the row's gold labels.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| **accuracy (label in gold set)** | **{_f(m['accuracy_label_in_gold_set'])}** |",
        f"| rows right / scored | {m['right']} / {m['rows']} |",
        f"| rows without a label | {m['unlabelled']} |",
        f"| gold labels per row: mean / max (rows with several) | {sizes['mean']:.2f} / {sizes['max']} "
        f"({sizes['rows_with_several']}) |",
        f"| exact-set match (gold set is just the predicted label) | {_f(m['exact_set_accuracy'])} |",
        "",
        "Label-set scores, the prediction taken as a one-label set (micro precision = right / labelled "
        "rows; recall is below 1 wherever a gold set holds several labels):",
        "",
        *_averages_md(m, ("micro", "macro")),
        *_per_label_md(m["per_label"]),
        *_not_in_label_set_md(m),
    ]
    return (
        lines
        + _by_source_md(m.get("by_source"))
        + _calibration_md(m["calibration"], files)
        + _label_probs_md(m.get("label_probs"))
    )


def _averages_md(m: dict, names: tuple[str, ...]) -> list[str]:
    lines = ["| average | precision | recall | F1 |", "|---|---:|---:|---:|"]
    for name in names:
        s = m[name]
        lines.append(f"| {name} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} |")
    return lines


def _per_label_md(per_label: list[dict]) -> list[str]:
    lines = [
        "",
        "## Per label",
        "",
        "| label | precision | recall | F1 | gold rows | predicted rows |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in per_label:
        lines.append(
            f"| {c['label']} | {_f(c['precision'])} | {_f(c['recall'])} | {_f(c['f1'])} | {c['support']} "
            f"| {c['predicted']} |"
        )
    return lines


def _not_in_label_set_md(m: dict) -> list[str]:
    outside = m.get("gold_labels_not_in_label_set")
    return ["", f"Gold labels not in the run's label set: {', '.join(outside)}."] if outside else []


def _multilabel_md(m: dict) -> list[str]:
    sizes = m["gold_labels_per_row"]
    micro = m["micro"]
    return [
        "",
        "## Scores (multi-label)",
        "",
        f"Exact-set match: {_f(m['exact_set_accuracy'])}. Gold labels per row: mean {sizes['mean']:.2f}, "
        f"max {sizes['max']}. Pooled counts: TP {micro['tp']}, FP {micro['fp']}, FN {micro['fn']}.",
        "",
        *_averages_md(m, ("micro", "macro", "samples")),
        *_per_label_md(m["per_label"]),
        *_not_in_label_set_md(m),
    ]


def _extraction_md(m: dict, files: set[str]) -> list[str]:
    lines = [
        "",
        "## Scores per attribute",
        "",
        *_picture(files, "attributes.png", "F1 per attribute"),
        "Exact: values as given. Normalised: Unicode NFKC, casefold, whitespace collapsed and stripped, "
        "numbers compared as floats.",
        "",
        "| attribute | type | gold rows | predicted rows | exact P | exact R | exact F1 "
        "| norm. P | norm. R | norm. F1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in m["per_attribute"]:
        e, n = a["exact"], a["normalised"]
        lines.append(
            f"| {a['attribute']} | {a['type']} | {a['gold_rows']} | {a['predicted_rows']} "
            f"| {_f(e['precision'])} | {_f(e['recall'])} | {_f(e['f1'])} "
            f"| {_f(n['precision'])} | {_f(n['recall'])} | {_f(n['f1'])} |"
        )
    e, n = m["overall"]["exact"], m["overall"]["normalised"]
    lines.append(
        f"| **overall (micro)** | | | | {_f(e['precision'])} | {_f(e['recall'])} | {_f(e['f1'])} | "
        f"{_f(n['precision'])} | {_f(n['recall'])} | {_f(n['f1'])} |"
    )
    lines += ["", "| counts | TP | FP | FN |", "|---|---:|---:|---:|"]
    lines += [f"| overall, {mode} | {t['tp']} | {t['fp']} | {t['fn']} |" for mode, t in m["overall"].items()]
    dropped = [
        f"{a['attribute']} {a['gold_null_values']}" for a in m["per_attribute"] if a["gold_null_values"]
    ]
    if dropped:
        lines += ["", f"Gold values that were `--null-values` tokens (not counted): {', '.join(dropped)}."]
    if m["attributes_never_in_gold"]:
        lines += [
            "",
            "Never in gold (every prediction counts as a false positive): "
            f"{', '.join(m['attributes_never_in_gold'])}.",
        ]
    if m["unmatched_gold_attributes"]:
        shown = ", ".join(
            f"{k} ({v} row{'s' if v != 1 else ''})" for k, v in m["unmatched_gold_attributes"].items()
        )
        lines += ["", f"Gold attributes the run does not extract (not scored): {shown}."]
    return lines


def write_confusion_csv(confusion: dict, path: Path) -> None:
    """The whole confusion matrix, unfolded: one row per gold class, one column per prediction."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["gold \\ predicted", *confusion["columns"]])
        for label, row in zip(confusion["rows"], confusion["matrix"], strict=True):
            writer.writerow([label, *row])

"""data/convert.py's work: read a public dataset's files, plan the output files, report the counts.

The readers are `atkd.convert.datasets` (one per layout), the split is `atkd.convert.splitting`; this module puts
them together the way the script does, so the script holds only its command line. Output files
(`planned_files`): questions.jsonl and ability_paths.jsonl, and with a split eval.jsonl,
iteration_K.jsonl and their *_ability_paths.jsonl; files that would be empty are left out. When
the source has categories, ability_tree.json (`tree_of`) is the tree they make, ready for main.py's
EXISTING_ABILITY_TREE_PATH.
`convert_report.json` (`report_of`) and the printed lines (`summary_lines`) give the rows kept and
dropped by reason, per file.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from . import datasets
from .splitting import Split

FORMATS = ("medqa", "medmcqa", "cmexam", "mmlu", "cmmlu", "jsonl", "csv")
REPORT_FILE = "convert_report.json"
TREE_FILE = "ability_tree.json"


def read_format(fmt: str, inputs: Sequence[str], cop_base: int | None = None,
                path_columns: Sequence[str] | None = None,
                mapping: datasets.FieldMapping | None = None) -> datasets.Converted:
    """The input files read with the reader of `fmt` (`cop_base`: medmcqa; `path_columns`: cmexam;
    `mapping`: jsonl and csv)."""
    if fmt == "medqa":
        return datasets.read_medqa(inputs)
    if fmt == "medmcqa":
        return datasets.read_medmcqa(inputs, cop_base=cop_base)
    if fmt == "cmexam":
        return datasets.read_cmexam(inputs, path_columns or datasets.CMEXAM_DEFAULT_PATH_COLUMNS)
    if fmt == "mmlu":
        return datasets.read_mmlu(inputs)
    if fmt == "cmmlu":
        return datasets.read_cmmlu(inputs)
    if fmt == "jsonl":
        return datasets.read_jsonl(inputs, mapping)
    if fmt == "csv":
        return datasets.read_csv(inputs, mapping)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def path_lines(records: list[dict], paths: dict[str, list[str]]) -> list[dict]:
    """The ability-path lines of `records` that have a path, in record order."""
    return [{"id": r["id"], "ability_path": paths[r["id"]]} for r in records if r["id"] in paths]


def planned_files(conv: datasets.Converted, split: Split | None) -> dict[str, list[dict]]:
    """Every output file name with its lines (files that would be empty are left out)."""
    files = {"questions.jsonl": conv.records, "ability_paths.jsonl": path_lines(conv.records, conv.paths)}
    if split:
        files["eval.jsonl"] = split.eval
        files["eval_ability_paths.jsonl"] = path_lines(split.eval, conv.paths)
        for k, part in enumerate(split.iterations, start=1):
            files[f"iteration_{k}.jsonl"] = part
            files[f"iteration_{k}_ability_paths.jsonl"] = path_lines(part, conv.paths)
    return {name: lines for name, lines in files.items() if lines}


def tree_of(records: list[dict], paths: dict[str, list[str]]) -> dict:
    """The ability tree the source's categories make: nested objects of names in order of first use,
    leaves `{}`, the level-1 categories at the top (main.py roots such a file at DOMAIN)."""
    tree: dict = {}
    for r in records:
        node = tree
        for name in paths.get(r["id"], ()):
            node = node.setdefault(name, {})
    return tree


def count_leaves(tree: dict) -> int:
    return sum(count_leaves(sub) if sub else 1 for sub in tree.values())


def by_count(counts: Counter) -> dict[str, int]:
    """Most frequent first, then by name."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def report_of(fmt: str, inputs: Sequence[str], conv: datasets.Converted, files: dict[str, list[dict]],
              split: dict | None, tree: dict | None, args: dict) -> dict:
    """convert_report.json: rows kept and dropped by reason, overall and per file; the split's
    settings (`split`: iterations, eval_fraction, seed; None without a split); the files written
    with their line counts and the categories' tree (None without categories); the arguments."""
    return {
        "format": fmt,
        "inputs": [str(p) for p in inputs],
        "rows": len(conv.records) + sum(conv.dropped.values()),
        "kept": len(conv.records),
        "dropped": sum(conv.dropped.values()),
        "dropped_by_reason": by_count(conv.dropped),
        "with_ability_path": len(conv.paths),
        "per_file": {key: {"path": f["path"], "kept": f["kept"], "dropped": sum(f["dropped"].values()),
                           "dropped_by_reason": by_count(f["dropped"])} for key, f in conv.per_file.items()},
        "notes": conv.notes,
        "split": split,
        "files": {name: len(lines) for name, lines in files.items()},
        "ability_tree": None if tree is None else {"file": TREE_FILE, "level_1": len(tree),
                                                   "leaves": count_leaves(tree)},
        "args": args,
    }


def summary_lines(report: dict, out_dir) -> list[str]:
    """What data/convert.py prints: the counts of the report, one per line."""
    lines = [f"rows: {report['rows']}", f"kept: {report['kept']}", f"dropped: {report['dropped']}"]
    lines += [f"dropped ({reason}): {n}" for reason, n in report["dropped_by_reason"].items()]
    if report["kept"]:
        lines.append(f"with ability path: {report['with_ability_path']}")
    lines += [f"note: {note}" for note in report["notes"]]
    lines += [f"wrote {out_dir / name} ({n})" for name, n in report["files"].items()]
    if report["ability_tree"]:
        t = report["ability_tree"]
        lines.append(f"wrote {out_dir / t['file']} ({t['level_1']} level-1 abilities, {t['leaves']} leaves)")
    return lines

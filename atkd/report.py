"""The run's report: accuracy per iteration and per ability, before and after (ARCHITECTURE.md §2).

Built only from files the stages wrote (scored trees, JSONL outputs), so it can be rebuilt at any
time; main.py rewrites it after every iteration as `report.md` and `report.json`.
"""

from __future__ import annotations

from pathlib import Path

from . import paths
from .io import read_json, write_json, write_text
from .tree import AbilityTree, load_tree

WEAKEST_SHOWN = 3  # abilities of each round's measurement listed as "weakest"


def _tree(path: Path) -> AbilityTree | None:
    return load_tree(path) if path.is_file() else None


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def node_accuracies(tree: AbilityTree | None) -> dict[str, dict]:
    """{"Area > Leaf": {"n", "correct", "accuracy"}} for every node below the root, plus "overall"."""
    if tree is None:
        return {}
    out = {"overall": {k: tree.root.stats.get(k) for k in ("n", "correct", "accuracy")}}
    for node in tree.nodes()[1:]:
        out[" > ".join(node.path[1:])] = {k: node.stats.get(k) for k in ("n", "correct", "accuracy")}
    return out


def weakest_leaves(tree: AbilityTree | None, k: int = WEAKEST_SHOWN) -> list[str]:
    if tree is None:
        return []
    measured = [n for n in tree.leaves() if n.stats.get("weakness") is not None]
    measured.sort(key=lambda n: (-n.stats["weakness"], n.path))
    return [" > ".join(n.path[1:]) for n in measured[:k]]


def validation_agents(validated: Path) -> dict | None:
    """Step D's agents: each one's model, how it answered (score or generate) and its accuracy on the
    generated questions, from D's report.json; None before D has run."""
    path = paths.report_path(validated)
    if not path.is_file():
        return None
    return {name: {k: row.get(k) for k in ("model", "mode", "accuracy")}
            for name, row in read_json(path).get("agents", {}).items()}


def collect(workflow_dir: Path, models_dir: Path, num_iterations: int, with_eval: bool) -> dict:
    """Every number of the report, as a JSON-able dict."""
    report = {"iterations": []}
    before = _tree(paths.baseline_eval(workflow_dir).scored_tree) if with_eval else None
    report["baseline_eval"] = node_accuracies(before)
    for i in range(1, num_iterations + 1):
        it = paths.IterationPaths(workflow_dir, models_dir, i)
        measured = _tree(it.scored_tree)
        after = _tree(it.eval.scored_tree) if with_eval else None
        entry = {
            "iteration": i,
            "student_on_round_data": node_accuracies(measured).get("overall"),
            "weakest_abilities": weakest_leaves(measured),
            "generated": _count_lines(it.generated),
            "validated": _count_lines(it.validated),
            "agents": validation_agents(it.validated),
            "final_model": str(it.final_model) if it.final_model.exists() else None,
        }
        if with_eval:
            entry["eval_before"] = node_accuracies(before)
            entry["eval_after"] = node_accuracies(after)
        report["iterations"].append(entry)
        before = after
    done = [e for e in report["iterations"] if e.get("eval_after")]
    if with_eval and done:
        # The run's net effect: the untouched student against the newest trained one.
        report["whole_run"] = {"after_iteration": done[-1]["iteration"],
                               "weakest_of_iteration_1": report["iterations"][0]["weakest_abilities"],
                               "eval_before": report["baseline_eval"], "eval_after": done[-1]["eval_after"]}
    return report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_markdown(report: dict) -> str:
    lines = ["# AT-KD run report", ""]
    for entry in report["iterations"]:
        i = entry["iteration"]
        lines.append(f"## Iteration {i}")
        lines.append("")
        overall = entry["student_on_round_data"] or {}
        lines.append(f"- student accuracy on this round's data: {_pct(overall.get('accuracy'))} (n={overall.get('n', '-')})")
        lines.append(f"- weakest abilities: {', '.join(entry['weakest_abilities']) or '-'}")
        lines.append(f"- questions generated: {entry['generated'] if entry['generated'] is not None else '-'}, "
                     f"validated: {entry['validated'] if entry['validated'] is not None else '-'}")
        if entry.get("agents"):
            lines.append("- validating agents: " + "; ".join(
                f"{name.replace('_', ' ')} {row['model']} ({row['mode']} mode), accuracy {_pct(row['accuracy'])}"
                for name, row in entry["agents"].items()))
        if "eval_after" in entry:
            lines += [""] + _table(entry["eval_before"], entry["eval_after"], entry["weakest_abilities"], "weakest")
        lines.append("")
    whole = report.get("whole_run")
    if whole and len(report["iterations"]) > 1:
        lines += [f"## Whole run: the initial student against the student after iteration {whole['after_iteration']}",
                  ""] + _table(whole["eval_before"], whole["eval_after"], whole["weakest_of_iteration_1"],
                               "weakest in iteration 1") + [""]
    return "\n".join(lines)


def _table(before: dict, after: dict, marked: list[str], mark: str) -> list[str]:
    """Markdown rows: accuracy per ability on the evaluation set, before and after."""
    lines = ["| ability (evaluation set) | n | before | after | change |", "|---|---|---|---|---|"]
    for name in before or after:
        acc_b, acc_a = (before.get(name) or {}).get("accuracy"), (after.get(name) or {}).get("accuracy")
        n = (after.get(name) or before.get(name) or {}).get("n")
        change = "-" if acc_a is None or acc_b is None else f"{100 * (acc_a - acc_b):+.1f}"
        suffix = f" ({mark})" if name in marked else ""
        lines.append(f"| {name}{suffix} | {n} | {_pct(acc_b)} | {_pct(acc_a)} | {change} |")
    return lines


def write_report(workflow_dir: Path, models_dir: Path, num_iterations: int, with_eval: bool) -> str:
    """Write report.md and report.json into the workflow folder; returns the markdown."""
    report = collect(workflow_dir, models_dir, num_iterations, with_eval)
    text = render_markdown(report)
    write_json(workflow_dir / paths.REPORT_JSON, report)
    write_text(workflow_dir / paths.REPORT_MD, text)
    return text

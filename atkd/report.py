"""The run's report: accuracy per iteration and per ability, before and after (ARCHITECTURE.md §2).

Built only from files the stages wrote (scored trees, JSONL outputs, D's report), so it can be
rebuilt at any time; main.py rewrites it after every iteration as `report.md` and `report.json`.
With an evaluation set it also lists per ability the teacher's own accuracy (scored once per run)
and the share of its questions that passed validation, beside the student's accuracy after each
iteration: where the teacher is weak, distillation cannot help. `report_accuracy.png` (drawn
with matplotlib, an optional extra) shows the student's accuracy per ability before and after
each iteration, with the teacher's; without matplotlib the report says how to get it.
"""

from __future__ import annotations

from pathlib import Path

from . import paths
from .io import read_json, write_bytes, write_json, write_text
from .tree import AbilityTree, load_tree

WEAKEST_SHOWN = 3  # abilities of each round's measurement listed as "weakest"
TEACHER_WEAK = 0.8  # teacher accuracy on an ability below which the report flags it (the student's ceiling)
LOW_PASS_RATE = 0.5  # share of generated questions passing validation below which an ability is flagged


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


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def validation_agents(validated: Path) -> dict | None:
    """Step D's agents: each one's model, how it answered (score or generate) and its accuracy on the
    generated questions, from D's report.json; None before D has run."""
    report = _read(paths.report_path(validated))
    if report is None:
        return None
    return {name: {k: row.get(k) for k in ("model", "mode", "accuracy")} for name, row in report.get("agents", {}).items()}


def pass_rates(d_report: dict | None, domain: str | None) -> dict[str, dict]:
    """{"Area > Leaf": {"total", "kept", "pass_rate"}} from step D's report (its names start at the domain)."""
    out = {}
    for name, row in ((d_report or {}).get("by_leaf") or {}).items():
        parts = name.split(" > ")
        key = " > ".join(parts[1:]) if domain and parts[0] == domain and len(parts) > 1 else name
        out[key] = {k: row.get(k) for k in ("total", "kept", "pass_rate")}
    return out


def training_data(it: paths.IterationPaths) -> dict:
    """What D2 (replay) and D3 (rationales) added to the round's training data, when they ran."""
    out = {}
    replay = _read(paths.replay_record_path(it.replay_mix))
    if replay:
        out["replay"] = {k: replay[k] for k in ("replay", "share", "replay_fraction")}
    rationales = _read(paths.report_path(it.explained))
    if rationales:
        out["rationales"] = {k: rationales[k] for k in ("total", "kept", "from_teacher", "from_dataset", "by_reason")}
    return out


def collect(workflow_dir: Path, models_dir: Path, num_iterations: int, with_eval: bool) -> dict:
    """Every number of the report, as a JSON-able dict."""
    report = {"iterations": []}
    before = _tree(paths.baseline_eval(workflow_dir).scored_tree) if with_eval else None
    report["baseline_eval"] = node_accuracies(before)
    if with_eval:
        report["teacher_eval"] = node_accuracies(_tree(paths.teacher_eval(workflow_dir).scored_tree))
    domain = before.domain if before is not None else None
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
            "validation_by_ability": pass_rates(_read(paths.report_path(it.validated)), domain or _domain(measured)),
            **training_data(it),
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


def _domain(tree: AbilityTree | None) -> str | None:
    return tree.domain if tree is not None else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_markdown(report: dict, chart: str | None = None) -> str:
    """The report as Markdown; `chart` is the chart's file name when it was drawn (beside report.md)."""
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
        if entry.get("replay"):
            r = entry["replay"]
            lines.append(f"- replayed from the round's questions: {r['replay']} items ({_pct(r['share'])} of training)")
        if entry.get("rationales"):
            r = entry["rationales"]
            dropped = ", ".join(f"{k} {v}" for k, v in r["by_reason"].items() if v) or "none"
            lines.append(f"- items with a rationale: {r['kept']} of {r['total']} ({r['from_teacher']} by the "
                         f"teacher, {r['from_dataset']} from the dataset; dropped: {dropped})")
        if "eval_after" in entry:
            lines += [""] + _table(entry["eval_before"], entry["eval_after"], entry["weakest_abilities"], "weakest")
        lines.append("")
    whole = report.get("whole_run")
    if whole and len(report["iterations"]) > 1:
        lines += [f"## Whole run: the initial student against the student after iteration {whole['after_iteration']}",
                  ""] + _table(whole["eval_before"], whole["eval_after"], whole["weakest_of_iteration_1"],
                               "weakest in iteration 1") + [""]
    if "teacher_eval" in report:
        lines += _per_ability(report, chart)
    return "\n".join(lines)


def _per_ability(report: dict, chart: str | None) -> list[str]:
    """The section that puts the student's gains beside what the teacher knows and what passed validation."""
    its = [e for e in report["iterations"] if e.get("eval_after")]
    teacher = report["teacher_eval"]
    lines = ["## Per ability: the teacher, validation, the student", ""]
    if chart:
        lines += [f"![Student accuracy per ability before and after each iteration, and the teacher's]({chart})", ""]
    else:
        lines += ["(No chart: matplotlib is not installed. `pip install matplotlib`, then rerun `python main.py`: "
                  "finished steps are skipped and the report is redrawn with the chart.)", ""]
    head = ["ability (evaluation set)", "teacher"] + [f"passed D, it. {e['iteration']}" for e in report["iterations"]]
    head += ["student before"] + [f"after it. {e['iteration']}" for e in its]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in report["baseline_eval"] or teacher:
        cells = [name, _pct((teacher.get(name) or {}).get("accuracy"))]
        for e in report["iterations"]:
            row = e.get("validation_by_ability", {}).get(name)
            cells.append(f"{_pct(row['pass_rate'])} of {row['total']}" if row else "-")
        cells.append(_pct((report["baseline_eval"].get(name) or {}).get("accuracy")))
        cells += [_pct((e["eval_after"].get(name) or {}).get("accuracy")) for e in its]
        lines.append("| " + " | ".join(cells) + " |")
    weak = [n for n in leaf_names(teacher) if (teacher[n].get("accuracy") or 0) < TEACHER_WEAK]
    rare = sorted({n for e in report["iterations"] for n, row in e.get("validation_by_ability", {}).items()
                   if row.get("pass_rate") is not None and row["pass_rate"] < LOW_PASS_RATE})
    verdict = (f"the teacher answers {', '.join(weak)} below {TEACHER_WEAK:.0%} on the evaluation set." if weak else
               f"the teacher answers every ability at {TEACHER_WEAK:.0%} or more on the evaluation set." if teacher else
               "the teacher has not been scored yet.")
    lines += ["", "Where the teacher is weak, distillation cannot help: " + verdict]
    if rare:
        lines.append(f"Less than {LOW_PASS_RATE:.0%} of the teacher's questions passed validation for: {', '.join(rare)}.")
    return lines + [""]


def leaf_names(accs: dict[str, dict]) -> list[str]:
    """The names in `accs` (node_accuracies) that are leaves: no other name continues them."""
    return [n for n in accs if n != "overall" and not any(k.startswith(n + " > ") for k in accs)]


def accuracy_chart(report: dict, path: Path) -> bool:
    """Draw the student's accuracy per ability before and after each iteration, with the teacher's, as a PNG
    at `path`; False (nothing written) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    import io

    teacher = report.get("teacher_eval") or {}
    series = [("student before", report["baseline_eval"])]
    series += [(f"after iteration {e['iteration']}", e["eval_after"]) for e in report["iterations"] if e.get("eval_after")]
    names = ["overall"] + leaf_names(report["baseline_eval"])
    fig = Figure(figsize=(8, 1.2 + 0.45 * len(names)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / len(series)
    for i, (label, accs) in enumerate(series):
        ys = [k + (i - (len(series) - 1) / 2) * height for k in range(len(names))]
        ax.barh(ys, [100 * ((accs.get(n) or {}).get("accuracy") or 0) for n in names], height=height, label=label)
    if teacher:
        ax.scatter([100 * ((teacher.get(n) or {}).get("accuracy") or 0) for n in names], range(len(names)),
                   marker="D", s=18, color="black", zorder=3, label="teacher")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 104)  # room for the teacher's marks at 100%
    ax.set_xlabel("accuracy on the evaluation set (%)")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series) + 1, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_bytes(path, buf.getvalue())
    return True


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
    chart = workflow_dir / paths.REPORT_CHART
    drawn = with_eval and accuracy_chart(report, chart)
    if not drawn:
        chart.unlink(missing_ok=True)  # never leave an older run's chart beside a report that does not show it
    text = render_markdown(report, chart.name if drawn else None)
    write_json(workflow_dir / paths.REPORT_JSON, report)
    write_text(workflow_dir / paths.REPORT_MD, text)
    return text

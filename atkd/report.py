"""The run's report: accuracy per iteration and per ability, before and after (ARCHITECTURE.md §2).

Built only from files the stages wrote (scored trees, JSONL outputs, the steps' summary.json), so it can be
rebuilt at any time; main.py rewrites it after every iteration as `report.md` and `report.json`.
With an evaluation set it also lists per ability the teacher's own accuracy (scored once per run)
and the share of its questions that passed validation, beside the student's accuracy after each
iteration: where the teacher is weak, distillation cannot help. `report_accuracy.png` (drawn
with matplotlib, an optional extra) shows the student's accuracy per ability before and after
each iteration, with the teacher's; without matplotlib the report says how to get it.

Every accuracy carries its 95% Wilson interval (`ci95`, atkd/intervals.py). A before -> after
change is marked when the exact McNemar test on the evaluation questions measured both times
(step H's per-question results) gives p < 0.05; the JSON holds each test's discordant counts.
"""

from __future__ import annotations

from pathlib import Path

from . import paths
from .intervals import ALPHA, mcnemar_exact, wilson_interval
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
    """{"Area > Leaf": {"n", "correct", "accuracy", "ci95"}} for every node below the root, plus "overall"."""
    if tree is None:
        return {}
    return {"overall" if node is tree.root else " > ".join(node.path[1:]): accuracy_entry(node.stats)
            for node in tree.nodes()}


def accuracy_entry(stats: dict) -> dict:
    """n, correct, accuracy and its 95% Wilson interval ([low, high] fractions; None when n is 0)."""
    out = {k: stats.get(k) for k in ("n", "correct", "accuracy")}
    out["ci95"] = wilson_interval(out["correct"] or 0, out["n"] or 0)
    return out


PAIRED_TEST = (f"exact McNemar test (two-sided binomial test, p = 1/2, on the evaluation questions answered "
               f"right on one side only), p < {ALPHA}")


def per_question(stats_path: Path) -> dict[str, tuple[tuple, bool]] | None:
    """{id: (node path below the root, answered right)} from step H's stats; None when H has not written them."""
    stats = _read(stats_path)
    if stats is None or "per_question" not in stats:
        return None
    return {str(r["id"]): (tuple(r["path"][1:]), bool(r["correct"])) for r in stats["per_question"]}


def paired_changes(before: dict | None, after: dict | None) -> dict[str, dict]:
    """Per node name (and "overall"): the questions measured both times, those that went right -> wrong and
    wrong -> right, the McNemar p-value and whether the change is marked; {} without both sides."""
    if before is None or after is None:
        return {}
    counts: dict[str, list[int]] = {}
    for key, (path, now) in after.items():
        if key not in before:
            continue
        was = before[key][1]
        # The question counts at its node and every ancestor, as in step H.
        for name in ["overall"] + [" > ".join(path[:d]) for d in range(1, len(path) + 1)]:
            row = counts.setdefault(name, [0, 0, 0])
            row[0] += 1
            row[1] += was and not now
            row[2] += now and not was
    out = {}
    for name, (n, lost, gained) in counts.items():
        p = mcnemar_exact(lost, gained)
        out[name] = {"n_paired": n, "right_to_wrong": lost, "wrong_to_right": gained, "p_value": p,
                     "marked": p < ALPHA}
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
    generated questions, from D's summary.json; None before D has run."""
    report = _read(paths.summary_path(validated))
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
    replay = _read(paths.summary_path(it.replay_mix))
    if replay:
        out["replay"] = {k: replay[k] for k in ("replay", "share", "replay_fraction")}
    rationales = _read(paths.summary_path(it.explained))
    if rationales:
        out["rationales"] = {k: rationales[k] for k in ("total", "kept", "from_teacher", "from_dataset", "by_reason")}
    return out


def on_policy_practice(it: paths.IterationPaths, domain: str | None) -> dict:
    """{"on_policy": ...} of step D4 (RESPONSES student | mixed): items the student practised on its own replies,
    and its sampled accuracy per ability before training ({"Area > Leaf": {chosen, right, wrong, unparsed,
    sampled_accuracy}}); {} when D4 did not run."""
    d4 = _read(paths.summary_path(it.on_policy_items))
    if d4 is None:
        return {}
    out = {k: d4.get(k) for k in ("written", "chosen", "practised", "right", "wrong", "unparsed", "sampled_accuracy",
                                  "share", "temperature", "seconds")}
    out["by_ability"] = {}
    for name, row in (d4.get("by_leaf") or {}).items():
        parts = name.split(" > ")
        key = " > ".join(parts[1:]) if domain and parts[0] == domain and len(parts) > 1 else name
        out["by_ability"][key] = {k: row.get(k) for k in ("chosen", "right", "wrong", "unparsed", "sampled_accuracy")}
    return {"on_policy": out}


def on_policy_lines(practice: dict | None) -> list[str]:
    """The report.md lines of step D4: how many items were practised on-policy, the sampled accuracy per ability."""
    if not practice:
        return []
    lines = [f"- practised on-policy (the student's own sampled replies, scored by the teacher): "
             f"{practice['practised']} of {practice['written']} written items ({practice['chosen']} sampled; "
             f"{practice['unparsed']} committed to no letter and kept the teacher's response); the student's sampled "
             f"accuracy before training: {_pct(practice['sampled_accuracy'])} ({practice['right']} right, "
             f"{practice['wrong']} wrong)"]
    if practice["by_ability"]:
        lines.append("  - sampled accuracy per ability: " + "; ".join(
            f"{name} {_pct(row['sampled_accuracy'])} ({row['right']}/{row['chosen']})"
            for name, row in practice["by_ability"].items()))
    return lines


def collect(workflow_dir: Path, models_dir: Path, num_iterations: int, with_eval: bool) -> dict:
    """Every number of the report, as a JSON-able dict."""
    report = {"iterations": []}
    baseline = paths.baseline_eval(workflow_dir)
    before = _tree(baseline.scored_tree) if with_eval else None
    report["baseline_eval"] = node_accuracies(before)
    if with_eval:
        report["teacher_eval"] = node_accuracies(_tree(paths.teacher_eval(workflow_dir).scored_tree))
        report["paired_test"] = PAIRED_TEST
    first_answers = answers_before = per_question(baseline.tree_summary) if with_eval else None
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
            "validation_by_ability": pass_rates(_read(paths.summary_path(it.validated)), domain or _domain(measured)),
            **training_data(it),
            **on_policy_practice(it, domain or _domain(measured)),
            "final_model": str(it.final_model) if it.final_model.exists() else None,
        }
        if with_eval:
            answers_after = per_question(it.eval.tree_summary) if after is not None else None
            entry["eval_before"] = node_accuracies(before)
            entry["eval_after"] = node_accuracies(after)
            entry["eval_change"] = paired_changes(answers_before, answers_after)
            answers_before = answers_after
        report["iterations"].append(entry)
        before = after
    done = [e for e in report["iterations"] if e.get("eval_after")]
    if with_eval and done:
        # The run's net effect: the untouched student against the newest trained one.
        report["whole_run"] = {"after_iteration": done[-1]["iteration"],
                               "weakest_of_iteration_1": report["iterations"][0]["weakest_abilities"],
                               "eval_before": report["baseline_eval"], "eval_after": done[-1]["eval_after"],
                               "eval_change": paired_changes(first_answers, per_question(paths.IterationPaths(
                                   workflow_dir, models_dir, done[-1]["iteration"]).eval.tree_summary))}
    return report


def _domain(tree: AbilityTree | None) -> str | None:
    return tree.domain if tree is not None else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pct_ci(entry: dict | None) -> str:
    """'80.0% (58-92)': an accuracy with its 95% interval in whole percents; '-' when not measured."""
    entry = entry or {}
    if entry.get("accuracy") is None:
        return "-"
    ci = entry.get("ci95")
    return _pct(entry["accuracy"]) + (f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})" if ci else "")


def render_markdown(report: dict, chart: str | None = None) -> str:
    """The report as Markdown; `chart` is the chart's file name when it was drawn (beside report.md)."""
    lines = ["# AT-KD run report", ""]
    for entry in report["iterations"]:
        i = entry["iteration"]
        lines.append(f"## Iteration {i}")
        lines.append("")
        overall = entry["student_on_round_data"] or {}
        lines.append(f"- student accuracy on this round's data: {_pct_ci(overall)} (n={overall.get('n', '-')})")
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
        lines += on_policy_lines(entry.get("on_policy"))
        if "eval_after" in entry:
            lines += [""] + _table(entry["eval_before"], entry["eval_after"], entry["weakest_abilities"], "weakest",
                                   entry.get("eval_change") or {})
        lines.append("")
    whole = report.get("whole_run")
    if whole and len(report["iterations"]) > 1:
        lines += [f"## Whole run: the initial student against the student after iteration {whole['after_iteration']}",
                  ""] + _table(whole["eval_before"], whole["eval_after"], whole["weakest_of_iteration_1"],
                               "weakest in iteration 1", whole.get("eval_change") or {}) + [""]
    if "teacher_eval" in report:
        lines += _per_ability(report, chart)
    return "\n".join(lines)


def _per_ability(report: dict, chart: str | None) -> list[str]:
    """The section that puts the student's gains beside what the teacher knows and what passed validation."""
    its = [e for e in report["iterations"] if e.get("eval_after")]
    teacher = report["teacher_eval"]
    lines = ["## Per ability: the teacher, validation, the student", "",
             "Accuracies with their 95% Wilson interval in brackets.", ""]
    if chart:
        lines += [f"![Student accuracy per ability before and after each iteration, and the teacher's]({chart})", ""]
    else:
        lines += ["(No chart: matplotlib is not installed. `pip install matplotlib`, then rerun `python main.py`: "
                  "finished steps are skipped and the report is redrawn with the chart.)", ""]
    head = ["ability (evaluation set)", "teacher"] + [f"passed D, it. {e['iteration']}" for e in report["iterations"]]
    head += ["student before"] + [f"after it. {e['iteration']}" for e in its]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in report["baseline_eval"] or teacher:
        cells = [name, _pct_ci(teacher.get(name))]
        for e in report["iterations"]:
            row = e.get("validation_by_ability", {}).get(name)
            cells.append(f"{_pct(row['pass_rate'])} of {row['total']}" if row else "-")
        cells.append(_pct_ci(report["baseline_eval"].get(name)))
        cells += [_pct_ci(e["eval_after"].get(name)) for e in its]
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


CHART_COLOURS = ("#e66101", "#92c5de", "#4393c3", "#2166ac", "#053061")  # before, then later iterations darker


def chart_series(report: dict) -> list[tuple[str, dict]]:
    """(label, node accuracies) of the student before and after each evaluated iteration, in order."""
    series = [("student before", report["baseline_eval"])]
    return series + [(f"after iteration {e['iteration']}", e["eval_after"])
                     for e in report["iterations"] if e.get("eval_after")]


def series_colour(i: int, count: int) -> str:
    """Orange for the student before; blues for the iterations, the newest the darkest."""
    if i == 0:
        return CHART_COLOURS[0]
    blues = CHART_COLOURS[1:]
    return blues[(len(blues) - (count - 1) + i - 1) % len(blues)] if count - 1 <= len(blues) else \
        blues[(i - 1) % len(blues)]


def accuracy_chart(report: dict, path: Path) -> bool:
    """Draw the student's accuracy per ability (95% intervals as whiskers) before and after each iteration,
    the teacher's as a reference mark, and the whole run's change with its paired test, as a PNG at `path`;
    False (nothing written) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    import io

    series = chart_series(report)
    names = ["overall"] + leaf_names(report["baseline_eval"])
    fig = Figure(figsize=(9, 1.6 + 0.18 * len(names) * (len(series) + 1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k in range(0, len(names), 2):  # shaded every other row: each ability's marks stay together
        ax.axhspan(k - 0.5, k + 0.5, color="#f0f0f0", zorder=0)
    ax.axhline(0.5, color="#888888", linewidth=0.8)  # overall apart from the abilities
    _teacher_marks(ax, report.get("teacher_eval") or {}, names)
    step = 0.8 / len(series)
    for i, (label, accs) in enumerate(series):
        colour = series_colour(i, len(series))
        _student_marks(ax, accs, names, (i - (len(series) - 1) / 2) * step, colour, label)
    _change_labels(ax, report, names)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(-2, 102)
    ax.set_xticks(range(0, 101, 10))
    ax.grid(axis="x", color="#dddddd", linewidth=0.6, zorder=0)
    ax.set_xlabel("accuracy on the evaluation set (%); whiskers: 95% Wilson interval", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series) + 1, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    write_bytes(path, buf.getvalue())
    return True


def _teacher_marks(ax, teacher: dict, names: list[str]) -> None:
    """The teacher's accuracy per row: a dark line across the row's height, the student's ceiling."""
    rows = [(k, (teacher.get(n) or {}).get("accuracy")) for k, n in enumerate(names)]
    rows = [(k, 100 * acc) for k, acc in rows if acc is not None]
    if rows:
        ax.vlines([x for _k, x in rows], [k - 0.45 for k, _x in rows], [k + 0.45 for k, _x in rows],
                  colors="#8c8c8c", linewidths=2.5, zorder=2, label="teacher")


def _student_marks(ax, accs: dict, names: list[str], offset: float, colour: str, label: str) -> None:
    """One series: a dot at each measured accuracy, whiskers over its 95% interval."""
    xs, ys, lo, hi = [], [], [], []
    for k, n in enumerate(names):
        entry = accs.get(n) or {}
        if entry.get("accuracy") is None:
            continue
        acc, ci = 100 * entry["accuracy"], entry.get("ci95") or [entry["accuracy"]] * 2
        xs.append(acc)
        ys.append(k + offset)
        lo.append(max(0.0, acc - 100 * ci[0]))  # never negative: 100% and its upper bound differ by rounding
        hi.append(max(0.0, 100 * ci[1] - acc))
    ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", markersize=4, color=colour, ecolor=colour, elinewidth=1.2,
                capsize=0, zorder=3, label=label)


def _change_labels(ax, report: dict, names: list[str]) -> None:
    """Right of each row: before -> the newest evaluation's change in points, bold with * when the paired test
    marks it."""
    whole = report.get("whole_run") or {}
    done = [e for e in report["iterations"] if e.get("eval_after")]
    if not done:
        return
    after = done[-1]["eval_after"]
    tests = (whole.get("eval_change") if whole else done[-1].get("eval_change")) or {}
    for k, n in enumerate(names):
        b, a = (report["baseline_eval"].get(n) or {}).get("accuracy"), (after.get(n) or {}).get("accuracy")
        if a is None or b is None:
            continue
        marked = (tests.get(n) or {}).get("marked")
        ax.text(1.01, k, f"{100 * (a - b):+.0f}{' *' if marked else ''}", transform=ax.get_yaxis_transform(),
                va="center", fontsize=8, fontweight="bold" if marked else "normal")
    ax.text(1.01, 1.0, f"change,\nbefore to\nit. {done[-1]['iteration']}\n(* p<{ALPHA})", transform=ax.transAxes,
            va="bottom", fontsize=7, color="#555555")


def _table(before: dict, after: dict, marked: list[str], mark: str, tests: dict[str, dict]) -> list[str]:
    """Markdown rows: accuracy per ability on the evaluation set, before and after, with the paired test;
    a change the test finds is not noise is in bold."""
    lines = ["| ability (evaluation set) | n | before | after | change | McNemar p (right→wrong/wrong→right) |",
             "|---|---|---|---|---|---|"]
    for name in before or after:
        acc_b, acc_a = (before.get(name) or {}).get("accuracy"), (after.get(name) or {}).get("accuracy")
        n = (after.get(name) or before.get(name) or {}).get("n")
        change = "-" if acc_a is None or acc_b is None else f"{100 * (acc_a - acc_b):+.1f}"
        test = tests.get(name)
        if test and test["marked"] and change != "-":
            change = f"**{change}**"
        suffix = f" ({mark})" if name in marked else ""
        lines.append(f"| {name}{suffix} | {n} | {_pct_ci(before.get(name))} | {_pct_ci(after.get(name))} | {change} "
                     f"| {_test_cell(test)} |")
    note = "Accuracy with its 95% Wilson interval in brackets."
    if tests:
        note += f" A change in bold is not noise: {PAIRED_TEST}."
    elif after:
        note += (" No paired test: step H's per-question results are missing on one side (written since "
                 "step H's version 2; rerunning main.py redoes steps B and H only).")
    return lines + ["", note]


def _test_cell(test: dict | None) -> str:
    if not test:
        return "-"
    p = test["p_value"]
    return f"{p:.3f} ({test['right_to_wrong']}/{test['wrong_to_right']})" if p >= 0.001 else \
        f"<0.001 ({test['right_to_wrong']}/{test['wrong_to_right']})"


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

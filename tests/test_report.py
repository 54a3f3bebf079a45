"""The run report: numbers come from the scored trees the stages wrote; the whole-run table compares
the initial student with the newest one and marks iteration 1's weakest abilities. Every accuracy
carries its 95% Wilson interval; a change is marked only when the exact McNemar test on the same
evaluation questions says it is not noise."""

from __future__ import annotations

import json
import sys

import pytest

from atkd import paths
from atkd.intervals import mcnemar_exact, wilson_interval
from atkd.io import write_json
from atkd.records import question_from_dict
from atkd.report import write_report
from atkd.tree import tree_from_nested
from atkd.weakness import analyze


def scored(path, acc: dict[str, tuple[int, int]]) -> None:
    """Save a scored tree Root > Area > {Easy, Hard} with (correct, n) per leaf."""
    tree = tree_from_nested({"Area": {"Easy": 0, "Hard": 0}}, domain="Root")
    for leaf in tree.leaves():
        c, n = acc[leaf.name]
        leaf.stats = {"n": n, "correct": c, "accuracy": c / n, "weakness": 1 - c / n}
    for node in (tree.root, tree.root.children[0]):
        c, n = sum(v[0] for v in acc.values()), sum(v[1] for v in acc.values())
        node.stats = {"n": n, "correct": c, "accuracy": c / n, "weakness": 1 - c / n}
    tree.save_scored(path)


def test_report_per_iteration_and_whole_run(tmp_path):
    wf, models = tmp_path / "workflow", tmp_path / "models"
    scored(paths.baseline_eval(wf).scored_tree, {"Easy": (9, 10), "Hard": (1, 10)})
    evals = [{"Easy": (8, 10), "Hard": (6, 10)}, {"Easy": (10, 10), "Hard": (7, 10)}]
    for i, after in enumerate(evals, start=1):
        it = paths.IterationPaths(wf, models, i)
        scored(it.scored_tree, {"Easy": (5, 5), "Hard": (i, 5)})
        scored(it.eval.scored_tree, after)
    it1 = paths.IterationPaths(wf, models, 1)
    it1.generated.parent.mkdir(parents=True)
    it1.generated.write_text('{"id": 1}\n{"id": 2}\n\n{"id": 3}\n')

    text = write_report(wf, models, 2, with_eval=True)
    report = json.loads((wf / paths.REPORT_JSON).read_text())
    first, second = report["iterations"]
    assert first["weakest_abilities"][0] == "Area > Hard" and first["generated"] == 3 and first["validated"] is None
    assert first["eval_before"]["Area > Hard"]["accuracy"] == 0.1
    assert first["eval_after"]["Area > Hard"]["accuracy"] == 0.6 == second["eval_before"]["Area > Hard"]["accuracy"]
    whole = report["whole_run"]
    assert whole["after_iteration"] == 2 and whole["weakest_of_iteration_1"][0] == "Area > Hard"
    assert whole["eval_before"]["overall"]["accuracy"] == 0.5 and whole["eval_after"]["overall"]["accuracy"] == 0.85
    # Scored trees without step H's per-question results: intervals, but no paired test and nothing in bold.
    assert "| Area > Hard (weakest) | 10 | 10.0% (2-40) | 60.0% (31-83) | +50.0 | - |" in text
    assert "| Area > Hard (weakest in iteration 1) | 10 | 10.0% (2-40) | 70.0% (40-89) | +60.0 | - |" in text
    assert "| overall | 20 | 50.0% (30-70) | 85.0% (64-95) | +35.0 | - |" in text
    assert "No paired test: step H's per-question results are missing" in text and "**" not in text
    assert (wf / paths.REPORT_MD).read_text() == text


def test_report_of_an_unfinished_run_has_no_whole_run_numbers(tmp_path):
    wf, models = tmp_path / "workflow", tmp_path / "models"
    scored(paths.baseline_eval(wf).scored_tree, {"Easy": (9, 10), "Hard": (1, 10)})
    text = write_report(wf, models, 2, with_eval=True)
    report = json.loads((wf / paths.REPORT_JSON).read_text())
    assert "whole_run" not in report and "Whole run" not in text
    assert report["iterations"][0]["eval_after"] == {} and "| overall | 20 | 50.0% (30-70) | - | - | - |" in text


def finished_run(tmp_path):
    """A one-iteration run's files: scored trees, the teacher's scores, D's report (names start at the domain)."""
    wf, models = tmp_path / "workflow", tmp_path / "models"
    scored(paths.baseline_eval(wf).scored_tree, {"Easy": (9, 10), "Hard": (1, 10)})
    scored(paths.teacher_eval(wf).scored_tree, {"Easy": (10, 10), "Hard": (6, 10)})
    it = paths.IterationPaths(wf, models, 1)
    scored(it.scored_tree, {"Easy": (5, 5), "Hard": (1, 5)})
    scored(it.eval.scored_tree, {"Easy": (9, 10), "Hard": (5, 10)})
    write_json(paths.summary_path(it.validated), {"by_leaf": {
        "Root > Area > Hard": {"total": 20, "kept": 8, "pass_rate": 0.4, "rejected": {"both_wrong": 12}},
        "Root > Area > Easy": {"total": 2, "kept": 2, "pass_rate": 1.0, "rejected": {}}}})
    return wf, models


def test_report_shows_the_teacher_and_validation_per_ability_with_a_chart(tmp_path):
    wf, models = finished_run(tmp_path)
    text = write_report(wf, models, 1, with_eval=True)
    chart = wf / paths.REPORT_CHART
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    assert f"]({paths.REPORT_CHART})" in text
    assert "| Area > Hard | 60.0% (31-83) | 40.0% of 20 | 10.0% (2-40) | 50.0% (24-76) |" in text
    assert "| Area > Easy | 100.0% (72-100) | 100.0% of 2 | 90.0% (60-98) | 90.0% (60-98) |" in text
    assert "the teacher answers Area > Hard below 80% on the evaluation set" in text
    assert "Less than 50% of the teacher's questions passed validation for: Area > Hard." in text
    report = json.loads((wf / paths.REPORT_JSON).read_text())
    assert report["teacher_eval"]["Area > Hard"]["accuracy"] == 0.6
    assert report["iterations"][0]["validation_by_ability"]["Area > Hard"] == {"total": 20, "kept": 8, "pass_rate": 0.4}


def test_without_matplotlib_the_report_says_how_to_get_the_chart(tmp_path, monkeypatch):
    wf, models = finished_run(tmp_path)
    write_report(wf, models, 1, with_eval=True)
    assert (wf / paths.REPORT_CHART).is_file()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    text = write_report(wf, models, 1, with_eval=True)
    assert "No chart: matplotlib is not installed. `pip install matplotlib`" in text
    assert paths.REPORT_CHART not in text
    assert not (wf / paths.REPORT_CHART).exists()  # no stale chart beside a report that does not show it
    assert "| Area > Hard | 60.0% (31-83) | 40.0% of 20 | 10.0% (2-40) | 50.0% (24-76) |" in text  # all there


# ------------------------------------------------------------------------ intervals and the paired test

def evaluated(ev: paths.EvalPaths, right: dict[str, set[int]]) -> None:
    """Step H's files for 20 questions per leaf (ids "<leaf>-<k>"), those in `right` answered right:
    the analyzer's own counting writes the scored tree and the stats with their per-question results."""
    tree = tree_from_nested({"Area": {"Easy": 0, "Hard": 0}}, domain="Root")
    questions, ability, replies = [], {}, {}
    for leaf, ok in right.items():
        for k in range(20):
            key = f"{leaf}-{k}"
            questions.append(question_from_dict({"id": key, "question": f"{key}?", "options": {"A": "x", "B": "y"},
                                                 "answer_idx": "A"}))
            ability[key] = ["Root", "Area", leaf]
            replies[key] = {"id": key, "pred_letter": "A" if k in ok else "B"}
    analysis = analyze(tree, questions, ability, replies, "replies.jsonl", prior_strength=4.0)
    tree.save_scored(ev.scored_tree)
    write_json(ev.tree_summary, analysis.stats())


def test_wilson_interval_and_mcnemar_p_equal_hand_computed():
    # 16/20: p = 0.8, z^2/n = 3.84146/20 = 0.192073; centre = (0.8 + 0.096036) / 1.192073 = 0.751662,
    # half = (1.959964 / 1.192073) * sqrt(0.8 * 0.2 / 20 + 3.84146 / 1600) = 1.644170 * 0.101983 = 0.167680.
    assert wilson_interval(16, 20) == pytest.approx([0.58398, 0.91934], abs=1e-5)
    assert wilson_interval(0, 5) == pytest.approx([0.0, 0.43448], abs=1e-5)  # not the empty [0, 0]
    assert wilson_interval(0, 0) is None
    # 2 right -> wrong, 14 wrong -> right: 2 * (C(16,0) + C(16,1) + C(16,2)) / 2^16 = 2 * 137 / 65536.
    assert mcnemar_exact(2, 14) == pytest.approx(274 / 65536) == mcnemar_exact(14, 2)
    assert mcnemar_exact(3, 0) == 0.25 and mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0


def test_every_accuracy_has_its_interval_and_only_real_changes_are_marked(tmp_path):
    wf, models = tmp_path / "workflow", tmp_path / "models"
    # Hard: 4/20 -> 16/20, questions 0, 1 lost and 4..17 gained: p = 274/65536 = 0.0042, marked.
    # Easy: 16/20 -> 13/20, questions 0..2 lost, none gained: p = 2 / 2^3 = 0.25, not marked (-15 points).
    # overall: 20/40 -> 29/40 with 5 lost and 14 gained: p = 2 * (1+19+171+969+3876+11628) / 2^19 = 0.0636, not marked.
    evaluated(paths.baseline_eval(wf), {"Easy": set(range(16)), "Hard": set(range(4))})
    evaluated(paths.teacher_eval(wf), {"Easy": set(range(20)), "Hard": set(range(16))})
    it = paths.IterationPaths(wf, models, 1)
    evaluated(it.eval, {"Easy": set(range(3, 16)), "Hard": set(range(2, 18))})
    scored(it.scored_tree, {"Easy": (5, 5), "Hard": (1, 5)})

    text = write_report(wf, models, 1, with_eval=True)
    report = json.loads((wf / paths.REPORT_JSON).read_text())
    entry = report["iterations"][0]
    assert report["baseline_eval"]["Area > Easy"]["ci95"] == pytest.approx([0.58398, 0.91934], abs=1e-5)
    assert entry["eval_after"]["Area > Hard"]["ci95"] == pytest.approx([0.58398, 0.91934], abs=1e-5)
    assert report["teacher_eval"]["Area > Easy"]["ci95"] == pytest.approx(wilson_interval(20, 20))
    change = entry["eval_change"]
    assert change["Area > Hard"] == {"n_paired": 20, "right_to_wrong": 2, "wrong_to_right": 14,
                                     "p_value": pytest.approx(274 / 65536), "marked": True}
    assert change["Area > Easy"] == {"n_paired": 20, "right_to_wrong": 3, "wrong_to_right": 0,
                                     "p_value": 0.25, "marked": False}
    assert change["overall"]["p_value"] == pytest.approx(2 * 16664 / 2 ** 19) and not change["overall"]["marked"]
    assert change["Area"] == {**change["overall"]}  # the one area holds every question
    assert "exact McNemar" in report["paired_test"]

    assert "| Area > Hard (weakest) | 20 | 20.0% (8-42) | 80.0% (58-92) | **+60.0** | 0.004 (2/14) |" in text
    assert "| Area > Easy (weakest) | 20 | 80.0% (58-92) | 65.0% (43-82) | -15.0 | 0.250 (3/0) |" in text
    assert "| overall | 40 | 50.0% (35-65) | 72.5% (57-84) | +22.5 | 0.064 (5/14) |" in text
    assert "A change in bold is not noise: exact McNemar test" in text
    assert "| Area > Easy | 100.0% (84-100) | - | 80.0% (58-92) | 65.0% (43-82) |" in text

"""The run report: numbers come from the scored trees the stages wrote; the whole-run table compares
the initial student with the newest one and marks iteration 1's weakest abilities."""

from __future__ import annotations

import json
import sys

from atkd import paths
from atkd.io import write_json
from atkd.report import write_report
from atkd.tree import tree_from_nested


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
    assert "| Area > Hard (weakest) | 10 | 10.0% | 60.0% | +50.0 |" in text
    assert "| Area > Hard (weakest in iteration 1) | 10 | 10.0% | 70.0% | +60.0 |" in text
    assert "| overall | 20 | 50.0% | 85.0% | +35.0 |" in text
    assert (wf / paths.REPORT_MD).read_text() == text


def test_report_of_an_unfinished_run_has_no_whole_run_numbers(tmp_path):
    wf, models = tmp_path / "workflow", tmp_path / "models"
    scored(paths.baseline_eval(wf).scored_tree, {"Easy": (9, 10), "Hard": (1, 10)})
    text = write_report(wf, models, 2, with_eval=True)
    report = json.loads((wf / paths.REPORT_JSON).read_text())
    assert "whole_run" not in report and "Whole run" not in text
    assert report["iterations"][0]["eval_after"] == {} and "| overall | 20 | 50.0% | - | - |" in text


def finished_run(tmp_path):
    """A one-iteration run's files: scored trees, the teacher's scores, D's report (names start at the domain)."""
    wf, models = tmp_path / "workflow", tmp_path / "models"
    scored(paths.baseline_eval(wf).scored_tree, {"Easy": (9, 10), "Hard": (1, 10)})
    scored(paths.teacher_eval(wf).scored_tree, {"Easy": (10, 10), "Hard": (6, 10)})
    it = paths.IterationPaths(wf, models, 1)
    scored(it.scored_tree, {"Easy": (5, 5), "Hard": (1, 5)})
    scored(it.eval.scored_tree, {"Easy": (9, 10), "Hard": (5, 10)})
    write_json(paths.report_path(it.validated), {"by_leaf": {
        "Root > Area > Hard": {"total": 20, "kept": 8, "pass_rate": 0.4, "rejected": {"both_wrong": 12}},
        "Root > Area > Easy": {"total": 2, "kept": 2, "pass_rate": 1.0, "rejected": {}}}})
    return wf, models


def test_report_shows_the_teacher_and_validation_per_ability_with_a_chart(tmp_path):
    wf, models = finished_run(tmp_path)
    text = write_report(wf, models, 1, with_eval=True)
    chart = wf / paths.REPORT_CHART
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    assert f"]({paths.REPORT_CHART})" in text
    assert "| Area > Hard | 60.0% | 40.0% of 20 | 10.0% | 50.0% |" in text
    assert "| Area > Easy | 100.0% | 100.0% of 2 | 90.0% | 90.0% |" in text
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
    assert "| Area > Hard | 60.0% | 40.0% of 20 | 10.0% | 50.0% |" in text  # the numbers are all there

"""The run report: numbers come from the scored trees the stages wrote; the whole-run table compares
the initial student with the newest one and marks iteration 1's weakest abilities."""

from __future__ import annotations

import json

from atkd import paths
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

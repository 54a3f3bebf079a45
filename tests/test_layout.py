"""The workflow folder's layout, from the plan main.py would run (nothing runs): one summary name, a done-record
per stage, and every step's log beside its folder, in an iteration as in the evaluations and the labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from atkd import paths
from atkd.cli import parse_config
from atkd.plan import (baseline_eval_steps, eval_files, eval_steps, iteration_steps, round_files, teacher_eval_steps,
                       tree_step)
from atkd.stages import STAGES, STEPS
from atkd.workflow import WorkflowConfig

NO_SUMMARY = {"tree", "F"}  # the tree stage writes the tree alone; F its model (trainer_state.json in final_model/)


@pytest.fixture
def plan(tmp_path) -> dict[str, list]:
    """Every step of every stage, where main.py puts it: {"workflow"/"eval_labels"/...: [(letter, step)]}."""
    import main

    base = parse_config(WorkflowConfig, [], defaults=main.defaults())
    cfg = replace(base, existing_ability_tree_path="", ability_class_files_per_iteration=[], eval_ability_class_path="",
                  response_style="rationale", responses="mixed", replay_fraction=0.3)
    workflow, tree = tmp_path / "wf", tmp_path / "wf" / paths.INITIAL_TREE
    it = paths.IterationPaths(workflow, tmp_path / "models", 1)
    ev = eval_files(cfg, workflow, tree, [])
    chain = ["L", "A", "B", "C", "D", "D3", "D2", "D4", "E", "F"]
    files = round_files(cfg, it, tree, [], False)
    return {"workflow": [("tree", tree_step(cfg, workflow, []))],
            "eval_labels": [("L", ev.label_step)],
            "baseline_eval": list(zip("GH", baseline_eval_steps(cfg, workflow, tree, [], ev.ability_paths))),
            "teacher_eval": list(zip("GH", teacher_eval_steps(cfg, workflow, tree, [], ev.ability_paths))),
            "iteration_1": list(zip(chain, iteration_steps(cfg, it, "s", tree, [], files)))
            + list(zip("GH", eval_steps(cfg, it.eval, "s", tree, [], ev.ability_paths)))}


def test_done_record_names_are_unique_across_the_stage_table(plan):
    names = {stage.name: paths.done_record(".", stage.config).name for stage in STAGES}
    assert len(set(names.values())) == len(STAGES), names
    assert names["replay"] == "replay.done.json" and names["train"] == "train.done.json"
    # and the steps main.py runs use them: one record name per stage, never another stage's
    by_stage: dict[str, set] = {}
    for steps in plan.values():
        for _, step in steps:
            by_stage.setdefault(step.stage.name, set()).add(step.cfg.record_path().name)
    assert by_stage == {name: {record} for name, record in names.items()}


def test_every_step_is_named_run_and_logged_as_the_stage_table_says(plan, tmp_path):
    workflow = tmp_path / "wf"
    for where, steps in plan.items():
        here = workflow if where == "workflow" else workflow / where
        for letter, step in steps:
            kind = next(k for k in STEPS if k.letter == letter)
            assert step.script == kind.stage.script, (where, letter)
            assert step.log_path == here / f"{kind.folder}.log", (where, letter)  # beside the step's folder
            assert step.name == (kind.folder if where in ("workflow", "iteration_1") else f"{where}/{kind.folder}")
            if letter != "F":  # F's record is with its model, in the models folder
                assert step.cfg.record_path().parent == here / kind.folder, (where, letter)


def test_every_step_that_summarises_its_work_writes_summary_json_in_its_folder(plan):
    for where, steps in plan.items():
        for letter, step in steps:
            outputs = step.cfg.outputs()
            assert not {"stats.json", "plan.json", "report.json", "replay.json"} & {p.name for p in outputs}
            assert not [p for p in outputs if p.name.endswith(".summary.json")]
            if letter in NO_SUMMARY:
                assert "summary.json" not in {p.name for p in outputs}, (where, letter)
            else:
                assert step.cfg.record_path().parent / "summary.json" in outputs, (where, letter)

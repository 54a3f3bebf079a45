"""A stage's fingerprint holds only the prompts that stage renders: editing the question-writing prompt
reruns step C (and what reads its output), not the evaluation, A, B or D before it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from atkd import prompts
from atkd.answering import InferenceConfig
from atkd.cross_check import CrossCheckConfig
from atkd.fingerprint import DoneRecord, fingerprint
from atkd.question_writing import QuestionWritingConfig
from atkd.weakness import AnalyzerConfig, run as analyze

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def configs(tmp: Path) -> dict:
    """A, B, C and D of one iteration, as the workflow builds them (inputs need not exist for a fingerprint)."""
    it = tmp / "iteration_1"
    return {
        "A": InferenceConfig(model_path=str(DEMO / "models" / "student"), dataset_path=str(DEMO / "iteration_1.jsonl"),
                             output_path=str(it / "A" / "replies.jsonl")),
        "B": AnalyzerConfig(initial_tree_path=str(tmp / "tree.json"), paths_file=str(tmp / "paths.jsonl"),
                            answers_file=str(tmp / "questions.jsonl"), student_responses_file=str(tmp / "replies.jsonl"),
                            output_tree_path=str(it / "B" / "tree.json"), output_stats_path=str(it / "B" / "stats.json")),
        "C": QuestionWritingConfig(teacher_model_path=str(DEMO / "models" / "teacher"),
                                   ability_tree_path=str(it / "B" / "tree.json"),
                                   full_dataset_path=str(DEMO / "iteration_1.jsonl"),
                                   ability_class_path=str(DEMO / "iteration_1_ability_paths.jsonl"),
                                   output_path=str(it / "C" / "generated.jsonl")),
        "D": CrossCheckConfig(agent_model_1_path=str(DEMO / "models" / "teacher"),
                              agent_model_2_path=str(DEMO / "models" / "agent"),
                              input_file=str(it / "C" / "generated.jsonl"), output_file=str(it / "D" / "validated.jsonl")),
    }


def fingerprints(cfgs: dict) -> dict:
    return {step: fingerprint(cfg) for step, cfg in cfgs.items()}


def edit_label(monkeypatch, field: str, suffix: str = " (edited)") -> None:
    """Edit one text of the English prompts in place, as an edit of atkd/prompts.py would."""
    en = prompts.LABELS["en"]
    monkeypatch.setitem(prompts.LABELS, "en", dataclasses.replace(en, **{field: getattr(en, field) + suffix}))


def changed(before: dict, after: dict) -> set[str]:
    return {step for step in before if before[step] != after[step]}


def test_editing_the_question_writing_prompt_changes_only_step_c(tmp_path, monkeypatch):
    cfgs = configs(tmp_path)
    before = fingerprints(cfgs)
    edit_label(monkeypatch, "write_task")
    assert changed(before, fingerprints(cfgs)) == {"C"}


def test_editing_the_question_writing_function_changes_only_step_c(tmp_path, monkeypatch):
    cfgs = configs(tmp_path)
    before = fingerprints(cfgs)
    original = prompts.write_question_user_text
    monkeypatch.setattr(prompts, "write_question_user_text", lambda *a, **k: original(*a, **k) + "\n\nBe concise.")
    assert changed(before, fingerprints(cfgs)) == {"C"}


def test_editing_the_mcq_prompt_changes_the_stages_that_render_it(tmp_path, monkeypatch):
    cfgs = configs(tmp_path)
    before = fingerprints(cfgs)
    edit_label(monkeypatch, "mcq_instruction")
    assert changed(before, fingerprints(cfgs)) == {"A", "D"}  # B renders no prompt, C only its own


def test_a_stage_that_renders_no_prompt_holds_no_prompt_version(tmp_path):
    assert "prompts" not in fingerprint(configs(tmp_path)["B"])
    assert "prompts" in fingerprint(configs(tmp_path)["C"])


def test_a_finished_analysis_stays_done_after_any_prompt_edit(tmp_path, monkeypatch):
    """Step B for real: its done-record still matches after the MCQ and question-writing prompts change."""
    shutil.copy(ROOT / "ability_trees" / "demo_tree.json", tmp_path / "tree.json")
    shutil.copy(DEMO / "iteration_1_ability_paths.jsonl", tmp_path / "paths.jsonl")
    shutil.copy(DEMO / "iteration_1.jsonl", tmp_path / "questions.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    (tmp_path / "replies.jsonl").write_text("".join(json.dumps({"id": r["id"], "pred_letter": "A"}) + "\n"
                                                    for r in rows), encoding="utf-8")
    cfg = configs(tmp_path)["B"]
    analyze(cfg)
    assert DoneRecord(cfg).status()[0] == "done"
    edit_label(monkeypatch, "write_task")
    edit_label(monkeypatch, "mcq_instruction")
    assert DoneRecord(cfg).status() == ("done", "outputs are up to date")
    # ... while step C's record, written before the edit, would be stale.
    c = configs(tmp_path)["C"]
    monkeypatch.undo()
    old = fingerprint(c)
    edit_label(monkeypatch, "write_task")
    assert old != fingerprint(c)


@pytest.mark.parametrize("name", prompts.PROMPT_NAMES)
def test_every_prompt_has_probes_in_both_languages(name):
    assert all(prompts.prompt_probes(name, lang) for lang in prompts.LABELS)

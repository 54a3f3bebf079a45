"""main.py's step runner on a real stage (the analyzer, no model): skip what is done, redo what changed and
say what, resume what was left, and agree with the stage run by hand because both read one done-record."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from atkd import paths
from atkd.cli import parse_config, to_argv
from atkd.fingerprint import DoneRecord
from atkd.io import write_json, write_jsonl
from atkd.steps import Step, StepFailed, run_step
from atkd.weakness import AnalyzerConfig
from atkd.plan import train_step
from atkd.workflow import WorkflowConfig

TREE = {"Med": {"Cardio": 0, "Resp": 0}}


def q(i: int, answer: str) -> dict:
    return {"id": i, "question": f"Question {i}?", "options": {"A": "a", "B": "b"}, "answer_idx": answer}


@pytest.fixture
def step(tmp_path) -> Step:
    write_json(tmp_path / "tree.json", TREE)
    write_jsonl(tmp_path / "q.jsonl", [q(1, "A"), q(2, "B"), q(3, "A")])
    write_jsonl(tmp_path / "paths.jsonl", [{"id": 1, "ability_path": ["Cardio"]}, {"id": 2, "ability_path": ["Cardio"]},
                                           {"id": 3, "ability_path": ["Resp"]}])
    write_jsonl(tmp_path / "replies.jsonl", [{"id": 1, "pred_letter": "A"}, {"id": 2, "pred_letter": "A"},
                                             {"id": 3, "pred_letter": "A"}])
    out = tmp_path / "B"
    cfg = AnalyzerConfig(initial_tree_path=str(tmp_path / "tree.json"), paths_file=str(tmp_path / "paths.jsonl"),
                         answers_file=str(tmp_path / "q.jsonl"), student_responses_file=str(tmp_path / "replies.jsonl"),
                         output_tree_path=str(out / "tree.json"), output_stats_path=str(out / "summary.json"))
    return Step("B_student_tree", "student_data_analyzer.py", cfg, log_path=tmp_path / "B.log")


def accuracy(step: Step) -> float:
    return json.loads(Path(step.cfg.output_stats_path).read_text())["accuracy"]


def test_runs_once_then_skips_and_the_record_holds_the_command(step, capsys):
    assert run_step(step) == "new"
    assert accuracy(step) == pytest.approx(2 / 3)
    record = json.loads(step.cfg.record_path().read_text())
    assert record["argv"][1:] == to_argv(step.cfg)
    mtime = Path(step.cfg.output_stats_path).stat().st_mtime_ns
    assert run_step(step) == "done"
    assert Path(step.cfg.output_stats_path).stat().st_mtime_ns == mtime
    out = capsys.readouterr().out
    assert "[run] B_student_tree" in out and "[skip] B_student_tree: outputs are up to date" in out
    assert "-m atkd analyze --initial_tree_path" in step.log_path.read_text()  # the command, as it ran


def test_changed_setting_reruns_and_says_which(step, capsys):
    run_step(step)
    changed = replace(step, cfg=replace(step.cfg, prior_strength=0.0))
    assert run_step(changed) == "changed"
    assert "[rerun] B_student_tree: changed since the last run: prior_strength 4.0 -> 0.0" in capsys.readouterr().out
    stats = json.loads(Path(step.cfg.output_stats_path).read_text())
    assert stats["prior_strength"] == 0.0


def test_changed_input_contents_rerun_even_with_the_old_size_and_mtime(step, capsys):
    run_step(step)
    replies = Path(step.cfg.student_responses_file)
    st = replies.stat()
    text = replies.read_text().replace('"pred_letter": "A"}\n{"id": 2', '"pred_letter": "B"}\n{"id": 2')
    assert len(text.encode()) == st.st_size
    replies.write_text(text)
    os.utime(replies, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_step(step) == "changed"
    assert "student_responses_file (contents)" in capsys.readouterr().out
    assert accuracy(step) == pytest.approx(1 / 3)


def test_settings_that_cannot_change_results_are_not_a_change(tmp_path):
    """GPU ids and batch sizes of deterministic passes are left out of the fingerprint (declared once, in the field)."""
    from atkd.answering import InferenceConfig

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text(json.dumps(q(1, "A")) + "\n")
    a = InferenceConfig(model_path=str(model), dataset_path=str(tmp_path / "d.jsonl"), output_path=str(tmp_path / "r.jsonl"))
    b = replace(a, gpu_ids=[0, 1], batch_size=64, output_path=str(tmp_path / "other.jsonl"))
    assert DoneRecord(a).fingerprint == DoneRecord(b).fingerprint
    assert DoneRecord(a).fingerprint != DoneRecord(replace(a, mode="generate")).fingerprint


def test_a_stage_run_by_hand_after_main_does_nothing_and_main_skips_a_stage_run_by_hand(step, run, capsys):
    run_step(step)
    proc = run("student_data_analyzer.py", *to_argv(step.cfg))
    assert proc.returncode == 0 and "nothing to do" in proc.stderr
    other = replace(step.cfg, prior_strength=1.0)
    assert run("student_data_analyzer.py", *to_argv(other)).returncode == 0  # by hand, with another setting
    assert run_step(replace(step, cfg=other)) == "done"  # main.py agrees: it reads the same record


def test_one_stage_run_into_one_folder_under_two_names_never_takes_the_others_record(step, capsys):
    """The record is named after the stage (`analyze.done.json`), so two outputs of one stage in one folder share
    it: it names the outputs it is for, and the other output is not done."""
    run_step(step)
    out = Path(step.cfg.output_tree_path).parent
    other = replace(step.cfg, prior_strength=0.0, output_tree_path=str(out / "other.json"),
                    output_stats_path=str(out / "other_summary.json"))
    assert run_step(replace(step, cfg=other)) == "new"
    assert json.loads(step.cfg.record_path().read_text())["outputs"] == ["other.json", "other_summary.json"]
    # The first output with the other's settings: the record's fingerprint matches and its files exist, but they
    # hold prior 4.0's numbers; the record is not theirs, so it runs.
    first = replace(step, cfg=replace(step.cfg, prior_strength=0.0))
    assert run_step(first) == "new"
    assert "is of other outputs (other.json, other_summary.json)" in capsys.readouterr().out
    assert json.loads(Path(step.cfg.output_stats_path).read_text())["prior_strength"] == 0.0
    assert run_step(first) == "done"


def test_failure_names_the_log_and_leaves_no_record(step):
    write_jsonl(Path(step.cfg.paths_file), [{"id": 1, "ability_path": ["Nowhere"]}])
    with pytest.raises(StepFailed) as err:
        run_step(step)
    assert err.value.code == 2 and str(step.log_path) in str(err.value)
    assert "no ability path matches" in step.log_path.read_text()
    assert not step.cfg.record_path().exists()
    assert DoneRecord(step.cfg).status()[0] == "new"


def _launch(step: Step, flag: str):
    cmd = step.command
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_training_launch_follows_the_gpus_or_the_users_accelerate_config(tmp_path):
    import main

    it = paths.IterationPaths(tmp_path / "wf", tmp_path / "models", 1)
    cfg = parse_config(WorkflowConfig, [], defaults=main.defaults())
    four = train_step(cfg, it, "s", [2, 3, 5, 7])
    assert _launch(four, "--num_processes") == "4" and "--multi_gpu" in four.command
    assert _launch(four, "--mixed_precision") == "bf16" and four.env == {"CUDA_VISIBLE_DEVICES": "2,3,5,7"}
    cpu = train_step(cfg, it, "s", [])  # one CPU process: no launcher, no check pass first, no GPU visible
    assert cpu.command[:4] == [sys.executable, "-m", "atkd", "train"] and not cpu.precheck_flags
    assert cpu.env == {"CUDA_VISIBLE_DEVICES": ""} and cpu.argv == four.argv
    assert "--check_only" in four.precheck_flags  # under the launcher, bad input is found by a plain pass first
    own_cfg = replace(cfg, accelerate_config_file=str(tmp_path / "fsdp.yaml"))
    own = train_step(own_cfg, it, "s", [0, 1])
    assert _launch(own, "--config_file") == own_cfg.accelerate_config_file
    for flag in ("--num_processes", "--mixed_precision", "--multi_gpu", "--cpu"):
        assert flag not in own.command  # the user's file decides
    assert own.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert own.argv == four.argv  # the launcher never changes what train.py is asked to do


def test_lora_constants_reach_train_py_and_matter_only_with_lora_on(tmp_path):
    import main

    from atkd.fingerprint import fingerprint

    it = paths.IterationPaths(tmp_path / "wf", tmp_path / "models", 1)
    cfg = parse_config(WorkflowConfig, ["--lora_r", "8", "--lora_alpha", "32", "--lora_dropout", "0.1",
                                        "--lora_target_modules", "q_proj,v_proj"], defaults=main.defaults())
    step = train_step(cfg, it, "s", [])
    for flag, value in (("--lora_r", "8"), ("--lora_alpha", "32.0"), ("--lora_dropout", "0.1"),
                        ("--lora_target_modules", "q_proj,v_proj")):
        assert _launch(step, flag) == value
    assert step.cfg.outputs()[-1].parent.name == "final_adapter"
    full = train_step(parse_config(WorkflowConfig, [], defaults=main.defaults()), it, "s", []).cfg
    assert full.lora_r == 0
    assert all(p.parent.name == "final_model" for p in full.outputs())
    # with LoRA off, its other settings cannot change the result: they do not enter the fingerprint
    assert fingerprint(replace(full, lora_alpha=64.0, lora_target_modules=["x"])) == fingerprint(full)
    assert fingerprint(replace(step.cfg, lora_alpha=64.0)) != fingerprint(step.cfg)


def test_the_distillation_signal_settings_reach_their_steps(tmp_path):
    """ALLOC_TEMPERATURE goes to step C; REPLAY_FRACTION adds D2 and RESPONSE_STYLE rationale adds D3, and E
    and F then read what they wrote (E with token-level rows for the reasons)."""
    import main
    from atkd.plan import RoundFiles, iteration_steps

    it = paths.IterationPaths(tmp_path / "wf", tmp_path / "models", 1)
    plain = parse_config(WorkflowConfig, ["--alloc_temperature", "1e6", "--replay_fraction", "0"],
                         defaults=main.defaults())
    files = RoundFiles(plain.dataset_files_per_iteration[0], plain.ability_class_files_per_iteration[0])
    steps = {s.name: s for s in iteration_steps(plain, it, "s", tmp_path / "tree.json", [], files)}
    assert steps["C_distill_data"].cfg.alloc_temperature == 1e6 and "D2_replay" not in steps and "D3_rationales" not in steps
    assert steps["E_teacher_logits"].cfg.dataset_path == steps["F_train"].cfg.train_file_path == str(it.validated)
    assert steps["E_teacher_logits"].cfg.response_field is None
    assert steps["F_train"].cfg.reason_weight == 0.0  # letter style: REASON_WEIGHT has nothing to weigh

    richer = replace(plain, replay_fraction=0.2, response_style="rationale", use_dataset_explanation=False,
                     reason_weight=0.5)
    order = [s.name for s in iteration_steps(richer, it, "s", tmp_path / "tree.json", [], files)]
    steps = {s.name: s for s in iteration_steps(richer, it, "s", tmp_path / "tree.json", [], files)}
    # D3 first, then D2 on what D3 kept: the replay share is of the final training items.
    assert order.index("D_validated_data") < order.index("D3_rationales") < order.index("D2_replay") < order.index(
        "E_teacher_logits")
    replay, rationales = steps["D2_replay"].cfg, steps["D3_rationales"].cfg
    assert rationales.input_file == str(it.validated) and rationales.use_dataset_explanation is False
    assert replay.validated_file == rationales.output_file and replay.replay_fraction == 0.2
    assert replay.ability_tree_path == str(it.scored_tree) and replay.dataset_path == plain.dataset_files_per_iteration[0]
    assert replay.drop_field == "explanation"  # no dataset explanations: replay items train on their letter
    assert steps["E_teacher_logits"].cfg.dataset_path == steps["F_train"].cfg.train_file_path == replay.output_path
    assert steps["E_teacher_logits"].cfg.response_field == rationales.explanation_field == "explanation"
    kept = {s.name: s.cfg for s in iteration_steps(replace(richer, use_dataset_explanation=True), it, "s",
                                                   tmp_path / "tree.json", [], files)}
    assert kept["D2_replay"].drop_field == ""  # the dataset's own explanations stay on replay items
    assert steps["F_train"].cfg.reason_weight == 0.5

"""main.py end to end on the embedded demo: the loop runs, resumes after SIGKILL, reruns what changed.

One iteration with small sizes keeps each run short; the default two-iteration demo is the
README's quick start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import killed_when, main_in_process, parts_written

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"

SMALL = ["--num_iterations", "1",
         "--dataset_files_per_iteration", str(DEMO / "iteration_1.jsonl"),
         "--ability_class_files_per_iteration", str(DEMO / "iteration_1_ability_paths.jsonl"),
         "--num_distill_samples", "60", "--train_epochs", "2", "--save_steps", "1", "--save_total_limit", "2",
         "--gpus_to_use", ""]


def main_cmd(base: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(base / "workflow"),
            "--models_output_dir", str(base / "models"), *SMALL, *extra]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def run_main(base: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(main_cmd(base, *extra), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_until(base: Path, ready, timeout: float = 600, stdout: Path | None = None) -> None:
    """main.py on `base`, SIGKILLed with every step it started once `ready()` is true (its output to `stdout`)."""
    killed_when(main_cmd(base), ready, env(), timeout, stdout)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= tol, f"weights differ by {worst}"


def copy_finished(src: Path, dst: Path, *names: str) -> None:
    """Copy finished steps (files or folders, relative to a workflow folder) of one run into another's: a run
    with the same settings skips them there (work is recorded by contents, never by path)."""
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dst / name)


def it1(base: Path) -> Path:
    return base / "workflow" / "iteration_1"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    base = tmp_path_factory.mktemp("reference")
    return base, run_main(base)


@pytest.mark.e2e
def test_demo_loop_trains_the_student_and_reports(reference):
    base, proc = reference
    report = json.loads((base / "workflow" / "report.json").read_text())
    (entry,) = report["iterations"]
    assert 0.0 <= entry["student_on_round_data"]["accuracy"] <= 1.0
    assert entry["generated"] > 0 and 0 < entry["validated"] <= entry["generated"]
    before, after = entry["eval_before"], entry["eval_after"]
    assert before["overall"]["n"] == after["overall"]["n"] > 0
    assert after["overall"]["accuracy"] is not None and before["overall"]["accuracy"] is not None
    assert entry["weakest_abilities"] and all(name in after for name in entry["weakest_abilities"])
    assert "| ability (evaluation set) |" in (base / "workflow" / "report.md").read_text()
    initial = weights(DEMO / "models" / "student")
    trained = weights(base / "models" / "iteration_1_student_model" / "final_model")
    assert max((initial[k].float() - trained[k].float()).abs().max().item() for k in initial) > 1e-4
    for step in ("A_student_reply", "B_student_tree", "C_distill_data", "D_validated_data", "E_teacher_logits", "F_train"):
        assert (it1(base) / f"{step}.log").stat().st_size > 0
        assert f"[run] {step}" in proc.stdout


# The demo run's step folders (D2: REPLAY_FRACTION is on by default), each with its summary, its done-record named
# after its stage and its log beside it; F writes its model under the models folder, its log in the iteration's.
RUN_LAYOUT = {"iteration_1": {"A_student_reply": "answer", "B_student_tree": "analyze", "C_distill_data": "write_questions",
                              "D_validated_data": "cross_check", "D2_replay": "replay", "E_teacher_logits": "logits",
                              "G_eval_reply": "answer", "H_eval_tree": "analyze"},
              "baseline_eval": {"G_eval_reply": "answer", "H_eval_tree": "analyze"},
              "teacher_eval": {"G_eval_reply": "answer", "H_eval_tree": "analyze"}}


@pytest.mark.e2e
def test_every_step_folder_holds_summary_json_its_stages_record_and_its_log_beside_it(reference):
    base, _ = reference
    workflow = base / "workflow"
    assert sorted(p.name for p in workflow.iterdir() if p.is_dir()) == sorted(RUN_LAYOUT)
    for where, steps in RUN_LAYOUT.items():
        assert sorted(p.name for p in (workflow / where).iterdir() if p.is_dir()) == sorted(steps), where
        for folder, stage in steps.items():
            summary = workflow / where / folder / "summary.json"
            assert json.loads(summary.read_text()), summary  # the step's summary, under the one name
            assert sorted(p.name for p in (workflow / where / folder).glob("*.done.json")) == [f"{stage}.done.json"]
            assert (workflow / where / f"{folder}.log").stat().st_size > 0
        for old in ("stats.json", "plan.json", "report.json", "replay.json"):
            assert not list((workflow / where).rglob(old)), old
    assert (it1(base) / "F_train.log").stat().st_size > 0
    assert (base / "models" / "iteration_1_student_model" / "train.done.json").is_file()
    assert not list(workflow.glob("*.log"))  # every log beside its step's folder (no tree step: the demo gives it)


@pytest.mark.e2e
def test_killed_during_generation_then_during_training_resumes_to_the_same_run_and_reruns_only_what_changed(
        reference, tmp_path):
    """One run killed twice (SIGKILL to the whole process group): while step C writes, then while F trains. Each
    rerun continues the work in flight and the finished run equals an uninterrupted one; a changed setting then
    reruns only what depends on it. The steps before C are the reference run's, copied (main.py skips them:
    work is recorded by contents, not by path), so the first kill comes while C writes, not minutes later."""
    ref, _ = reference
    copy_finished(ref / "workflow", tmp_path / "workflow", "initial_ability_tree.json", "baseline_eval",
                  "teacher_eval", "iteration_1/A_student_reply", "iteration_1/B_student_tree")
    parts = it1(tmp_path) / "C_distill_data" / "generated.jsonl.parts"
    run_until(tmp_path, lambda: parts_written(parts))
    assert not (it1(tmp_path) / "C_distill_data" / "generated.jsonl").exists()
    student = tmp_path / "models" / "iteration_1_student_model"
    log = tmp_path / "resumed_during_generation.txt"
    run_until(tmp_path, lambda: any(student.glob("checkpoint-*")), stdout=log)
    assert not (student / "final_model").exists()
    first_resume = log.read_text()
    for step in ("A_student_reply", "B_student_tree"):
        assert f"[skip] {step}" in first_resume
    assert "[resume] C_distill_data" in first_resume
    proc = run_main(tmp_path)
    for step in ("A_student_reply", "B_student_tree", "C_distill_data", "D_validated_data", "E_teacher_logits"):
        assert f"[skip] {step}" in proc.stdout
    assert "[resume] F_train" in proc.stdout
    for rel in ("C_distill_data/generated.jsonl", "C_distill_data/summary.json", "D_validated_data/validated.jsonl"):
        assert (it1(tmp_path) / rel).read_bytes() == (it1(ref) / rel).read_bytes(), rel
    final = Path("models") / "iteration_1_student_model" / "final_model"
    assert_same_weights(tmp_path / final, ref / final)

    again = run_main(tmp_path)
    assert "[run]" not in again.stdout and again.stdout.count("[skip]") >= 8

    # A setting of D2 (the replay share): D2 reruns for it, E and F because their input files' contents changed;
    # every step before D2 stays (the evaluations before training, the measurement, C and D).
    changed = run_main(tmp_path, "--replay_fraction", "0.5")
    for step in ("A_student_reply", "B_student_tree", "C_distill_data", "D_validated_data",
                 "baseline_eval/G_eval_reply", "baseline_eval/H_eval_tree", "teacher_eval/G_eval_reply"):
        assert f"[skip] {step}" in changed.stdout
    assert "[rerun] D2_replay: changed since the last run: replay_fraction 0.25 -> 0.5" in changed.stdout
    for step, source in (("E_teacher_logits", "dataset_path"), ("F_train", "teacher_logits_dir"),
                         ("G_eval_reply", "model_path")):
        assert f"[rerun] {step}: changed since the last run: {source} (contents)" in changed.stdout


def printed_commands(stdout: str) -> dict[str, str]:
    """Step name -> the command main.py printed before running it (a shell line: `NAME=value` prefixes set the
    environment, as in `CUDA_VISIBLE_DEVICES= python -m atkd train ...`)."""
    out, name = {}, None
    for line in stdout.splitlines():
        if line.startswith("[run] "):
            name = line.split()[1].rstrip(":")
        elif line.startswith("  $ ") and name:
            out[name] = line[4:]
            name = None
    return out


@pytest.mark.e2e
def test_commands_main_printed_rerun_by_hand_after_the_run_do_no_work(reference):
    base, proc = reference
    commands = printed_commands(proc.stdout)
    assert {"A_student_reply", "B_student_tree", "C_distill_data", "D_validated_data", "E_teacher_logits",
            "F_train", "G_eval_reply", "H_eval_tree"} <= set(commands)
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}
    for name, cmd in commands.items():
        by_hand = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
        assert by_hand.returncode == 0, (name, by_hand.stderr[-2000:])
        assert "nothing to do" in by_hand.stderr, (name, by_hand.stderr[-2000:])
    after = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}
    assert after == before  # not one file written, not one removed


def planned_commands(stdout: str) -> dict[str, str]:
    """Step name -> the command (a shell line) a `--dry_run` printed for it (steps it would run)."""
    lines = stdout.splitlines()
    return {line.split()[1].rstrip(":"): nxt.strip() for line, nxt in zip(lines, lines[1:])
            if line.startswith("[plan] ") and nxt.startswith("  ")}


@pytest.mark.e2e
def test_new_weights_at_the_same_path_redo_the_work_in_main_and_by_hand(reference, tmp_path):
    """Same size, mtime set back: only the contents changed, and that is enough. The finished reference run,
    moved to another folder with its student copied beside it, is still done there (work is recorded by
    contents, never by path)."""
    ref, _ = reference
    shutil.copytree(ref / "workflow", tmp_path / "workflow")
    shutil.copytree(ref / "models", tmp_path / "models")
    student = tmp_path / "student"
    shutil.copytree(DEMO / "models" / "student", student)
    moved = run_main(tmp_path, "--student_model_path", str(student), "--dry_run")
    assert not planned_commands(moved.stdout) and moved.stdout.count("[skip]") == 13, moved.stdout
    weights_file = student / "model.safetensors"

    def rewrite(scale: float) -> None:
        st = weights_file.stat()
        tensors = load_file(str(weights_file))
        name = next(k for k in sorted(tensors) if "lm_head" in k)
        tensors[name] = (tensors[name].float() * scale).to(tensors[name].dtype)
        save_file(tensors, str(weights_file), metadata={"format": "pt"})
        assert weights_file.stat().st_size == st.st_size
        os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns))

    rewrite(0.5)
    again = run_main(tmp_path, "--student_model_path", str(student), "--dry_run")  # what a run would redo
    assert "[plan] A_student_reply: changed since the last run: model_path (contents)" in again.stdout
    assert "[plan] F_train: changed since the last run:" in again.stdout  # the student is F's input too

    replies = it1(tmp_path) / "A_student_reply" / "replies.jsonl"
    record = it1(tmp_path) / "A_student_reply" / "answer.done.json"
    old_replies, old_signature = replies.read_bytes(), json.loads(record.read_text())["fingerprint"]["model_path"]
    rewrite(3.0)  # and by hand: the command main.py prints for step A sees the new weights too
    by_hand = subprocess.run(planned_commands(again.stdout)["A_student_reply"], shell=True, capture_output=True,
                             text=True, env=env(), cwd=ROOT, timeout=300)
    assert by_hand.returncode == 0, by_hand.stderr[-2000:]
    assert "nothing to do" not in by_hand.stderr and "model_path (contents): redoing" in by_hand.stderr
    assert replies.read_bytes() != old_replies  # new option probabilities
    assert json.loads(record.read_text())["fingerprint"]["model_path"] != old_signature


def test_config_errors_stop_before_any_work(tmp_path):
    proc = main_in_process(main_cmd(tmp_path, "--num_iterations", "2")[2:])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "DATASET_FILES_PER_ITERATION lists 1 file(s) but NUM_ITERATIONS is 2" in proc.stderr
    assert not (tmp_path / "workflow").exists()
    proc = main_in_process(main_cmd(tmp_path, "--student_model_path", str(tmp_path / "nope"))[2:])
    assert proc.returncode == 2 and "model folder not found" in proc.stderr
    assert not (tmp_path / "workflow").exists()


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path):
    proc = main_in_process(main_cmd(tmp_path, "--dry_run")[2:])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for stage in ("answer", "analyze", "write_questions", "cross_check", "logits", "train"):
        assert f" -m atkd {stage} " in out  # each step runs its stage from the installed package
    assert "CUDA_VISIBLE_DEVICES= " in out and "accelerate.commands.launch" not in out  # one CPU process: plain
    assert not (tmp_path / "workflow" / "iteration_1").exists()

"""Experiment trackers: train.py's per-step scalars and the workflow's per-iteration ones, read back from
TensorBoard's event files; a tracker whose package is missing stops the run before any work."""

import importlib.util
import json
import shutil

import pytest
from conftest import make_questions

import main
import train
from atkd import tracking
from atkd.io import write_json, write_jsonl
from atkd.teacher_logits import LogitsConfig
from atkd.teacher_logits import run as run_teacher_logits

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAIN_TAGS = ["train/ce", "train/kd", "train/learning_rate", "train/loss", "train/tokens_per_s"]
OFFSET = 100  # the optimizer steps of "earlier iterations"


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file under `logdir`."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir):
    """train.py --report_to tensorboard on the tiny Llama: 12 items, 2 per step, 6 steps, checkpoints kept."""
    root = tmp_path_factory.mktemp("tracked")
    data = root / "validated.jsonl"
    write_jsonl(data, make_questions(12, seed=5))
    logits = root / "E_teacher_logits"
    run_teacher_logits(LogitsConfig(model_path=str(llama_dir), dataset_path=str(data), output_dir=str(logits),
                                    batch_size=8))
    out = root / "iteration_2_student_model"
    args = ["--student_model_path", str(llama_dir), "--train_file_path", str(data), "--teacher_logits_dir",
            str(logits), "--output_dir", str(out), "--num_epochs", "1", "--batch_size", "2",
            "--gradient_accumulation_steps", "1", "--learning_rate", "2e-3", "--logging_steps", "1",
            "--save_steps", "2", "--save_total_limit", "0", "--seed", "3", "--report_to", "tensorboard",
            "--tracking_step_offset", str(OFFSET)]
    assert train.main(args) == 0
    return out, args


def test_train_py_logs_loss_parts_lr_and_throughput_at_the_runs_global_steps(trained):
    out, _ = trained
    run = json.loads((out / "tracking" / "run.json").read_text())
    assert run["name"].startswith("iteration_2_student_model-")
    got = scalars(out / "tracking" / run["name"])
    assert sorted(got) == TRAIN_TAGS
    log = json.loads((out / "final_model" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    for tag in TRAIN_TAGS:
        assert [s for s, _ in got[tag]] == list(range(OFFSET + 1, OFFSET + 7))  # after the earlier steps
    for key, tag in (("loss", "train/loss"), ("ce", "train/ce"), ("kd", "train/kd"), ("lr", "train/learning_rate")):
        assert [v for _, v in got[tag]] == pytest.approx([e[key] for e in log], rel=1e-5)
    loss = [v for _, v in got["train/loss"]]
    assert all(0 < v < 20 for v in loss) and loss[-1] < loss[0]  # a real, falling loss
    # KD starts at 0 (this student is its teacher) and grows as training moves it away.
    assert got["train/kd"][0][1] == pytest.approx(0, abs=1e-4) and got["train/kd"][-1][1] > 1e-4
    assert all(100 < v < 1e8 for _, v in got["train/tokens_per_s"])  # 2 items of ~60 tokens a step, a CPU


def test_a_resumed_training_continues_its_count(trained, tmp_path):
    out, args = trained
    again = tmp_path / out.name
    shutil.copytree(out, again)
    for gone in ("final_model", "train.done.json"):  # (no checkpoint at the last step)
        path = again / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(again / "tracking" / json.loads((again / "tracking" / "run.json").read_text())["name"])
    args = [str(again) if a == str(out) else a for a in args]
    assert train.main(args) == 0  # resumes from checkpoint-4: steps 5 and 6 again
    run = json.loads((again / "tracking" / "run.json").read_text())
    assert run == json.loads((out / "tracking" / "run.json").read_text())  # the same run
    got = scalars(again / "tracking" / run["name"])
    assert [s for s, _ in got["train/loss"]] == [OFFSET + 5, OFFSET + 6]


def finished_report() -> dict:
    """report.json of a two-iteration run with an evaluation set (intervals where the report has them)."""
    def accs(overall, leaf, ci=True):
        rows = {"overall": {"n": 40, "correct": round(40 * overall), "accuracy": overall},
                "Drugs": {"n": 20, "correct": round(20 * leaf), "accuracy": leaf},
                "Drugs > Anticoagulants": {"n": 20, "correct": round(20 * leaf), "accuracy": leaf}}
        if ci:
            for row in rows.values():
                row["ci95"] = [max(0.0, row["accuracy"] - 0.1), min(1.0, row["accuracy"] + 0.1)]
        return rows

    before, after_1, after_2 = accs(0.5, 0.05), accs(0.75, 0.6), accs(0.9, 0.85, ci=False)
    return {"baseline_eval": before, "teacher_eval": accs(1.0, 1.0),
            "iterations": [{"iteration": 1, "generated": 480, "validated": 390, "replay": {"replay": 130},
                            "eval_before": before, "eval_after": after_1},
                           {"iteration": 2, "generated": 480, "validated": 401, "eval_before": after_1,
                            "eval_after": after_2}]}


def test_the_workflow_logs_each_iteration_at_the_step_that_ends_its_training(tmp_path):
    workflow, models = tmp_path / "wf", tmp_path / "models"
    for i, steps in ((1, 60), (2, 64)):
        write_json(models / f"iteration_{i}_student_model" / "final_model" / "trainer_state.json",
                   {"global_step": steps})
    report = finished_report()
    for i in (1, 2):
        tracking.log_iteration("tensorboard", workflow, models, report, i, {"seed": 0, "lora_target_modules": ["x"]})
    run = json.loads((workflow / "tracking" / "run.json").read_text())
    got = scalars(workflow / "tracking" / run["name"])
    assert got["eval/accuracy/overall"] == [(0, 0.5), (60, 0.75), (124, pytest.approx(0.9))]
    assert got["eval/accuracy/Drugs/Anticoagulants"] == [(0, pytest.approx(0.05)), (60, pytest.approx(0.6)),
                                                         (124, pytest.approx(0.85))]
    # The intervals where the report has them (iteration 2's report has none).
    assert got["eval/ci95_low/overall"] == [(0, pytest.approx(0.4)), (60, pytest.approx(0.65))]
    assert got["eval/ci95_high/Drugs"] == [(0, pytest.approx(0.15)), (60, pytest.approx(0.7))]
    assert got["data/written"] == [(60, 480), (124, 480)]
    assert got["data/validated"] == [(60, 390), (124, 401)]
    assert got["data/replayed"] == [(60, 130)]
    assert got["iteration"] == [(60, 1), (124, 2)]
    assert tracking.log_iteration("none", workflow, models, report, 1) == {}


def test_a_tracker_without_its_package_stops_before_any_work(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    wf, models = tmp_path / "wf", tmp_path / "models"
    for argv, problem in ((["--report_to", "tensorboard,wandb"], "main.py: report_to names wandb, but the package "
                                                                  "'wandb' is not installed: pip install wandb"),
                          (["--report_to", "tensorbored"], "main.py: REPORT_TO (--report_to) must be none, or a "
                                                           "comma-separated list of tensorboard, wandb, mlflow")):
        with pytest.raises(SystemExit) as err:
            main.main([*argv, "--workflow_output_dir", str(wf), "--models_output_dir", str(models)])
        assert err.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: " + problem), lines
        assert not wf.exists() and not models.exists()
    with pytest.raises(SystemExit) as err:  # train.py alike, before it reads anything
        train.main(["--student_model_path", "x", "--train_file_path", "x", "--teacher_logits_dir", "x",
                    "--output_dir", str(tmp_path / "out"), "--report_to", "wandb"])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --report_to: report_to names wandb, but the package 'wandb' "
                                               "is not installed: pip install wandb (or leave wandb out)")
    assert not (tmp_path / "out").exists()

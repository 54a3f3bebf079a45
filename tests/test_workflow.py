"""The step runner of main.py: skip done steps, rerun changed ones (and say why), resume started ones."""

import json
import sys
import textwrap

import pytest

from atkd.workflow import Step, StepFailed, run_step, status

WRITER = textwrap.dedent("""
    import sys, pathlib
    src, out, word = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    calls = out.parent / "calls.txt"
    calls.write_text((calls.read_text() if calls.exists() else "") + word + "\\n")
    print("writing", out)
    if word == "fail":
        sys.exit(3)
    out.write_text(pathlib.Path(src).read_text() + word)
""")


@pytest.fixture
def setup(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    src = tmp_path / "in.txt"
    src.write_text("hello ")
    folder = tmp_path / "step"

    def make(word="x"):
        out = folder / "out.txt"
        return Step(name="S", argv=[str(script), str(src), str(out), word, "--gpu_ids", "0"], folder=folder,
                    outputs=[out], inputs=[src], log_path=tmp_path / "S.log")
    return make, src, folder, tmp_path


def calls(folder):
    return (folder / "calls.txt").read_text().split()


def test_runs_once_then_skips(setup, capsys):
    make, src, folder, tmp = setup
    assert run_step(make()) == "new"
    assert (folder / "out.txt").read_text() == "hello x"
    assert run_step(make()) == "done"
    assert calls(folder) == ["x"]
    assert "writing" in (tmp / "S.log").read_text()
    assert "[skip] S" in capsys.readouterr().out


def test_changed_argument_reruns_and_says_which(setup, capsys):
    make, src, folder, tmp = setup
    run_step(make("x"))
    assert run_step(make("y")) == "rerun"
    out = capsys.readouterr().out
    assert "[rerun] S: arguments changed" in out
    assert (folder / "out.txt").read_text() == "hello y"
    assert calls(folder) == ["y"]  # the folder was cleared: stale work is not resumed


def test_gpu_ids_do_not_count_as_a_change(setup):
    make, src, folder, tmp = setup
    run_step(make())
    step = make()
    step.argv[-1] = "1"
    assert status(step)[0] == "done"


def test_changed_input_reruns(setup):
    make, src, folder, tmp = setup
    run_step(make())
    src.write_text("bye ")
    state, reason = status(make())
    assert state == "rerun" and str(src) in reason
    run_step(make())
    assert (folder / "out.txt").read_text() == "bye x"


def test_interrupted_step_resumes_without_clearing(setup):
    make, src, folder, tmp = setup
    step = make()
    folder.mkdir()
    (folder / f".started.{step.name}.json").write_text(json.dumps({"argv": ["other"], "inputs": {}}))
    assert status(step)[0] == "rerun"  # started with other arguments: start over
    from atkd.workflow import step_record
    (folder / f".started.{step.name}.json").write_text(json.dumps(step_record(step)))
    (folder / "calls.txt").write_text("earlier\n")
    assert run_step(step) == "resume"
    assert calls(folder) == ["earlier", "x"]


def test_failure_names_the_log_and_leaves_no_marker(setup):
    make, src, folder, tmp = setup
    step = make("fail")
    with pytest.raises(StepFailed) as err:
        run_step(step)
    assert err.value.code == 3 and str(tmp / "S.log") in str(err.value)
    assert not step.marker.exists()
    assert status(step)[0] == "resume"


def _launch(step, flag):
    cmd = step.command
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_training_launch_follows_the_gpus_or_the_users_accelerate_config(tmp_path):
    from atkd import paths
    from atkd.pipeline import WorkflowConfig, train_step

    it = paths.IterationPaths(tmp_path / "wf", tmp_path / "models", 1)
    cfg = WorkflowConfig(student_model_path="s", dataset_files_per_iteration=["d"], ability_class_files_per_iteration=["a"])
    four = train_step(cfg, it, "s", [2, 3, 5, 7])
    assert _launch(four, "--num_processes") == "4" and "--multi_gpu" in four.command
    assert _launch(four, "--mixed_precision") == "bf16" and four.env == {"CUDA_VISIBLE_DEVICES": "2,3,5,7"}
    cpu = train_step(cfg, it, "s", [])
    assert _launch(cpu, "--num_processes") == "1" and "--cpu" in cpu.command and cpu.env == {}
    cfg.accelerate_config_file = str(tmp_path / "fsdp.yaml")
    own = train_step(cfg, it, "s", [0, 1])
    assert _launch(own, "--config_file") == cfg.accelerate_config_file
    for flag in ("--num_processes", "--mixed_precision", "--multi_gpu", "--cpu"):
        assert flag not in own.command  # the user's file decides
    assert own.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert own.argv == four.argv  # the launcher never changes what train.py is asked to do

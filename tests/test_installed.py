"""The package installed without the checkout (a non-editable install), used from another folder:
`python -m atkd` runs any stage, and main.py's step runner runs its steps that way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atkd.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --no-deps --target`: the package files alone, from a copy of what pyproject.toml needs
    (building in the checkout would write build/ there)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt", "requirements-chart.txt"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "atkd", src / "atkd", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "--target", str(target), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # A development install of the checkout (pip install -e .) adds an import hook that would serve any
    # module the installed copy lacks from the checkout: a sitecustomize beside it removes that hook.
    (target / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n")
    return target


def python(installed: Path, cwd: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """The interpreter with only the installed copy on its path, in `cwd` (not the checkout)."""
    env = dict(os.environ, PYTHONPATH=str(installed), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def test_the_installed_copy_is_the_one_imported(installed, tmp_path):
    proc = python(installed, tmp_path, "-c", "import importlib.util as u; print(*(u.find_spec(m).origin for m in "
                  "('atkd', 'atkd.__main__', 'atkd.stages', 'atkd.convert.conversion')))")
    assert proc.returncode == 0, proc.stderr
    assert all(Path(origin).is_relative_to(installed / "atkd") for origin in proc.stdout.split()), proc.stdout


def test_help_lists_every_stage(installed, tmp_path):
    proc = python(installed, tmp_path, "-m", "atkd", "--help")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert listed == {s.name for s in STAGES} | {"workflow"}
    proc = python(installed, tmp_path, "-m", "atkd", "no_such_stage")
    assert proc.returncode == 2 and "error: no stage 'no_such_stage'" in proc.stderr


def test_a_stage_help_shows_its_flags(installed, tmp_path):
    proc = python(installed, tmp_path, "-m", "atkd", "answer", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m atkd answer") and "--model_path" in proc.stdout


def analyzer_inputs(folder: Path) -> list[str]:
    """Step B's flags on the demo's first round, every student answer "A"."""
    rows = [json.loads(line) for line in (DEMO / "iteration_1.jsonl").read_text(encoding="utf-8").splitlines()]
    replies = folder / "replies.jsonl"
    replies.write_text("".join(json.dumps({"id": r["id"], "pred_letter": "A"}) + "\n" for r in rows), encoding="utf-8")
    return ["--initial_tree_path", str(ROOT / "ability_trees" / "demo_tree.json"),
            "--paths_file", str(DEMO / "iteration_1_ability_paths.jsonl"), "--answers_file", str(DEMO / "iteration_1.jsonl"),
            "--student_responses_file", str(replies), "--output_tree_path", "B/tree.json",
            "--output_stats_path", "B/stats.json"]


def test_a_stage_runs_from_another_folder(installed, tmp_path):
    proc = python(installed, tmp_path, "-m", "atkd", "analyze", *analyzer_inputs(tmp_path))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "B" / "stats.json").read_text(encoding="utf-8"))
    right = sum(json.loads(line)["answer_idx"] == "A" for line in (DEMO / "iteration_1.jsonl").read_text().splitlines())
    assert (stats["scored"], stats["correct"]) == (192, right)
    record = json.loads((tmp_path / "B" / "analyze.done.json").read_text(encoding="utf-8"))
    assert record["argv"][0] == "python -m atkd analyze"  # the record names the command that can rerun it


def test_the_step_runner_runs_a_step_as_python_m_atkd(installed, tmp_path):
    """main.py's runner (`atkd.steps`), imported from the installed copy: the step runs and is done."""
    script = ("import sys; from pathlib import Path; from atkd.cli import parse_config; from atkd.weakness import "
              "AnalyzerConfig; from atkd.steps import Step, run_step\n"
              "cfg = parse_config(AnalyzerConfig, sys.argv[1:])\n"
              "print('state', run_step(Step('B_student_tree', 'student_data_analyzer.py', cfg, log_path=Path('B.log'))))\n"
              "print('state', run_step(Step('B_student_tree', 'student_data_analyzer.py', cfg)))")
    proc = python(installed, tmp_path, "-c", script, *analyzer_inputs(tmp_path))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"{sys.executable} -m atkd analyze --initial_tree_path" in proc.stdout
    assert "state new" in proc.stdout and "[skip] B_student_tree: outputs are up to date" in proc.stdout
    assert (tmp_path / "B" / "tree.json").is_file() and "$ " in (tmp_path / "B.log").read_text()


def test_main_py_plans_its_steps_as_python_m_atkd(installed, tmp_path):
    """main.py beside the installed package only (a copy, so its folder holds no atkd): the dry run's commands."""
    shutil.copy(ROOT / "main.py", tmp_path / "main.py")
    demo = {"teacher_model_path": DEMO / "models" / "teacher", "student_model_path": DEMO / "models" / "student",
            "agent_model_1_path": DEMO / "models" / "teacher", "agent_model_2_path": DEMO / "models" / "agent",
            "existing_ability_tree_path": ROOT / "ability_trees" / "demo_tree.json",
            "dataset_files_per_iteration": DEMO / "iteration_1.jsonl",
            "ability_class_files_per_iteration": DEMO / "iteration_1_ability_paths.jsonl",
            "eval_dataset_path": DEMO / "eval.jsonl", "eval_ability_class_path": DEMO / "eval_ability_paths.jsonl",
            "num_iterations": 1, "workflow_output_dir": tmp_path / "wf", "models_output_dir": tmp_path / "models"}
    flags = [a for k, v in demo.items() for a in (f"--{k}", str(v))]
    proc = python(installed, tmp_path, "main.py", "--dry_run", *flags)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    commands = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert commands and all(" -m atkd " in c for c in commands), commands
    assert any(" -m atkd train " in c for c in commands)

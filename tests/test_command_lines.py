"""Every script's command line is its config dataclass: one flag per field, nothing else, and a config
written back as flags (what main.py runs and prints) parses to the same config."""

from __future__ import annotations

import re
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from atkd.answering import InferenceConfig
from atkd.cli import parse_config, to_argv
from atkd.cross_check import CrossCheckConfig
from atkd.labelling import LabelConfig
from atkd.question_writing import QuestionWritingConfig
from atkd.rationale_writing import RationaleConfig
from atkd.replay import ReplayConfig
from atkd.stages import STAGES, STEPS
from atkd.student_sampling import StudentSamplingConfig
from atkd.teacher_logits import LogitsConfig
from atkd.trainer import TrainConfig
from atkd.tree_building import TreeConfig
from atkd.weakness import AnalyzerConfig
from atkd.workflow import WorkflowConfig

ROOT = Path(__file__).resolve().parent.parent
# Every top-level script: main.py and the stage table's aliases.
SCRIPTS = {"main.py": WorkflowConfig, **{stage.script: stage.load()[0] for stage in STAGES}}


def test_every_top_level_script_is_in_the_table():
    assert {p.name for p in ROOT.glob("*.py")} == set(SCRIPTS)


def flags_in_help(text: str) -> set[str]:
    options = text.split("options:", 1)[1]
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", options))


def expected_flags(cls) -> set[str]:
    out = {"-h", "--help"}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        out.add(f"--{f.name}")
        if hints[f.name] is bool:
            out.add(f"--no-{f.name}")
    return out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_lists_exactly_the_configs_fields(run, script):
    proc = run(script, "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage:")
    assert flags_in_help(proc.stdout) == expected_flags(SCRIPTS[script])


def sample(cls) -> dict:
    """A value for every field, different from its default where the field allows it."""
    values = {"model_path": "m", "dataset_path": "d.jsonl", "output_path": "o.jsonl", "mode": "generate",
              "gpu_ids": [1, 3], "dtype": "bf16", "lang": "zh", "trust_remote_code": True, "seed": 7,
              "batch_size": 3, "api_base": "http://x/v1", "api_model": "served", "domain": "Med",
              "output_dir": "out", "output_filename": "t.json", "nodes_per_level": [5, 2],
              "response_field": "explanation", "min_confidence": 0.25, "learning_rate": 3e-05}
    return {f.name: values[f.name] for f in fields(cls) if f.name in values}


@pytest.mark.parametrize("cls", [InferenceConfig, CrossCheckConfig, QuestionWritingConfig, LogitsConfig,
                                 AnalyzerConfig, TrainConfig, TreeConfig, LabelConfig])
def test_flags_written_by_to_argv_parse_back_to_the_same_config(cls):
    import create_initial_tree

    required = {"input_file": "g.jsonl", "output_file": "v.jsonl", "agent_model_1_path": "a1",
                "agent_model_2_path": "a2", "ability_tree_path": "t.json", "full_dataset_path": "d.jsonl",
                "ability_class_path": "p.jsonl", "teacher_model_path": "t", "initial_tree_path": "t.json",
                "paths_file": "p.jsonl", "answers_file": "d.jsonl", "student_responses_file": "r.jsonl",
                "output_tree_path": "b/t.json", "output_stats_path": "b/s.json", "student_model_path": "s",
                "train_file_path": "v.jsonl", "teacher_logits_dir": "e"}
    names = {f.name for f in fields(cls)}
    values = {**{k: v for k, v in required.items() if k in names}, **sample(cls)}
    if cls is CrossCheckConfig:
        values.pop("min_confidence")  # generate mode carries no probabilities
    if cls is TreeConfig:
        values["model_path"] = ""  # ignored with an endpoint
    cfg = cls(**values)
    defaults = {"model_path": create_initial_tree.MODEL_PATH} if cls is TreeConfig else None
    assert parse_config(cls, to_argv(cfg), defaults=defaults) == cfg


def test_bad_values_are_one_line_errors_with_exit_2(run, tmp_path):
    proc = run("inference.py", "--model_path", tmp_path, "--dataset_path", tmp_path / "d.jsonl",
               "--output_path", tmp_path / "o.jsonl", "--batch_size", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --batch_size must be at least 1 (got 0)"
    proc = run("main.py", "--num_iterations", "0")
    assert proc.returncode == 2
    assert "error: main.py: NUM_ITERATIONS (--num_iterations) must be at least 1 (got 0)" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cfg", [
    ReplayConfig(validated_file="v.jsonl", dataset_path="d.jsonl", ability_class_path="p.jsonl",
                 ability_tree_path="t.json", output_path="m.jsonl", replay_fraction=0.3, seed=4),
    RationaleConfig(teacher_model_path="t", input_file="v.jsonl", output_file="x.jsonl", explanation_field="why",
                    use_dataset_explanation=False, max_new_tokens=64, batch_size=3, lang="zh", gpu_ids=[1, 3]),
    StudentSamplingConfig(student_model_path="s", input_file="t.jsonl", output_file="o.jsonl", share=0.5, seed=3,
                          temperature=0.7, max_new_tokens=64, batch_size=3, lang="zh", gpu_ids=[1, 3], dtype="bf16"),
])
def test_the_training_data_stages_round_trip_too(cfg):
    assert parse_config(type(cfg), to_argv(cfg)) == cfg


@pytest.mark.parametrize("script, args", [
    ("generate_rationales.py", ["--teacher_model_path", "t", "--input_file", "{q}", "--output_file", "{q}"]),
    ("add_replay.py", ["--validated_file", "{q}", "--dataset_path", "d.jsonl", "--ability_class_path", "p.jsonl",
                       "--ability_tree_path", "t.json", "--output_path", "{q}"]),
    ("inference.py", ["--model_path", "m", "--dataset_path", "{q}", "--output_path", "{q}"]),
    ("sample_student_responses.py", ["--student_model_path", "s", "--input_file", "{q}", "--output_file", "{q}"]),
])
def test_an_output_that_names_an_input_is_refused_before_any_work(run, tmp_path, script, args):
    """Every stage, from the roles of its settings: writing the output would destroy what it reads."""
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "1"}\n')
    proc = run(script, *[a.format(q=q) for a in args])
    assert proc.returncode == 2
    out_flag = args[args.index("{q}", args.index("{q}") + 1) - 1]
    in_flag = args[args.index("{q}") - 1]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {out_flag} is {in_flag} itself; it would be overwritten"
    assert q.read_text() == '{"id": "1"}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]


# ------------------------------------------------------------------ the docs' stage tables list the stage table

def table_rows(path: Path, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with `header`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def letters_of(cell: str) -> list[str]:
    return [part.split()[0] for part in cell.split(",")]


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


STEP = {step.letter: step for step in STEPS}


def test_architecture_module_map_lists_every_step_with_its_script_and_module():
    rows = [r for r in table_rows(ROOT / "docs" / "ARCHITECTURE.md", "| step | script | module |") if r[0] != "all"]
    seen = []
    for row in rows:
        for letter in letters_of(row[0]):
            seen.append(letter)
            assert ticked(row[1]) == [STEP[letter].stage.script], row
            assert ticked(row[2]) == [STEP[letter].stage.module], row
    assert sorted(seen) == sorted(STEP)


def test_readme_iteration_table_lists_every_step_with_its_script_and_folder():
    rows = table_rows(ROOT / "README.md", "| step | script | writes")
    seen = []
    for row in rows:
        letters = letters_of(row[0])
        seen += letters
        assert [s for s in ticked(row[1]) if s.endswith(".py")] == list(dict.fromkeys(
            STEP[letter].stage.script for letter in letters)), row
        if len(letters) == 1 and letters[0] != "F":  # F writes to the models folder
            assert any(t.startswith(STEP[letters[0]].folder + "/") for t in ticked(row[2])), row
    assert sorted(seen) == sorted(set(STEP) - {"tree"})  # the tree is built once per run, not per iteration

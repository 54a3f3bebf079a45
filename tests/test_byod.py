"""Bring your own dataset, through main.py: a public-layout file converted with data/convert.py and run
without ability paths (the teacher labels them), and the checks main.py makes before any work: no
evaluation question in the iteration files, every ability path in the tree, the tree rooted at DOMAIN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atkd.io import write_jsonl
from atkd.leakage import exact_key
from atkd.records import load_questions
from conftest import main_in_process

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(ROOT))


def main_args(base: Path, *args: str) -> list[str]:
    return ["--workflow_output_dir", str(base / "workflow"), "--models_output_dir", str(base / "models"),
            "--gpus_to_use", "", *map(str, args)]


def main_py(base: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "main.py"), *main_args(base, *args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)


def checked(base: Path, *args: str) -> subprocess.CompletedProcess:
    """main.py in this process: its checks before any work and its plan (no model work, no subprocess)."""
    return main_in_process(main_args(base, *args))


def one_iteration(data: Path, paths: Path | str) -> list[str]:
    return ["--num_iterations", "1", "--dataset_files_per_iteration", str(data),
            "--ability_class_files_per_iteration", str(paths)]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def refused(proc: subprocess.CompletedProcess, base: Path) -> str:
    """The one error line of a run that must stop before any work."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert not (base / "workflow").exists() and not (base / "models").exists()
    return errors[0]


# --------------------------------------------------------------------------- checks before any work

def test_an_ability_path_not_in_the_tree_names_file_line_and_closest_names(tmp_path):
    rows = jsonl(DEMO / "iteration_1_ability_paths.jsonl")
    rows[4]["ability_path"] = ["Clinical medicine", "Pharmacology", "Antibiotic"]
    write_jsonl(tmp_path / "paths.jsonl", rows)
    line = refused(checked(tmp_path, *one_iteration(DEMO / "iteration_1.jsonl", tmp_path / "paths.jsonl")), tmp_path)
    assert line == (f"error: {tmp_path / 'paths.jsonl'}:5: ability path 'Clinical medicine > Pharmacology > "
                    "Antibiotic' names no node of the ability tree (ability_trees/demo_tree.json, domain "
                    "'Clinical medicine'): 'Antibiotic' is not under Clinical medicine > Pharmacology; "
                    "closest: Antibiotics")

    evals = jsonl(DEMO / "eval_ability_paths.jsonl")
    evals[9]["ability_path"] = ["Pharmacolgy", "Antibiotics"]  # the evaluation set's paths are checked too
    write_jsonl(tmp_path / "eval_paths.jsonl", evals)
    line = refused(checked(tmp_path, *one_iteration(DEMO / "iteration_1.jsonl", DEMO / "iteration_1_ability_paths.jsonl"),
                           "--eval_ability_class_path", tmp_path / "eval_paths.jsonl"), tmp_path)
    assert line.startswith(f"error: {tmp_path / 'eval_paths.jsonl'}:10: ability path 'Pharmacolgy > Antibiotics'")
    assert line.endswith("'Pharmacolgy' is not among the level-1 abilities; closest: Pharmacology")


def test_a_tree_rooted_at_another_name_than_domain_says_which_to_change(tmp_path):
    small = one_iteration(DEMO / "iteration_1.jsonl", DEMO / "iteration_1_ability_paths.jsonl")
    line = refused(checked(tmp_path, *small, "--domain", "临床医学"), tmp_path)
    assert line.startswith("error: ability_trees/demo_tree.json: the tree's root (its one top key) is "
                           "'Clinical medicine' but DOMAIN is '临床医学': set DOMAIN = 'Clinical medicine' in main.py "
                           "(--domain), or rename the tree's top key to '临床医学'")

    # A tree file that lists the level-1 abilities directly is rooted at DOMAIN, as documented.
    nested = json.loads((ROOT / "ability_trees" / "demo_tree.json").read_text(encoding="utf-8"))
    (tmp_path / "flat.json").write_text(json.dumps(nested["Clinical medicine"]), encoding="utf-8")
    proc = checked(tmp_path, *small, "--existing_ability_tree_path", tmp_path / "flat.json", "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[plan] A_student_reply" in proc.stdout


def test_evaluation_questions_in_an_iteration_file_stop_the_run_or_are_dropped(tmp_path):
    evals = jsonl(DEMO / "eval.jsonl")
    rows = jsonl(DEMO / "iteration_1.jsonl")
    copy = dict(evals[3], id="copied-eval-3", options=dict(zip("ABCD", reversed(evals[3]["options"].values()))))
    copy["answer_idx"] = "ABCD"[3 - "ABCD".index(evals[3]["answer_idx"])]
    rows.insert(10, copy)
    write_jsonl(tmp_path / "it1.jsonl", rows)
    paths = jsonl(DEMO / "iteration_1_ability_paths.jsonl") + [{"id": "copied-eval-3", "ability_path":
                                                                jsonl(DEMO / "eval_ability_paths.jsonl")[3]["ability_path"]}]
    write_jsonl(tmp_path / "it1_paths.jsonl", paths)
    small = one_iteration(tmp_path / "it1.jsonl", tmp_path / "it1_paths.jsonl")

    line = refused(checked(tmp_path, *small), tmp_path)
    assert line == (f"error: {tmp_path / 'it1.jsonl'}:11: question 'copied-eval-3' repeats evaluation question "
                    f"'demo-eval-0003' (data/demo/eval.jsonl:4): the same question. Questions repeating the "
                    f"evaluation set: 1 of 193 in {tmp_path / 'it1.jsonl'}. Remove them, or set DROP_EVAL_OVERLAP = "
                    "True in main.py (--drop_eval_overlap) to drop them from the iteration files")

    proc = checked(tmp_path, *small, "--drop_eval_overlap", "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = tmp_path / "workflow" / "iteration_1" / "data"
    assert (f"[plan] dropping 1 of 193 questions of {tmp_path / 'it1.jsonl'} that repeat evaluation questions; "
            f"iteration 1 reads {kept / 'questions.jsonl'}") in proc.stdout
    assert f"--dataset_path {kept / 'questions.jsonl'}" in proc.stdout
    assert f"--ability_class_path {kept / 'ability_paths.jsonl'}" in proc.stdout
    assert not kept.exists()  # a dry run writes nothing


# --------------------------------------------------------------------------- end to end

def medqa_rows() -> list[dict]:
    """70 of the demo's questions in MedQA's published layout (no categories), a few broken rows, and ten
    questions given twice (so the split can put one copy in the evaluation set and one in the pool)."""
    out = []
    for q in jsonl(DEMO / "iteration_1.jsonl")[:70]:
        out.append({"question": q["question"], "answer": q["options"][q["answer_idx"]], "options": q["options"],
                    "meta_info": "step1", "answer_idx": q["answer_idx"]})
    out += [dict(row) for row in out[::7]]
    out += [{"question": "Which vitamin deficiency causes scurvy?", "answer": "", "meta_info": "step1",
             "options": {"A": "A", "B": "B12", "C": "C", "D": "D"}},  # no answer_idx
            {"question": "Which organ makes insulin?", "answer": "Pancreas", "meta_info": "step1", "answer_idx": "C",
             "options": {"A": "Liver", "B": "", "C": "Pancreas", "D": "Spleen"}},  # an empty option
            {"question": "Which nerve supplies the deltoid?", "answer": "?", "meta_info": "step1", "answer_idx": "E",
             "options": {"A": "Axillary", "B": "Radial", "C": "Ulnar", "D": "Median"}}]  # answer outside
    return out


# Small on purpose: each stage is a subprocess whose start-up dominates, and nothing below needs more questions
# written or more training than some of each.
RUN_SIZES = ["--num_distill_samples", "16", "--train_epochs", "1"]


@pytest.fixture(scope="module")
def byod_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("byod")
    write_jsonl(base / "US" / "train.jsonl", medqa_rows())
    data = base / "medqa"
    conv = subprocess.run([sys.executable, "data/convert.py", "--format", "medqa", "--input", base / "US" / "train.jsonl",
                           "--output_dir", data, "--iterations", "1", "--eval_fraction", "0.25", "--seed", "0"],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    assert conv.returncode == 0, conv.stderr
    proc = main_py(base, "--num_iterations", "1", "--dataset_files_per_iteration", data / "iteration_1.jsonl",
                   "--ability_class_files_per_iteration", "", "--eval_dataset_path", data / "eval.jsonl",
                   "--eval_ability_class_path", "", "--drop_eval_overlap", *RUN_SIZES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, data, conv, proc


@pytest.mark.e2e
def test_a_converted_dataset_without_ability_paths_is_labelled_and_distilled(byod_run):
    base, data, conv, proc = byod_run
    report = json.loads((data / "convert_report.json").read_text(encoding="utf-8"))
    assert (report["rows"], report["kept"], report["dropped"]) == (83, 80, 3)
    assert report["dropped_by_reason"] == {"answer outside options": 1, "empty option": 1, "no answer": 1}
    assert not (data / "ability_paths.jsonl").exists()  # MedQA has no categories
    assert report["files"] == {"questions.jsonl": 80, "eval.jsonl": 20, "iteration_1.jsonl": 60}

    # The copies the split put on both sides are dropped from the pool, and the steps read what is left.
    eval_keys = {exact_key(q.question, q.options) for q in load_questions(data / "eval.jsonl")}
    pool = load_questions(data / "iteration_1.jsonl")
    repeats = [q for q in pool if exact_key(q.question, q.options) in eval_keys]
    assert repeats, "the split must put a copy on each side of at least one repeated question"
    it1 = base / "workflow" / "iteration_1"
    assert (f"dropping {len(repeats)} of 60 questions of {data / 'iteration_1.jsonl'} that repeat evaluation "
            "questions") in proc.stdout
    kept = load_questions(it1 / "data" / "questions.jsonl")
    assert [q.key for q in kept] == [q.key for q in pool if q not in repeats]
    assert [r["id"] for r in jsonl(it1 / "data" / "dropped_eval_overlap.jsonl")] == [q.id for q in repeats]

    # The teacher labelled both sets before the steps that need paths, and every question got a leaf.
    out = proc.stdout
    assert out.index("[run] eval_labels/L_ability_labels") < out.index("[run] baseline_eval/H_eval_tree")
    assert out.index("[run] L_ability_labels") < out.index("[run] B_student_tree")
    assert (base / "workflow" / "eval_labels" / "L_ability_labels.log").stat().st_size > 0  # beside its folder
    labels = {"eval": jsonl(base / "workflow" / "eval_labels" / "L_ability_labels" / "ability_paths.jsonl"),
              "pool": jsonl(it1 / "L_ability_labels" / "ability_paths.jsonl")}
    assert [r["id"] for r in labels["pool"]] == [q.id for q in kept]
    for folder in (base / "workflow" / "eval_labels" / "L_ability_labels", it1 / "L_ability_labels"):
        assert sorted(p.name for p in folder.iterdir()) == ["ability_paths.jsonl", "label.done.json", "summary.json"]
    assert len(labels["eval"]) == 20
    tree = json.loads((ROOT / "ability_trees" / "demo_tree.json").read_text(encoding="utf-8"))["Clinical medicine"]
    for r in labels["eval"] + labels["pool"]:
        area, leaf = r["ability_path"]
        assert leaf in tree[area] and len(r["confidence"]) == 2 and all(0 < p <= 1 for p in r["confidence"])

    # The loop ran on those labels: every question scored, questions written, the student trained, the report.
    stats = json.loads((it1 / "B_student_tree" / "summary.json").read_text(encoding="utf-8"))
    assert stats["scored"] == len(kept) and stats["questions_without_path"]["count"] == 0
    entry = json.loads((base / "workflow" / "report.json").read_text(encoding="utf-8"))["iterations"][0]
    assert entry["generated"] > 0 and 0 < entry["validated"] <= entry["generated"]
    assert entry["eval_before"]["overall"]["n"] == entry["eval_after"]["overall"]["n"] == 20
    assert (base / "models" / "iteration_1_student_model" / "final_model").is_dir()
    assert "| ability (evaluation set) |" in (base / "workflow" / "report.md").read_text(encoding="utf-8")


@pytest.mark.e2e
def test_the_labelling_steps_are_skipped_when_done(byod_run):
    base, data, _, _ = byod_run
    again = main_py(base, "--num_iterations", "1", "--dataset_files_per_iteration", data / "iteration_1.jsonl",
                    "--ability_class_files_per_iteration", "", "--eval_dataset_path", data / "eval.jsonl",
                    "--eval_ability_class_path", "", "--drop_eval_overlap", *RUN_SIZES)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[skip] eval_labels/L_ability_labels" in again.stdout and "[skip] L_ability_labels" in again.stdout
    assert "[run]" not in again.stdout and "[rerun]" not in again.stdout


def test_why_a_path_names_no_node():
    from atkd.tree import load_tree

    tree = load_tree(ROOT / "ability_trees" / "demo_tree.json")
    assert tree.mismatch(["Pharmacology", "Antibiotics"]) is None
    assert tree.mismatch(["Clinical Medicine", "Pharmacology"]) == (
        "'Clinical Medicine' is not among the level-1 abilities; closest: Clinical medicine (the domain), "
        "Internal medicine")
    assert tree.mismatch(["Surgery"]) == ("'Surgery' is not among the level-1 abilities, which are: Pharmacology, "
                                          "Microbiology, Anatomy, Internal medicine")
    assert tree.mismatch(["Anatomy", "Bones", "Femur"]) == ("Clinical medicine > Anatomy > Bones is a leaf: there is "
                                                            "no 'Femur' below it")

"""Every file and folder name the pipeline hands between stages, decided here once (ARCHITECTURE.md §2).

main.py builds its commands from these, and a person running a stage by hand gets the same
names: each stage derives its side files from its main output path with the helpers at the
bottom. The step folders' names are the stage table's (`atkd.stages.STEPS`).

The layout is one rule, wherever steps run (`StepFolders`): step X writes the folder the stage
table names for it, its log `<that folder>.log` beside it, and, when it summarises its work, a
`summary.json` in its folder (`summary_path`); its done-record is named after its stage
(`done_record`: `answer.done.json`, `replay.done.json`, `train.done.json`), so no two stages'
records share a name. An iteration (`iteration_N/`), an evaluation (`baseline_eval/`,
`teacher_eval/`, and `iteration_N/` for the trained student), the evaluation set's labels
(`eval_labels/`) and the workflow folder itself (the tree step's `initial_tree/`) are laid out alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .stages import stage_of_config, step_folder

INITIAL_TREE = "initial_ability_tree.json"
# The run's report, at the workflow folder's top (not a step's summary).
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
REPORT_CHART = "report_accuracy.png"  # beside report.md, which embeds it
SUMMARY = "summary.json"  # every step's summary, in its step folder
DONE_MARKER = ".done.json"
LABELS = "ability_paths.jsonl"  # step L's output, wherever it labels a set of questions
BASELINE_EVAL = "baseline_eval"
TEACHER_EVAL = "teacher_eval"
EVAL_LABELS = "eval_labels"


class StepFolders:
    """Steps that write under one folder, `self.dir`: step X writes `<dir>/<X's folder>/` (the stage table's
    name) and logs to `<dir>/<X's folder>.log` beside it. `title` names the folder in main.py's lines
    ("baseline_eval/G_eval_reply"); an iteration's steps print under its own `=== iteration N` line."""

    dir: Path
    title: str = ""

    def step_dir(self, letter: str) -> Path:
        return self.dir / step_folder(letter)

    def log_file(self, letter: str) -> Path:
        return self.dir / f"{step_folder(letter)}.log"

    def step_name(self, letter: str) -> str:
        """How main.py names step `letter` here when it prints it (also in `[done]` lines)."""
        return f"{self.title}/{step_folder(letter)}" if self.title else step_folder(letter)

    # L: the teacher's ability paths of questions that came without them
    @property
    def labels_dir(self) -> Path:
        return self.step_dir("L")

    @property
    def labels(self) -> Path:
        return self.labels_dir / LABELS


@dataclass(frozen=True)
class Folder(StepFolders):
    """Steps under `dir`, nothing else: the evaluation set's labels (`eval_labels`), the workflow folder (`tree`)."""

    dir: Path
    title: str = ""


@dataclass(frozen=True)
class IterationPaths(StepFolders):
    """The folders and files of one iteration (1-based) of the workflow (before A, when its questions come
    without ability paths, the teacher's labels: `labels`)."""

    workflow_dir: Path
    models_dir: Path
    iteration: int

    @property
    def dir(self) -> Path:
        return self.workflow_dir / f"iteration_{self.iteration}"

    # A: student answers
    @property
    def replies_dir(self) -> Path:
        return self.step_dir("A")

    @property
    def replies(self) -> Path:
        return self.replies_dir / "replies.jsonl"

    # B: ability analysis
    @property
    def tree_dir(self) -> Path:
        return self.step_dir("B")

    @property
    def scored_tree(self) -> Path:
        return self.tree_dir / "tree.json"

    @property
    def tree_summary(self) -> Path:
        return summary_path(self.scored_tree)

    # C: distillation data
    @property
    def distill_dir(self) -> Path:
        return self.step_dir("C")

    @property
    def generated(self) -> Path:
        return self.distill_dir / "generated.jsonl"

    # D: validated data
    @property
    def validated_dir(self) -> Path:
        return self.step_dir("D")

    @property
    def validated(self) -> Path:
        return self.validated_dir / "validated.jsonl"

    # D2 (REPLAY_FRACTION > 0): validated items plus replayed dataset questions
    @property
    def replay_dir(self) -> Path:
        return self.step_dir("D2")

    @property
    def replay_mix(self) -> Path:
        return self.replay_dir / "train.jsonl"

    # D3 (RESPONSE_STYLE rationale): the teacher's rationale for each training item
    @property
    def rationale_dir(self) -> Path:
        return self.step_dir("D3")

    @property
    def explained(self) -> Path:
        return self.rationale_dir / "explained.jsonl"

    # D4 (RESPONSES student | mixed): the student's own rationale replies for the items it practises
    @property
    def on_policy_dir(self) -> Path:
        return self.step_dir("D4")

    @property
    def on_policy_items(self) -> Path:
        return self.on_policy_dir / "train.jsonl"

    # E: teacher logits
    @property
    def logits_dir(self) -> Path:
        return self.step_dir("E")

    # F: training
    @property
    def student_dir(self) -> Path:
        return self.models_dir / f"iteration_{self.iteration}_student_model"

    @property
    def final_model(self) -> Path:
        return final_model_dir(self.student_dir)

    # with DROP_EVAL_OVERLAP: the iteration's files without the questions that repeat evaluation questions
    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def kept_questions(self) -> Path:
        return self.data_dir / "questions.jsonl"

    @property
    def kept_ability_paths(self) -> Path:
        return self.data_dir / "ability_paths.jsonl"

    @property
    def dropped_overlap(self) -> Path:
        return self.data_dir / "dropped_eval_overlap.jsonl"

    # after F: the trained student on the evaluation set
    @property
    def eval(self) -> "EvalPaths":
        return EvalPaths(self.dir)


@dataclass(frozen=True)
class EvalPaths(StepFolders):
    """A model's answers on the evaluation set and their per-ability scores (G, H), under `dir`."""

    dir: Path
    title: str = ""

    @property
    def replies_dir(self) -> Path:
        return self.step_dir("G")

    @property
    def replies(self) -> Path:
        return self.replies_dir / "replies.jsonl"

    @property
    def tree_dir(self) -> Path:
        return self.step_dir("H")

    @property
    def scored_tree(self) -> Path:
        return self.tree_dir / "tree.json"

    @property
    def tree_summary(self) -> Path:
        return summary_path(self.scored_tree)


def baseline_eval(workflow_dir: Path) -> EvalPaths:
    """The initial student on the evaluation set (the "before" of iteration 1)."""
    return EvalPaths(Path(workflow_dir) / BASELINE_EVAL, BASELINE_EVAL)


def teacher_eval(workflow_dir: Path) -> EvalPaths:
    """The teacher on the evaluation set, once per run (what distillation can at best reach)."""
    return EvalPaths(Path(workflow_dir) / TEACHER_EVAL, TEACHER_EVAL)


def eval_labels(workflow_dir: Path) -> Folder:
    """Where the teacher labels the evaluation set when it comes without ability paths (step L: `.labels`)."""
    return Folder(Path(workflow_dir) / EVAL_LABELS, EVAL_LABELS)


def workflow_steps(workflow_dir: Path) -> Folder:
    """The workflow folder as the tree step sees it: `initial_tree/`, `initial_tree.log` at its top."""
    return Folder(Path(workflow_dir))


def sibling(path: str | Path, name: str) -> Path:
    """A side file next to a stage's main output (same folder)."""
    return Path(path).parent / name


def summary_path(output_path: str | Path) -> Path:
    """Every stage's summary of its work: `summary.json` beside its main output (in its step folder).
    A: the scoring figures; B, H: the per-node stats; C: the plan per leaf; D: the pass rates; D2: what was
    replayed; D3: the rationales kept and dropped; D4: the sampled letters; E: the teacher's accuracy;
    L: the confidence per level."""
    return sibling(output_path, SUMMARY)


def done_record(folder: str | Path, config_name: str) -> Path:
    """The done-record, in a stage's output folder, of the stage whose config class is `config_name`:
    `<stage>.done.json`, the stage table's name (`atkd.stages`), so two stages never share a record's name."""
    stage = stage_of_config(config_name)
    if stage is None:
        raise KeyError(f"{config_name} is no stage's config (atkd.stages): it has no done-record")
    return Path(folder) / f"{stage.name}{DONE_MARKER}"


def rejected_path(validated_path: str | Path) -> Path:
    return sibling(validated_path, "rejected.jsonl")


def dropped_path(explained_path: str | Path) -> Path:
    return sibling(explained_path, "dropped.jsonl")


def agent_answers_path(validated_path: str | Path, agent: int) -> Path:
    """Where one validation agent's answers are logged while step D runs (its part log's base name)."""
    return sibling(validated_path, f"{Path(validated_path).name}.agent_{agent}")


def args_path(output_path: str | Path) -> Path:
    """Where a stage records the arguments it ran with: `<output stem>.args.json` beside it."""
    output_path = Path(output_path)
    stem = output_path.name.split(".")[0] if output_path.suffix else output_path.name
    folder = output_path.parent if output_path.suffix else output_path
    return folder / f"{stem}.args.json"


# Teacher-logits store (step E) and training outputs (step F).
LOGITS_INDEX = "index.json"
FINAL_MODEL = "final_model"
FINAL_ADAPTER = "final_adapter"  # LoRA runs: the adapters alone (peft format), beside the merged final_model
CHECKPOINT_PREFIX = "checkpoint-"


def logits_index(store_dir: str | Path) -> Path:
    """The store's index; it is written last, so its presence means the store is complete."""
    return Path(store_dir) / LOGITS_INDEX


def logits_summary(store_dir: str | Path) -> Path:
    """The teacher's accuracy on the data the logits were taken on (the store's summary)."""
    return summary_path(logits_index(store_dir))


def final_model_dir(train_output_dir: str | Path) -> Path:
    return Path(train_output_dir) / FINAL_MODEL


def final_adapter_dir(train_output_dir: str | Path) -> Path:
    return Path(train_output_dir) / FINAL_ADAPTER


def checkpoint_dir(train_output_dir: str | Path, step: int) -> Path:
    return Path(train_output_dir) / f"{CHECKPOINT_PREFIX}{step}"

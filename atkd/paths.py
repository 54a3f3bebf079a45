"""Every file and folder name the pipeline hands between stages, decided here once (ARCHITECTURE.md §2).

main.py builds its commands from these, and a person running a stage by hand gets the same
names: each stage derives its side files (summary, stats, plan, report, args) from its main
output path with the helpers at the bottom. The step folders' names are the stage table's
(`atkd.stages.STEPS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .stages import step_folder

INITIAL_TREE = "initial_ability_tree.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
REPORT_CHART = "report_accuracy.png"  # beside report.md, which embeds it
DONE_MARKER = ".done.json"


@dataclass(frozen=True)
class IterationPaths:
    """The folders and files of one iteration (1-based) of the workflow."""

    workflow_dir: Path
    models_dir: Path
    iteration: int

    @property
    def dir(self) -> Path:
        return self.workflow_dir / f"iteration_{self.iteration}"

    # A: student answers
    @property
    def replies_dir(self) -> Path:
        return self.dir / step_folder("A")

    @property
    def replies(self) -> Path:
        return self.replies_dir / "replies.jsonl"

    # B: ability analysis
    @property
    def tree_dir(self) -> Path:
        return self.dir / step_folder("B")

    @property
    def scored_tree(self) -> Path:
        return self.tree_dir / "tree.json"

    @property
    def tree_stats(self) -> Path:
        return self.tree_dir / "stats.json"

    # C: distillation data
    @property
    def distill_dir(self) -> Path:
        return self.dir / step_folder("C")

    @property
    def generated(self) -> Path:
        return self.distill_dir / "generated.jsonl"

    # D: validated data
    @property
    def validated_dir(self) -> Path:
        return self.dir / step_folder("D")

    @property
    def validated(self) -> Path:
        return self.validated_dir / "validated.jsonl"

    # D2 (REPLAY_FRACTION > 0): validated items plus replayed dataset questions
    @property
    def replay_dir(self) -> Path:
        return self.dir / step_folder("D2")

    @property
    def replay_mix(self) -> Path:
        return self.replay_dir / "train.jsonl"

    # D3 (RESPONSE_STYLE rationale): the teacher's rationale for each training item
    @property
    def rationale_dir(self) -> Path:
        return self.dir / step_folder("D3")

    @property
    def explained(self) -> Path:
        return self.rationale_dir / "explained.jsonl"

    # D4 (RESPONSES student | mixed): the student's own rationale replies for the items it practises
    @property
    def on_policy_dir(self) -> Path:
        return self.dir / step_folder("D4")

    @property
    def on_policy_items(self) -> Path:
        return self.on_policy_dir / "train.jsonl"

    # E: teacher logits
    @property
    def logits_dir(self) -> Path:
        return self.dir / step_folder("E")

    # F: training
    @property
    def student_dir(self) -> Path:
        return self.models_dir / f"iteration_{self.iteration}_student_model"

    @property
    def final_model(self) -> Path:
        return final_model_dir(self.student_dir)

    # before A, when the iteration's questions come without ability paths: the teacher's labels
    @property
    def labels_dir(self) -> Path:
        return self.dir / step_folder("L")

    @property
    def labels(self) -> Path:
        return self.labels_dir / "ability_paths.jsonl"

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

    def log_file(self, step: str) -> Path:
        return self.dir / f"{step}.log"


@dataclass(frozen=True)
class EvalPaths:
    """A student's answers on the evaluation set and their per-ability scores, under `base`."""

    base: Path

    @property
    def replies_dir(self) -> Path:
        return self.base / step_folder("G")

    @property
    def replies(self) -> Path:
        return self.replies_dir / "replies.jsonl"

    @property
    def tree_dir(self) -> Path:
        return self.base / step_folder("H")

    @property
    def scored_tree(self) -> Path:
        return self.tree_dir / "tree.json"

    @property
    def stats(self) -> Path:
        return self.tree_dir / "stats.json"


def baseline_eval(workflow_dir: Path) -> EvalPaths:
    """The initial student on the evaluation set (the "before" of iteration 1)."""
    return EvalPaths(Path(workflow_dir) / "baseline_eval")


def eval_labels(workflow_dir: Path) -> Path:
    """The teacher's ability paths of the evaluation set, when it comes without them."""
    return Path(workflow_dir) / "L_eval_ability_labels" / "ability_paths.jsonl"


def teacher_eval(workflow_dir: Path) -> EvalPaths:
    """The teacher on the evaluation set, once per run (what distillation can at best reach)."""
    return EvalPaths(Path(workflow_dir) / "teacher_eval")


def sibling(path: str | Path, name: str) -> Path:
    """A side file next to a stage's main output (same folder)."""
    return Path(path).parent / name


def summary_path(replies_path: str | Path) -> Path:
    return sibling(replies_path, "summary.json")


def labels_summary_path(labels_path: str | Path) -> Path:
    """label_abilities.py's summary: `<output stem>.summary.json` beside its ability paths."""
    return sibling(labels_path, f"{Path(labels_path).name.split('.')[0]}.summary.json")


def plan_path(generated_path: str | Path) -> Path:
    return sibling(generated_path, "plan.json")


def report_path(validated_path: str | Path) -> Path:
    return sibling(validated_path, "report.json")


def rejected_path(validated_path: str | Path) -> Path:
    return sibling(validated_path, "rejected.jsonl")


def dropped_path(explained_path: str | Path) -> Path:
    return sibling(explained_path, "dropped.jsonl")


def replay_record_path(mix_path: str | Path) -> Path:
    return sibling(mix_path, "replay.json")


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
LOGITS_SUMMARY = "summary.json"
FINAL_MODEL = "final_model"
FINAL_ADAPTER = "final_adapter"  # LoRA runs: the adapters alone (peft format), beside the merged final_model
CHECKPOINT_PREFIX = "checkpoint-"


def logits_index(store_dir: str | Path) -> Path:
    """The store's index; it is written last, so its presence means the store is complete."""
    return Path(store_dir) / LOGITS_INDEX


def logits_summary(store_dir: str | Path) -> Path:
    """The teacher's accuracy on the data the logits were taken on."""
    return Path(store_dir) / LOGITS_SUMMARY


def final_model_dir(train_output_dir: str | Path) -> Path:
    return Path(train_output_dir) / FINAL_MODEL


def final_adapter_dir(train_output_dir: str | Path) -> Path:
    return Path(train_output_dir) / FINAL_ADAPTER


def checkpoint_dir(train_output_dir: str | Path, step: int) -> Path:
    return Path(train_output_dir) / f"{CHECKPOINT_PREFIX}{step}"

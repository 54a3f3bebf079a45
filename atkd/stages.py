"""The stage table: every stage once, and every step of the workflow once (ARCHITECTURE.md §1).

A stage is a command (`python -m atkd <name>`, or its top-level script, a thin alias kept as the
documented interface): a config class and a `run(cfg)` in one module of this package, the prompts
it renders (its fingerprint holds those and no others, `atkd.fingerprint`), and its help text.
A step is a letter of the workflow: the stage it runs and the folder it writes (also its log's
stem). Steps A and G run the same stage (answer), and so do B and H (analyze).

What comes from here: the step folders of `atkd.paths` and the names of the done-records (the
stage's name: `answer.done.json`), the script and command `atkd.steps` runs for a step,
`python -m atkd --help`, and the stage tables of README.md and docs/ARCHITECTURE.md (a test
checks they list exactly these). Nothing heavy is imported: a stage's module is imported when
the stage runs (`Stage.load`), so `python -m atkd --help` and the paths stay cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

# The prompts a stage can render (`atkd.prompts.prompt_probes`): the MCQ prompt (plain or chain of
# thought, its answer line), the rationale prompt and reply, the question-writing prompt and its
# reply format, the tree-building prompt, the labelling question (an MCQ over ability names).
MCQ, RATIONALE, WRITE, TREE, LABEL = "mcq", "rationale", "write", "tree", "label"


@dataclass(frozen=True)
class Stage:
    """One command of the pipeline."""

    name: str  # python -m atkd <name>; its done-record is <name>.done.json (atkd.paths.done_record)
    script: str  # its alias at the checkout root
    module: str  # atkd.<module>: the config class and run()
    config: str  # the config class's name in that module
    about: str  # one line: what it does
    prompts: tuple[str, ...]  # the prompts it renders (the only ones its fingerprint holds)
    usage: str  # the rest of its help: a copy-pasteable command, then what it writes

    def load(self) -> tuple[type, Callable]:
        """(config class, run function), importing the stage's module."""
        module = importlib.import_module(f"atkd.{self.module}")
        return getattr(module, self.config), module.run

    @property
    def description(self) -> str:
        """The `--help` text above the flags."""
        return f"{self.about}\n\n{self.usage}"


@dataclass(frozen=True)
class StepKind:
    """One letter of the workflow: the stage it runs and the folder it writes (its log: `<folder>.log`)."""

    letter: str
    stage: Stage
    # under the folder it runs in (an iteration's, an evaluation's: atkd.paths.StepFolders); F: only its log's
    # stem (the model goes to the models folder)
    folder: str


TREE_STAGE = Stage(
    "tree", "create_initial_tree.py", "tree_building", "TreeConfig",
    "Create the initial ability tree by asking an LLM for sub-abilities, level by level.", (TREE,),
    """    python create_initial_tree.py --model_path /models/Qwen2.5-7B-Instruct --domain 临床医学 --nodes_per_level 6,4

or against an OpenAI-compatible server (vLLM, SGLang, `transformers serve`, a hosted API; the key
is read from the environment variable named by --api_key_env):

    python create_initial_tree.py --api_base http://127.0.0.1:8000/v1 --api_model Qwen2.5-7B-Instruct --domain 临床医学

The tree is written (atomically) to OUTPUT_DIR/OUTPUT_FILENAME in the nested form
`{"domain": {"level 1": {"level 2": {}}}}`, with its done-record beside it. create_initial_tree.py's
constants are the defaults of its flags; `python -m atkd tree` takes the config's own defaults.""")

LABEL_STAGE = Stage(
    "label", "label_abilities.py", "labelling", "LabelConfig",
    "Place questions that come without ability paths in the ability tree, with a model (the teacher).", (MCQ, LABEL),
    """    python label_abilities.py --model_path data/demo/models/teacher --ability_tree_path ability_trees/demo_tree.json --dataset_path data/demo/eval.jsonl --output_path output/labels/eval_ability_paths.jsonl

Level by level, the model picks the child ability each question tests, as a multiple-choice
question over the children's names scored like any answer. The choice does not depend on the order
the tree lists the children in: they are offered sorted by name, under every cyclic shift of that
order (k prompts for k children; `--rotations n`: n evenly spaced shifts), and the child with the
highest mean probability wins. Levels of more than 26 children are picked within chunks of at most
26, then among the chunk winners. Writes `{"id", "ability_path", "confidence"}` lines, ready for
main.py's ability-class files, and summary.json beside them (confidence per level, questions per
ability). A killed run keeps its finished batches; the same command completes it, and does nothing
once it is done.""")

ANSWER_STAGE = Stage(
    "answer", "inference.py", "answering", "InferenceConfig",
    "Answer a multiple-choice dataset with a local or served model (steps A and G): replies.jsonl and summary.json.",
    (MCQ,),
    """    python inference.py --model_path data/demo/models/student --dataset_path data/demo/iteration_1.jsonl --output_path output/workflow/iteration_1/A_student_reply/replies.jsonl

Score mode (default) reads the option-letter probabilities at the answer position, one forward
pass per batch; generate mode writes a chain-of-thought reply and extracts the letter. A killed
run keeps its finished batches; running the same command again completes the rest, and running
it after it finished does nothing (its done-record says the replies are up to date).""")

ANALYZE_STAGE = Stage(
    "analyze", "student_data_analyzer.py", "weakness", "AnalyzerConfig",
    "Score the ability tree with the student's answers (steps B and H): per-node accuracy, smoothed accuracy, "
    "weakness.", (),
    """    python student_data_analyzer.py --initial_tree_path ability_trees/demo_tree.json --paths_file data/demo/iteration_1_ability_paths.jsonl --answers_file data/demo/iteration_1.jsonl --student_responses_file output/workflow/iteration_1/A_student_reply/replies.jsonl --output_tree_path output/workflow/iteration_1/B_student_tree/tree.json --output_stats_path output/workflow/iteration_1/B_student_tree/summary.json

The formulas (a Beta prior centred on the parent's smoothed accuracy) and everything the stats
file (summary.json in main.py's runs) reports are described in `atkd/weakness.py`. Replies need only `id` and `pred_letter`.""")

WRITE_STAGE = Stage(
    "write_questions", "generate_distill_data.py", "question_writing", "QuestionWritingConfig",
    "Step C: the teacher writes new questions for the abilities where the student is weak.", (WRITE,),
    """    python generate_distill_data.py --teacher_model_path data/demo/models/teacher --ability_tree_path output/workflow/iteration_1/B_student_tree/tree.json --full_dataset_path data/demo/iteration_1.jsonl --ability_class_path data/demo/iteration_1_ability_paths.jsonl --output_path output/workflow/iteration_1/C_distill_data/generated.jsonl --num_samples 100

Samples are allocated over the leaves in proportion to weakness (atkd/allocation.py); each prompt
shows a few seed questions of the leaf; replies are parsed strictly, near-duplicates dropped, the
correct option's position shuffled, and short leaves retried at most --max_retries times.
Writes generated.jsonl and summary.json, the plan (target, achieved, seeds and rejection reasons per leaf).
A killed run resumes where it stopped when rerun with the same arguments.""")

CROSS_CHECK_STAGE = Stage(
    "cross_check", "evaluate_distilled_data.py", "cross_check", "CrossCheckConfig",
    "Step D: two agent models answer every generated question; keep those both answer as labelled.", (MCQ,),
    """    python evaluate_distilled_data.py --agent_model_1_path data/demo/models/teacher --agent_model_2_path data/demo/models/agent --input_file output/workflow/iteration_1/C_distill_data/generated.jsonl --output_file output/workflow/iteration_1/D_validated_data/validated.jsonl

Agents run one after the other (one model in memory at a time), in score mode from their
option-letter logits by default, or with --mode generate from a chain-of-thought reply (local
models or OpenAI-compatible endpoints). Writes validated.jsonl (kept items with both agents'
answers), rejected.jsonl (with the reason) and summary.json (pass rate overall, per leaf, per
reason). Using one model for both agents is allowed but flagged in the report and the log.
A killed run resumes per agent: answers already written are kept (each agent's own log).""")

REPLAY_STAGE = Stage(
    "replay", "add_replay.py", "replay", "ReplayConfig",
    "Add replayed dataset questions to the validated generated ones (step D2, when REPLAY_FRACTION > 0).", (),
    """    python add_replay.py --validated_file output/workflow/iteration_1/D_validated_data/validated.jsonl --dataset_path data/demo/iteration_1.jsonl --ability_class_path data/demo/iteration_1_ability_paths.jsonl --ability_tree_path output/workflow/iteration_1/B_student_tree/tree.json --output_path output/workflow/iteration_1/D2_replay/train.jsonl --replay_fraction 0.2

The replay items (ids `replay-<id>`, gold answers) make --replay_fraction of the training items;
they are drawn with the seed, favouring abilities with a high smoothed accuracy in the scored
tree. Writes train.jsonl (the generated items, then the replay items) and summary.json beside it.""")

RATIONALE_STAGE = Stage(
    "rationales", "generate_rationales.py", "rationale_writing", "RationaleConfig",
    "The teacher's rationale for each training item: the answer line first, then a short reason (step D3).",
    (RATIONALE,),
    """    python generate_rationales.py --teacher_model_path data/demo/models/teacher --input_file output/workflow/iteration_1/D_validated_data/validated.jsonl --output_file output/workflow/iteration_1/D3_rationales/explained.jsonl

An item is kept when the teacher's answer line gives the item's labelled answer and a reason
follows; the reason goes into the `explanation` field, which generate_logits.py
(--response_field explanation) and train.py turn into token-level distillation. Items that
already have an explanation keep it (--no-use_dataset_explanation asks the teacher anyway).
Writes explained.jsonl, dropped.jsonl and summary.json; a killed run resumes.""")

STUDENT_RESPONSES_STAGE = Stage(
    "student_responses", "sample_student_responses.py", "student_sampling", "StudentSamplingConfig",
    "The student's own sampled rationale replies for its on-policy practice items (step D4).", (RATIONALE,),
    """    python sample_student_responses.py --student_model_path data/demo/models/student --input_file output/workflow/iteration_1/D2_replay/train.jsonl --output_file output/workflow/iteration_1/D4_student_responses/train.jsonl

The student answers each written (not replayed) item, or a seeded --share of them, with the
rationale prompt (answer line, then why), sampled at --temperature; the item keeps its reply
(`student_reply`), the letter its answer line commits to (`student_letter`, `student_correct`) and
the reason (`student_reason`). generate_logits.py then takes the teacher's log-probs at every token
of the student's response and train.py trains it on-policy. Writes train.jsonl (every item) and
summary.json (right / wrong / unparsed sampled letters per ability); a killed run resumes.""")

LOGITS_STAGE = Stage(
    "logits", "generate_logits.py", "teacher_logits", "LogitsConfig",
    "Store the teacher's answer distributions for distillation (step E): safetensors shards + index.json.", (MCQ,),
    """    python generate_logits.py --model_path data/demo/models/teacher --dataset_path output/workflow/iteration_1/D_validated_data/validated.jsonl --output_dir output/workflow/iteration_1/E_teacher_logits

Per item: the teacher's log-probabilities over the option letters at the answer position
(tokenizer independent, so the student may come from another family). With --response_field,
also the top-k log-probabilities and the leftover tail mass at every response token after the
letter (usable for token-level KD when the student shares the teacher's vocabulary; the index
records a tokenizer fingerprint so train.py can tell). index.json also holds the teacher's
accuracy (summary.json too). A killed run keeps its finished shards; the same command resumes.

A served teacher instead of its weights (vLLM, SGLang, llama.cpp, a hosted API):

    python generate_logits.py --api_base http://127.0.0.1:8000/v1 --api_model teacher --model_path TEACHER_TOKENIZER_DIR --dataset_path ... --output_dir ...

letters from the answer position's top_logprobs (at most --top_logprobs_cap), token-level targets
from the prompt log-probs (--prompt_logprobs echo | prompt_logprobs | none) where the server gives
them; --model_path holds the tokenizer alone, or is empty (option level only). Every answer is kept
as it arrives: a killed run asks only the rest.""")

TRAIN_STAGE = Stage(
    "train", "train.py", "trainer", "TrainConfig",
    "Distil the teacher into the student (step F): checkpoint-<step>/ folders, then final_model/.", (MCQ,),
    """    accelerate launch --num_processes 2 train.py --student_model_path data/demo/models/student --train_file_path output/workflow/iteration_1/D_validated_data/validated.jsonl --teacher_logits_dir output/workflow/iteration_1/E_teacher_logits --output_dir output/models/iteration_1_student_model

Also runs as plain `python train.py ...` (one process; the GPU if there is one, else the CPU), and
installed as `accelerate launch ... -m atkd train ...`.
Sharded training of 7B-8B students: `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
(or zero3.yaml, DeepSpeed); the config decides sharding and precision, the flags below decide the
training arithmetic. Master weights are fp32 whatever the precision (see --dtype). `--lora_r 16`
trains LoRA adapters only (needs peft) and writes final_model merged plus final_adapter/.
Loss = alpha_ce * CE + (1 - alpha_ce) * T^2 * KD(teacher || student): CE on the response tokens
only; KD on the option letters at the answer position (any tokenizer) and, when the student
shares the teacher's vocabulary and the data has responses, on every later response token
(top-k + tail bucket). Both terms are averaged over the tokens of a whole gradient-accumulation
window. A rerun resumes from the newest complete checkpoint of the same settings and inputs in
--output_dir; when final_model/ is up to date there is nothing to do.""")

STAGES: tuple[Stage, ...] = (TREE_STAGE, LABEL_STAGE, ANSWER_STAGE, ANALYZE_STAGE, WRITE_STAGE, CROSS_CHECK_STAGE,
                             REPLAY_STAGE, RATIONALE_STAGE, STUDENT_RESPONSES_STAGE, LOGITS_STAGE, TRAIN_STAGE)

# The workflow's steps in the order one run meets them (D3 before D2: replay's share is of the final items).
STEPS: tuple[StepKind, ...] = (
    StepKind("tree", TREE_STAGE, "initial_tree"),
    StepKind("L", LABEL_STAGE, "L_ability_labels"),
    StepKind("A", ANSWER_STAGE, "A_student_reply"),
    StepKind("B", ANALYZE_STAGE, "B_student_tree"),
    StepKind("C", WRITE_STAGE, "C_distill_data"),
    StepKind("D", CROSS_CHECK_STAGE, "D_validated_data"),
    StepKind("D3", RATIONALE_STAGE, "D3_rationales"),
    StepKind("D2", REPLAY_STAGE, "D2_replay"),
    StepKind("D4", STUDENT_RESPONSES_STAGE, "D4_student_responses"),
    StepKind("E", LOGITS_STAGE, "E_teacher_logits"),
    StepKind("F", TRAIN_STAGE, "F_train"),
    StepKind("G", ANSWER_STAGE, "G_eval_reply"),
    StepKind("H", ANALYZE_STAGE, "H_eval_tree"),
)

# main.py's whole loop as a command (`python -m atkd workflow`): not a stage of the table (it runs
# them); its config has no defaults (main.py's constants are its values), so every flag is given.
WORKFLOW = Stage(
    "workflow", "main.py", "workflow", "WorkflowConfig",
    "The whole AT-KD loop, as main.py runs it, with every setting given as a flag (main.py's constants "
    "are not in the package).", (),
    """    python -m atkd workflow --teacher_model_path ... (every flag: python main.py --help lists them with the
    demo's values as defaults)

The same as `python main.py` with its constants written out: each step runs as
`python -m atkd <stage> ...`, a finished step is skipped, a rerun continues.""")


def stage_named(name: str) -> Stage:
    """The stage called `name`, or whose top-level script is `name` ("inference.py"); `workflow` is main.py's loop."""
    for stage in (*STAGES, WORKFLOW):
        if name in (stage.name, stage.script):
            return stage
    raise KeyError(f"no stage {name!r}; the stages: {', '.join(s.name for s in STAGES)}, workflow")


def step_kind(letter: str) -> StepKind:
    """Step `letter` of the workflow: its stage and its folder."""
    for step in STEPS:
        if step.letter == letter:
            return step
    raise KeyError(f"no step {letter!r}")


def step_folder(letter: str) -> str:
    """The folder step `letter` writes (also its log's stem): "A" -> "A_student_reply"."""
    return step_kind(letter).folder


def stage_of_config(config_name: str) -> Stage | None:
    """The stage whose config class is called `config_name` (main.py's loop for WorkflowConfig); None outside
    the table."""
    return next((stage for stage in (*STAGES, WORKFLOW) if stage.config == config_name), None)


def prompts_of(config_name: str) -> tuple[str, ...] | None:
    """The prompts the stage of config class `config_name` renders; None for a config outside the table."""
    stage = stage_of_config(config_name)
    return stage.prompts if stage is not None and stage is not WORKFLOW else None

"""main.py's plan: its settings turned into the steps of each iteration, with nothing run or written.

`FEEDS` is the one table from main.py's settings to the stage fields they feed: `WorkflowConfig`
declares each of those settings from its first stage field (`atkd.cli.fed`: type, check, help),
and the step builders copy the values through it (`fed_values`). Every other stage field is set
here from the run itself (paths, the iteration's seed and student, ids) or left at its default;
tests/test_settings_table.py holds the two lists and checks that every field of every stage is
one of the three.

The builders are pure (settings -> `Step`s): `--dry_run` prints exactly what they return, and
`atkd.workflow.run` runs it. A step is a letter of the stage table (`stage_step`): its script comes
from there, its folder, log and name from where it runs (`atkd.paths.StepFolders`: an iteration, an
evaluation, the evaluation set's labels, the workflow folder for the tree). The steps between D
(validated) and E (logits) are decided once, by `training_chain`: D3 (rationales), D2 (replay), D4
(the student's own responses), each reading the previous one's output; E and F read the last one's.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import paths
from .answering import InferenceConfig
from .cross_check import CrossCheckConfig
from .labelling import LabelConfig
from .model_source import AGENT_FLAGS, ENDPOINT_FIELDS, TEACHER_FLAGS, TREE_FLAGS, ModelSource
from .question_writing import QuestionWritingConfig
from .rationale_writing import RationaleConfig
from .replay import ReplayConfig
from .stages import step_kind
from .steps import Step
from .student_sampling import StudentSamplingConfig
from .teacher_logits import LogitsConfig
from .trainer import TrainConfig
from .tree_building import TreeConfig
from .weakness import AnalyzerConfig

if TYPE_CHECKING:  # the settings' class; it declares its fields from FEEDS, so it imports this module
    from .workflow import WorkflowConfig

STAGE_CONFIGS = (TreeConfig, LabelConfig, InferenceConfig, AnalyzerConfig, QuestionWritingConfig, CrossCheckConfig,
                 RationaleConfig, ReplayConfig, StudentSamplingConfig, LogitsConfig, TrainConfig)
LOCAL_MODEL_STAGES = (TreeConfig, LabelConfig, InferenceConfig, QuestionWritingConfig, CrossCheckConfig,
                      RationaleConfig, StudentSamplingConfig, LogitsConfig)  # those with --gpu_ids
ENDPOINT_STAGES = (TreeConfig, LabelConfig, InferenceConfig, QuestionWritingConfig, CrossCheckConfig,
                   RationaleConfig, LogitsConfig)  # --api_key_env & co.
PLACED_STAGES = (TreeConfig, QuestionWritingConfig, RationaleConfig, CrossCheckConfig, LogitsConfig)


def _each(configs: tuple, name: str) -> tuple:
    return tuple((c, name) for c in configs)


# main.py setting -> the stage fields it feeds, (config class, field); the first one declares the setting.
FEEDS: dict[str, tuple[tuple[type, str], ...]] = {
    # models and where they are (atkd.model_source)
    "teacher_model_path": ((QuestionWritingConfig, "teacher_model_path"), (RationaleConfig, "teacher_model_path"),
                           (TreeConfig, "model_path"), (LabelConfig, "model_path"), (LogitsConfig, "model_path"),
                           (InferenceConfig, "model_path")),  # the last: the teacher's evaluation
    "student_model_path": ((InferenceConfig, "model_path"), (TrainConfig, "student_model_path"),
                           (StudentSamplingConfig, "student_model_path")),
    "agent_model_1_path": ((CrossCheckConfig, "agent_model_1_path"),),
    "agent_model_2_path": ((CrossCheckConfig, "agent_model_2_path"),),
    "teacher_api_base": ((QuestionWritingConfig, "api_base"), (RationaleConfig, "api_base"), (TreeConfig, "api_base"),
                         (LabelConfig, "api_base"), (LogitsConfig, "api_base"), (InferenceConfig, "api_base")),
    "teacher_api_model": ((QuestionWritingConfig, "api_model"), (RationaleConfig, "api_model"),
                          (TreeConfig, "api_model"), (LabelConfig, "api_model"), (LogitsConfig, "api_model"),
                          (InferenceConfig, "api_model")),
    "agent_1_api_base": ((CrossCheckConfig, "agent_1_api_base"),),
    "agent_1_api_model": ((CrossCheckConfig, "agent_1_api_model"),),
    "agent_2_api_base": ((CrossCheckConfig, "agent_2_api_base"),),
    "agent_2_api_model": ((CrossCheckConfig, "agent_2_api_model"),),
    "api_key_env": _each(ENDPOINT_STAGES, "api_key_env"),
    "api_concurrency": _each(ENDPOINT_STAGES, "api_concurrency"),
    "api_timeout_s": _each(ENDPOINT_STAGES, "api_timeout_s"),
    "api_max_attempts": _each(ENDPOINT_STAGES, "api_max_attempts"),
    "model_placement": _each(PLACED_STAGES, "model_placement"),
    "gpus_to_use": _each(LOCAL_MODEL_STAGES, "gpu_ids"),
    # data
    "domain": ((TreeConfig, "domain"),),
    "eval_dataset_path": ((QuestionWritingConfig, "eval_dataset_path"),),
    # the loop
    "num_distill_samples": ((QuestionWritingConfig, "num_samples"),),
    "seed": ((InferenceConfig, "seed"), (QuestionWritingConfig, "seed"), (ReplayConfig, "seed"),
             (StudentSamplingConfig, "seed"), (TrainConfig, "seed"), (TreeConfig, "seed")),
    # stage knobs
    "inference_batch_size": ((InferenceConfig, "batch_size"), (CrossCheckConfig, "batch_size"),
                             (LogitsConfig, "batch_size"), (LabelConfig, "batch_size")),
    "generation_batch_size": ((QuestionWritingConfig, "batch_size"), (RationaleConfig, "batch_size"),
                              (StudentSamplingConfig, "batch_size")),
    "max_retries": ((QuestionWritingConfig, "max_retries"),),
    "gen_temperature": ((QuestionWritingConfig, "temperature"),),
    "min_confidence": ((CrossCheckConfig, "min_confidence"),),
    "top_k": ((LogitsConfig, "top_k"),),
    "prior_strength": ((AnalyzerConfig, "prior_strength"),),
    # training
    "train_epochs": ((TrainConfig, "num_epochs"),),
    **{name: ((TrainConfig, name),) for name in (
        "learning_rate", "batch_size", "gradient_accumulation_steps", "temperature", "alpha_ce", "kd_loss",
        "save_steps", "save_total_limit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
        "reason_weight", "on_policy_kd_loss", "report_to")},
    # the distillation signal
    "alloc_temperature": ((QuestionWritingConfig, "alloc_temperature"),),
    "use_dataset_explanation": ((RationaleConfig, "use_dataset_explanation"),),
    "replay_fraction": ((ReplayConfig, "replay_fraction"),),
    "on_policy_share": ((StudentSamplingConfig, "share"),),
    "on_policy_temperature": ((StudentSamplingConfig, "temperature"),),
}

# Fed settings a builder sets itself instead of copying them as they are (why).
SET_PER_STEP = {
    "teacher_model_path": "with the teacher served: E, L and its G get it (tokenizer; weights where the server "
                          "gives no log-probs), the generating stages none",
    "student_model_path": "iteration 1's student; a later iteration distils the one before it trained",
    "agent_model_1_path": "no folder when the agent is at an endpoint",
    "agent_model_2_path": "no folder when the agent is at an endpoint",
    "teacher_api_base": "the teacher's stages, not the student's answers", "teacher_api_model": "likewise",
    "agent_1_api_base": "D only", "agent_1_api_model": "D only, with its endpoint",
    "agent_2_api_base": "D only", "agent_2_api_model": "D only, with its endpoint",
    "api_key_env": "only the stages an endpoint serves", "api_concurrency": "likewise", "api_timeout_s": "likewise",
    "api_max_attempts": "likewise",
    "model_placement": "the local teacher's and the agents' stages",
    "gpus_to_use": "the usable ids: the CPU when the machine has no CUDA",
    "domain": "the tree stage only runs without EXISTING_ABILITY_TREE_PATH",
    "seed": "iteration N's steps use SEED + N - 1",
    "reason_weight": "0 where there is no reason to weigh (letter style, the teacher's responses)",
    "report_to": "given to F with the run's tracking folder (atkd.workflow.with_tracking)",
}


def fed_values(cfg: WorkflowConfig, stage: type) -> dict:
    """The values main.py's settings give `stage`'s fields as they are (FEEDS, less SET_PER_STEP)."""
    return {field: getattr(cfg, setting) for setting, targets in FEEDS.items() if setting not in SET_PER_STEP
            for cls, field in targets if cls is stage}


def configured(stage: type, cfg: WorkflowConfig, **own):
    """`stage`'s config: what main.py's settings feed it (`fed_values`), with the step's own values over them."""
    return stage(**{**fed_values(cfg, stage), **own})


def ability_file(cfg: WorkflowConfig, k: int) -> str:
    """The ability paths of iteration k+1's questions; "" when the teacher is to label them."""
    files = cfg.ability_class_files_per_iteration
    return files[k] if files else ""


# ---------------------------------------------------------------------------------- where the models are

def api_settings(cfg: WorkflowConfig) -> dict:
    """How the stages talk to endpoints: key variable, concurrency, timeout, tries."""
    return dict(api_key_env=cfg.api_key_env, api_concurrency=cfg.api_concurrency, api_timeout_s=cfg.api_timeout_s,
                api_max_attempts=cfg.api_max_attempts)


def model_source(cfg: WorkflowConfig, who: str, gpus: list[int]) -> ModelSource:
    """Where main.py's teacher, agent_1 or agent_2 is: its endpoint when <WHO>_API_BASE is set, else its folder."""
    path = cfg.teacher_model_path if who == "teacher" else getattr(cfg, f"agent_model_{who[-1]}_path")
    base = getattr(cfg, f"{who}_api_base")
    return ModelSource(model_path="" if base else path, api_base=base,
                       api_model=getattr(cfg, f"{who}_api_model") if base else "", gpu_ids=tuple(gpus),
                       model_placement=cfg.model_placement, **api_settings(cfg))


def teacher_settings(cfg: WorkflowConfig, flags=TEACHER_FLAGS, local: tuple[str, ...] = ("model_path", "model_placement"),
                     folder_when_served: bool = False) -> dict:
    """Where the teacher is: its endpoint (then no folder, so the endpoint's model name is its identity in
    the fingerprint; `folder_when_served`: TEACHER_MODEL_PATH still, for the stages that read its tokenizer
    or, where the server gives no log-probs, its weights: E, the teacher's G, L), else its folder and the
    `local` settings (placed on the GPUs by MODEL_PLACEMENT)."""
    source = model_source(cfg, "teacher", [])
    if not source.is_served:
        return flags.settings(source, local)
    out = flags.settings(source, ("model_path", *ENDPOINT_FIELDS))
    if folder_when_served:
        out[flags.flag("model_path")] = cfg.teacher_model_path
    return out


def agent_settings(cfg: WorkflowConfig) -> dict:
    """Each agent: its endpoint (generate mode) or its folder (score mode), and how to reach or place it."""
    return {name: value for n in (1, 2) for name, value in AGENT_FLAGS[n].settings(
        model_source(cfg, f"agent_{n}", []), ("model_path", *ENDPOINT_FIELDS, "model_placement")).items()}


# ---------------------------------------------------------------------------------- steps

def stage_step(letter: str, where: paths.StepFolders, cfg, **run) -> Step:
    """Step `letter` of the stage table (`atkd.stages`) run under `where`: named after its folder there, its
    stage's script, its log beside its folder (`run`: the launcher, environment and check of F)."""
    return Step(where.step_name(letter), step_kind(letter).stage.script, cfg, log_path=where.log_file(letter), **run)


def tree_step(cfg: WorkflowConfig, workflow: Path, gpus: list[int]) -> Step:
    """Build the initial tree with the teacher when no tree file is given."""
    root = paths.workflow_steps(workflow)
    tree_cfg = configured(TreeConfig, cfg, **teacher_settings(cfg, TREE_FLAGS),
                          domain=cfg.domain, output_dir=str(root.step_dir("tree")), output_filename=paths.INITIAL_TREE,
                          seed=cfg.seed, gpu_ids=gpus)
    return stage_step("tree", root, tree_cfg)


@dataclass
class RoundFiles:
    """The question and ability-path files a set of steps reads, and the step that writes the paths
    when the user gave none (the teacher labels the questions)."""

    questions: str
    ability_paths: str
    label_step: Step | None = None


def label_step(cfg: WorkflowConfig, where: paths.StepFolders, questions: str, tree: Path, gpus: list[int]) -> Step:
    """L: the teacher places questions that came without ability paths in the tree (`where.labels`)."""
    labels = configured(LabelConfig, cfg,
                        **teacher_settings(cfg, TREE_FLAGS, ("model_path",), folder_when_served=True),
                        ability_tree_path=str(tree),
                        dataset_path=questions, output_path=str(where.labels), gpu_ids=gpus)
    return stage_step("L", where, labels)


def labelled(cfg: WorkflowConfig, where: paths.StepFolders, questions: str, ability: str, tree: Path,
             gpus: list[int]) -> RoundFiles:
    """`questions` with the given ability paths, or with the labels step L writes under `where`."""
    if ability:
        return RoundFiles(questions, ability)
    return RoundFiles(questions, str(where.labels), label_step(cfg, where, questions, tree, gpus))


def round_files(cfg: WorkflowConfig, it: paths.IterationPaths, tree: Path, gpus: list[int],
                dropped: bool) -> RoundFiles:
    """Iteration N's files: the user's, or their copies without repeats of evaluation questions
    (`dropped`), with the teacher's labels where no ability-path file was given."""
    k = it.iteration - 1
    questions, ability = cfg.dataset_files_per_iteration[k], ability_file(cfg, k)
    if dropped:
        questions, ability = str(it.kept_questions), str(it.kept_ability_paths) if ability else ""
    return labelled(cfg, it, questions, ability, tree, gpus)


def eval_files(cfg: WorkflowConfig, workflow: Path, tree: Path, gpus: list[int]) -> RoundFiles:
    """The evaluation set's files, with the teacher's labels (under `eval_labels/`) when EVAL_ABILITY_CLASS_PATH
    is empty."""
    return labelled(cfg, paths.eval_labels(workflow), cfg.eval_dataset_path, cfg.eval_ability_class_path, tree, gpus)


def reply_config(cfg: WorkflowConfig, model: str | dict, questions: str, output: Path, seed: int,
                 gpus: list[int]) -> InferenceConfig:
    """A or G: `model` (a folder, or a source's settings: `teacher_settings`) answers `questions`."""
    where = model if isinstance(model, dict) else {"model_path": model}
    return configured(InferenceConfig, cfg, **where, dataset_path=questions,
                           output_path=str(output), seed=seed, gpu_ids=gpus)


def tree_config(cfg: WorkflowConfig, tree: Path, ability_paths: str, questions: str, replies: Path,
                scored_tree: Path) -> AnalyzerConfig:
    """B or H: the replies' per-ability scores (the stats: the step's summary)."""
    return configured(AnalyzerConfig, cfg, initial_tree_path=str(tree), paths_file=ability_paths,
                          answers_file=questions, student_responses_file=str(replies),
                          output_tree_path=str(scored_tree), output_stats_path=str(paths.summary_path(scored_tree)))


def eval_steps(cfg: WorkflowConfig, ev: paths.EvalPaths, model: str | dict, tree: Path, gpus: list[int],
               ability_paths: str) -> list[Step]:
    """G, H under `ev`: `model`'s answers on the evaluation set, then their per-ability scores."""
    reply = reply_config(cfg, model, cfg.eval_dataset_path, ev.replies, cfg.seed, gpus)
    scored = tree_config(cfg, tree, ability_paths, cfg.eval_dataset_path, ev.replies, ev.scored_tree)
    return [stage_step("G", ev, reply), stage_step("H", ev, scored)]


def baseline_eval_steps(cfg: WorkflowConfig, workflow: Path, tree: Path, gpus: list[int],
                        ability_paths: str) -> list[Step]:
    """G, H for the untouched student, under `baseline_eval/`: the "before" of iteration 1."""
    return eval_steps(cfg, paths.baseline_eval(workflow), cfg.student_model_path, tree, gpus, ability_paths)


def teacher_eval_steps(cfg: WorkflowConfig, workflow: Path, tree: Path, gpus: list[int],
                       ability_paths: str) -> list[Step]:
    """G, H for the teacher, once per run, under `teacher_eval/`: its accuracy per ability bounds what
    distillation can teach."""
    return eval_steps(cfg, paths.teacher_eval(workflow), teacher_settings(cfg, TREE_FLAGS, ("model_path",),
                                                                            folder_when_served=True),
                      tree, gpus, ability_paths)


def iteration_steps(cfg: WorkflowConfig, it: paths.IterationPaths, student: str, tree: Path,
                    gpus: list[int], files: RoundFiles) -> list[Step]:
    """(L,) A-F for one iteration: (label,) measure, score, write, validate, (explain, replay, practise,)
    take the teacher's logits, train."""
    k = it.iteration - 1
    data, ability = files.questions, files.ability_paths
    seed = cfg.seed + k  # each round samples afresh, reproducibly
    return ([files.label_step] if files.label_step else []) + [
        stage_step("A", it, reply_config(cfg, student, data, it.replies, seed, gpus)),
        stage_step("B", it, tree_config(cfg, tree, ability, data, it.replies, it.scored_tree)),
        stage_step("C", it, configured(
            QuestionWritingConfig, cfg, **teacher_settings(cfg), ability_tree_path=str(it.scored_tree),
            full_dataset_path=data, ability_class_path=ability, output_path=str(it.generated), seed=seed,
            id_prefix=f"it{it.iteration}", gpu_ids=gpus)),
        stage_step("D", it, configured(
            CrossCheckConfig, cfg, **agent_settings(cfg), input_file=str(it.generated), output_file=str(it.validated),
            gpu_ids=gpus)),
        *training_data_steps(cfg, it, data, ability, seed, gpus, student),
        stage_step("E", it, configured(
            LogitsConfig, cfg, **teacher_settings(cfg, TREE_FLAGS, folder_when_served=True),
            dataset_path=str(training_items(cfg, it)), output_dir=str(it.logits_dir), gpu_ids=gpus,
            response_field=EXPLANATION_FIELD if cfg.response_style == "rationale" else None)),
        train_step(cfg, it, student, gpus),
    ]


# ---------------------------------------------------------------------------------- D3, D2, D4: the training items

EXPLANATION_FIELD = "explanation"  # where D3 writes the reason (data/convert.py keeps datasets' own there too)


def training_chain(cfg: WorkflowConfig) -> list[str]:
    """The steps (letters) between D and E, in order, each reading the one before's output (D's first):
    D3 (RESPONSE_STYLE rationale) explains D's validated items; D2 (REPLAY_FRACTION > 0) adds replay
    items to what D3 kept (D3 drops items, and replay's share is of the final training items); D4
    (RESPONSES student | mixed) has the student answer the items the teacher's responses were for."""
    wanted = {"D3": cfg.response_style == "rationale", "D2": cfg.replay_fraction > 0, "D4": cfg.responses != "teacher"}
    return [letter for letter, on in wanted.items() if on]


def chain_outputs(it: paths.IterationPaths) -> dict[str, Path]:
    """What D and each step of the chain writes."""
    return {"D": it.validated, "D3": it.explained, "D2": it.replay_mix, "D4": it.on_policy_items}


def chain_inputs(cfg: WorkflowConfig, it: paths.IterationPaths) -> dict[str, Path]:
    """Each step of the chain and what it reads: the output of the step before it."""
    letters = ["D", *training_chain(cfg)]
    out = chain_outputs(it)
    return {letter: out[before] for before, letter in zip(letters, letters[1:])}


def training_items(cfg: WorkflowConfig, it: paths.IterationPaths) -> Path:
    """The file E and F read: the last output of D and its chain."""
    return chain_outputs(it)[(["D"] + training_chain(cfg))[-1]]


def training_data_steps(cfg: WorkflowConfig, it: paths.IterationPaths, data: str, ability: str, seed: int,
                        gpus: list[int], student: str | None = None) -> list[Step]:
    """The chain's steps (`training_chain`). Replay items keep their letter target, or the dataset's own
    explanation when USE_DATASET_EXPLANATION; D4 needs the iteration's `student`."""
    inputs, outputs = chain_inputs(cfg, it), chain_outputs(it)
    rationale = cfg.response_style == "rationale"
    configs = {
        "D3": lambda: configured(
            RationaleConfig, cfg, **teacher_settings(cfg), input_file=str(inputs["D3"]),
            output_file=str(outputs["D3"]), explanation_field=EXPLANATION_FIELD, gpu_ids=gpus),
        "D2": lambda: configured(ReplayConfig, cfg, validated_file=str(inputs["D2"]), dataset_path=data,
            ability_class_path=ability, ability_tree_path=str(it.scored_tree), output_path=str(outputs["D2"]),
            seed=seed, drop_field=EXPLANATION_FIELD if rationale and not cfg.use_dataset_explanation else ""),
        "D4": lambda: configured(StudentSamplingConfig, cfg, student_model_path=student,
            input_file=str(inputs["D4"]), output_file=str(outputs["D4"]),
            share=1.0 if cfg.responses == "student" else cfg.on_policy_share, seed=seed, gpu_ids=gpus),
    }
    return [stage_step(letter, it, configs[letter]()) for letter in training_chain(cfg)]


# ---------------------------------------------------------------------------------- F

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_step(cfg: WorkflowConfig, it: paths.IterationPaths, student: str, gpus: list[int]) -> Step:
    """F: train.py under `accelerate launch`, one process per GPU; on the CPU, one plain process.

    With the user's accelerate config file, the file decides processes, precision and the
    distributed backend (command-line values would override it); only the port stays ours, a
    free one, so two runs on one machine do not collide. One CPU process needs no launcher: it runs
    like any other stage (bad input exits 2 by itself, so no `--check_only` pass first), which saves
    the launcher's and the check's interpreters (about 4 s of imports); no GPU is visible to it.
    """
    weighs_reasons = cfg.response_style == "rationale" or cfg.responses != "teacher"
    train_cfg = configured(TrainConfig, cfg, student_model_path=student, train_file_path=str(training_items(cfg, it)),
        teacher_logits_dir=str(it.logits_dir), output_dir=str(it.student_dir), seed=cfg.seed + it.iteration - 1,
        reason_weight=cfg.reason_weight if weighs_reasons else 0.0)
    if not gpus and not cfg.accelerate_config_file:
        return stage_step("F", it, train_cfg, env={"CUDA_VISIBLE_DEVICES": ""})
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    if cfg.accelerate_config_file:
        launcher += ["--config_file", cfg.accelerate_config_file]
    else:  # GPUs here (one CPU process returned above)
        launcher += ["--num_machines", "1", "--dynamo_backend", "no", "--num_processes", str(len(gpus)),
                     "--mixed_precision", "bf16"]
        if len(gpus) > 1:
            launcher += ["--multi_gpu"]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else {}
    return stage_step("F", it, train_cfg, launcher=launcher, env=env, precheck_flags=["--check_only"])

"""main.py's workflow: its settings, the checks before any work, and the steps of each iteration.

`WorkflowConfig` declares every workflow setting once (help and check); main.py's UPPER_CASE
constants are its values. `iteration_steps` turns it into the stage configs of steps A-H (and L,
the teacher labelling questions that came without ability paths), and each stage's command line
is generated from its config (`atkd.cli.to_argv`), so what main.py runs, prints and fingerprints
is exactly what a person would run by hand. `run` checks everything first (no work starts on a bad
configuration: every file, every ability path against the tree, the tree's root against DOMAIN,
no evaluation question in an iteration file), then runs the steps in order, skipping those
already done (`atkd.steps`), and rewrites the report after every iteration.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from . import model_card, paths, tracking
from .answering import InferenceConfig
from .cli import PLACEMENTS, Check, StageConfig, above, at_least, between, setting
from .cross_check import CrossCheckConfig
from .errors import InputError
from .io import iter_jsonl, read_json, write_json, write_jsonl
from .kd_loss import KD_KINDS
from .labelling import LabelConfig
from .leakage import Repeat, check_iteration_files
from .question_writing import QuestionWritingConfig
from .rationale_writing import RationaleConfig
from .records import load_ability_paths, load_questions
from .replay import ReplayConfig
from .student_sampling import StudentSamplingConfig
from .steps import Step, StepFailed, run_step
from .teacher_logits import LogitsConfig
from .trainer import TrainConfig
from .tree import check_paths_file, is_scored, load_tree, single_top_key
from .tree_building import TreeConfig
from .weakness import AnalyzerConfig

RESPONSE_STYLES = ("letter", "rationale")
RESPONSE_SOURCES = ("teacher", "student", "mixed")  # RESPONSES: who writes the responses the student trains on
MODEL_SETTINGS = ("teacher_model_path", "student_model_path", "agent_model_1_path", "agent_model_2_path")
ENDPOINTS = ("teacher", "agent_1", "agent_2")  # <who>_api_base / <who>_api_model
SERVED_AGENTS = {"agent_model_1_path": "agent_1_api_base", "agent_model_2_path": "agent_2_api_base"}


@dataclass(kw_only=True)
class WorkflowConfig(StageConfig):
    """Everything main.py decides. No defaults here: main.py's constants are the values."""

    source = "main.py"
    # models
    teacher_model_path: str = setting(help="Hugging Face folder of the teacher: writes questions, gives logits")
    student_model_path: str = setting(help="Hugging Face folder of the student of iteration 1")
    agent_model_1_path: str = setting(help="first validation agent (model folder)")
    agent_model_2_path: str = setting(help="second validation agent; a different model from the first")
    # data
    domain: str = setting(help="domain name, the root of the ability tree")
    existing_ability_tree_path: str = setting(help="initial ability tree (nested JSON); empty: the teacher builds "
                                                   "one with create_initial_tree.py")
    dataset_files_per_iteration: list[str] = setting(help="question .jsonl per iteration")
    ability_class_files_per_iteration: list[str] = setting(help="ability-path .jsonl per iteration, same length; "
                                                                "an empty entry (an empty list: every iteration): "
                                                                "the teacher labels the questions (label_abilities.py)")
    eval_dataset_path: str = setting(help="held-out question .jsonl scored before and after each iteration; "
                                          "empty: none")
    eval_ability_class_path: str = setting(help="ability paths of the evaluation set; empty: the teacher labels it")
    drop_eval_overlap: bool = setting(help="iteration questions that repeat an evaluation question (atkd/leakage.py) "
                                           "are left out of filtered copies the steps read; off: such questions "
                                           "stop the run before any work")
    # the loop
    num_iterations: int = setting(check=at_least(1), help="rounds of measure -> generate -> validate -> distil")
    num_distill_samples: int = setting(check=at_least(1),
                                       help="questions the teacher writes per round (before validation)")
    gpus_to_use: list[int] = setting(help="GPU ids; ignored (CPU) when the machine has no CUDA")
    seed: int = setting(help="seed of every stage (sampling, shuffles, training); iteration N uses seed + N - 1")
    # stage knobs
    inference_batch_size: int = setting(check=at_least(1), help="questions per forward pass when scoring")
    generation_batch_size: int = setting(check=at_least(1), help="prompts per generate call when writing questions")
    max_retries: int = setting(check=at_least(0), help="extra generation rounds for abilities short of their target")
    gen_temperature: float = setting(check=at_least(0), help="sampling temperature of the teacher writing questions")
    min_confidence: float = setting(check=between(0.0, 1.0), help="both agents must give the labelled answer at "
                                                                  "least this probability (0: off)")
    top_k: int = setting(check=at_least(1), help="teacher log-probs kept per response token (token-level KD)")
    prior_strength: float = setting(check=at_least(0), help="pseudo-count of the Beta prior that shrinks a node's "
                                                            "accuracy toward its parent's")
    # training
    train_epochs: int = setting(check=at_least(1), help="epochs over the validated data per round")
    learning_rate: float = setting(check=above(0), help="peak learning rate")
    batch_size: int = setting(check=at_least(1), help="training micro-batch per process")
    gradient_accumulation_steps: int = setting(check=at_least(1), help="micro-batches per optimizer step")
    temperature: float = setting(check=above(0), help="distillation temperature T (the KD term is scaled by T^2)")
    alpha_ce: float = setting(check=between(0.0, 1.0), help="weight of the CE loss; 1 - ALPHA_CE weighs the KD loss")
    kd_loss: str = setting(choices=KD_KINDS, help="forward_kl | reverse_kl | jsd")
    save_steps: int = setting(check=at_least(1), help="optimizer steps between checkpoints")
    save_total_limit: int = setting(help="checkpoints kept (oldest deleted; <= 0 keeps all)")
    accelerate_config_file: str = setting(help="accelerate config for training (empty: one process per GPU)")
    # serving engines (OpenAI-compatible endpoints) and placement on GPUs
    teacher_api_base: str = setting(affects_output=False,
                                    help="endpoint of the served teacher, e.g. http://127.0.0.1:8000/v1: it builds "
                                         "the tree and writes the questions; its logits (step E) still come from "
                                         "TEACHER_MODEL_PATH; empty: the local folder does all")
    teacher_api_model: str = setting(help="the teacher's model name at TEACHER_API_BASE")
    agent_1_api_base: str = setting(affects_output=False,
                                    help="endpoint of agent 1 (it then answers in generate mode); empty: "
                                         "AGENT_MODEL_1_PATH, locally, in score mode")
    agent_1_api_model: str = setting(help="agent 1's model name at AGENT_1_API_BASE")
    agent_2_api_base: str = setting(affects_output=False, help="endpoint of agent 2, like AGENT_1_API_BASE")
    agent_2_api_model: str = setting(help="agent 2's model name at AGENT_2_API_BASE")
    api_key_env: str = setting(affects_output=False, help="environment variable holding the endpoints' API key")
    api_concurrency: int = setting(check=at_least(1), affects_output=False,
                                   help="requests in flight at once per endpoint")
    api_timeout_s: float = setting(check=above(0), affects_output=False,
                                   help="seconds one request may take before it is retried")
    api_max_attempts: int = setting(check=at_least(1), affects_output=False,
                                    help="tries per request (waits of 1 s, 2 s, 4 s, ... between) before the step fails")
    model_placement: str = setting(choices=PLACEMENTS, affects_output=False,
                                   help="local teacher and agents on several GPUs: per_gpu (a copy per GPU), spread "
                                        "(one copy over all of them), auto (spread when it does not fit one GPU)")
    lora_r: int = setting(check=at_least(0), help="LoRA rank of training (0: full fine-tuning; > 0 needs peft)")
    lora_alpha: float = setting(check=above(0), help="LoRA alpha: adapter updates are scaled by alpha / r")
    lora_dropout: float = setting(check=between(0.0, 0.99), help="dropout probability on the LoRA adapters' input")
    lora_target_modules: list[str] = setting(help="modules that get LoRA adapters, or all-linear")
    # the distillation signal
    alloc_temperature: float = setting(check=above(0), help="step C: samples per ability ~ weakness^(1/T); 1: "
                                                            "proportional, 1e6: uniform over the abilities")
    response_style: str = setting(choices=RESPONSE_STYLES, help="letter: the student learns the answer letter; "
                                                                "rationale: the letter, then the teacher's reason "
                                                                "(step D3; token-level KD)")
    use_dataset_explanation: bool = setting(help="rationale style: an item with its own explanation keeps it "
                                                 "instead of asking the teacher")
    reason_weight: float = setting(check=at_least(0), help="rationale style: weight of an item's reason tokens "
                                                           "together against its letter's 1 (0: every token weighs 1)")
    replay_fraction: float = setting(check=Check(lambda v: 0 <= v < 1, "in [0, 1)"),
                                     help="share of each round's training items replayed from the round's own "
                                          "questions, favouring abilities the student knows (step D2; 0: none)")
    responses: str = setting(choices=RESPONSE_SOURCES,
                             help="teacher: the student trains on the teacher's responses; student: on its own "
                                  "sampled rationale replies to the round's written items, scored token by token "
                                  "by the teacher (step D4, on-policy distillation); mixed: a seeded "
                                  "ON_POLICY_SHARE of them")
    on_policy_share: float = setting(check=Check(lambda v: 0 < v <= 1, "in (0, 1]"),
                                     help="RESPONSES mixed: share of the round's written items the student practises "
                                          "on-policy")
    on_policy_kd_loss: str = setting(choices=KD_KINDS, help="the divergence on the tokens of the student's own "
                                                            "responses (forward_kl | reverse_kl | jsd)")
    on_policy_temperature: float = setting(check=at_least(0), help="the student's sampling temperature in step D4 "
                                                                   "(1: its own distribution)")
    # outputs
    workflow_output_dir: str = setting(help="intermediate data, logs, the report")
    models_output_dir: str = setting(help="checkpoints and final models per iteration")
    report_to: str = tracking.report_to_setting(default=None)
    dry_run: bool = setting(False, affects_output=False, help="print the plan and every command; run nothing")

    @classmethod
    def flag(cls, name: str) -> str:
        return f"{name.upper()} (--{name})"

    def problems(self) -> list[str]:
        out = []
        n = self.num_iterations
        for name in ("dataset_files_per_iteration", "ability_class_files_per_iteration"):
            files = getattr(self, name)
            if len(files) != n and not (name == "ability_class_files_per_iteration" and not files):
                out.append(f"{name.upper()} lists {len(files)} file(s) but NUM_ITERATIONS is {n}: "
                           "give one file per iteration")
        for name in MODEL_SETTINGS:
            if not getattr(self, name) and not self.served(name):
                out.append(f"{name.upper()} is not set")
        for who in ENDPOINTS:
            if getattr(self, f"{who}_api_base") and not getattr(self, f"{who}_api_model"):
                out.append(f"{who.upper()}_API_BASE needs {who.upper()}_API_MODEL (the model name the server serves)")
        if self.min_confidence > 0 and self.agent_1_api_base and self.agent_2_api_base:
            out.append("MIN_CONFIDENCE needs an agent that scores locally (agents at endpoints answer in generate "
                       "mode, without probabilities): set it to 0 or clear one AGENT_N_API_BASE")
        if self.eval_ability_class_path and not self.eval_dataset_path:
            out.append("EVAL_ABILITY_CLASS_PATH is set but EVAL_DATASET_PATH is not: set both, or neither")
        if not self.existing_ability_tree_path and not self.domain:
            out.append("set EXISTING_ABILITY_TREE_PATH, or DOMAIN so create_initial_tree.py can build one")
        return out

    def served(self, model_setting: str) -> bool:
        """Whether an endpoint stands in for that agent's folder (the teacher's folder is always used:
        its logits, step E, are taken locally)."""
        return model_setting in SERVED_AGENTS and bool(getattr(self, SERVED_AGENTS[model_setting]))

    def outputs(self) -> list[Path]:
        return [Path(self.workflow_output_dir) / paths.REPORT_JSON]

    def locked_folders(self) -> list[Path]:
        """Both output folders, for the whole run (a dry run writes nothing and locks nothing)."""
        return [] if self.dry_run else [Path(self.workflow_output_dir), Path(self.models_output_dir)]


def ability_file(cfg: WorkflowConfig, k: int) -> str:
    """The ability paths of iteration k+1's questions; "" when the teacher is to label them."""
    files = cfg.ability_class_files_per_iteration
    return files[k] if files else ""


def given_ability_files(cfg: WorkflowConfig) -> list[str]:
    """Every ability-path file the user gave (iterations, then the evaluation set)."""
    given = [ability_file(cfg, k) for k in range(cfg.num_iterations)] + [cfg.eval_ability_class_path]
    return [f for f in given if f]


def check_inputs(cfg: WorkflowConfig) -> list[int]:
    """Every file and folder the run will read, before any work; returns the usable GPU ids ([] = CPU)."""
    from .api import endpoint
    from .models import check_model_dir, usable_gpu_ids

    for name in MODEL_SETTINGS:
        if not cfg.served(name):
            check_model_dir(getattr(cfg, name))
    for who in ENDPOINTS:
        if getattr(cfg, f"{who}_api_base") and not cfg.dry_run:  # a dry run may come before the servers
            endpoint(getattr(cfg, f"{who}_api_base"), getattr(cfg, f"{who}_api_model"), cfg).check_reachable()
    for data in cfg.dataset_files_per_iteration:
        load_questions(data)
    for ability in given_ability_files(cfg):
        load_ability_paths(ability)
    if cfg.eval_dataset_path:
        load_questions(cfg.eval_dataset_path)
    if cfg.existing_ability_tree_path:
        check_tree_domain(cfg.existing_ability_tree_path, cfg.domain)
        check_ability_paths(cfg, load_tree(cfg.existing_ability_tree_path, domain=cfg.domain or None),
                            cfg.existing_ability_tree_path)
    if cfg.accelerate_config_file and not Path(cfg.accelerate_config_file).is_file():
        raise InputError(cfg.accelerate_config_file, "accelerate config file not found")
    if cfg.lora_r:
        from .lora import require_peft

        require_peft()  # before any work, not hours later at training
    tracking.require_trackers(cfg.report_to, cfg.source)  # likewise: a tracker's package
    return usable_gpu_ids(cfg.gpus_to_use)


def check_tree_domain(tree_file: str, domain: str) -> None:
    """A tree file rooted at one name (one top key, or a scored tree) must be rooted at DOMAIN: the
    library would make such a file one level-1 ability under DOMAIN, a tree one level too deep."""
    obj = read_json(tree_file)
    root = obj["name"] if is_scored(obj) else single_top_key(obj)
    if domain and root is not None and str(root).strip() != domain.strip():
        raise InputError(tree_file, f"the tree's root (its one top key) is {root!r} but DOMAIN is {domain!r}: "
                                    f"set DOMAIN = {root!r} in main.py (--domain), or rename the tree's top key to "
                                    f"{domain!r} (a tree file that lists its level-1 abilities as top keys is rooted "
                                    "at DOMAIN)")


def check_ability_paths(cfg: WorkflowConfig, tree, tree_file: str | Path) -> None:
    """Every ability path of every given file names a node of the tree (else: file, line, closest names)."""
    for ability in given_ability_files(cfg):
        check_paths_file(tree, ability, tree_file)


def check_eval_overlap(cfg: WorkflowConfig) -> dict[str, list[Repeat]]:
    """The iteration questions that repeat evaluation questions, per iteration file (`atkd.leakage`);
    an `InputError` when there are any and DROP_EVAL_OVERLAP is off."""
    if not cfg.eval_dataset_path:
        return {}
    files = {f: load_questions(f) for f in cfg.dataset_files_per_iteration}
    return check_iteration_files(cfg.eval_dataset_path, load_questions(cfg.eval_dataset_path), files,
                                 cfg.drop_eval_overlap, "set DROP_EVAL_OVERLAP = True in main.py "
                                                        "(--drop_eval_overlap) to drop them from the iteration files")


# ---------------------------------------------------------------------------------- the plan

def api_settings(cfg: WorkflowConfig) -> dict:
    """How the stages talk to endpoints: key variable, concurrency, timeout, tries."""
    return dict(api_key_env=cfg.api_key_env, api_concurrency=cfg.api_concurrency, api_timeout_s=cfg.api_timeout_s,
                api_max_attempts=cfg.api_max_attempts)


def teacher_settings(cfg: WorkflowConfig) -> dict:
    """Where the generating teacher is: its endpoint (then no folder: the endpoint's model name is its
    identity in the fingerprint), else its folder, placed on the GPUs by MODEL_PLACEMENT."""
    if cfg.teacher_api_base:
        return dict(api_base=cfg.teacher_api_base, api_model=cfg.teacher_api_model, **api_settings(cfg))
    return dict(model_placement=cfg.model_placement)


def agent_settings(cfg: WorkflowConfig) -> dict:
    """Each agent: its endpoint (generate mode) or its folder (score mode), and how to reach or place it."""
    out = dict(model_placement=cfg.model_placement, **api_settings(cfg))
    for n in (1, 2):
        base = getattr(cfg, f"agent_{n}_api_base")
        out[f"agent_model_{n}_path"] = "" if base else getattr(cfg, f"agent_model_{n}_path")
        out[f"agent_{n}_api_base"] = base
        out[f"agent_{n}_api_model"] = getattr(cfg, f"agent_{n}_api_model") if base else ""
    return out


def tree_step(cfg: WorkflowConfig, workflow: Path, gpus: list[int]) -> Step:
    """Build the initial tree with the teacher when no tree file is given."""
    out = workflow / "initial_tree"
    tree_cfg = TreeConfig(model_path=cfg.teacher_model_path, domain=cfg.domain, output_dir=str(out),
                          output_filename=paths.INITIAL_TREE, seed=cfg.seed, gpu_ids=gpus, **teacher_settings(cfg))
    return Step("initial_tree", "create_initial_tree.py", tree_cfg, log_path=workflow / "initial_tree.log")


@dataclass
class RoundFiles:
    """The question and ability-path files a set of steps reads, and the step that writes the paths
    when the user gave none (the teacher labels the questions)."""

    questions: str
    ability_paths: str
    label_step: Step | None = None


def label_step(cfg: WorkflowConfig, name: str, questions: str, output: Path, tree: Path, gpus: list[int],
               log_path: Path) -> Step:
    """L: the teacher places questions that came without ability paths in the tree."""
    labels = LabelConfig(model_path=cfg.teacher_model_path, ability_tree_path=str(tree), dataset_path=questions,
                         output_path=str(output), batch_size=cfg.inference_batch_size, gpu_ids=gpus)
    return Step(name, "label_abilities.py", labels, log_path=log_path)


def round_files(cfg: WorkflowConfig, it: paths.IterationPaths, tree: Path, gpus: list[int],
                dropped: bool) -> RoundFiles:
    """Iteration N's files: the user's, or their copies without repeats of evaluation questions
    (`dropped`), with the teacher's labels where no ability-path file was given."""
    k = it.iteration - 1
    questions, ability = cfg.dataset_files_per_iteration[k], ability_file(cfg, k)
    if dropped:
        questions, ability = str(it.kept_questions), str(it.kept_ability_paths) if ability else ""
    if ability:
        return RoundFiles(questions, ability)
    return RoundFiles(questions, str(it.labels), label_step(cfg, "L_ability_labels", questions, it.labels, tree, gpus,
                                                            it.log_file("L_ability_labels")))


def eval_files(cfg: WorkflowConfig, workflow: Path, tree: Path, gpus: list[int]) -> RoundFiles:
    """The evaluation set's files, with the teacher's labels when EVAL_ABILITY_CLASS_PATH is empty."""
    if cfg.eval_ability_class_path:
        return RoundFiles(cfg.eval_dataset_path, cfg.eval_ability_class_path)
    out = paths.eval_labels(workflow)
    return RoundFiles(cfg.eval_dataset_path, str(out), label_step(cfg, "L_eval_ability_labels", cfg.eval_dataset_path,
                                                                  out, tree, gpus, workflow / "L_eval_ability_labels.log"))


def eval_steps(cfg: WorkflowConfig, ev: paths.EvalPaths, student: str, tree: Path, gpus: list[int],
               log_dir: Path, ability_paths: str) -> list[Step]:
    """G, H: the student's answers on the evaluation set, then their per-ability scores."""
    reply = InferenceConfig(model_path=student, dataset_path=cfg.eval_dataset_path, output_path=str(ev.replies),
                            batch_size=cfg.inference_batch_size, seed=cfg.seed, gpu_ids=gpus)
    scored = AnalyzerConfig(initial_tree_path=str(tree), paths_file=ability_paths,
                            answers_file=cfg.eval_dataset_path, student_responses_file=str(ev.replies),
                            output_tree_path=str(ev.scored_tree), output_stats_path=str(ev.stats),
                            prior_strength=cfg.prior_strength)
    return [Step("G_eval_reply", "inference.py", reply, log_path=log_dir / "G_eval_reply.log"),
            Step("H_eval_tree", "student_data_analyzer.py", scored, log_path=log_dir / "H_eval_tree.log")]


def teacher_eval_steps(cfg: WorkflowConfig, workflow: Path, tree: Path, gpus: list[int],
                       ability_paths: str) -> list[Step]:
    """G, H for the teacher, once per run: its accuracy per ability bounds what distillation can teach."""
    steps = eval_steps(cfg, paths.teacher_eval(workflow), cfg.teacher_model_path, tree, gpus, workflow, ability_paths)
    return [replace(s, name=name, log_path=workflow / f"{name}.log")
            for s, name in zip(steps, ("G_teacher_eval_reply", "H_teacher_eval_tree"))]


def iteration_steps(cfg: WorkflowConfig, it: paths.IterationPaths, student: str, tree: Path,
                    gpus: list[int], files: RoundFiles) -> list[Step]:
    """(L,) A-F for one iteration: (label,) measure, score, write, validate, take the teacher's logits, train."""
    k = it.iteration - 1
    data, ability = files.questions, files.ability_paths
    seed = cfg.seed + k  # each round samples afresh, reproducibly
    return ([files.label_step] if files.label_step else []) + [
        Step("A_student_reply", "inference.py", InferenceConfig(
            model_path=student, dataset_path=data, output_path=str(it.replies),
            batch_size=cfg.inference_batch_size, seed=seed, gpu_ids=gpus), log_path=it.log_file("A_student_reply")),
        Step("B_student_tree", "student_data_analyzer.py", AnalyzerConfig(
            initial_tree_path=str(tree), paths_file=ability, answers_file=data,
            student_responses_file=str(it.replies), output_tree_path=str(it.scored_tree),
            output_stats_path=str(it.tree_stats), prior_strength=cfg.prior_strength),
            log_path=it.log_file("B_student_tree")),
        Step("C_distill_data", "generate_distill_data.py", QuestionWritingConfig(
            teacher_model_path="" if cfg.teacher_api_base else cfg.teacher_model_path,
            ability_tree_path=str(it.scored_tree),
            full_dataset_path=data, ability_class_path=ability, output_path=str(it.generated),
            eval_dataset_path=cfg.eval_dataset_path,
            num_samples=cfg.num_distill_samples, max_retries=cfg.max_retries, batch_size=cfg.generation_batch_size,
            temperature=cfg.gen_temperature, seed=seed, id_prefix=f"it{it.iteration}", gpu_ids=gpus,
            alloc_temperature=cfg.alloc_temperature, **teacher_settings(cfg)), log_path=it.log_file("C_distill_data")),
        Step("D_validated_data", "evaluate_distilled_data.py", CrossCheckConfig(
            input_file=str(it.generated), output_file=str(it.validated), min_confidence=cfg.min_confidence,
            batch_size=cfg.inference_batch_size, gpu_ids=gpus, **agent_settings(cfg)),
            log_path=it.log_file("D_validated_data")),
        *training_data_steps(cfg, it, data, ability, seed, gpus),
        *on_policy_steps(cfg, it, student, seed, gpus),
        Step("E_teacher_logits", "generate_logits.py", LogitsConfig(
            model_path=cfg.teacher_model_path, dataset_path=str(training_items(cfg, it)), output_dir=str(it.logits_dir),
            top_k=cfg.top_k, batch_size=cfg.inference_batch_size, gpu_ids=gpus, model_placement=cfg.model_placement,
            response_field=EXPLANATION_FIELD if cfg.response_style == "rationale" else None),
            log_path=it.log_file("E_teacher_logits")),
        train_step(cfg, it, student, gpus),
    ]


EXPLANATION_FIELD = "explanation"  # where D3 writes the reason (data/convert.py keeps datasets' own there too)


def training_items(cfg: WorkflowConfig, it: paths.IterationPaths) -> Path:
    """The file E and F read: D's validated items, plus D2's replay items, with D3's rationales, with D4's
    student responses."""
    if cfg.responses != "teacher":
        return it.on_policy_items
    return teacher_items(cfg, it)


def on_policy_steps(cfg: WorkflowConfig, it: paths.IterationPaths, student: str, seed: int,
                    gpus: list[int]) -> list[Step]:
    """D4 (RESPONSES student | mixed): the iteration's input student answers its practice items itself."""
    if cfg.responses == "teacher":
        return []
    return [Step("D4_student_responses", "sample_student_responses.py", StudentSamplingConfig(
        student_model_path=student, input_file=str(teacher_items(cfg, it)), output_file=str(it.on_policy_items),
        share=1.0 if cfg.responses == "student" else cfg.on_policy_share, seed=seed,
        temperature=cfg.on_policy_temperature, batch_size=cfg.generation_batch_size, gpu_ids=gpus),
        log_path=it.log_file("D4_student_responses"))]


def teacher_items(cfg: WorkflowConfig, it: paths.IterationPaths) -> Path:
    """The training items with the teacher's responses: the last of D (validated), D3 (rationales) and D2
    (replay) that runs."""
    if cfg.replay_fraction > 0:
        return it.replay_mix
    return it.explained if cfg.response_style == "rationale" else it.validated


def training_data_steps(cfg: WorkflowConfig, it: paths.IterationPaths, data: str, ability: str, seed: int,
                        gpus: list[int]) -> list[Step]:
    """D3 (rationales, when RESPONSE_STYLE is rationale) on D's validated items, then D2 (replay, when
    REPLAY_FRACTION > 0) on what D3 kept: D3 drops items, and replay's share is of the final training items.
    Replay items keep their letter target, or the dataset's own explanation when USE_DATASET_EXPLANATION."""
    steps, items = [], it.validated
    rationale = cfg.response_style == "rationale"
    if rationale:
        steps.append(Step("D3_rationales", "generate_rationales.py", RationaleConfig(
            teacher_model_path="" if cfg.teacher_api_base else cfg.teacher_model_path, input_file=str(items),
            output_file=str(it.explained), explanation_field=EXPLANATION_FIELD,
            use_dataset_explanation=cfg.use_dataset_explanation, batch_size=cfg.generation_batch_size, gpu_ids=gpus,
            **teacher_settings(cfg)), log_path=it.log_file("D3_rationales")))
        items = it.explained
    if cfg.replay_fraction > 0:
        steps.append(Step("D2_replay", "add_replay.py", ReplayConfig(
            validated_file=str(items), dataset_path=data, ability_class_path=ability,
            ability_tree_path=str(it.scored_tree), output_path=str(it.replay_mix),
            replay_fraction=cfg.replay_fraction, seed=seed,
            drop_field=EXPLANATION_FIELD if rationale and not cfg.use_dataset_explanation else ""),
            log_path=it.log_file("D2_replay")))
    return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_step(cfg: WorkflowConfig, it: paths.IterationPaths, student: str, gpus: list[int]) -> Step:
    """F: train.py under `accelerate launch`, one process per GPU (or one CPU process).

    With the user's accelerate config file, the file decides processes, precision and the
    distributed backend (command-line values would override it); only the port stays ours, a
    free one, so two runs on one machine do not collide.
    """
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    if cfg.accelerate_config_file:
        launcher += ["--config_file", cfg.accelerate_config_file]
    else:
        launcher += ["--num_machines", "1", "--dynamo_backend", "no", "--num_processes", str(max(1, len(gpus)))]
        launcher += ["--mixed_precision", "bf16"] if gpus else ["--cpu", "--mixed_precision", "no"]
        if len(gpus) > 1:
            launcher += ["--multi_gpu"]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else {}
    train_cfg = TrainConfig(
        student_model_path=student, train_file_path=str(training_items(cfg, it)), teacher_logits_dir=str(it.logits_dir),
        output_dir=str(it.student_dir), temperature=cfg.temperature, alpha_ce=cfg.alpha_ce, kd_loss=cfg.kd_loss,
        num_epochs=cfg.train_epochs, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed + it.iteration - 1, lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
        reason_weight=cfg.reason_weight if cfg.response_style == "rationale" or cfg.responses != "teacher" else 0.0,
        on_policy_kd_loss=cfg.on_policy_kd_loss)
    return Step("F_train", "train.py", train_cfg, log_path=it.log_file("F_train"), launcher=launcher, env=env,
                precheck_flags=["--check_only"])


# ---------------------------------------------------------------------------------- running

def prepare_tree(cfg: WorkflowConfig, workflow: Path, gpus: list[int]) -> Path:
    """`initial_ability_tree.json` in the workflow folder: the given tree (normalised) or a built one."""
    target = workflow / paths.INITIAL_TREE
    if cfg.existing_ability_tree_path:
        nested = load_tree(cfg.existing_ability_tree_path, domain=cfg.domain or None).to_nested()
    else:
        step = tree_step(cfg, workflow, gpus)
        run_step(step, cfg.dry_run)
        if cfg.dry_run:
            return target
        nested = load_tree(step.cfg.outputs()[0]).to_nested()
    if cfg.dry_run:
        print(f"[plan] initial tree -> {target}", flush=True)
    elif not target.exists() or load_tree(target).to_nested() != nested:
        write_json(target, nested)  # rewritten only when it changed: its content feeds step B's fingerprint
    return target


def drop_repeats(cfg: WorkflowConfig, it: paths.IterationPaths, repeats: list[Repeat]) -> str:
    """DROP_EVAL_OVERLAP: iteration N's questions (and given ability paths) without those that repeat
    evaluation questions, written under iteration_N/data/ with the list of the dropped; returns what
    main.py prints."""
    k = it.iteration - 1
    source, ability = cfg.dataset_files_per_iteration[k], ability_file(cfg, k)
    gone = {r.key: r for r in repeats}
    questions = load_questions(source)
    if len(gone) == len(questions):
        raise InputError(source, "every question of the file repeats an evaluation question: nothing is left to use")
    plan = (f"dropping {len(gone)} of {len(questions)} questions of {source} that repeat evaluation questions; "
            f"iteration {it.iteration} reads {it.kept_questions} (the dropped: {it.dropped_overlap})")
    if cfg.dry_run:
        return f"[plan] {plan}"
    write_jsonl(it.kept_questions, [q.to_dict() for q in questions if q.key not in gone])
    write_jsonl(it.dropped_overlap, [{"id": q.id, "repeats_eval_id": gone[q.key].eval_key, "exact": gone[q.key].exact,
                                      "similarity": gone[q.key].similarity, "question": q.question}
                                     for q in questions if q.key in gone])
    if ability:
        write_jsonl(it.kept_ability_paths, [obj for _, obj in iter_jsonl(ability) if str(obj.get("id")) not in gone])
    return plan


def run(cfg: WorkflowConfig) -> int:
    """Check, then run every step of every iteration; returns the exit status."""
    from .report import write_report

    gpus = check_inputs(cfg)
    repeats = check_eval_overlap(cfg)
    workflow, models = Path(cfg.workflow_output_dir), Path(cfg.models_output_dir)
    where = f"GPUs {gpus}" if gpus else "the CPU"
    print(f"AT-KD: {cfg.num_iterations} iteration(s) on {where}; outputs in {workflow} and {models}", flush=True)
    try:
        tree = prepare_tree(cfg, workflow, gpus)
        if not cfg.existing_ability_tree_path and not cfg.dry_run:  # a tree the teacher built: check against it now
            check_ability_paths(cfg, load_tree(tree), tree)
        its = [paths.IterationPaths(workflow, models, i) for i in range(1, cfg.num_iterations + 1)]
        dropped = [bool(repeats.get(cfg.dataset_files_per_iteration[it.iteration - 1])) for it in its]
        for it, drop in zip(its, dropped):
            if drop:
                print(drop_repeats(cfg, it, repeats[cfg.dataset_files_per_iteration[it.iteration - 1]]), flush=True)
        with_eval = bool(cfg.eval_dataset_path)
        if with_eval:
            ev = eval_files(cfg, workflow, tree, gpus)
            baseline = eval_steps(cfg, paths.baseline_eval(workflow), cfg.student_model_path, tree, gpus, workflow,
                                  ev.ability_paths)
            for step in ([ev.label_step] if ev.label_step else []) + baseline:
                run_step(step, cfg.dry_run)
            for step in teacher_eval_steps(cfg, workflow, tree, gpus, ev.ability_paths):
                run_step(step, cfg.dry_run)
        student = cfg.student_model_path
        for it, drop in zip(its, dropped):
            i = it.iteration
            print(f"=== iteration {i}/{cfg.num_iterations}: student {student}", flush=True)
            steps = iteration_steps(cfg, it, student, tree, gpus, round_files(cfg, it, tree, gpus, drop))
            if with_eval:
                steps += eval_steps(cfg, it.eval, str(it.final_model), tree, gpus, it.dir, ev.ability_paths)
            ran = [run_step(step, cfg.dry_run) != "done" for step in with_tracking(cfg, steps, workflow, models, i)]
            student = str(it.final_model)  # the next round distils into this round's result
            if not cfg.dry_run:
                print(write_report(workflow, models, cfg.num_iterations, with_eval), flush=True)
                after_iteration(cfg, workflow, models, i, track=any(ran))
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.code if err.code > 0 else 1
    if not cfg.dry_run:
        print(f"done: report in {workflow / paths.REPORT_MD} and {workflow / paths.REPORT_JSON}", flush=True)
    return 0


# ---------------------------------------------------------------------------------- trackers and model cards

def with_tracking(cfg: WorkflowConfig, steps: list[Step], workflow: Path, models: Path, iteration: int) -> list[Step]:
    """The steps, with REPORT_TO given to training (F): the run's tracking folder, and the optimizer steps of
    the earlier iterations, so the trackers count the whole run's steps in one sequence."""
    if not tracking.tracker_names(cfg.report_to):
        return steps
    folder = tracking.tracking_dir(workflow)
    if not cfg.dry_run:
        tracking.run_identity(folder)  # made once, before the first training: one run for every process
    return [replace(s, cfg=replace(s.cfg, report_to=cfg.report_to, tracking_dir=str(folder),
                                   tracking_step_offset=tracking.steps_through(models, iteration - 1)))
            if isinstance(s.cfg, TrainConfig) else s for s in steps]


def after_iteration(cfg: WorkflowConfig, workflow: Path, models: Path, iteration: int, track: bool) -> None:
    """After the iteration's evaluation and report: its model card, and, when a step of it ran (`track`; a
    rerun that skips the iteration has logged it before), its scalars to the trackers."""
    from dataclasses import fields

    report = read_json(workflow / paths.REPORT_JSON)
    model_card.write_iteration_cards(cfg, report, iteration, models)
    if not track:
        return
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("affects_output", True)}
    tracking.log_iteration(cfg.report_to, workflow, models, report, iteration, settings)

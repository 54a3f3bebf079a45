"""main.py's workflow: its settings, the checks before any work, and the steps of each iteration.

`WorkflowConfig` declares every workflow setting once (help and check); main.py's UPPER_CASE
constants are its values. `iteration_steps` turns it into the stage configs of steps A-H, and
each stage's command line is generated from its config (`atkd.cli.to_argv`), so what main.py
runs, prints and fingerprints is exactly what a person would run by hand. `run` checks
everything first (no work starts on a bad configuration), then runs the steps in order,
skipping those already done (`atkd.steps`), and rewrites the report after every iteration.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from . import paths
from .answering import InferenceConfig
from .cli import Check, StageConfig, above, at_least, between, setting
from .cross_check import CrossCheckConfig
from .errors import InputError
from .io import write_json
from .kd_loss import KD_KINDS
from .question_writing import QuestionWritingConfig
from .rationale_writing import RationaleConfig
from .records import load_ability_paths, load_questions
from .replay import ReplayConfig
from .steps import Step, StepFailed, run_step
from .teacher_logits import LogitsConfig
from .trainer import TrainConfig
from .tree import load_tree
from .tree_building import TreeConfig
from .weakness import AnalyzerConfig

RESPONSE_STYLES = ("letter", "rationale")
MODEL_SETTINGS = ("teacher_model_path", "student_model_path", "agent_model_1_path", "agent_model_2_path")


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
    ability_class_files_per_iteration: list[str] = setting(help="ability-path .jsonl per iteration, same length")
    eval_dataset_path: str = setting(help="held-out question .jsonl scored before and after each iteration; "
                                          "empty: none")
    eval_ability_class_path: str = setting(help="ability paths of the evaluation set")
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
    # outputs
    workflow_output_dir: str = setting(help="intermediate data, logs, the report")
    models_output_dir: str = setting(help="checkpoints and final models per iteration")
    dry_run: bool = setting(False, affects_output=False, help="print the plan and every command; run nothing")

    @classmethod
    def flag(cls, name: str) -> str:
        return f"{name.upper()} (--{name})"

    def problems(self) -> list[str]:
        out = []
        n = self.num_iterations
        for name in ("dataset_files_per_iteration", "ability_class_files_per_iteration"):
            files = getattr(self, name)
            if len(files) != n:
                out.append(f"{name.upper()} lists {len(files)} file(s) but NUM_ITERATIONS is {n}: "
                           "give one file per iteration")
        for name in MODEL_SETTINGS:
            if not getattr(self, name):
                out.append(f"{name.upper()} is not set")
        if bool(self.eval_dataset_path) != bool(self.eval_ability_class_path):
            out.append("set both EVAL_DATASET_PATH and EVAL_ABILITY_CLASS_PATH, or neither")
        if not self.existing_ability_tree_path and not self.domain:
            out.append("set EXISTING_ABILITY_TREE_PATH, or DOMAIN so create_initial_tree.py can build one")
        return out

    def outputs(self) -> list[Path]:
        return [Path(self.workflow_output_dir) / paths.REPORT_JSON]


def check_inputs(cfg: WorkflowConfig) -> list[int]:
    """Every file and folder the run will read, before any work; returns the usable GPU ids ([] = CPU)."""
    from .models import check_model_dir, usable_gpu_ids

    for name in MODEL_SETTINGS:
        check_model_dir(getattr(cfg, name))
    for data, ability in zip(cfg.dataset_files_per_iteration, cfg.ability_class_files_per_iteration):
        load_questions(data)
        load_ability_paths(ability)
    if cfg.eval_dataset_path:
        load_questions(cfg.eval_dataset_path)
        load_ability_paths(cfg.eval_ability_class_path)
    if cfg.existing_ability_tree_path:
        load_tree(cfg.existing_ability_tree_path, domain=cfg.domain or None)
    if cfg.accelerate_config_file and not Path(cfg.accelerate_config_file).is_file():
        raise InputError(cfg.accelerate_config_file, "accelerate config file not found")
    return usable_gpu_ids(cfg.gpus_to_use)


# ---------------------------------------------------------------------------------- the plan

def tree_step(cfg: WorkflowConfig, workflow: Path, gpus: list[int]) -> Step:
    """Build the initial tree with the teacher when no tree file is given."""
    out = workflow / "initial_tree"
    tree_cfg = TreeConfig(model_path=cfg.teacher_model_path, domain=cfg.domain, output_dir=str(out),
                          output_filename=paths.INITIAL_TREE, seed=cfg.seed, gpu_ids=gpus[:1])
    return Step("initial_tree", "create_initial_tree.py", tree_cfg, log_path=workflow / "initial_tree.log")


def eval_steps(cfg: WorkflowConfig, ev: paths.EvalPaths, student: str, tree: Path, gpus: list[int],
               log_dir: Path) -> list[Step]:
    """G, H: the student's answers on the evaluation set, then their per-ability scores."""
    reply = InferenceConfig(model_path=student, dataset_path=cfg.eval_dataset_path, output_path=str(ev.replies),
                            batch_size=cfg.inference_batch_size, seed=cfg.seed, gpu_ids=gpus)
    scored = AnalyzerConfig(initial_tree_path=str(tree), paths_file=cfg.eval_ability_class_path,
                            answers_file=cfg.eval_dataset_path, student_responses_file=str(ev.replies),
                            output_tree_path=str(ev.scored_tree), output_stats_path=str(ev.stats),
                            prior_strength=cfg.prior_strength)
    return [Step("G_eval_reply", "inference.py", reply, log_path=log_dir / "G_eval_reply.log"),
            Step("H_eval_tree", "student_data_analyzer.py", scored, log_path=log_dir / "H_eval_tree.log")]


def teacher_eval_steps(cfg: WorkflowConfig, workflow: Path, tree: Path, gpus: list[int]) -> list[Step]:
    """G, H for the teacher, once per run: its accuracy per ability bounds what distillation can teach."""
    steps = eval_steps(cfg, paths.teacher_eval(workflow), cfg.teacher_model_path, tree, gpus, workflow)
    return [replace(s, name=name, log_path=workflow / f"{name}.log")
            for s, name in zip(steps, ("G_teacher_eval_reply", "H_teacher_eval_tree"))]


def iteration_steps(cfg: WorkflowConfig, it: paths.IterationPaths, student: str, tree: Path,
                    gpus: list[int]) -> list[Step]:
    """A-F for one iteration: measure, score, write, validate, take the teacher's logits, train."""
    k = it.iteration - 1
    data, ability = cfg.dataset_files_per_iteration[k], cfg.ability_class_files_per_iteration[k]
    seed = cfg.seed + k  # each round samples afresh, reproducibly
    return [
        Step("A_student_reply", "inference.py", InferenceConfig(
            model_path=student, dataset_path=data, output_path=str(it.replies),
            batch_size=cfg.inference_batch_size, seed=seed, gpu_ids=gpus), log_path=it.log_file("A_student_reply")),
        Step("B_student_tree", "student_data_analyzer.py", AnalyzerConfig(
            initial_tree_path=str(tree), paths_file=ability, answers_file=data,
            student_responses_file=str(it.replies), output_tree_path=str(it.scored_tree),
            output_stats_path=str(it.tree_stats), prior_strength=cfg.prior_strength),
            log_path=it.log_file("B_student_tree")),
        Step("C_distill_data", "generate_distill_data.py", QuestionWritingConfig(
            teacher_model_path=cfg.teacher_model_path, ability_tree_path=str(it.scored_tree),
            full_dataset_path=data, ability_class_path=ability, output_path=str(it.generated),
            num_samples=cfg.num_distill_samples, max_retries=cfg.max_retries, batch_size=cfg.generation_batch_size,
            temperature=cfg.gen_temperature, seed=seed, id_prefix=f"it{it.iteration}", gpu_ids=gpus,
            alloc_temperature=cfg.alloc_temperature), log_path=it.log_file("C_distill_data")),
        Step("D_validated_data", "evaluate_distilled_data.py", CrossCheckConfig(
            agent_model_1_path=cfg.agent_model_1_path, agent_model_2_path=cfg.agent_model_2_path,
            input_file=str(it.generated), output_file=str(it.validated), min_confidence=cfg.min_confidence,
            batch_size=cfg.inference_batch_size, gpu_ids=gpus), log_path=it.log_file("D_validated_data")),
        *training_data_steps(cfg, it, data, ability, seed, gpus),
        Step("E_teacher_logits", "generate_logits.py", LogitsConfig(
            model_path=cfg.teacher_model_path, dataset_path=str(training_items(cfg, it)), output_dir=str(it.logits_dir),
            top_k=cfg.top_k, batch_size=cfg.inference_batch_size, gpu_ids=gpus,
            response_field=EXPLANATION_FIELD if cfg.response_style == "rationale" else None),
            log_path=it.log_file("E_teacher_logits")),
        train_step(cfg, it, student, gpus),
    ]


EXPLANATION_FIELD = "explanation"  # where D3 writes the reason (data/convert.py keeps datasets' own there too)


def training_items(cfg: WorkflowConfig, it: paths.IterationPaths) -> Path:
    """The file E and F read: D's validated items, plus D2's replay items, with D3's rationales."""
    if cfg.response_style == "rationale":
        return it.explained
    return it.replay_mix if cfg.replay_fraction > 0 else it.validated


def training_data_steps(cfg: WorkflowConfig, it: paths.IterationPaths, data: str, ability: str, seed: int,
                        gpus: list[int]) -> list[Step]:
    """D2 (replay, when REPLAY_FRACTION > 0) and D3 (rationales, when RESPONSE_STYLE is rationale)."""
    steps, items = [], it.validated
    if cfg.replay_fraction > 0:
        steps.append(Step("D2_replay", "add_replay.py", ReplayConfig(
            validated_file=str(items), dataset_path=data, ability_class_path=ability,
            ability_tree_path=str(it.scored_tree), output_path=str(it.replay_mix),
            replay_fraction=cfg.replay_fraction, seed=seed), log_path=it.log_file("D2_replay")))
        items = it.replay_mix
    if cfg.response_style == "rationale":
        steps.append(Step("D3_rationales", "generate_rationales.py", RationaleConfig(
            teacher_model_path=cfg.teacher_model_path, input_file=str(items), output_file=str(it.explained),
            explanation_field=EXPLANATION_FIELD, use_dataset_explanation=cfg.use_dataset_explanation,
            batch_size=cfg.generation_batch_size, gpu_ids=gpus), log_path=it.log_file("D3_rationales")))
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
        save_total_limit=cfg.save_total_limit, seed=cfg.seed + it.iteration - 1,
        reason_weight=cfg.reason_weight if cfg.response_style == "rationale" else 0.0)
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


def run(cfg: WorkflowConfig) -> int:
    """Check, then run every step of every iteration; returns the exit status."""
    from .report import write_report

    gpus = check_inputs(cfg)
    workflow, models = Path(cfg.workflow_output_dir), Path(cfg.models_output_dir)
    where = f"GPUs {gpus}" if gpus else "the CPU"
    print(f"AT-KD: {cfg.num_iterations} iteration(s) on {where}; outputs in {workflow} and {models}", flush=True)
    try:
        tree = prepare_tree(cfg, workflow, gpus)
        with_eval = bool(cfg.eval_dataset_path)
        if with_eval:
            for step in eval_steps(cfg, paths.baseline_eval(workflow), cfg.student_model_path, tree, gpus, workflow):
                run_step(step, cfg.dry_run)
            for step in teacher_eval_steps(cfg, workflow, tree, gpus):
                run_step(step, cfg.dry_run)
        student = cfg.student_model_path
        for i in range(1, cfg.num_iterations + 1):
            it = paths.IterationPaths(workflow, models, i)
            print(f"=== iteration {i}/{cfg.num_iterations}: student {student}", flush=True)
            steps = iteration_steps(cfg, it, student, tree, gpus)
            if with_eval:
                steps += eval_steps(cfg, it.eval, str(it.final_model), tree, gpus, it.dir)
            for step in steps:
                run_step(step, cfg.dry_run)
            student = str(it.final_model)  # the next round distils into this round's result
            if not cfg.dry_run:
                print(write_report(workflow, models, cfg.num_iterations, with_eval), flush=True)
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.code if err.code > 0 else 1
    if not cfg.dry_run:
        print(f"done: report in {workflow / paths.REPORT_MD} and {workflow / paths.REPORT_JSON}", flush=True)
    return 0

"""The workflow main.py runs: its configuration, validation, and the steps of each iteration.

`build_plan(cfg)` turns a `WorkflowConfig` into the list of `atkd.workflow.Step`s (DESIGN §3);
`run(cfg)` validates everything first (no work starts on a bad configuration), then runs the
steps in order, skipping those already done, and writes the report after every iteration.
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import paths
from .errors import InputError
from .records import load_ability_paths, load_questions
from .tree import load_tree
from .workflow import Step, StepFailed, run_step

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent  # the stage scripts live at the repository root


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class WorkflowConfig:
    """Everything main.py passes on to the stages; main.py's constants are its defaults."""

    # models
    teacher_model_path: str = _f("", "Hugging Face folder of the teacher: writes questions, gives logits")
    student_model_path: str = _f("", "Hugging Face folder of the student of iteration 1")
    agent_model_1_path: str = _f("", "first validation agent (model folder)")
    agent_model_2_path: str = _f("", "second validation agent; a different model from the first")
    # data
    domain: str = _f("", "domain name, the root of the ability tree (used when the tree file has no root)")
    existing_ability_tree_path: str = _f("", "initial ability tree (nested JSON); empty: build one with create_initial_tree.py")
    dataset_files_per_iteration: list = _f(None, "question .jsonl per iteration (comma-separated on the command line)")
    ability_class_files_per_iteration: list = _f(None, "ability-path .jsonl per iteration, same length")
    eval_dataset_path: str = _f("", "held-out question .jsonl scored before and after each iteration; empty: none")
    eval_ability_class_path: str = _f("", "ability paths of the evaluation set")
    # the loop
    num_iterations: int = _f(2, "rounds of measure -> generate -> validate -> distil")
    num_distill_samples: int = _f(100, "questions the teacher writes per round (before validation)")
    gpus_to_use: list = _f(None, "GPU ids; ignored (CPU) when the machine has no CUDA")
    seed: int = _f(0, "seed of every stage (sampling, shuffles, training)")
    # stage knobs
    inference_batch_size: int = _f(16, "questions per forward pass when scoring")
    generation_batch_size: int = _f(16, "prompts per generate call when writing questions")
    max_retries: int = _f(3, "extra generation rounds for abilities short of their target")
    gen_temperature: float = _f(0.8, "sampling temperature of the teacher when writing questions")
    min_confidence: float = _f(0.0, "both agents must give the labelled answer at least this probability (0: off)")
    top_k: int = _f(20, "teacher log-probs kept per response token (token-level KD)")
    prior_strength: float = _f(4.0, "pseudo-count of the Beta prior that shrinks a node's accuracy toward its parent's")
    # training
    train_epochs: int = _f(3, "epochs over the validated data per round")
    learning_rate: float = _f(5e-6, "peak learning rate")
    batch_size: int = _f(2, "micro-batch per process")
    gradient_accumulation_steps: int = _f(16, "micro-batches per optimizer step")
    temperature: float = _f(2.0, "distillation temperature T (the KD term is scaled by T^2)")
    alpha_ce: float = _f(0.5, "weight of the CE loss; 1 - alpha_ce weighs the KD loss")
    kd_loss: str = _f("forward_kl", "forward_kl | reverse_kl | jsd")
    save_steps: int = _f(1000, "optimizer steps between checkpoints")
    save_total_limit: int = _f(2, "checkpoints kept (oldest deleted)")
    accelerate_config_file: str = _f("", "accelerate config for training (empty: one process per GPU)")
    # outputs
    workflow_output_dir: str = _f("./output/workflow", "intermediate data, logs, the report")
    models_output_dir: str = _f("./output/models", "checkpoints and final models per iteration")

    @classmethod
    def help_of(cls, name: str) -> str:
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


# ---------------------------------------------------------------------------------- validation

def validate(cfg: WorkflowConfig, where: str = "main.py") -> list[int]:
    """Check the whole configuration before any work; returns the usable GPU ids ([] = CPU)."""
    from .models import check_model_dir, usable_gpu_ids

    n = cfg.num_iterations
    if n < 1:
        raise InputError(where, f"NUM_ITERATIONS must be at least 1 (got {n})")
    for name in ("dataset_files_per_iteration", "ability_class_files_per_iteration"):
        files = getattr(cfg, name) or []
        if len(files) != n:
            raise InputError(where, f"{name.upper()} lists {len(files)} file(s) but NUM_ITERATIONS is {n}: "
                                    "give one file per iteration")
    for name in ("teacher_model_path", "student_model_path", "agent_model_1_path", "agent_model_2_path"):
        if not getattr(cfg, name):
            raise InputError(where, f"{name.upper()} is not set")
        check_model_dir(getattr(cfg, name))
    for data, ability in zip(cfg.dataset_files_per_iteration, cfg.ability_class_files_per_iteration):
        load_questions(data)
        load_ability_paths(ability)
    if bool(cfg.eval_dataset_path) != bool(cfg.eval_ability_class_path):
        raise InputError(where, "set both EVAL_DATASET_PATH and EVAL_ABILITY_CLASS_PATH, or neither")
    if cfg.eval_dataset_path:
        load_questions(cfg.eval_dataset_path)
        load_ability_paths(cfg.eval_ability_class_path)
    if cfg.existing_ability_tree_path:
        load_tree(cfg.existing_ability_tree_path, domain=cfg.domain or None)
    elif not cfg.domain:
        raise InputError(where, "set EXISTING_ABILITY_TREE_PATH, or DOMAIN so create_initial_tree.py can build one")
    if cfg.accelerate_config_file and not Path(cfg.accelerate_config_file).is_file():
        raise InputError(cfg.accelerate_config_file, "accelerate config file not found")
    if not 0.0 <= cfg.alpha_ce <= 1.0:
        raise InputError(where, f"ALPHA_CE must be in [0, 1] (got {cfg.alpha_ce})")
    if cfg.num_distill_samples < 1:
        raise InputError(where, f"NUM_DISTILL_SAMPLES must be at least 1 (got {cfg.num_distill_samples})")
    return usable_gpu_ids(list(cfg.gpus_to_use or []))


# ---------------------------------------------------------------------------------- the plan

def script(name: str) -> str:
    return str(ROOT / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_flag(gpus: list[int]) -> list[str]:
    return ["--gpu_ids", ",".join(map(str, gpus))]


def tree_step(cfg: WorkflowConfig, workflow: Path, gpus: list[int]) -> Step:
    """Build the initial tree with the teacher when no tree file is given."""
    out = workflow / "initial_tree"
    return Step(
        name="initial_tree", folder=out, outputs=[out / paths.INITIAL_TREE], inputs=[Path(cfg.teacher_model_path)],
        log_path=workflow / "initial_tree.log",
        argv=[script("create_initial_tree.py"), "--model_path", cfg.teacher_model_path, "--domain", cfg.domain,
              "--output_dir", str(out), "--output_filename", paths.INITIAL_TREE, "--seed", str(cfg.seed),
              "--gpu_id", str(gpus[0] if gpus else -1)])


def eval_steps(cfg: WorkflowConfig, ev: paths.EvalPaths, student: str, tree: Path, gpus: list[int],
               log_dir: Path) -> list[Step]:
    """The student's answers on the evaluation set, then their per-ability scores."""
    reply = Step(
        name="G_eval_reply", folder=ev.replies_dir, outputs=[ev.replies], log_path=log_dir / "G_eval_reply.log",
        inputs=[Path(student), Path(cfg.eval_dataset_path)],
        argv=[script("inference.py"), "--model_path", student, "--dataset_path", cfg.eval_dataset_path,
              "--output_path", str(ev.replies), "--batch_size", str(cfg.inference_batch_size),
              "--seed", str(cfg.seed), *gpu_flag(gpus)])
    scored = Step(
        name="H_eval_tree", folder=ev.tree_dir, outputs=[ev.scored_tree, ev.stats], log_path=log_dir / "H_eval_tree.log",
        inputs=[tree, Path(cfg.eval_ability_class_path), Path(cfg.eval_dataset_path), ev.replies],
        argv=[script("student_data_analyzer.py"), "--initial_tree_path", str(tree),
              "--paths_file", cfg.eval_ability_class_path, "--answers_file", cfg.eval_dataset_path,
              "--student_responses_file", str(ev.replies), "--output_tree_path", str(ev.scored_tree),
              "--output_stats_path", str(ev.stats), "--prior_strength", str(cfg.prior_strength)])
    return [reply, scored]


def iteration_steps(cfg: WorkflowConfig, it: paths.IterationPaths, student: str, tree: Path, gpus: list[int]) -> list[Step]:
    """Steps A-F of DESIGN §3 for one iteration."""
    k = it.iteration - 1
    data, ability = cfg.dataset_files_per_iteration[k], cfg.ability_class_files_per_iteration[k]
    seed = str(cfg.seed + k)  # each round samples afresh, reproducibly
    steps = [
        Step(name="A_student_reply", folder=it.replies_dir, outputs=[it.replies], log_path=it.log_file("A_student_reply"),
             inputs=[Path(student), Path(data)],
             argv=[script("inference.py"), "--model_path", student, "--dataset_path", data,
                   "--output_path", str(it.replies), "--batch_size", str(cfg.inference_batch_size),
                   "--seed", seed, *gpu_flag(gpus)]),
        Step(name="B_student_tree", folder=it.tree_dir, outputs=[it.scored_tree, it.tree_stats],
             log_path=it.log_file("B_student_tree"), inputs=[tree, Path(ability), Path(data), it.replies],
             argv=[script("student_data_analyzer.py"), "--initial_tree_path", str(tree), "--paths_file", ability,
                   "--answers_file", data, "--student_responses_file", str(it.replies),
                   "--output_tree_path", str(it.scored_tree), "--output_stats_path", str(it.tree_stats),
                   "--prior_strength", str(cfg.prior_strength)]),
        Step(name="C_distill_data", folder=it.distill_dir, outputs=[it.generated, paths.plan_path(it.generated)],
             log_path=it.log_file("C_distill_data"),
             inputs=[Path(cfg.teacher_model_path), it.scored_tree, Path(data), Path(ability)],
             argv=[script("generate_distill_data.py"), "--teacher_model_path", cfg.teacher_model_path,
                   "--ability_tree_path", str(it.scored_tree), "--full_dataset_path", data,
                   "--ability_class_path", ability, "--output_path", str(it.generated),
                   "--num_samples", str(cfg.num_distill_samples), "--max_retries", str(cfg.max_retries),
                   "--batch_size", str(cfg.generation_batch_size), "--temperature", str(cfg.gen_temperature),
                   "--seed", seed, "--id_prefix", f"it{it.iteration}", *gpu_flag(gpus)]),
        Step(name="D_validated_data", folder=it.validated_dir, outputs=[it.validated, paths.report_path(it.validated)],
             log_path=it.log_file("D_validated_data"),
             inputs=[Path(cfg.agent_model_1_path), Path(cfg.agent_model_2_path), it.generated],
             argv=[script("evaluate_distilled_data.py"), "--agent_model_1_path", cfg.agent_model_1_path,
                   "--agent_model_2_path", cfg.agent_model_2_path, "--input_file", str(it.generated),
                   "--output_file", str(it.validated), "--min_confidence", str(cfg.min_confidence),
                   "--batch_size", str(cfg.inference_batch_size), *gpu_flag(gpus)]),
        Step(name="E_teacher_logits", folder=it.logits_dir, outputs=[it.logits_dir / "index.json"],
             log_path=it.log_file("E_teacher_logits"), inputs=[Path(cfg.teacher_model_path), it.validated],
             argv=[script("generate_logits.py"), "--model_path", cfg.teacher_model_path,
                   "--dataset_path", str(it.validated), "--output_dir", str(it.logits_dir),
                   "--top_k", str(cfg.top_k), "--batch_size", str(cfg.inference_batch_size), *gpu_flag(gpus)]),
        train_step(cfg, it, student, gpus),
    ]
    return steps


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
    return Step(
        name="F_train", folder=it.student_dir, outputs=[it.final_model / "config.json"], log_path=it.log_file("F_train"),
        inputs=[Path(student), it.validated, it.logits_dir], launcher=launcher, env=env, precheck_flags=["--check_only"],
        argv=[script("train.py"), "--student_model_path", student, "--train_file_path", str(it.validated),
              "--teacher_logits_dir", str(it.logits_dir), "--output_dir", str(it.student_dir),
              "--temperature", str(cfg.temperature), "--alpha_ce", str(cfg.alpha_ce), "--kd_loss", cfg.kd_loss,
              "--num_epochs", str(cfg.train_epochs), "--learning_rate", str(cfg.learning_rate),
              "--batch_size", str(cfg.batch_size), "--gradient_accumulation_steps", str(cfg.gradient_accumulation_steps),
              "--save_steps", str(cfg.save_steps), "--save_total_limit", str(cfg.save_total_limit),
              "--seed", str(cfg.seed + it.iteration - 1)])


# ---------------------------------------------------------------------------------- running

def prepare_tree(cfg: WorkflowConfig, workflow: Path, gpus: list[int], dry_run: bool) -> Path:
    """`initial_ability_tree.json` in the workflow folder: the given tree (normalised) or a built one."""
    from .io import write_json

    target = workflow / paths.INITIAL_TREE
    if cfg.existing_ability_tree_path:
        nested = load_tree(cfg.existing_ability_tree_path, domain=cfg.domain or None).to_nested()
    else:
        step = tree_step(cfg, workflow, gpus)
        run_step(step, dry_run)
        if dry_run:
            return target
        nested = load_tree(step.outputs[0]).to_nested()
    if dry_run:
        print(f"[plan] initial tree -> {target}", flush=True)
    elif not target.exists() or load_tree(target).to_nested() != nested:
        write_json(target, nested)  # rewritten only when it changed: its content feeds step B's fingerprint
    return target


def run(cfg: WorkflowConfig, dry_run: bool = False) -> int:
    """Validate, then run every step of every iteration; returns the exit status."""
    from .report import write_report

    gpus = validate(cfg)
    workflow, models = Path(cfg.workflow_output_dir), Path(cfg.models_output_dir)
    where = f"GPUs {gpus}" if gpus else "the CPU"
    print(f"AT-KD: {cfg.num_iterations} iteration(s) on {where}; outputs in {workflow} and {models}", flush=True)
    try:
        tree = prepare_tree(cfg, workflow, gpus, dry_run)
        with_eval = bool(cfg.eval_dataset_path)
        if with_eval:
            for step in eval_steps(cfg, paths.baseline_eval(workflow), cfg.student_model_path, tree, gpus, workflow):
                run_step(step, dry_run)
        student = cfg.student_model_path
        for i in range(1, cfg.num_iterations + 1):
            it = paths.IterationPaths(workflow, models, i)
            print(f"=== iteration {i}/{cfg.num_iterations}: student {student}", flush=True)
            steps = iteration_steps(cfg, it, student, tree, gpus)
            if with_eval:
                steps += eval_steps(cfg, it.eval, str(it.final_model), tree, gpus, it.dir)
            for step in steps:
                run_step(step, dry_run)
            student = str(it.final_model)  # the next round distils into this round's result
            if not dry_run:
                print(write_report(workflow, models, cfg.num_iterations, with_eval), flush=True)
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.code if err.code > 0 else 1
    if not dry_run:
        print(f"done: report in {workflow / paths.REPORT_MD} and {workflow / paths.REPORT_JSON}", flush=True)
    return 0

"""main.py's workflow: its settings, the checks before any work, and the loop that runs the plan.

`WorkflowConfig` declares every workflow setting once; main.py's UPPER_CASE constants are its
values. A setting that feeds a stage field (`atkd.plan.FEEDS`) is declared from that field (its
type, check and help: `fed`); the others are main.py's own. `atkd.plan` turns the settings into
the stage configs of steps A-H (and L, D2-D4, the tree), and each stage's command line is generated
from its config (`atkd.cli.to_argv`), so what main.py runs, prints and fingerprints is exactly what
a person would run by hand. `run` checks everything first (no work starts on a bad configuration:
every file, every ability path against the tree, the tree's root against DOMAIN, no evaluation
question in an iteration file), then runs the steps in order, skipping those already done
(`atkd.steps`), and rewrites the report after every iteration.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from . import model_card, paths, tracking
from .cli import StageConfig, at_least, setting
from .cli import fed as _fed_by
from .errors import InputError
from .io import iter_jsonl, read_json, write_json, write_jsonl
from .leakage import Repeat, check_iteration_files
from .plan import (FEEDS, ability_file, baseline_eval_steps, eval_files, eval_steps, iteration_steps, model_source,
                   round_files, teacher_eval_steps, tree_step)
from .records import load_ability_paths, load_questions
from .steps import Step, StepFailed, run_step
from .trainer import TrainConfig
from .tree import check_paths_file, is_scored, load_tree, single_top_key

RESPONSE_STYLES = ("letter", "rationale")
RESPONSE_SOURCES = ("teacher", "student", "mixed")  # RESPONSES: who writes the responses the student trains on
MODEL_SETTINGS = ("teacher_model_path", "student_model_path", "agent_model_1_path", "agent_model_2_path")
ENDPOINTS = ("teacher", "agent_1", "agent_2")  # <who>_api_base / <who>_api_model
SERVED = {"teacher_model_path": "teacher_api_base", "agent_model_1_path": "agent_1_api_base",
          "agent_model_2_path": "agent_2_api_base"}


def fed(name: str, help: str | None = None):
    """main.py's setting `name`, declared from the first stage field it feeds (`atkd.plan.FEEDS`)."""
    stage, field_name = FEEDS[name][0]
    return _fed_by(stage, field_name, help)


@dataclass(kw_only=True)
class WorkflowConfig(StageConfig):
    """Everything main.py decides. No defaults here: main.py's constants are the values."""

    source = "main.py"
    # models
    teacher_model_path: str = fed("teacher_model_path", "Hugging Face folder of the teacher: writes questions, "
                                                        "gives logits")
    student_model_path: str = fed("student_model_path", "Hugging Face folder of the student of iteration 1")
    agent_model_1_path: str = fed("agent_model_1_path", "first validation agent (model folder)")
    agent_model_2_path: str = fed("agent_model_2_path", "second validation agent; a different model from the first")
    # data
    domain: str = setting(help="domain name, the root of the ability tree (needed when the teacher builds the tree)")
    existing_ability_tree_path: str = setting(help="initial ability tree (nested JSON); empty: the teacher builds "
                                                   "one with create_initial_tree.py")
    dataset_files_per_iteration: list[str] = setting(help="question .jsonl per iteration")
    ability_class_files_per_iteration: list[str] = setting(help="ability-path .jsonl per iteration, same length; "
                                                                "an empty entry (an empty list: every iteration): "
                                                                "the teacher labels the questions (label_abilities.py)")
    eval_dataset_path: str = fed("eval_dataset_path", "held-out question .jsonl scored before and after each "
                                                      "iteration (generated questions repeating one are dropped); "
                                                      "empty: none")
    eval_ability_class_path: str = setting(help="ability paths of the evaluation set; empty: the teacher labels it")
    drop_eval_overlap: bool = setting(help="iteration questions that repeat an evaluation question (atkd/leakage.py) "
                                           "are left out of filtered copies the steps read; off: such questions "
                                           "stop the run before any work")
    # the loop
    num_iterations: int = setting(check=at_least(1), help="rounds of measure -> generate -> validate -> distil")
    num_distill_samples: int = fed("num_distill_samples", "questions the teacher writes per round (before validation)")
    gpus_to_use: list[int] = fed("gpus_to_use", "GPU ids; ignored (CPU) when the machine has no CUDA")
    seed: int = fed("seed", "seed of every stage (sampling, shuffles, training); iteration N uses seed + N - 1")
    # stage knobs
    inference_batch_size: int = fed("inference_batch_size", "questions per forward pass when scoring (A, D, E, G, L)")
    generation_batch_size: int = fed("generation_batch_size", "prompts per generate call when writing (C, D3, D4)")
    max_retries: int = fed("max_retries")
    gen_temperature: float = fed("gen_temperature", "sampling temperature of the teacher writing questions")
    min_confidence: float = fed("min_confidence", "both agents must give the labelled answer at least this "
                                                  "probability (0: off)")
    top_k: int = fed("top_k")
    prior_strength: float = fed("prior_strength")
    # training
    train_epochs: int = fed("train_epochs", "epochs over the round's training items")
    learning_rate: float = fed("learning_rate")
    batch_size: int = fed("batch_size")
    gradient_accumulation_steps: int = fed("gradient_accumulation_steps")
    temperature: float = fed("temperature")
    alpha_ce: float = fed("alpha_ce")
    kd_loss: str = fed("kd_loss")
    save_steps: int = fed("save_steps")
    save_total_limit: int = fed("save_total_limit")
    accelerate_config_file: str = setting(help="accelerate config for training (empty: one process per GPU)")
    # serving engines (OpenAI-compatible endpoints) and placement on GPUs
    teacher_api_base: str = fed("teacher_api_base", "endpoint of the served teacher, e.g. http://127.0.0.1:8000/v1: "
                                                    "it does all the teacher's steps (tree, labels, questions, "
                                                    "rationales, its evaluation, its log-probs for step E); "
                                                    "TEACHER_MODEL_PATH then holds only its tokenizer (token-level "
                                                    "targets) or is empty (option level only); empty: the local "
                                                    "folder does all")
    teacher_api_model: str = fed("teacher_api_model", "the teacher's model name at TEACHER_API_BASE")
    agent_1_api_base: str = fed("agent_1_api_base", "endpoint of agent 1 (it scores from the letters' log-probs its "
                                                    "server returns, else answers in generate mode); empty: "
                                                    "AGENT_MODEL_1_PATH, locally, in score mode")
    agent_1_api_model: str = fed("agent_1_api_model", "agent 1's model name at AGENT_1_API_BASE")
    agent_2_api_base: str = fed("agent_2_api_base", "endpoint of agent 2, like AGENT_1_API_BASE")
    agent_2_api_model: str = fed("agent_2_api_model", "agent 2's model name at AGENT_2_API_BASE")
    api_key_env: str = fed("api_key_env")
    api_concurrency: int = fed("api_concurrency", "requests in flight at once per endpoint")
    api_timeout_s: float = fed("api_timeout_s")
    api_max_attempts: int = fed("api_max_attempts")
    model_placement: str = fed("model_placement")
    lora_r: int = fed("lora_r")
    lora_alpha: float = fed("lora_alpha")
    lora_dropout: float = fed("lora_dropout")
    lora_target_modules: list[str] = fed("lora_target_modules")
    # the distillation signal
    alloc_temperature: float = fed("alloc_temperature")
    response_style: str = setting(choices=RESPONSE_STYLES, help="letter: the student learns the answer letter; "
                                                                "rationale: the letter, then the teacher's reason "
                                                                "(step D3; token-level KD)")
    use_dataset_explanation: bool = fed("use_dataset_explanation", "rationale style: an item with its own "
                                                                   "explanation keeps it instead of asking the teacher")
    reason_weight: float = fed("reason_weight")
    replay_fraction: float = fed("replay_fraction", "share of each round's training items replayed from the round's "
                                                    "own questions, favouring abilities the student knows (step D2; "
                                                    "0: none)")
    responses: str = setting(choices=RESPONSE_SOURCES,
                             help="teacher: the student trains on the teacher's responses; student: on its own "
                                  "sampled rationale replies to the round's written items, scored token by token "
                                  "by the teacher (step D4, on-policy distillation); mixed: a seeded "
                                  "ON_POLICY_SHARE of them")
    on_policy_share: float = fed("on_policy_share", "RESPONSES mixed: share of the round's written items the student "
                                                    "practises on-policy")
    on_policy_kd_loss: str = fed("on_policy_kd_loss")
    on_policy_temperature: float = fed("on_policy_temperature", "the student's sampling temperature in step D4 "
                                                                "(1: its own distribution)")
    # outputs
    workflow_output_dir: str = setting(help="intermediate data, logs, the report")
    models_output_dir: str = setting(help="checkpoints and final models per iteration")
    report_to: str = fed("report_to")
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
        if self.eval_ability_class_path and not self.eval_dataset_path:
            out.append("EVAL_ABILITY_CLASS_PATH is set but EVAL_DATASET_PATH is not: set both, or neither")
        if not self.existing_ability_tree_path and not self.domain:
            out.append("set EXISTING_ABILITY_TREE_PATH, or DOMAIN so create_initial_tree.py can build one")
        if self.on_policy_share == 0:  # D4's --share may be 0; main.py's mixed responses need some on-policy items
            out.append("ON_POLICY_SHARE (--on_policy_share) must be above 0 (none on-policy: RESPONSES = \"teacher\")")
        return out

    def served(self, model_setting: str) -> bool:
        """Whether an endpoint stands in for that model's folder (the teacher's may still name its tokenizer)."""
        return model_setting in SERVED and bool(getattr(self, SERVED[model_setting]))

    def outputs(self) -> list[Path]:
        return [Path(self.workflow_output_dir) / paths.REPORT_JSON]

    def locked_folders(self) -> list[Path]:
        """Both output folders, for the whole run (a dry run writes nothing and locks nothing)."""
        return [] if self.dry_run else [Path(self.workflow_output_dir), Path(self.models_output_dir)]


def given_ability_files(cfg: WorkflowConfig) -> list[str]:
    """Every ability-path file the user gave (iterations, then the evaluation set)."""
    given = [ability_file(cfg, k) for k in range(cfg.num_iterations)] + [cfg.eval_ability_class_path]
    return [f for f in given if f]


def check_inputs(cfg: WorkflowConfig) -> list[int]:
    """Every file and folder the run will read, before any work; returns the usable GPU ids ([] = CPU)."""
    from .models import check_model_dir, usable_gpu_ids

    for name in MODEL_SETTINGS:
        if not cfg.served(name):
            check_model_dir(getattr(cfg, name))
    if cfg.served("teacher_model_path"):
        print(served_teacher_folder(cfg.teacher_model_path), flush=True)
    for who in ENDPOINTS:
        source = model_source(cfg, who, [])
        if source.is_served and not cfg.dry_run:  # a dry run may come before the servers
            source.check()
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


def served_teacher_folder(folder: str) -> str:
    """What a served teacher's TEACHER_MODEL_PATH gives step E (`InputError` when it names no tokenizer)."""
    from .models import check_tokenizer_dir, has_model

    if not folder:
        return ("the teacher is served and TEACHER_MODEL_PATH is empty: step E stores option-level targets only "
                "(no token-level ones), and train.py checks the student's prompts by their words")
    if has_model(folder):
        return (f"the teacher is served; its weights in {folder} are loaded only where its server gives no log-probs "
                "(step E, its evaluation, labelling), else only its tokenizer is read")
    check_tokenizer_dir(folder)
    return (f"the teacher is served: step E uses only the tokenizer in {folder} (token-level targets for items with "
            "a response), no weights are loaded from it")


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
            baseline = baseline_eval_steps(cfg, workflow, tree, gpus, ev.ability_paths)
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
                steps += eval_steps(cfg, it.eval, str(it.final_model), tree, gpus, ev.ability_paths)
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

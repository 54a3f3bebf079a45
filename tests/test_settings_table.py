"""One declaration: every field of every stage config is fed by a main.py setting (atkd.plan.FEEDS), derived
by the workflow (paths, seeds, the iteration's student, ids: the list below, with why), or left at its
default (the list below, with why); a fed setting has its stage field's type and check, and its value
reaches that field in the plan main.py prints."""

from __future__ import annotations

import typing
from dataclasses import fields, replace
from pathlib import Path

import pytest

from atkd import paths
from atkd.answering import InferenceConfig
from atkd.cli import parse_config
from atkd.cross_check import CrossCheckConfig
from atkd.labelling import LabelConfig
from atkd.plan import (FEEDS, SET_PER_STEP, STAGE_CONFIGS, baseline_eval_steps, eval_files, iteration_steps,
                       round_files, teacher_eval_steps, tree_step)
from atkd.question_writing import QuestionWritingConfig
from atkd.rationale_writing import RationaleConfig
from atkd.replay import ReplayConfig
from atkd.student_sampling import StudentSamplingConfig
from atkd.teacher_logits import LogitsConfig
from atkd.trainer import TrainConfig
from atkd.tree_building import TreeConfig
from atkd.weakness import AnalyzerConfig
from atkd.workflow import WorkflowConfig

PATHS = "a path in the workflow's output folders (atkd.paths), or the round's question / ability-path file"
DERIVED = {
    **{(TreeConfig, f): PATHS for f in ("output_dir", "output_filename")},
    **{(LabelConfig, f): PATHS for f in ("ability_tree_path", "dataset_path", "output_path")},
    **{(InferenceConfig, f): PATHS for f in ("dataset_path", "output_path")},
    **{(AnalyzerConfig, f): PATHS for f in ("initial_tree_path", "paths_file", "answers_file",
                                            "student_responses_file", "output_tree_path", "output_stats_path")},
    **{(QuestionWritingConfig, f): PATHS for f in ("ability_tree_path", "full_dataset_path", "ability_class_path",
                                                   "output_path")},
    (QuestionWritingConfig, "id_prefix"): "it<N>: ids unique across iterations",
    **{(CrossCheckConfig, f): PATHS for f in ("input_file", "output_file")},
    **{(RationaleConfig, f): PATHS for f in ("input_file", "output_file")},
    (RationaleConfig, "explanation_field"): "the field E stores token-level logits for (plan.EXPLANATION_FIELD)",
    **{(ReplayConfig, f): PATHS for f in ("validated_file", "dataset_path", "ability_class_path",
                                          "ability_tree_path", "output_path")},
    (ReplayConfig, "drop_field"): "the explanation field when the rationale style keeps no dataset explanations",
    **{(StudentSamplingConfig, f): PATHS for f in ("input_file", "output_file")},
    **{(LogitsConfig, f): PATHS for f in ("dataset_path", "output_dir")},
    (LogitsConfig, "response_field"): "the explanation field in rationale style or with the student's responses",
    **{(TrainConfig, f): PATHS for f in ("train_file_path", "teacher_logits_dir", "output_dir")},
    (TrainConfig, "tracking_dir"): "the run's tracking folder, with REPORT_TO (workflow.with_tracking)",
    (TrainConfig, "tracking_step_offset"): "the optimizer steps of the earlier iterations (workflow.with_tracking)",
}
LOCAL = ("dtype", "trust_remote_code")
DEFAULTED = {
    **{(c, f): "main.py has no such setting: auto dtype (bf16 on GPU, fp32 on CPU), no checkpoint code"
       for c in (TreeConfig, LabelConfig, InferenceConfig, QuestionWritingConfig, CrossCheckConfig, RationaleConfig,
                 StudentSamplingConfig, LogitsConfig, TrainConfig) for f in LOCAL},
    **{(c, "lang"): "detected from the questions (the domain name for the tree; the tokenizer in training)"
       for c in (TreeConfig, LabelConfig, InferenceConfig, QuestionWritingConfig, CrossCheckConfig, RationaleConfig,
                 StudentSamplingConfig, LogitsConfig, TrainConfig)},
    **{(TreeConfig, f): "the tree stage's own defaults (create_initial_tree.py's constants when run by hand)"
       for f in ("nodes_per_level", "max_retries", "max_new_tokens", "temperature")},
    (LabelConfig, "rotations"): "labels in one pass",
    (InferenceConfig, "mode"): "score: option-letter probabilities",
    (InferenceConfig, "max_new_tokens"): "generate mode only",
    (AnalyzerConfig, "domain"): "read from the tree",
    **{(QuestionWritingConfig, f): "step C's own defaults" for f in ("top_p", "max_new_tokens", "alloc_floor",
                                                                     "seeds_per_prompt", "dedup_threshold")},
    (QuestionWritingConfig, "domain"): "read from the tree",
    (CrossCheckConfig, "mode"): "score (an agent at an endpoint whose server gives no letter log-probs generates)",
    (CrossCheckConfig, "max_new_tokens"): "generate mode only",
    (RationaleConfig, "max_new_tokens"): "step D3's own default",
    (StudentSamplingConfig, "max_new_tokens"): "step D4's own default",
    (LogitsConfig, "shard_size"): "storage only",
    (LogitsConfig, "top_logprobs_cap"): "a served teacher: 20, what hosted APIs and vLLM's default allow",
    (LogitsConfig, "prompt_logprobs"): "a served teacher: echo, kept option-level (and counted) where the server "
                                       "gives no prompt log-probs",
    **{(TrainConfig, f): "train.py's own defaults" for f in ("max_length", "gradient_checkpointing", "warmup_ratio",
                                                             "weight_decay", "lr_scheduler", "max_grad_norm",
                                                             "logging_steps")},
    (TrainConfig, "check_only"): "main.py runs the check as its own precheck (Step.precheck_flags)",
}
# A fed setting whose main.py check is looser than its stage field's, and why.
LOOSER = {"domain": "may be empty when EXISTING_ABILITY_TREE_PATH is given; the tree stage, which runs only "
                    "without one, refuses an empty DOMAIN"}


def fed_fields() -> set:
    return {target for targets in FEEDS.values() for target in targets}


def test_every_field_of_every_stage_is_fed_derived_or_left_at_its_default():
    fed = fed_fields()
    for listed in (DERIVED, DEFAULTED):
        assert not set(listed) & fed
    assert not set(DERIVED) & set(DEFAULTED)
    every = {(c, f.name) for c in STAGE_CONFIGS for f in fields(c)}
    unaccounted = sorted(f"{c.__name__}.{name}" for c, name in every - fed - set(DERIVED) - set(DEFAULTED))
    assert unaccounted == []
    named = fed | set(DERIVED) | set(DEFAULTED)
    assert sorted(f"{c.__name__}.{n}" for c, n in named - every) == []  # no list names a field that is not there


def check_text(cls, name: str) -> str | None:
    meta = next(f for f in fields(cls) if f.name == name).metadata
    return meta["check"].text if meta["check"] is not None else None


def test_a_fed_setting_has_its_stage_fields_type_and_check():
    main_hints = typing.get_type_hints(WorkflowConfig)
    wrong = []
    for setting, targets in FEEDS.items():
        assert setting in main_hints, f"{setting} feeds stages but main.py has no such setting"
        for cls, name in targets:
            if typing.get_type_hints(cls)[name] != main_hints[setting]:
                wrong.append(f"{setting}: type {main_hints[setting]} but {cls.__name__}.{name} is "
                             f"{typing.get_type_hints(cls)[name]}")
            if setting not in LOOSER and check_text(WorkflowConfig, setting) != check_text(cls, name):
                wrong.append(f"{setting}: {check_text(WorkflowConfig, setting)!r} but {cls.__name__}.{name}: "
                             f"{check_text(cls, name)!r}")
    assert wrong == []
    assert check_text(WorkflowConfig, "lora_dropout") == check_text(TrainConfig, "lora_dropout") == "in [0, 1)"


def all_steps(cfg: WorkflowConfig, tmp_path: Path) -> list:
    """Every step main.py would run for `cfg` in iteration 2 (tree, labels, evaluations included)."""
    workflow, tree = tmp_path / "wf", tmp_path / "wf" / paths.INITIAL_TREE
    it = paths.IterationPaths(workflow, tmp_path / "models", 2)
    ev = eval_files(cfg, workflow, tree, [])
    files = round_files(cfg, it, tree, [], dropped=False)
    return [tree_step(cfg, workflow, []), ev.label_step,
            *baseline_eval_steps(cfg, workflow, tree, [], ev.ability_paths),
            *teacher_eval_steps(cfg, workflow, tree, [], ev.ability_paths),
            *iteration_steps(cfg, it, "student-of-round-2", tree, [], files)]


def test_every_fed_value_reaches_its_stage_fields(tmp_path):
    import main

    base = parse_config(WorkflowConfig, [], defaults=main.defaults())
    # Values unlike every stage default, so a field left at its default cannot pass for a fed one.
    cfg = replace(base, existing_ability_tree_path="", ability_class_files_per_iteration=[], eval_ability_class_path="",
                  response_style="rationale", responses="mixed", replay_fraction=0.3, num_distill_samples=7,
                  max_retries=5, gen_temperature=0.3, inference_batch_size=3, generation_batch_size=5,
                  min_confidence=0.2, top_k=7, prior_strength=2.5, train_epochs=4, learning_rate=3e-4, batch_size=5,
                  gradient_accumulation_steps=3, temperature=1.5, alpha_ce=0.3, kd_loss="jsd", save_steps=17,
                  save_total_limit=4, lora_r=4, lora_alpha=8.0, lora_dropout=0.2, lora_target_modules=["q_proj"],
                  alloc_temperature=2.0, use_dataset_explanation=False, reason_weight=0.7, on_policy_share=0.4,
                  on_policy_kd_loss="forward_kl", on_policy_temperature=0.6)
    steps = all_steps(cfg, tmp_path)
    built = {type(s.cfg) for s in steps}
    assert built == set(STAGE_CONFIGS)  # the plan above makes a config of every stage
    missed = []
    for setting, targets in FEEDS.items():
        if setting in SET_PER_STEP:
            continue
        for cls, name in targets:
            for step in steps:
                if isinstance(step.cfg, cls) and getattr(step.cfg, name) != getattr(cfg, setting):
                    missed.append(f"{setting} -> {step.name} {name}: {getattr(step.cfg, name)!r}")
    assert missed == []
    # The settings a builder sets itself: the round's seed, the round's student, the usable GPUs.
    by_name = {s.name: s.cfg for s in steps}
    assert by_name["C_distill_data"].seed == by_name["F_train"].seed == cfg.seed + 1
    assert by_name["D4_student_responses"].student_model_path == by_name["F_train"].student_model_path \
        == "student-of-round-2"
    assert by_name["F_train"].reason_weight == 0.7


def test_main_py_accepts_and_refuses_what_the_stage_does():
    """LORA_DROPOUT was checked as [0, 0.99] in main.py and [0, 1) in train.py; now one check, the stage's."""
    import main

    from atkd.errors import InputError

    assert parse_config(WorkflowConfig, ["--lora_dropout", "0.995"], defaults=main.defaults()).lora_dropout == 0.995
    for flag in ("--lora_dropout", "--replay_fraction"):
        with pytest.raises(InputError, match=r"must be in \[0, 1\) \(got 1.0\)"):
            parse_config(WorkflowConfig, [flag, "1.0"], defaults=main.defaults())

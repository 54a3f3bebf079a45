"""The model card (README.md) of every final_model/ (and final_adapter/): how the model came to be.

A YAML header as the Hugging Face Hub reads it (`base_model`: the iteration's input student, or
the hub id its config names; `library_name: transformers`; `tags`; `datasets`: the data files'
names), then the teacher, the data and its counts per iteration, the training settings and the
accuracy per ability on the evaluation set before and after.

Written twice, atomically (`atkd.io.write_text`: a temp file, then `os.replace`): train.py writes
what it knows when training ends (`training_facts`), and main.py rewrites it after the
iteration's evaluation with the whole run's view (`workflow_facts`: every iteration up to this
one, and the per-ability table from report.json). A card says nothing about the weights, so
`README.md` is left out of a model folder's content hash (`atkd.fingerprint.is_bookkeeping`):
writing it never makes a later stage that reads the folder rerun.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .io import read_json, write_text

CARD = "README.md"
TAGS = ("distillation", "at-kd", "knowledge-distillation")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "Qwen/Qwen2.5-0.5B-Instruct"
# Settings of the fingerprint that are not training settings (code and prompt versions).
NOT_SETTINGS = ("stage", "version", "prompts")


def base_model_name(student: str | Path) -> str:
    """The student a model was trained from: the hub id its config.json names (`_name_or_path`), else
    its folder as given."""
    config = Path(student) / "config.json"
    try:
        named = str(read_json(config).get("_name_or_path") or "")
    except (OSError, ValueError, AttributeError):
        named = ""
    return named if HUB_ID.match(named) and not Path(named).exists() else str(student)


def _is_hash(value) -> bool:
    return value == "missing" or (isinstance(value, str) and len(value) == 64
                                  and all(c in "0123456789abcdef" for c in value))


def training_settings(fingerprint: dict) -> dict:
    """The settings a training ran with, from its fingerprint (input hashes and code versions left out)."""
    return {k: v for k, v in fingerprint.items() if k not in NOT_SETTINGS and not _is_hash(v)}


def _teacher_of_logits(logits_dir: str | Path) -> str | None:
    from .paths import logits_index

    index = logits_index(logits_dir)
    return read_json(index).get("teacher_model") if Path(index).is_file() else None


def training_facts(cfg, stats, total_steps: int, fingerprint: dict) -> dict:
    """What train.py knows when it ends: student, teacher (from the logits' index), data, settings
    (`fingerprint`: the training's, from its done-record)."""
    from dataclasses import asdict

    return {
        "base_model": base_model_name(cfg.student_model_path),
        "teacher": _teacher_of_logits(cfg.teacher_logits_dir),
        "datasets": [Path(cfg.train_file_path).name],
        "iterations": [{"student": str(cfg.student_model_path), "training_file": str(cfg.train_file_path),
                        "training_items": asdict(stats)["n_items"] - len(stats.skipped_too_long),
                        "optimizer_steps": total_steps}],
        "training": training_settings(fingerprint),
    }


def workflow_facts(cfg, report: dict, iteration: int, models_dir: Path) -> dict:
    """main.py's view after iteration `iteration`: every iteration up to it, and its evaluation."""
    from .checkpoint import STATE_FILE
    from .paths import IterationPaths

    its, student = [], cfg.student_model_path
    for entry in report.get("iterations", [])[:iteration]:
        i = entry["iteration"]
        final = IterationPaths(Path("."), Path(models_dir), i).final_model
        state = read_json(final / STATE_FILE) if (final / STATE_FILE).is_file() else {}
        examples = state.get("examples") or {}
        its.append({"iteration": i, "student": str(student), "questions": cfg.dataset_files_per_iteration[i - 1],
                    "written": entry.get("generated"), "validated": entry.get("validated"),
                    "replayed": (entry.get("replay") or {}).get("replay"),
                    "training_items": (examples["n_items"] - len(examples.get("skipped_too_long", []))
                                       if examples else None),
                    "optimizer_steps": state.get("global_step")})
        last_state, student = state, str(final)
    entry = report["iterations"][iteration - 1]
    teacher = cfg.teacher_model_path + (f" (questions written by {cfg.teacher_api_model} at an endpoint)"
                                        if cfg.teacher_api_base else "")
    return {
        "base_model": base_model_name(its[-1]["student"]),
        "teacher": teacher,
        "datasets": [Path(f).name for f in cfg.dataset_files_per_iteration[:iteration]],
        "iterations": its,
        "training": training_settings(last_state.get("fingerprint") or {}),
        "evaluation": {"file": cfg.eval_dataset_path, "before": entry.get("eval_before"),
                       "after": entry.get("eval_after"), "teacher": report.get("teacher_eval")}
        if entry.get("eval_after") else None,
    }


# --------------------------------------------------------------------------- the text

def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(str(text), ensure_ascii=False)


def header(facts: dict) -> list[str]:
    lines = ["---", f"base_model: {_yaml_str(facts['base_model'])}", "library_name: transformers",
             "pipeline_tag: text-generation", "tags:"] + [f"- {_yaml_str(t)}" for t in TAGS]
    if facts.get("datasets"):
        lines += ["datasets:"] + [f"- {_yaml_str(d)}" for d in facts["datasets"]]
    return lines + ["---"]


def _cell(value) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def _pct(row: dict | None) -> str:
    if not row or row.get("accuracy") is None:
        return "-"
    ci = row.get("ci95")
    interval = f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})" if ci and None not in ci else ""
    return f"{100 * row['accuracy']:.1f}%{interval}"


def _evaluation(ev: dict) -> list[str]:
    before, after, teacher = ev["before"] or {}, ev["after"] or {}, ev.get("teacher") or {}
    with_ci = any((row or {}).get("ci95") for row in after.values())
    lines = [f"## Accuracy per ability on the evaluation set (`{ev['file']}`)", "",
             "Before: the student this iteration started from; after: this model."
             + (" In brackets, the 95% interval (%)." if with_ci else ""), "",
             "| ability | n | teacher | before | after | change (points) |", "|---|---|---|---|---|---|"]
    for name in after or before:
        b, a = before.get(name) or {}, after.get(name) or {}
        change = ("-" if a.get("accuracy") is None or b.get("accuracy") is None
                  else f"{100 * (a['accuracy'] - b['accuracy']):+.1f}")
        lines.append(f"| {_cell(name)} | {_cell(a.get('n', b.get('n')))} | {_pct(teacher.get(name))} | {_pct(b)} | "
                     f"{_pct(a)} | {change} |")
    return lines + [""]


def card_text(facts: dict, title: str) -> str:
    """The README.md of a model folder."""
    lines = header(facts) + ["", f"# {title}", "",
                             f"Distilled with AT-KD (ability-tree guided knowledge distillation) from the teacher "
                             f"`{facts.get('teacher') or 'unknown'}` into the student `{facts['base_model']}`: each "
                             "iteration measures the student per ability, has the teacher write questions for its "
                             "weak abilities, keeps the questions two agent models answer as labelled, and trains the "
                             "student on the teacher's logits (cross-entropy plus a distillation loss).", "",
                             "## Data per iteration", "",
                             "| iteration | student trained | questions | written (C) | validated (D) | replayed (D2) | "
                             "training items | optimizer steps |", "|---|---|---|---|---|---|---|---|"]
    for it in facts["iterations"]:
        lines.append(f"| {_cell(it.get('iteration'))} | `{it['student']}` | "
                     f"`{it.get('questions') or it.get('training_file')}` | {_cell(it.get('written'))} | "
                     f"{_cell(it.get('validated'))} | {_cell(it.get('replayed'))} | {_cell(it.get('training_items'))} | "
                     f"{_cell(it.get('optimizer_steps'))} |")
    lines += ["", "## Training settings (the last iteration's)", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(','.join(map(str, v)) if isinstance(v, list) else v)} |"
              for k, v in facts["training"].items()]
    lines.append("")
    if facts.get("evaluation"):
        lines += _evaluation(facts["evaluation"])
    else:
        lines += ["No evaluation yet: main.py adds the accuracy per ability on its evaluation set after the "
                  "iteration's evaluation.", ""]
    return "\n".join(lines)


def write_card(folder: Path, facts: dict) -> Path:
    """`folder/README.md`, written atomically (unchanged text is not rewritten)."""
    path = Path(folder) / CARD
    text = card_text(facts, f"{Path(folder).parent.name}/{Path(folder).name}")
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)
    return path


def write_iteration_cards(cfg, report: dict, iteration: int, models_dir: Path) -> list[Path]:
    """main.py, after iteration `iteration`'s evaluation: the card of its final_model (and final_adapter)."""
    from .paths import IterationPaths, final_adapter_dir

    it = IterationPaths(Path("."), Path(models_dir), iteration)
    folders = [f for f in (it.final_model, final_adapter_dir(it.student_dir) if cfg.lora_r else None)
               if f is not None and f.is_dir()]
    if not folders or len(report.get("iterations", [])) < iteration:
        return []
    facts = workflow_facts(cfg, report, iteration, models_dir)
    return [write_card(f, facts) for f in folders]

"""Record schemas and their validation: questions, ability paths, replies (ARCHITECTURE.md §3).

A question is `{"id", "question", "options": {"A": ..., "B": ...}, "answer_idx", "meta_info"}`
plus any extra fields, which are kept. Ids may be int or str; they are compared as strings.
Every problem is reported as an `InputError` naming the file and line.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import iter_jsonl

LETTERS = string.ascii_uppercase  # option keys are consecutive capitals from A
MIN_OPTIONS, MAX_OPTIONS = 2, 26
QUESTION_FIELDS = ("id", "question", "options", "answer_idx", "meta_info")


@dataclass
class Question:
    """One multiple-choice question; `extra` keeps every field we do not interpret."""

    id: int | str
    question: str
    options: dict[str, str]
    answer_idx: str
    meta_info: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The id as a string: ids compare as strings across files."""
        return str(self.id)

    @property
    def letters(self) -> list[str]:
        return list(self.options)

    def to_dict(self) -> dict:
        out = {"id": self.id, "question": self.question, "options": dict(self.options),
               "answer_idx": self.answer_idx, "meta_info": self.meta_info}
        out.update(self.extra)
        return out


def question_problem(obj: dict) -> str | None:
    """Why `obj` is not a valid question record, or None when it is."""
    for name in ("id", "question", "options", "answer_idx"):
        if name not in obj:
            return f'missing field "{name}"'
    if not isinstance(obj["id"], (int, str)) or isinstance(obj["id"], bool) or str(obj["id"]) == "":
        return '"id" must be a non-empty string or an integer'
    if not isinstance(obj["question"], str) or not obj["question"].strip():
        return '"question" must be a non-empty string'
    options = obj["options"]
    if not isinstance(options, dict):
        return '"options" must be an object like {"A": "...", "B": "..."}'
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        return f'"options" must have {MIN_OPTIONS} to {MAX_OPTIONS} entries, found {len(options)}'
    expected = list(LETTERS[: len(options)])
    if sorted(options) != expected:
        return f'option keys must be consecutive capital letters from A ({", ".join(expected)}), found {", ".join(options)}'
    for letter in expected:
        if not isinstance(options[letter], str) or not options[letter].strip():
            return f'option "{letter}" must be a non-empty string'
    answer = obj["answer_idx"]
    if answer not in options:
        return f'answer_idx {answer!r} is not among the options {expected[0]}-{expected[-1]}'
    return None


def question_from_dict(obj: dict) -> Question:
    """Build a `Question` from an already validated record (options re-ordered A, B, ...)."""
    options = {k: obj["options"][k] for k in LETTERS[: len(obj["options"])]}
    extra = {k: v for k, v in obj.items() if k not in QUESTION_FIELDS}
    return Question(id=obj["id"], question=obj["question"], options=options,
                    answer_idx=obj["answer_idx"], meta_info=obj.get("meta_info"), extra=extra)


def load_questions(path: str | Path) -> list[Question]:
    """Read and validate a question file; duplicate ids are an error."""
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        problem = question_problem(obj)
        if problem:
            raise InputError(path, problem, lineno)
        q = question_from_dict(obj)
        if q.key in seen:
            raise InputError(path, f"duplicate id {q.id!r} (first seen on line {seen[q.key]})", lineno)
        seen[q.key] = lineno
        questions.append(q)
    return questions


def load_ability_paths(path: str | Path) -> dict[str, list[str]]:
    """Read `{"id", "ability_path": [...]}` lines into {id as str: path}."""
    paths: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        for name in ("id", "ability_path"):
            if name not in obj:
                raise InputError(path, f'missing field "{name}"', lineno)
        ability = obj["ability_path"]
        if (not isinstance(ability, list) or not ability
                or not all(isinstance(p, str) and p.strip() for p in ability)):
            raise InputError(path, '"ability_path" must be a non-empty list of non-empty strings', lineno)
        key = str(obj["id"])
        if key in seen:
            raise InputError(path, f"duplicate id {obj['id']!r} (first seen on line {seen[key]})", lineno)
        seen[key] = lineno
        paths[key] = [p.strip() for p in ability]
    return paths


def load_replies(path: str | Path) -> dict[str, dict]:
    """Read a replies file (inference.py output) into {id as str: record}."""
    replies: dict[str, dict] = {}
    for lineno, obj in iter_jsonl(path):
        for name in ("id", "pred_letter"):  # "correct" is recomputed from pred_letter, never trusted
            if name not in obj:
                raise InputError(path, f'missing field "{name}"', lineno)
        key = str(obj["id"])
        if key in replies:
            raise InputError(path, f"duplicate id {obj['id']!r}", lineno)
        replies[key] = obj
    return replies


# --------------------------------------------------------------------------- names several stages share

REPLAY_PREFIX = "replay-"  # a replayed question's id (step D2); D4 never has the student practise those items


def ability_name(q: Question) -> str:
    """A question's ability path as one name ("A > B"): the row key of D's, D3's and D4's per-ability reports."""
    path = q.extra.get("ability_path")
    if isinstance(path, list) and path:
        return " > ".join(str(p) for p in path)
    return "(no ability_path)"

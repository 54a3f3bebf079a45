"""No evaluation question in the training data: which questions repeat one, and main.py's check.

A question *repeats* an evaluation question when it is
- the same question: the same stem and the same set of options (options in any order), whatever
  answer it keys; or
- a near-duplicate that keys the same answer: stems and option sets both at least `threshold`
  similar (`atkd.dedup`, the measure step C uses against its seeds), and the same answer text.
Both rules read text through one normalisation, `atkd.dedup.words` (NFKC, case, spacing and
punctuation aside, each CJK character a word, comparison and sign symbols kept as words), and
"the same" text is the same `atkd.dedup.comparison_key` (the words run together). So "HbA1c > 9%"
and "HbA1c < 9%", "↑" and "↓", "(+)" and "(-)" make different questions, while "Beta blocker",
"Beta-blocker" and "BETA BLOCKER" (or "华法 林" and "华法林") are one answer. Case is folded here, unlike
in `qparse.option_key`: a reworded copy of an evaluation question keying "GG" where it keys "gg" is
counted as keying the same answer (the check errs towards a repeat).
The answer condition keeps templated questions apart: "Which of these is a respiratory disease?"
and "Which of these is a cardiovascular disease?" over three shared options are two questions
(the embedded demo has such pairs), while a copy with reordered or one reworded distractor is the
same question, and training on it would show the student the evaluation answer.

main.py checks every iteration file against the evaluation set before any work
(`check_iteration_files`): it stops with an `InputError` naming both files and lines, or, with
DROP_EVAL_OVERLAP, the repeating questions are left out of filtered copies the steps read. Step C
drops generated questions that repeat an evaluation question (`near_duplicate_eval` in its summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .dedup import DEFAULT_THRESHOLD, Features, NearDupIndex, features_of_words, rarest_first, words
from .errors import InputError
from .io import iter_jsonl
from .records import Question


@dataclass(frozen=True)
class Repeat:
    """A question that repeats an evaluation question."""

    key: str  # the repeating question's id
    eval_key: str
    similarity: float
    exact: bool

    def describe(self) -> str:
        if self.exact:
            return "the same question"
        return f"a near-duplicate (similarity {self.similarity:.2f}, same answer)"


def exact_key(question: str, options: dict[str, str]) -> tuple:
    """What two copies of one question share: the `comparison_key` of the stem and the set of the
    options' (case, width, spacing and punctuation aside; signs kept)."""
    return keyed(question, options).exact


class Keyed(NamedTuple):
    """A question read once through `atkd.dedup.words`: its exact key, its features and the
    `comparison_key` of each option, by letter."""

    exact: tuple
    features: Features
    option_keys: dict[str, str]


def keyed(question: str, options: dict[str, str]) -> Keyed:
    """A question's `Keyed`, its text split into words once."""
    stem, opts = words(question), [words(o) for o in options.values()]
    keys = ["".join(o) for o in opts]  # `comparison_key` of each option, from the words already split
    return Keyed(("".join(stem), tuple(sorted(keys))), features_of_words(stem, opts), dict(zip(options, keys)))


class EvalIndex:
    """The evaluation questions, for asking whether a question repeats one of them."""

    def __init__(self, eval_questions: list[Question], threshold: float = DEFAULT_THRESHOLD, rarest: bool = True):
        read = [keyed(q.question, q.options) for q in eval_questions]
        feats = [k.features for k in read]
        # The evaluation set is known up front: rare words first keeps each probe's candidates few
        # (rarest=False, the index's default hash order, is bench/leakage.py's baseline; same result).
        self.index = NearDupIndex(threshold, rarest_first(feats)) if rarest else NearDupIndex(threshold)
        self.answers: dict[str, str] = {}
        self.exact: dict[tuple, str] = {}
        for q, k in zip(eval_questions, read):
            self.index.add(k.features, q.key)
            self.answers[q.key] = k.option_keys[q.answer_idx]
            self.exact.setdefault(k.exact, q.key)

    def repeat_of(self, key: str, question: str, options: dict[str, str], answer_idx: str) -> Repeat | None:
        """The evaluation question this one repeats (the most similar), or None."""
        k = keyed(question, options)
        same = self.exact.get(k.exact)
        if same is not None:
            return Repeat(key, same, 1.0, exact=True)
        answer = k.option_keys[answer_idx]
        for eval_key, sim in self.index.similar(k.features):
            if self.answers[eval_key] == answer:
                return Repeat(key, eval_key, sim, exact=False)
        return None

    def repeats(self, questions: list[Question]) -> list[Repeat]:
        """Every question of `questions` that repeats an evaluation question, in their order."""
        found = (self.repeat_of(q.key, q.question, q.options, q.answer_idx) for q in questions)
        return [r for r in found if r is not None]


def line_numbers(path: str | Path) -> dict[str, int]:
    """{id: line} of a JSONL file (only used to point messages at lines)."""
    return {str(obj.get("id")): lineno for lineno, obj in iter_jsonl(path)}


def overlap_error(eval_path: str, found: dict[str, list[Repeat]], sizes: dict[str, int], fix: str) -> InputError:
    """The error that stops main.py: the first repeat, with both files and lines, and the counts."""
    path, repeats = next((p, r) for p, r in found.items() if r)
    first = repeats[0]
    eval_line = line_numbers(eval_path).get(first.eval_key)
    counts = ", ".join(f"{len(r)} of {sizes[p]} in {p}" for p, r in found.items() if r)
    return InputError(path, f"question {first.key!r} repeats evaluation question {first.eval_key!r} "
                            f"({eval_path}:{eval_line}): {first.describe()}. Questions repeating the evaluation "
                            f"set: {counts}. Remove them, or {fix}", line_numbers(path).get(first.key))


def check_iteration_files(eval_path: str, eval_questions: list[Question], files: dict[str, list[Question]],
                          drop: bool, fix: str, threshold: float = DEFAULT_THRESHOLD) -> dict[str, list[Repeat]]:
    """The repeats of evaluation questions in each iteration file (by path); an `InputError` when
    there are any and `drop` is off (`fix` says how to turn it on)."""
    index = EvalIndex(eval_questions, threshold)
    found = {path: index.repeats(questions) for path, questions in files.items()}
    if not drop and any(found.values()):
        raise overlap_error(eval_path, found, {p: len(q) for p, q in files.items()}, fix)
    return found

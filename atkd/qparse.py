"""Parsing a model-written question in the strict reply format (ARCHITECTURE.md §9).

The format is exactly what `prompts.question_block(q, lang, with_answer=True)` prints:

    Question: <text>            (问题：<text>)
    A. <option>
    B. <option>
    ...
    Answer: <letter>            (答案：<letter>)

The parser never accepts an invalid item: a missing or empty question, fewer than two options,
letters that are not consecutive from A, an empty or duplicate option, or an answer outside the
options each give a rejection reason instead; so does an answer line whose "letter" starts a word
("Answer: Aspirin"). Options are compared by `option_key`: width, spaces, invisible format
characters and a trailing period do not make two options different, case does ("GG", "gg" and "Gg"
are three genotypes, "Co" and "CO" cobalt and carbon monoxide, "mg" and "Mg" a unit and an element).
Text after the answer letter must name that option (`option_named`). Text before "Question:" and
after the answer line is ignored (models add chatter); a second question is not read. Bold labels
("**Question:**", "**Answer:** B") are read as labels.
"""

from __future__ import annotations

import re
import unicodedata

from .records import LETTERS, MAX_OPTIONS, question_problem

# Labels may be bold ("**Question:**", "**Answer:** B"): models add markdown unasked.
_QUESTION = re.compile(r"^\s*(?:\*\*)?(?:Question|问题)(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*(.*)$", re.IGNORECASE)
_OPTION = re.compile(r"^\s*\(?([A-Z])\s*[.．、:：)）]\s*(.*)$")
# The letter must stand alone: in "Answer: Aspirin" the A is part of a word, not option A.
_ANSWER = re.compile(r"^\s*(?:\*\*)?(?:Answer|答案|正确答案)(?:\*\*)?\s*[:：][\s*]*\(?\s*"
                     r"([A-Z](?![A-Za-z]))?\s*\)?[\s*]*[.。:：]?\s*(.*)$", re.IGNORECASE)
REASONS = ("no_question", "empty_question", "too_few_options", "bad_option_letters", "empty_option",
           "duplicate_options", "no_answer", "answer_not_in_options", "too_many_options")


def normalize_text(text: str) -> str:
    """Case-, width- and space-insensitive form used to compare options and questions."""
    if text.isascii():  # the common case, and a hot path: ASCII holds no Cf character and NFKC keeps it
        text = text.lower()
    else:
        # Format characters (zero-width spaces, joiners, BOMs: category Cf) are invisible: they make
        # no text non-empty and no two options different.
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
        text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[\s\u3000]+", " ", text).strip()
    return text.rstrip(".。;；")


def option_key(text: str) -> str:
    """What two options must differ in, case included: the text after NFKC (width) with invisible
    format characters, every space and a trailing period removed ("ice cream" and "icecream",
    "阿司 匹林" and "阿司匹林", "ＣＯ" and "CO" are one option; "CO" and "Co" are two). The one rule
    for repeated options: step C's acceptance here, the converters in `atkd.convert.datasets`."""
    if not text.isascii():  # ASCII holds no Cf character and NFKC keeps it
        text = unicodedata.normalize("NFKC", "".join(ch for ch in text if unicodedata.category(ch) != "Cf"))
    return re.sub(r"\s+", "", text).rstrip(".。;；")


def option_named(text: str, options: list[str]) -> int | None:
    """The index of the option `text` names: the one with its `option_key`; else the only one equal to
    it once case is folded too ("metoprolol" names "Metoprolol"); None when none or several do
    ("gG" among "GG", "gg", "Gg")."""
    key = option_key(text)
    keys = [option_key(o) for o in options]
    if key in keys:
        return keys.index(key)
    folded = [i for i, k in enumerate(keys) if k.casefold() == key.casefold()]
    return folded[0] if len(folded) == 1 else None


def parse_question(text: str) -> tuple[dict | None, str | None]:
    """(`{"question", "options", "answer_idx"}`, None) for a valid reply, else (None, reason)."""
    lines = (text or "").replace("\r\n", "\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if _QUESTION.match(ln)), None)
    if start is None:
        return None, "no_question"
    question_lines = [_QUESTION.match(lines[start]).group(1)]
    options: list[tuple[str, str]] = []
    answer, answer_rest = None, ""
    for ln in lines[start + 1:]:
        m = _ANSWER.match(ln)
        if m:
            if not m.group(1):
                return None, "no_answer"
            answer, answer_rest = m.group(1).upper(), m.group(2).strip()
            break
        if _QUESTION.match(ln):
            break  # a second question before any answer line: this one has no answer
        m = _OPTION.match(ln)
        if m and (options or m.group(1) == "A"):
            options.append((m.group(1), m.group(2).strip()))
        elif options:
            if ln.strip():
                return None, "bad_option_letters"  # prose between options
        elif ln.strip():
            question_lines.append(ln.strip())
    question = " ".join(q.strip() for q in question_lines if q.strip())
    if not option_key(question):
        return None, "empty_question"
    if len(options) < 2:
        return None, "too_few_options"
    if len(options) > MAX_OPTIONS:
        return None, "too_many_options"
    letters = [k for k, _ in options]
    if letters != list(LETTERS[:len(options)]):
        return None, "bad_option_letters"
    normalized = [option_key(v) for _, v in options]
    if not all(normalized):
        return None, "empty_option"
    if len(set(normalized)) != len(normalized):
        return None, "duplicate_options"
    if answer is None:
        return None, "no_answer"
    if answer not in letters:
        return None, "answer_not_in_options"
    # "Answer: B. metoprolol" is fine; "Answer: Aspirin" is not the letter A.
    rest = answer_rest.strip("*").strip()
    if rest and option_named(rest, [v for _, v in options]) != letters.index(answer):
        return None, "no_answer"
    item = {"question": question, "options": dict(options), "answer_idx": answer}
    # The record schema is the last word: whatever it rejects, we reject.
    if question_problem({"id": "probe", **item}) is not None:
        return None, "bad_option_letters"
    return item, None

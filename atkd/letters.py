"""The option-letter rule (ARCHITECTURE.md §7): which token is "the answer", and reading a letter from text.

The answer token for letter X is the first token of a reply that is X, derived per tokenizer by
encoding a probe prompt with and without the reply, and checked to decode to X. Scoring, teacher
logits and training all use these ids, so KD and CE see the same tokens (the reference mixed
" A" and "A").
"""

from __future__ import annotations

import re
import weakref

from .errors import InputError
from .prompts import LABELS, encode_prompt, render, reply_prefix

# Per tokenizer object (weakly held: a freed tokenizer's id() can be reused by a new one).
_CACHE: "weakref.WeakKeyDictionary[object, dict[str, dict[str, int]]]" = weakref.WeakKeyDictionary()


def letter_token_ids(tokenizer, letters: list[str] | str, lang: str = "en", source: str = "tokenizer") -> list[int]:
    """Token id of each letter at the answer position; `InputError` if a letter is not one token."""
    table = _CACHE.setdefault(tokenizer, {}).setdefault(lang, {})
    missing = [L for L in letters if L not in table]
    if missing:
        probe = render(tokenizer, "?", plain_cue=LABELS[lang].answer)
        base = encode_prompt(tokenizer, probe)
        prefix = reply_prefix(tokenizer, lang)
        for letter in missing:
            full = encode_prompt(tokenizer, probe + prefix + letter)
            if len(full) <= len(base) or full[: len(base)] != base:
                raise InputError(source, f"option letter {letter!r} changes the prompt's tokens; "
                                         "cannot score letters with this tokenizer")
            tok = full[len(base)]
            if tokenizer.decode([tok]).strip() != letter:
                raise InputError(source, f"option letter {letter!r} is not a single token at the answer "
                                         f"position (first token decodes to {tokenizer.decode([tok])!r})")
            table[letter] = tok
    ids = [table[L] for L in letters]
    if len(set(ids)) != len(ids):
        raise InputError(source, "two option letters map to the same token")
    return ids


# Markers that introduce a final answer, strongest first. The letter must stand alone: never
# the first capital of a word ("Aspirin"), the article "A" in prose, or a roman numeral.
_ANSWER_MARKERS = [
    r"(?:final\s+answer|answer|correct\s+(?:option|answer|choice))\s*(?:is|:|：|=)?\s*(?:option\s*)?[\(\[]?\s*([A-Z])\s*[\)\]]?(?![A-Za-z])",
    r"(?:答案|正确答案|正确选项|故选|应选|选择)\s*(?:是|为|：|:)?\s*[\(（\[]?\s*([A-Z])(?![A-Za-z])",
]
_SOLE = re.compile(r"^\W*([A-Z])\W*$")
_LEADING = re.compile(r"^\s*[\(（\[]?([A-Z])\s*[\)）\].:：、]")
_BRACKETED = re.compile(r"[\(（\[]([A-Z])[\)）\]]")


def extract_letter(text: str, letters: list[str], options: dict[str, str] | None = None) -> str | None:
    """The option letter a free-text reply commits to, or None when it commits to none."""
    if not text:
        return None
    allowed = set(letters)
    for pattern in _ANSWER_MARKERS:
        hits = [m.group(1) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
        hits = [h.upper() for h in hits if h.upper() in allowed and h.isupper()]
        if hits:
            return hits[-1]  # the last stated answer is the final one
    stripped = text.strip()
    for pattern in (_SOLE, _LEADING):
        m = pattern.match(stripped)
        if m and m.group(1) in allowed:
            return m.group(1)
    bracketed = {m.group(1) for m in _BRACKETED.finditer(text)} & allowed
    if len(bracketed) == 1:  # "Definitely (B)." - but "(A) or (C)" commits to nothing
        return bracketed.pop()
    if options:
        first_line = stripped.splitlines()[0].strip().rstrip(".。") if stripped else ""
        matches = [k for k, v in options.items() if v.strip().lower() == first_line.lower()]
        if len(matches) == 1:
            return matches[0]
    return None

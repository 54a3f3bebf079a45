"""The option-letter rule (ARCHITECTURE.md §7): which token is "the answer", and reading a letter from text.

The answer token for letter X is the first token of a reply that is X, as the model would emit it:
- with a chat template, the first token the template puts after the generation prompt when the
  assistant's turn is "X" (`prompts.reply_token_ids`). SentencePiece chat formats (Llama-2/Mistral
  "[INST] ... [/INST]") render the reply as " X", so their letter is "▁X", not the bare "X";
- without one, the token that follows the plain prompt's "Answer:" cue (plus `reply_prefix`).
Each is checked to decode to X and to differ from the other letters' tokens. Scoring, teacher
logits and training all use these ids, so KD and CE see the same tokens (the reference mixed
" A" and "A").
"""

from __future__ import annotations

import logging
import re
import unicodedata
import weakref

from .errors import InputError
from .prompts import LABELS, encode_prompt, has_chat_template, render, reply_prefix, reply_token_ids

log = logging.getLogger(__name__)

# Per tokenizer object (weakly held: a freed tokenizer's id() can be reused by a new one).
_CACHE: "weakref.WeakKeyDictionary[object, dict[str, dict[str, int]]]" = weakref.WeakKeyDictionary()


def letter_token_ids(tokenizer, letters: list[str] | str, lang: str = "en", source: str = "tokenizer") -> list[int]:
    """Token id of each letter at the answer position; `InputError` if a letter is not one token."""
    table = _CACHE.setdefault(tokenizer, {}).setdefault(lang, {})
    for letter in [L for L in letters if L not in table]:
        tok = (_template_letter_token if has_chat_template(tokenizer) else _cue_letter_token)(
            tokenizer, letter, lang, source)
        if tokenizer.decode([tok]).strip() != letter:
            raise InputError(source, f"option letter {letter!r} is not a single token at the answer "
                                     f"position (first token decodes to {tokenizer.decode([tok])!r})")
        table[letter] = tok
    ids = [table[L] for L in letters]
    if len(set(ids)) != len(ids):
        raise InputError(source, "two option letters map to the same token")
    return ids


def _template_letter_token(tokenizer, letter: str, lang: str, source: str) -> int:
    """The first token the chat template puts after the generation prompt for the reply `letter`.

    A template that refuses to render an assistant turn falls back to the letter appended to the
    generation prompt (right for every template whose reply starts flush after it).
    """
    try:
        ids = reply_token_ids(tokenizer, letter)
    except Exception as exc:  # jinja2's TemplateError, or raise_exception() inside the template
        log.warning("chat template cannot render an assistant reply (%s); the letter token is the bare letter "
                    "after the generation prompt", exc)
        return _cue_letter_token(tokenizer, letter, lang, source)
    if not ids:
        raise InputError(source, f"the chat template renders no assistant reply {letter!r} after its generation "
                                 "prompt; cannot score letters with this template")
    return ids[0]


def _cue_letter_token(tokenizer, letter: str, lang: str, source: str) -> int:
    """The token after the plain prompt's answer cue when the reply is `letter` (no chat template)."""
    probe = render(tokenizer, "?", plain_cue=LABELS[lang].answer)
    base = encode_prompt(tokenizer, probe)
    full = encode_prompt(tokenizer, probe + reply_prefix(tokenizer, lang) + letter)
    if len(full) <= len(base) or full[: len(base)] != base:
        raise InputError(source, f"option letter {letter!r} changes the prompt's tokens; "
                                 "cannot score letters with this tokenizer")
    return full[len(base)]


# Reading a letter from a reply. The text is first normalised: NFKC folds full-width letters,
# colons and brackets (答案：（Ｂ）) to ASCII, and Markdown emphasis, inline code and heading marks
# are dropped (**Answer:** B). Then, strongest first: a LaTeX \boxed{X}; an answer label followed
# by the letter (the last one stated wins); "option X is correct"; a reply that is just the letter
# or starts with an option line; one lone bracketed letter; an option's own text. The letter must
# stand alone and be a capital: never the first capital of a word ("Aspirin"), the last of a
# distractor's text ("Hepatitis C"), the article "A"/"a" in prose, or one of two candidates ("B or C").
_MARKUP = re.compile(r"\*+|_{2,}|`+|^[ \t]*#{1,6}[ \t]*", re.MULTILINE)
_ALONE = r"(?![A-Za-z0-9])(?!\s*(?:or|and|/|或|和|与)\s*\(?[A-Z](?![A-Za-z0-9]))"
_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\(?\s*([A-Z])" + _ALONE)
_LABELLED = [
    re.compile(r"\b(?i:final\s+answer|(?:correct|right|best)\s+(?:answer|option|choice)|answer)\b"
               r"\s*(?i:is|should\s+be|would\s+be|will\s+be)?\s*[:=\-–—]?\s*(?i:option|choice)?\s*[(\[]?\s*([A-Z])"
               + _ALONE),
    re.compile(r"(?:答案|正确选项|(?<!不)选择|(?<![不项])选(?![项择]))[】\]]?\s*(?:应该?)?\s*(?:是|为)?\s*[:]?\s*"
               r"(?:选项)?\s*[(\[【]?\s*([A-Z])" + _ALONE),
]
_CORRECT = [
    re.compile(r"(?:^|[.!?。\n]\s*|\b(?i:option|choice)\s*)\(?([A-Z])\)?\s+(?i:is)\s+(?i:the\s+)?(?i:correct|right)\b"),
    re.compile(r"(?<![A-Za-z和与或、,])(?:选项)?\s*([A-Z])\s*(?:选项)?\s*(?:是)?(?:正确|对)(?!吗)"),
]
_SOLE = re.compile(r"^\W*([A-Z])\W*$")
_LEADING = re.compile(r"^\s*[(\[【]?([A-Z])\s*[)\]】.:、]")
_BRACKETED = re.compile(r"[(\[【]([A-Z])[)\]】]")
_LABEL_THEN_TEXT = re.compile(r"(?:\b(?i:answer)\b\s*(?i:is)?\s*[:=]?|答案\s*(?:是|为)?\s*[:]?)[ \t]*([^\n]+)")


def normalised_reply(text: str) -> str:
    """`text` with full-width forms folded to ASCII and Markdown emphasis/code/heading marks removed."""
    return _MARKUP.sub("", unicodedata.normalize("NFKC", text))


def extract_letter(text: str, letters: list[str], options: dict[str, str] | None = None) -> str | None:
    """The option letter a free-text reply commits to, or None when it commits to none."""
    if not text:
        return None
    text = normalised_reply(text)
    allowed = set(letters)
    for patterns in ([_BOXED], _LABELLED, _CORRECT):
        hits = sorted((m.start(1), m.group(1)) for p in patterns for m in p.finditer(text) if m.group(1) in allowed)
        if patterns is _CORRECT and len({h for _, h in hits}) > 1:
            return None  # "A is correct ... C is correct": no single commitment
        if hits:
            return hits[-1][1]  # the last stated answer is the final one
    stripped = text.strip()
    # the letter alone (on the reply's only or first line: "B" then the explanation), or a leading "B." / "(B)"
    for pattern, part in ((_SOLE, stripped), (_SOLE, stripped.splitlines()[0] if stripped else ""), (_LEADING, stripped)):
        m = pattern.match(part)
        if m and m.group(1) in allowed:
            return m.group(1)
    bracketed = {m.group(1) for m in _BRACKETED.finditer(text)} & allowed
    if len(bracketed) == 1:  # "Definitely (B)." - but "(A) or (C)" commits to nothing
        return bracketed.pop()
    return letter_of_option_text(stripped, options) if options else None


def letter_of_option_text(text: str, options: dict[str, str]) -> str | None:
    """The option whose text is the reply's first line, or what follows its last answer label."""
    candidates = [m.group(1) for m in _LABEL_THEN_TEXT.finditer(text)][-1:] + text.splitlines()[:1]
    for candidate in candidates:
        said = candidate.strip().rstrip(".。!！").strip().lower()
        matches = [k for k, v in options.items() if normalised_reply(v).strip().lower() == said]
        if len(matches) == 1:
            return matches[0]
    return None

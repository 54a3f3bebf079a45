"""The option-letter rule (ARCHITECTURE.md §7): which token is "the answer", and reading a letter from text.

The answer token for letter X is the first token of a reply that is X, as the model would emit it:
- with a chat template, the first token the template puts after the generation prompt when the
  assistant's turn is "X" (`prompts.reply_token_ids`). SentencePiece chat formats (Llama-2/Mistral
  "[INST] ... [/INST]") render the reply as " X", so their letter is "▁X", not the bare "X";
- without one, the token that follows the plain prompt's "Answer:" cue (plus `reply_prefix`).
Each is checked to decode to X and to differ from the other letters' tokens; a chat template's letter
is also checked to be the token the tokenizer gives for the template's generation prompt followed by
the reply, right after the rendered prompt's ids (a prompt ending "ASSISTANT: " is rendered without
that space, which starts the reply: `prompts.reply_joined_whitespace`), else refused. Scoring, teacher
logits and training all use these ids, so KD and CE see the same tokens (the reference mixed
" A" and "A").
"""

from __future__ import annotations

import logging
import re
import unicodedata
import weakref
from typing import NamedTuple

from .errors import InputError
from .prompts import (LABELS, encode_prompt, has_chat_template, render, reply_lead, reply_prefix, reply_token_ids,
                      templated_prompt)

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
    _check_letter_continues_prompt(tokenizer, letter, ids[0], source)
    return ids[0]


def _check_letter_continues_prompt(tokenizer, letter: str, token: int, source: str) -> None:
    """Refuse a letter token that is not what the tokenizer gives for the template's generation prompt
    followed by the letter (as its assistant turn writes it: " A" for Llama-2): the rendered prompt's ids
    and the letter's must be exactly those ids, or scoring and training would put the letter after
    tokens the model never sees before it (a lone space token after "ASSISTANT: "), or score a token
    the tokenizer never produces there (a template whose turns differ from its generation prompt)."""
    said = templated_prompt(tokenizer, "?") + reply_lead(tokenizer, letter) + letter
    if encode_prompt(tokenizer, said) != encode_prompt(tokenizer, render(tokenizer, "?")) + [token]:
        raise InputError(source, f"the chat template's prompt followed by the letter {letter!r} (...{said[-24:]!r}) "
                                 "is not tokenized as the prompt's tokens then one letter token; cannot score or "
                                 "train letters with this template")


def _cue_letter_token(tokenizer, letter: str, lang: str, source: str) -> int:
    """The token after the plain prompt's answer cue when the reply is `letter` (no chat template)."""
    probe = render(tokenizer, "?", plain_cue=LABELS[lang].answer)
    base = encode_prompt(tokenizer, probe)
    full = encode_prompt(tokenizer, probe + reply_prefix(tokenizer, lang) + letter)
    if len(full) <= len(base) or full[: len(base)] != base:
        raise InputError(source, f"option letter {letter!r} changes the prompt's tokens; "
                                 "cannot score letters with this tokenizer")
    return full[len(base)]


# Reading a letter from a reply (ARCHITECTURE.md §7). A reply's letter is the single option it
# commits to as its answer; a wrong letter is far worse than none (a misread silently keeps a bad
# question in step D or drops a good one, and moves an accuracy), an unread reply is data (counted
# as unparsed). The text is first normalised: NFKC folds full-width letters, colons and brackets
# (答案：（Ｂ）) to ASCII, and Markdown emphasis, inline code and heading marks are dropped.
#
# Commitments, each at its place in the text:
# - a labelled answer: `Answer: B`, `Final answer - B`, `The answer is (B)`, `I would choose B`,
#   `答案：B`, `正确答案是B`, `故选B`, `答：B`, `\boxed{B}`;
# - a judged option: `B is correct`, `C is the answer`, `B选项正确`, `选项C是正确的`;
# - the letter alone: the whole reply, or its first line ("D" then the explanation); a reply that
#   starts with one option line ("B. Heparin is ...");
# - the option's own text as the whole reply, after an answer label, or before "is the answer".
# What never commits: a letter that is part of a word or of an option's text ("Aspirin",
# "Hepatitis C"); a label without a separator ("Answer B is wrong"); a letter followed by "?"
# ("Answer: B?") or judged wrong ("B is wrong"); negations ("not A", "不是A", "不选B": the label
# patterns never cross them); anything in a sentence that says "if"/"unless"/"如果"/"若"...
# (hypotheticals); a reply going option by option ("A. Aspirin: ...\nB. Heparin: ...").
# Then: several letters given as one answer ("A, C", "B或C", "(A) and (B)"), commitments that
# disagree, or a retraction after the last one ("wait", "等等"): no letter. A lone bracketed letter
# in a short reply ("Definitely (B).") is read only when nothing else commits.
_MARKUP = re.compile(r"\*+|_{2,}|`+|^[ \t]*#{1,6}[ \t]*", re.MULTILINE)
_LETTER = r"[(\[【]?\s*(?P<letter>[A-Z])(?![A-Za-z0-9])"
_CONNECTOR = (r"(?P<conn>(?:\s*(?:[:=\-–—]|\n|(?i:is|was|should\s+be|would\s+be|will\s+be|must\s+be|remains|"
              r"actually|definitely|clearly|probably|likely|most\s+likely|therefore|thus|then|indeed|still|either|"
              r"option|choice)\b))*)\s*")
_COMMITMENTS = [
    re.compile(r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?" + _LETTER),
    re.compile(r"\b(?i:(?:final|correct|right|best)\s+(?:answer|option|choice)|answer)\b" + _CONNECTOR + _LETTER),
    re.compile(r"\b(?i:I(?:\s+would|'d|\s+will|'ll)?\s+(?:choose|pick|select|go\s+with))\s*(?i:option|choice)?\s*"
               + _LETTER),
    re.compile(r"(?:(?:最终|正确|参考)?答案|正确选项|答(?=\s*:))[】\]]?\s*(?:应该|应当|应)?\s*"
               r"(?:是|为|选)?\s*:?\s*(?:选项)?\s*" + _LETTER),
    re.compile(r"(?:(?<![不项])选(?![项择])|(?<!不)选择)\s*:?\s*(?:选项)?\s*" + _LETTER),
    re.compile(r"(?:^|[.!?。\n]\s*|\b(?i:option|choice)\s+)[(\[]?(?P<letter>[A-Z])[)\]]?\s+(?i:is)\s+(?i:the\s+)?"
               r"(?i:correct|right|best|answer)\b"),
    re.compile(r"(?<![A-Za-z和与或、,])(?:选项)?\s*(?P<letter>[A-Z])\s*(?:选项)?\s*(?:是)?(?:正确|对)(?!吗)"),
]
# A label must be separated from its letter ("Answer: B", "answer is B", a line break), not "Answer B is wrong".
_SEPARATED = re.compile(r"[:=\-–—\n]|\b(?:is|was|be|option|choice)\b", re.IGNORECASE)
# After a letter: another letter of the same answer ("A, C", "B或C", "(B) or (C)", "B and possibly C").
_MORE = re.compile(r"\s*[)\]】]?\s*(?:,|、|/|&|(?i:or|and)\b|或者?|和|与|以及|及)\s*"
                   r"(?:(?i:possibly|maybe|perhaps|also)\s+)?(?:(?i:option|choice)\s*|选项\s*)?"
                   r"[(\[【]?\s*[A-Z](?![A-Za-z0-9])")
# After a letter: a question ("Answer: B?") or a verdict against it ("B is wrong", "B不正确").
_NOT_AN_ANSWER = re.compile(r"\s*[)\]】]?\s*(?:\?|(?i:is|was)\s+(?i:wrong|incorrect|not|false)\b|"
                            r"错误|不正确|不对|是错)")
_HYPOTHETICAL = re.compile(r"\b(?i:if|unless|suppose|supposing|assuming|otherwise)\b|如果|假如|假设|倘若|要是|若")
_NEGATION = re.compile(r"\b(?i:not|never|except|rather\s+than|instead\s+of)\b|n't\b|不是|不选|排除|除了|非")
_RETRACTION = re.compile(r"\b(?i:wait|hold\s+on|scratch\s+that|on\s+second\s+thought|let\s+me\s+reconsider|"
                         r"I\s+made\s+a\s+mistake)\b|等等|等一下|更正|我错了|重新考虑|再想想")
_SENTENCE_END = re.compile(r"[.!?。！？\n]")
_SOLE = re.compile(r"^\W*(?:(?i:option|choice)\s+|选项\s*)?([A-Z])\W*$")
_OPTION_LINE = re.compile(r"^\s*[(\[【]?([A-Z])\s*[)\]】.:、]", re.MULTILINE)
_ANALYSIS = re.compile(r":|\s[-–—]\s")  # "A. Aspirin: an antiplatelet ..." discusses an option, it does not pick it
_BRACKETED = re.compile(r"[(\[【]([A-Z])[)\]】]")
_BRACKETED_MAX_WORDS = 10  # a lone "(B)" commits only in a reply this short ("Definitely (B)."), not inside reasoning
_LABEL_THEN_TEXT = re.compile(r"(?:\b(?i:answer)\b\s*(?i:is)?\s*[:=]?|答案\s*(?:是|为)?\s*:?)[ \t]*([^\n]+)")
_TEXT_IS_ANSWER = re.compile(r"^[ \t]*([^\n]+?)\s+(?i:is\s+the\s+(?:correct\s+|right\s+|best\s+)?answer)\b",
                             re.MULTILINE)


def normalised_reply(text: str) -> str:
    """`text` with full-width forms folded to ASCII and Markdown emphasis/code/heading marks removed."""
    return _MARKUP.sub("", unicodedata.normalize("NFKC", text))


def extract_letter(text: str, letters: list[str], options: dict[str, str] | None = None) -> str | None:
    """The option letter a free-text reply commits to, or None when it commits to none (or to several)."""
    if not text:
        return None
    text = normalised_reply(text)
    allowed = set(letters)
    found = commitments(text, allowed, options)
    if not found:
        return lone_bracketed_letter(text, allowed)
    if any(c.several for c in found):
        return None  # "Answer: A, C": several letters as one answer
    said = {c.letter for c in found}
    if len(said) > 1:
        return None  # "Answer: A ... the answer is actually C": labelled answers that disagree
    last = max(c.at for c in found)
    if _RETRACTION.search(text, last):
        return None  # "the answer is D ... wait, no.": the last answer is taken back
    return said.pop()


class Commitment(NamedTuple):
    """One answer a reply states: where (its letter's offset), which letter, and whether more letters follow it."""

    at: int
    letter: str
    several: bool = False  # "A, C", "B或C", "(A) and (B)": this answer names several options


def commitments(text: str, allowed: set[str], options: dict[str, str] | None) -> list[Commitment]:
    """Every answer the (normalised) reply states, in no particular order."""
    found = []
    for pattern in _COMMITMENTS:
        for m in pattern.finditer(text):
            at = m.start("letter")
            if m.group("letter") not in allowed or not _committed_here(text, m):
                continue
            found.append(Commitment(at, m.group("letter"), bool(_MORE.match(text, m.end("letter")))))
    found += _leading_commitment(text, allowed)
    if options:
        found += [Commitment(at, letter) for at, letter in option_text_commitments(text, options)]
    return found


def _committed_here(text: str, m: re.Match) -> bool:
    """Whether the match states an answer: separated from its label, not asked or judged wrong, not hypothetical."""
    if "conn" in m.groupdict() and m.group("conn") is not None and not _SEPARATED.search(m.group("conn")):
        return False
    if _NOT_AN_ANSWER.match(text, m.end("letter")):
        return False
    return not _HYPOTHETICAL.search(_sentence(text, m.start(), m.end("letter")))


def _sentence(text: str, start: int, end: int) -> str:
    """The sentence (or line) holding text[start:end]."""
    before = max((m.end() for m in _SENTENCE_END.finditer(text, 0, start)), default=0)
    after = _SENTENCE_END.search(text, end)
    return text[before: after.start() if after else len(text)]


def _leading_commitment(text: str, allowed: set[str]) -> list[Commitment]:
    """The letter alone (the whole reply or its first line), or a reply that starts with one option line."""
    stripped = text.strip()
    first = stripped.splitlines()[0] if stripped else ""
    offset = text.find(first)
    m = _SOLE.match(first)
    if m is None:
        m = _OPTION_LINE.match(first)
        others = {o.group(1) for o in _OPTION_LINE.finditer(stripped)} - {m.group(1)} if m else set()
        if m is None or others or _ANALYSIS.search(first, m.end()):
            return []  # no option line, or an option-by-option discussion
    if m.group(1) not in allowed or _NOT_AN_ANSWER.match(first, m.end(1)):
        return []
    return [Commitment(offset + m.start(1), m.group(1), bool(_MORE.match(first, m.end(1))))]


def lone_bracketed_letter(text: str, allowed: set[str]) -> str | None:
    """The one bracketed letter of a short one-line reply with no negation ("Definitely (B)."), else None."""
    stripped = text.strip()
    if "\n" in stripped or len(stripped.split()) > _BRACKETED_MAX_WORDS:
        return None
    hits = [m for m in _BRACKETED.finditer(stripped) if m.group(1) in allowed]
    if len({m.group(1) for m in hits}) != 1 or _NEGATION.search(stripped) or _HYPOTHETICAL.search(stripped):
        return None
    if any(_NOT_AN_ANSWER.match(stripped, m.end(1)) for m in hits):
        return None
    return hits[0].group(1)


def option_text_commitments(text: str, options: dict[str, str]) -> list[tuple[int, str]]:
    """(position, letter) where the reply gives an option's own text as its answer: as its first line,
    after an answer label ("Answer: Heparin"), or before "is the answer"."""
    stripped = text.strip()
    candidates = [(text.find(stripped), stripped.splitlines()[0] if stripped else "")]
    candidates += [(m.start(1), m.group(1)) for m in _LABEL_THEN_TEXT.finditer(text)]
    candidates += [(m.start(1), m.group(1)) for m in _TEXT_IS_ANSWER.finditer(text)]
    found = []
    for at, candidate in candidates:
        letter = letter_of_option_text(candidate, options)
        if letter is not None and not _HYPOTHETICAL.search(_sentence(text, at, at + len(candidate))):
            found.append((at, letter))
    return found


def letter_of_option_text(text: str, options: dict[str, str]) -> str | None:
    """The one option whose text is `text` (case, closing full stop and Markdown aside), else None."""
    said = normalised_reply(text).strip().rstrip(".。!！").strip().lower()
    matches = [k for k, v in options.items() if said and normalised_reply(v).strip().lower() == said]
    return matches[0] if len(matches) == 1 else None

"""Every prompt the pipeline shows a model, in one place, in the data's language.

- the MCQ prompt (answering), identical for the student, the teacher, the agents and training;
- the chain-of-thought MCQ prompt (generate mode);
- the rationale prompt (generate_rationales.py): the answer line first, then a short reason;
- the question-writing prompt (generate_distill_data.py) and its strict reply format;
- the tree-building prompt (create_initial_tree.py).

With a chat template the prompt is rendered through it (generation prompt added) and the reply
starts right after; without one the prompt is plain text that ends with the answer label
("Answer:"), and the reply starts with a space (see `reply_prefix`).

Rendering is made to depend on nothing but the text and the tokenizer:
- the date is pinned (`PINNED_DATE`): Llama-3.x templates print today's date in the system header
  (`date_string`, or `strftime_now` when not given), which would change every prompt, the
  teacher/student byte-for-byte match across days and every resume fingerprint at midnight. A
  fixed `date_string` is passed, and `strftime_now("<fmt>")` calls are rewritten to the pinned
  date (`pinned_clock_template`);
- thinking is off: first-token letter scoring needs the letter to be the first token of the reply.
  `enable_thinking=False` is passed (Qwen3 then renders a closed, empty think block); a template
  whose generation prompt still ends inside an open think block (DeepSeek-R1 distills end with
  "<think>\\n") gets a closed empty block appended (`CLOSE_THINK`), so the letter is scored after it.
  Which of the two happened is logged once per tokenizer (`think_handling`);
- a generation prompt that ends in whitespace the tokenizer joins to the reply's first word
  ("... ASSISTANT: " then "A" is ":" + "ĠA", not ":" + "Ġ" + "ĠA") ends before that whitespace,
  and the reply starts with it (`reply_joined_whitespace`, `reply_prefix`): the prompt's ids
  followed by the letter's are the tokenizer's ids of the template's prompt followed by the letter,
  never a lone space token the model never saw before a letter.

`prompts_version(names)` is a short hash of what the named prompts render; a stage's fingerprint
includes it for the prompts that stage renders (`atkd.stages`), so changing a prompt reruns the
stages that render it and no other.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import re
import weakref
from dataclasses import dataclass

from .records import LETTERS, Question

log = logging.getLogger(__name__)

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")

# The "today" of every rendered prompt. 26 Jul 2024 is the date Llama-3.1/3.2 templates fall back
# to themselves when no date is available, so pinned prompts equal what those templates render
# offline; changing it changes `prompts_version()` and so reruns every stage that renders a prompt.
PINNED_DATE = datetime.date(2024, 7, 26)
DATE_STRING_FORMAT = "%d %b %Y"  # how Llama-3.x templates write date_string ("26 Jul 2024")

# The think-block tags of the reasoning families that use them (DeepSeek-R1 and its distills, Qwen3, QwQ).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CLOSE_THINK = THINK_CLOSE + "\n\n"  # what Qwen3 itself renders after an empty think block

# How a generation prompt's trailing whitespace is handled (see the module docstring); part of
# `prompts_version()`, so a change of the rule reruns the stages whose prompts it renders.
JOINED_WHITESPACE_RULE = "whitespace the tokenizer joins to the reply's first word starts the reply, not the prompt"


@dataclass(frozen=True)
class Labels:
    """The words of one language's prompts and formats."""

    question: str
    answer: str
    mcq_instruction: str
    cot_instruction: str
    write_intro: str
    write_examples: str
    write_task: str
    tree_task: str
    label_task: str
    rationale_instruction: str


LABELS = {
    "en": Labels(
        question="Question:",
        answer="Answer:",
        mcq_instruction="The following is a multiple-choice question. "
                        "Reply with the letter of the correct option only.",
        cot_instruction="The following is a multiple-choice question. Think it through "
                        "briefly, then give the final answer on the last line as \"Answer: <letter>\".",
        write_intro="You write multiple-choice exam questions about {domain}.\nAbility: {ability}",
        write_examples="Example questions on this ability:",
        write_task="Write one new question on the same ability, different from the examples, with "
                   "{n} options ({first}-{last}) and exactly one correct option. Use exactly this "
                   "format and nothing else:",
        tree_task="List {n} distinct sub-abilities of \"{ability}\" in {domain}, from broad to specific. "
                  "One short name per line, numbered 1., 2., ..., with no explanations.",
        label_task="Which ability does this exam question test? \"{question}\" (its options: {options})",
        rationale_instruction="The following is a multiple-choice question. Give the answer first, as "
                              "\"Answer: <letter>\" on the first line, then explain briefly why.",
    ),
    "zh": Labels(
        question="问题：",
        answer="答案：",
        mcq_instruction="以下是一道单项选择题。只回答正确选项的字母。",
        cot_instruction="以下是一道单项选择题。请简要分析，最后一行写出\"答案：<字母>\"。",
        write_intro="你负责编写{domain}的单项选择题。\n能力：{ability}",
        write_examples="该能力的示例题目：",
        write_task="请就同一能力编写一道与示例不同的新题目，共{n}个选项（{first}-{last}），"
                   "且只有一个正确选项。严格使用以下格式，不要输出其他内容：",
        tree_task="列出{domain}中\"{ability}\"的{n}个不同的子能力，由宽到窄。"
                  "每行一个简短名称，编号为1.、2.、……，不要解释。",
        label_task="这道考题考查的是哪一项能力？“{question}”（选项：{options}）",
        rationale_instruction="以下是一道单项选择题。先在第一行写出\"答案：<字母>\"，再简要说明理由。",
    ),
}
LANGUAGES = tuple(LABELS)
ABILITY_SEP = " > "


def language_of(questions: list[Question], lang: str = "auto") -> str:
    """`lang` itself, or the language detected from the questions' text when it is "auto"."""
    if lang != "auto":
        if lang not in LABELS:
            raise ValueError(f"unknown language {lang!r}; choose auto, {', '.join(LABELS)}")
        return lang
    return detect_language([q.question for q in questions])


def detect_language(texts: list[str]) -> str:
    """'zh' when CJK characters make up at least 10% of the letters, else 'en'."""
    sample = "".join(texts[:200])
    letters = sum(ch.isalpha() for ch in sample)
    cjk = len(_CJK.findall(sample))
    return "zh" if letters and cjk / letters >= 0.1 else "en"


def question_block(q: Question, lang: str, with_answer: bool = False) -> str:
    """`Question: ...` / `A. ...` lines (and `Answer: X`): the format of both prompts and replies."""
    lab = LABELS[lang]
    lines = [f"{lab.question} {q.question.strip()}" if lang == "en" else f"{lab.question}{q.question.strip()}"]
    lines += [f"{k}. {v.strip()}" for k, v in q.options.items()]
    if with_answer:
        lines.append(answer_line(q.answer_idx, lang))
    return "\n".join(lines)


def answer_line(letter: str, lang: str) -> str:
    lab = LABELS[lang]
    return f"{lab.answer} {letter}" if lang == "en" else f"{lab.answer}{letter}"


def mcq_user_text(q: Question, lang: str, cot: bool = False) -> str:
    """The MCQ prompt's words. Domain-free on purpose: every stage renders it identically from the
    question alone, so the teacher's logits and the student's training prompt match byte for byte."""
    lab = LABELS[lang]
    instruction = lab.cot_instruction if cot else lab.mcq_instruction
    return f"{instruction}\n\n{question_block(q, lang)}"


def rationale_user_text(q: Question, lang: str) -> str:
    """The rationale prompt's words: answer first, then why (its reply is `rationale_reply`)."""
    return f"{LABELS[lang].rationale_instruction}\n\n{question_block(q, lang)}"


def rationale_reply(letter: str, reason: str, lang: str) -> str:
    """A rationale reply as the prompt asks for it: the answer line, then the reason on the next line(s)."""
    return f"{answer_line(letter, lang)}\n{reason.strip()}"


def reason_of(reply: str) -> str:
    """The reason of a rationale reply (the inverse of `rationale_reply`): what follows its first non-empty
    line (the answer line), stripped."""
    lines = reply.strip().splitlines()
    return "\n".join(lines[1:]).strip()


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_kwargs() -> dict:
    """Extra variables every chat template is rendered with (see the module docstring)."""
    return dict(enable_thinking=False, date_string=PINNED_DATE.strftime(DATE_STRING_FORMAT))


# `strftime_now("<format>")` with a literal format: how templates that print a date call the clock.
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def pinned_clock_template(template: str) -> tuple[str, tuple[str, ...]]:
    """`template` with each `strftime_now("<fmt>")` call replaced by the pinned date in that format.

    transformers' `strftime_now` is a global of its Jinja environment that reads the real clock, and
    transformers 5 replaces callables passed as template variables with inert placeholders, so the
    clock cannot be swapped from outside: the calls are rewritten into `atkd_pinned_dates[i]`, a
    plain list passed with the render. (A format held in a variable, which no known template uses,
    would still read the clock.)
    """
    return _pinned_clock_template(template, PINNED_DATE)


@functools.lru_cache(maxsize=64)
def _pinned_clock_template(template: str, date: datetime.date) -> tuple[str, tuple[str, ...]]:
    formats: list[str] = []

    def pinned(m: re.Match) -> str:
        if m.group(2) not in formats:
            formats.append(m.group(2))
        return f"atkd_pinned_dates[{formats.index(m.group(2))}]"

    rewritten = _STRFTIME_CALL.sub(pinned, template)
    return rewritten, tuple(date.strftime(f) for f in formats)


def apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool, enable_thinking: bool = False) -> str:
    """The chat template's text for `messages`, with the date pinned (and, by default, thinking off)."""
    kwargs = dict(template_kwargs(), enable_thinking=enable_thinking)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the one apply_chat_template would pick
        template = tokenizer.get_chat_template()
    if "strftime_now" in template:
        template, dates = pinned_clock_template(template)
        kwargs.update(chat_template=template, atkd_pinned_dates=list(dates))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def render(tokenizer, user_text: str, plain_cue: str = "") -> str:
    """The full prompt text: through the chat template when there is one, else plain text + cue."""
    if has_chat_template(tokenizer):
        text = templated_prompt(tokenizer, user_text)
        joined = reply_joined_whitespace(tokenizer)
        return text[: -len(joined)] if joined and text.endswith(joined) else text
    return f"{user_text}\n\n{plain_cue}" if plain_cue else f"{user_text}\n\n"


def templated_prompt(tokenizer, user_text: str) -> str:
    """The chat template's prompt for `user_text`: the generation prompt added, an open think block closed,
    and its trailing whitespace kept (`render` drops what `reply_joined_whitespace` moves into the reply)."""
    text = apply_template(tokenizer, [{"role": "user", "content": user_text}], add_generation_prompt=True)
    _log_think_handling(tokenizer)
    if ends_in_open_think(text, user_text):
        text += CLOSE_THINK
    return text


# Per tokenizer object (weakly held), the trailing whitespace of its generation prompt that starts the reply.
_JOINED: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def reply_joined_whitespace(tokenizer) -> str:
    """The whitespace ending the chat template's generation prompt that the tokenizer joins to the reply's
    first word: " " for "... ASSISTANT: " with a byte-level or SentencePiece tokenizer ("A" after it is
    ":" + "ĠA"); "" for every template whose prompt ends in a newline or no whitespace, or with no template.

    `render` ends the prompt before it and `reply_prefix` starts the reply with it. When no cut gives
    the prompt's ids followed by the reply's, it is "" and the letter check refuses the template
    (`atkd.letters.letter_token_ids`).
    """
    if not has_chat_template(tokenizer):
        return ""
    if tokenizer not in _JOINED:
        _JOINED[tokenizer] = _joined_whitespace(tokenizer, templated_prompt(tokenizer, "?"))
        if _JOINED[tokenizer]:
            log.info("chat template's generation prompt ends in %r, which the tokenizer joins to the reply's first "
                     "word: prompts end before it and the answer letter's token carries it", _JOINED[tokenizer])
    return _JOINED[tokenizer]


def _joined_whitespace(tokenizer, prompt: str) -> str:
    """The shortest whitespace tail of `prompt` whose removal makes the prompt's ids a prefix of the ids of
    `prompt` + "A" ("" when the whitespace keeps its own tokens, as a newline does)."""
    trailing = len(prompt) - len(prompt.rstrip())
    if not trailing:
        return ""
    full = encode_prompt(tokenizer, prompt + "A")
    for k in range(trailing + 1):  # k = 0: the whitespace keeps its own tokens ("\n"), nothing moves
        head = encode_prompt(tokenizer, prompt[: len(prompt) - k])
        if len(full) > len(head) and full[: len(head)] == head:
            return prompt[len(prompt) - k:]
    return ""


def ends_in_open_think(text: str, user_text: str = "") -> bool:
    """Whether `text` ends inside a think block the template opened after the user's words.

    Only the part after the user's text counts: a question that quotes "<think>" opens nothing.
    """
    at = text.rfind(user_text.strip()) if user_text.strip() else -1
    tail = text[at + len(user_text.strip()):] if at >= 0 else text
    opened = tail.rfind(THINK_OPEN)
    return opened >= 0 and THINK_CLOSE not in tail[opened:]


# Per tokenizer object (weakly held), how its template's think block is handled.
_THINK: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def think_handling(tokenizer) -> str:
    """How `render` keeps this tokenizer's reply from starting inside a think block.

    "enable_thinking": the template honours enable_thinking=False (its generation prompt changes);
    "closed": the generation prompt opens a think block anyway, `render` appends `CLOSE_THINK`;
    "none": no think block at the generation prompt (or no chat template).
    """
    if not has_chat_template(tokenizer):
        return "none"
    if tokenizer not in _THINK:
        user = [{"role": "user", "content": "?"}]
        off = apply_template(tokenizer, user, add_generation_prompt=True)
        on = apply_template(tokenizer, user, add_generation_prompt=True, enable_thinking=True)
        _THINK[tokenizer] = ("closed" if ends_in_open_think(off, "?") else
                             "enable_thinking" if on != off else "none")
    return _THINK[tokenizer]


_THINK_LOGGED: "weakref.WeakSet[object]" = weakref.WeakSet()


def _log_think_handling(tokenizer) -> None:
    """Say once per tokenizer which of the two ways turned thinking off, if either was needed."""
    if tokenizer in _THINK_LOGGED:
        return
    _THINK_LOGGED.add(tokenizer)
    how = think_handling(tokenizer)
    if how == "enable_thinking":
        log.info("chat template honours enable_thinking: thinking is turned off, the answer letter is the "
                 "reply's first token")
    elif how == "closed":
        log.info("chat template opens a think block at the generation prompt and has no switch for it: a "
                 "closed empty think block (%r) is appended, the answer letter is read after it", CLOSE_THINK)


def reply_token_ids(tokenizer, reply: str, user_text: str = "?") -> list[int]:
    """The token ids a chat template puts after the generation prompt when the assistant says `reply`:
    the reply as the model would emit it, then whatever closes the turn.

    Found by rendering [user, assistant=reply] and [user] + generation prompt and taking what
    follows their shared token prefix, so the ids are those of the reply in context (e.g. "▁A"
    after Llama-2's "[/INST] ", not "A"). Empty when the template renders no such turn.
    """
    prompt = encode_prompt(tokenizer, render(tokenizer, user_text))
    turn = encode_prompt(tokenizer, apply_template(
        tokenizer, [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}],
        add_generation_prompt=False))
    shared = 0
    while shared < min(len(prompt), len(turn)) and prompt[shared] == turn[shared]:
        shared += 1
    return turn[shared:]


def mcq_prompt(tokenizer, q: Question, lang: str, cot: bool = False) -> str:
    """The MCQ prompt text; the answer letter is the first token of the reply."""
    cue = "" if cot else LABELS[lang].answer
    return render(tokenizer, mcq_user_text(q, lang, cot), cue)


def rationale_prompt(tokenizer, q: Question, lang: str) -> str:
    """The rationale prompt text; the reply starts with the answer line."""
    return render(tokenizer, rationale_user_text(q, lang))


def reply_prefix(tokenizer, lang: str = "en") -> str:
    """What precedes the letter in a reply: after a chat template, the generation prompt's whitespace that
    starts the reply (`reply_joined_whitespace`, nearly always ""); nothing after "答案："; a space after "Answer:"."""
    if has_chat_template(tokenizer):
        return reply_joined_whitespace(tokenizer)
    return "" if lang == "zh" else " "


def reply_lead(tokenizer, reply: str, user_text: str = "?") -> str:
    """The text a chat template's assistant turn puts between its generation prompt (`templated_prompt`, its
    trailing whitespace kept) and the reply `reply`: " " for Llama-2's "[/INST] A", "" for most. "" when
    the turn does not continue the generation prompt's text (R1 drops the think block of past turns)."""
    prompt = templated_prompt(tokenizer, user_text)
    turn = apply_template(tokenizer, [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}],
                          add_generation_prompt=False)
    at = turn.find(reply, len(prompt)) if turn.startswith(prompt) else -1
    return turn[len(prompt):at] if at >= 0 else ""


def encode_prompt(tokenizer, prompt_text: str) -> list[int]:
    """Token ids of a rendered prompt. Chat templates carry their own BOS; plain text gets the default."""
    add_special = not has_chat_template(tokenizer)
    return list(tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"])


def write_question_user_text(ability_path: list[str] | tuple[str, ...], seeds: list[Question],
                             n_options: int, lang: str, domain: str) -> str:
    """The teacher's question-writing prompt; its reply must follow `question_block(..., with_answer=True)`."""
    lab = LABELS[lang]
    letters = LETTERS[:n_options]
    template = "\n".join(
        [f"{lab.question} <question>" if lang == "en" else f"{lab.question}<问题>"]
        + [f"{k}. <option>" if lang == "en" else f"{k}. <选项>" for k in letters]
        + ([f"{lab.answer} <letter>"] if lang == "en" else [f"{lab.answer}<字母>"]))
    parts = [lab.write_intro.format(domain=domain, ability=ABILITY_SEP.join(ability_path))]
    if seeds:
        parts.append(lab.write_examples)
        parts += [question_block(s, lang, with_answer=True) for s in seeds]
    parts.append(lab.write_task.format(n=n_options, first=letters[0], last=letters[-1]))
    parts.append(template)
    return "\n\n".join(parts)


def ability_question(q: Question, abilities: list[str], lang: str) -> Question:
    """The labelling question: which of `abilities` does `q` test? An MCQ over the abilities, scored like
    any other (the letter probabilities pick the ability). `answer_idx` is a placeholder: nobody knows it."""
    sep = "; " if lang == "en" else "；"
    stem = LABELS[lang].label_task.format(question=q.question.strip(), options=sep.join(v.strip() for v in q.options.values()))
    return Question(id=q.id, question=stem, options=dict(zip(LETTERS, abilities)), answer_idx=LETTERS[0])


def tree_level_user_text(domain: str, ability_path: list[str] | tuple[str, ...], n: int, lang: str) -> str:
    """Ask for the children of one node of the ability tree."""
    return LABELS[lang].tree_task.format(n=n, domain=domain, ability=ABILITY_SEP.join(ability_path))


# The prompts a stage can render, by the names the stage table gives them (`atkd.stages`).
PROMPT_NAMES = ("mcq", "rationale", "write", "tree", "label")


def prompt_probes(name: str, lang: str) -> list[str]:
    """What prompt `name` renders on fixed probe inputs in `lang`, its reply format included: a change to any
    label, layout or function it goes through changes these texts, a change to a comment does not."""
    sample = Question(id=0, question="Q?", options={"A": "a", "B": "b"}, answer_idx="B")
    if name == "mcq":  # plain and chain of thought, the answer line, the plain-text cue
        return [mcq_user_text(sample, lang), mcq_user_text(sample, lang, cot=True), answer_line("C", lang),
                render(None, "u", LABELS[lang].answer)]
    if name == "rationale":
        return [rationale_user_text(sample, lang), rationale_reply("B", "why", lang), reason_of("Answer: B\nwhy")]
    if name == "write":  # the reply is parsed as question_block(..., with_answer=True) (atkd.qparse)
        return [write_question_user_text(["D", "E"], [sample], 4, lang, "dom"),
                question_block(sample, lang, with_answer=True)]
    if name == "tree":
        return [tree_level_user_text("dom", ["D"], 3, lang)]
    if name == "label":  # an MCQ over ability names: rendered through the MCQ prompt
        return [mcq_user_text(ability_question(sample, ["x", "y"], lang), lang)]
    raise ValueError(f"unknown prompt {name!r}; the prompts: {', '.join(PROMPT_NAMES)}")


def prompts_version(names: tuple[str, ...] | list[str] = PROMPT_NAMES) -> str:
    """12 hex digits identifying the prompts `names` (every prompt by default), in both languages, and how
    any prompt is rendered through a chat template (the pinned date, the think block, the joined whitespace).

    A stage's fingerprint holds the version of the prompts it renders only (`atkd.stages`), so editing
    the question-writing prompt reruns step C onward and not the steps before it.
    """
    produced: dict = {
        "date": PINNED_DATE.isoformat(),
        "date_format": DATE_STRING_FORMAT,
        "think": [THINK_OPEN, THINK_CLOSE, CLOSE_THINK],
        "template_kwargs": sorted(template_kwargs()),
        "joined_whitespace": JOINED_WHITESPACE_RULE,
        "ability_sep": ABILITY_SEP,
    }
    for name in sorted(set(names)):
        produced[name] = {lang: prompt_probes(name, lang) for lang in LABELS}
    blob = json.dumps(produced, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]

"""Every prompt the pipeline shows a model, in one place, in the data's language.

- the MCQ prompt (answering), identical for the student, the teacher, the agents and training;
- the chain-of-thought MCQ prompt (generate mode);
- the question-writing prompt (generate_distill_data.py) and its strict reply format;
- the tree-building prompt (create_initial_tree.py).

With a chat template the prompt is rendered through it (generation prompt added) and the reply
starts right after; without one the prompt is plain text that ends with the answer label
("Answer:"), and the reply starts with a space (see `reply_prefix`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .records import LETTERS, Question

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


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


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, user_text: str, plain_cue: str = "") -> str:
    """The full prompt text: through the chat template when there is one, else plain text + cue."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": user_text}]
        # enable_thinking=False keeps reasoning templates (Qwen3) from opening a think block;
        # templates that don't know the variable ignore it.
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    return f"{user_text}\n\n{plain_cue}" if plain_cue else f"{user_text}\n\n"


def mcq_prompt(tokenizer, q: Question, lang: str, cot: bool = False) -> str:
    """The MCQ prompt text; the answer letter is the first token of the reply."""
    cue = "" if cot else LABELS[lang].answer
    return render(tokenizer, mcq_user_text(q, lang, cot), cue)


def reply_prefix(tokenizer, lang: str = "en") -> str:
    """What precedes the letter in a reply: nothing after a chat template or "答案：", a space after "Answer:"."""
    return "" if has_chat_template(tokenizer) or lang == "zh" else " "


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

"""Fuzzing the strict question parser: it must never crash and never accept an invalid item.

A seeded corpus of over 10,000 strings: replies rendered from known items with one defect each
(missing parts, duplicate options differing only in space/width/invisible characters, answer
outside the options, letters skipping, the answer letter inside a word, prose between options...),
the same items rendered validly in many styles (Chinese labels, markdown, chatter around them),
and random soup made of format fragments. An independent oracle checks every accepted item.
"""

import random
import unicodedata

import pytest

from atkd.qparse import parse_question
from atkd.records import question_problem

EN = ("heart lung liver kidney aspirin insulin metoprolol amoxicillin femur tibia nerve muscle virus enzyme "
      "protein vein artery cell blood bone skin brain fever rash pain dose acute chronic").split()
ZH = ["阿司匹林", "胰岛素", "肝素", "心房颤动", "高血压", "肺炎", "糖尿病", "贫血", "骨折", "头痛", "发热", "咳嗽"]
CHATTER = ["Sure! Here is a new question:", "Here's one on the same ability.", "好的，以下是新题目：", "",
           "Note: the options are shuffled.", "I hope this helps."]
TRAILING = ["Explanation: the others are wrong.", "A. an extra option after the answer", "Question: another one?",
            "**Why:** because.", "答案解析：略。", ""]


def oracle_key(text: str) -> str:
    """Options that differ only in width, spaces, invisible characters or a final period are one option
    (case is kept: "GG" and "gg", "Co" and "CO" are different options)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Zs"))
    return text.rstrip(".。;；")


def assert_valid(item: dict) -> None:
    assert question_problem({"id": "x", **item}) is None, item
    keys = [oracle_key(v) for v in item["options"].values()]
    assert all(keys) and len(set(keys)) == len(keys), item
    assert item["answer_idx"] in item["options"], item
    assert oracle_key(item["question"]), item


# ------------------------------------------------------------------------ rendering known items

def make_item(rng: random.Random) -> dict:
    zh = rng.random() < 0.3
    words = ZH if zh else EN
    n = rng.randint(2, 6)
    options = []
    while len(options) < n:
        text = rng.choice(words) if rng.random() < 0.6 else f"{rng.choice(words)} {rng.choice(words)}"
        if oracle_key(text) not in {oracle_key(o) for o in options}:
            options.append(text)
    sep = "" if zh else " "
    question = sep.join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ("？" if zh else "?")
    letters = [chr(65 + i) for i in range(n)]
    return {"question": question, "options": dict(zip(letters, options)), "answer_idx": rng.choice(letters), "zh": zh}


def render(item: dict, rng: random.Random, defect: str | None = None) -> str:
    zh = item["zh"] and rng.random() < 0.8
    bold = rng.random() < 0.2
    q_label = "问题：" if zh else rng.choice(["Question:", "Question: ", "question: ", "QUESTION:"])
    a_label = "答案：" if zh else rng.choice(["Answer: ", "Answer:", "answer: "])
    if bold:
        q_label, a_label = f"**{q_label.strip()}** ", f"**{a_label.strip()}** "
    delim = rng.choice([". ", ") ", "、", "：", ". "])
    paren = delim == ") " and rng.random() < 0.5
    opts = list(item["options"].items())
    question = item["question"]
    answer = item["answer_idx"]
    if defect == "empty_question":
        question = rng.choice(["", "  ", "\u200b", "\u3000"])
    if defect == "duplicate":
        i, j = rng.sample(range(len(opts)), 2)
        src = opts[i][1]
        variant = rng.choice([f"  {src}  ", src.replace(" ", ""), src.replace(" ", "  "),
                              unicodedata.normalize("NFKC", src).translate({c: c + 0xFEE0 for c in range(0x21, 0x7F)}),
                              src[:1] + "\u200b" + src[1:], src + ".", src + "。", src + " ."])
        opts[j] = (opts[j][0], variant)
    if defect == "skip_letter" and len(opts) >= 3:
        del opts[rng.randrange(1, len(opts) - 1)]
        if answer not in dict(opts):
            answer = opts[0][0]
    if defect == "one_option":
        opts = opts[:1]
        answer = "A"
    if defect == "empty_option":
        k = rng.randrange(len(opts))
        opts[k] = (opts[k][0], rng.choice(["", " ", "\u200b", "."]))
    if defect == "swap_order":
        opts[0], opts[1] = opts[1], opts[0]
    if defect == "lowercase_letters":
        opts = [(k.lower(), v) for k, v in opts]
    lines = [rng.choice(CHATTER) for _ in range(rng.randint(0, 2))]
    lines.append(f"{q_label}{question}")
    for k, v in opts:
        label = f"({k}) " if paren else f"{k}{delim}"
        if defect == "markdown_bullets":
            label = "- " + label
        lines.append(f"{label}{v}")
        if defect == "prose_between" and k == "A":
            lines.append("This option is tempting but")
    if defect == "answer_outside":
        answer = chr(65 + len(opts) + rng.randint(0, 2))
    if defect == "answer_in_word":
        word = rng.choice(["spirin", "cute", "rtery", "lood", "one", "ever", "enzyme"])
        lines.append(f"{a_label}{answer}{word}")
    elif defect == "answer_wrong_text":
        others = [v for k, v in opts if k != answer]
        lines.append(f"{a_label}{answer}. {rng.choice(others)}")
    elif defect != "no_answer":
        style = rng.choice(["plain", "paren", "with_text", "bold"])
        text = dict(opts).get(answer, "")
        lines.append({"plain": f"{a_label}{answer}", "paren": f"{a_label}({answer})",
                      "with_text": f"{a_label}{answer}. {text}", "bold": f"{a_label}**{answer}**"}[style])
    lines += [rng.choice(TRAILING) for _ in range(rng.randint(0, 2))]
    return rng.choice(["\n", "\r\n"]).join(lines)


DEFECTS = ["empty_question", "duplicate", "skip_letter", "one_option", "empty_option", "swap_order",
           "lowercase_letters", "markdown_bullets", "prose_between", "answer_outside", "answer_in_word",
           "answer_wrong_text", "no_answer"]


def test_rendered_items_accepted_exactly_when_valid():
    rng = random.Random(20240601)
    accepted_valid = rejected_defective = 0
    for _ in range(3000):
        item = make_item(rng)
        got, reason = parse_question(render(item, rng))
        assert got is not None, (reason, item)
        assert got == {k: item[k] for k in ("question", "options", "answer_idx")}
        accepted_valid += 1
    for n in range(4000):
        item = make_item(rng)
        defect = DEFECTS[n % len(DEFECTS)]
        if defect == "skip_letter" and len(item["options"]) < 3:
            continue
        text = render(item, rng, defect)
        got, reason = parse_question(text)
        assert got is None, (defect, text, got)
        rejected_defective += 1
    assert accepted_valid == 3000 and rejected_defective > 3500


FRAGMENTS = ["Question:", "问题：", "**Question:**", "question :", "Answer:", "答案：", "**Answer:**", "正确答案：",
             "A.", "B.", "C)", "(D)", "E、", "F：", "Ａ．", "a.", "Z.", " ", "  ", "\n", "\n", "\n", "\r\n", "\u3000",
             "\u200b", "\ufeff", "foo", "Foo", "FOO", "ｆｏｏ", "f o o", "foo.", "阿司匹林", "阿司 匹林", "Aspirin",
             "aspirin", "**", "- ", "1.", "?", "？", "(", ")", "Explanation:", "A", "B", "C", "answer is B", "\t"]


def random_char(rng: random.Random) -> str:
    while True:
        c = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= c <= 0xDFFF:  # lone surrogates are not text
            return chr(c)


INLINE = [f for f in FRAGMENTS if "\n" not in f]


def content(rng: random.Random) -> str:
    """Option or question text: words, near-duplicate variants of "foo", invisible or odd characters."""
    if rng.random() < 0.15:
        return rng.choice(["foo", "Foo", "FOO", "ｆｏｏ", "f o o", "foo.", "fo\u200bo", "阿司匹林", "阿司 匹林", "阿司匹林。"])
    parts = [rng.choice(INLINE) if rng.random() < 0.3 else rng.choice(EN + ZH) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
    return "".join(parts) if rng.random() < 0.3 else " ".join(parts)


def soup_lines(rng: random.Random) -> str:
    """Reply-shaped soup: a question, options with letters now and then off, an answer, chatter."""
    lines = [rng.choice(CHATTER) for _ in range(rng.randint(0, 1))]
    if rng.random() < 0.9:
        lines.append(rng.choice(["Question: ", "问题：", "**Question:** ", "Question:"]) + content(rng))
    for k in range(rng.randint(1, 6)):
        letter = chr(65 + max(0, k + (rng.choice([-1, 1, 2]) if rng.random() < 0.05 else 0)))
        lines.append(letter + rng.choice([". ", ") ", "、", "：", "."]) + content(rng))
        if rng.random() < 0.03:
            lines.append(content(rng))
    if rng.random() < 0.9:
        tail = rng.choice(["", "", "", ".", "x", "spirin", ". " + content(rng), "**"])
        lines.append(rng.choice(["Answer: ", "答案：", "**Answer:** ", "answer:"]) + rng.choice("ABCDEFa") + tail)
    lines += [rng.choice(TRAILING + [content(rng)]) for _ in range(rng.randint(0, 2))]
    return "\n".join(lines)


def soup(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.1:  # raw random code points, any plane
        return "".join(random_char(rng) for _ in range(rng.randint(0, 60)))
    if r < 0.3:  # fragment soup
        return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 50)))
    return soup_lines(rng)


def test_soup_never_crashes_and_accepted_items_are_valid():
    rng = random.Random(7)
    accepted = 0
    for _ in range(6000):
        text = soup(rng)
        got, reason = parse_question(text)
        if got is None:
            assert reason
        else:
            assert reason is None
            assert_valid(got)
            accepted += 1
    assert accepted > 100  # the soup does reach the accept path, so the checks above ran


def test_hypothesis_texts_accepted_only_when_valid():
    hypothesis = pytest.importorskip("hypothesis")  # optional: the seeded corpora above always run
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=400, derandomize=True, deadline=None, database=None)
    @hypothesis.given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join) | st.text(max_size=80))
    def check(text):
        got, reason = parse_question(text)
        if got is not None:
            assert_valid(got)
        else:
            assert reason

    check()


# ------------------------------------------------------------------------ options keep their case

@pytest.mark.parametrize("options", [
    ["GG", "gg", "Gg"],  # genotypes
    ["Bb和Bb", "BB和BB", "bb和bb", "BB和bb"],
    ["Co", "CO", "Cu", "Ca"],  # cobalt, carbon monoxide
    ["mg", "Mg", "Mn", "Na"],  # milligram, magnesium
    ["Aa", "aa", "AA", "aA"],
])
def test_options_differing_only_in_case_are_different_options(options):
    reply = "Question: Which one?\n" + "\n".join(f"{k}. {v}" for k, v in zip("ABCDE", options)) + "\nAnswer: B"
    item, reason = parse_question(reply)
    assert reason is None and item["options"] == dict(zip("ABCDE", options)) and item["answer_idx"] == "B"


@pytest.mark.parametrize("a, b", [("ice cream", "icecream"), ("阿司 匹林", "阿司匹林"), ("Aspirin.", "Aspirin"),
                                  ("ＣＯ", "CO"), ("C\u200bO", "CO"), ("Mg 。", "Mg"), ("Bb 和 Bb", "Bb和Bb")])
def test_options_differing_in_width_spaces_or_a_final_period_are_one_option(a, b):
    item, reason = parse_question(f"Question: Which one?\nA. {a}\nB. x\nC. {b}\nAnswer: A")
    assert item is None and reason == "duplicate_options"


def test_the_text_after_the_answer_letter_names_its_option_with_case_deciding_between_case_twins():
    base = "Question: Which genotype is homozygous recessive?\nA. GG\nB. gg\nC. Gg\n"
    assert parse_question(base + "Answer: B. gg")[0]["answer_idx"] == "B"
    assert parse_question(base + "Answer: B. GG") == (None, "no_answer")  # names option A, not B
    assert parse_question("Question: Which?\nA. Metoprolol\nB. Aspirin\nAnswer: A. metoprolol")[0] is not None

"""Which option orders carry meaning, in English and Chinese, and the shuffle that keeps them.

Step C shuffles a written item's options with a seeded RNG so the correct option's position
carries no bias (ARCHITECTURE.md §9). Some options only mean something where they stand: one
naming other options by letter or place ("Both A and B", "A和C", "The first two") keeps the
item's order, and all/none-of-the-above options stay last. The rules live here, apart from the
question-writing stage, because they read the options' text alone.
"""

from __future__ import annotations

import random
import re

from .records import LETTERS


_TOKEN = re.compile(r"[A-Za-z]+|\d+|[\u3400-\u9fff]|\S")
_ABOVE_EN = re.compile(r"(?:(?:all|none|any|neither) (?:of )?(?:the )?(?:above|these|those|them|preceding)"
                       r"(?: (?:options|answers|choices|statements))?(?: (?:is|are) (?:correct|true|right))?"
                       r"|(?:all|none) (?:is|are) (?:correct|true|right))")
_ABOVE_ZH = re.compile(r"(?:以上|上述)(?:各项|选项|答案|说法|各选项|几项)?(?:都|均|皆|全|全部|全都)?"
                       r"(?:是|对|正确|不是|不对|不正确|非|错误|错)的?")
_FILLER_EN = {"both", "and", "or", "nor", "neither", "either", "only", "all", "except", "but", "not", "option",
              "options", "choice", "choices", "answer", "answers", "are", "is", "correct", "true", "right", "the",
              "of"}
_PLACE_EN = {"above", "below", "preceding", "former", "latter", "first", "second", "third", "fourth", "last",
             "two", "three"}
_FILLER_ZH = set("和与及或都均皆对是正确项选答案除外以之的者全部")
_PLACE_ZH = set("上述前后两三")


def option_position_kind(text: str, letters: str) -> str | None:
    """Whether an option's meaning depends on where the options stand (`letters`: the item's letters).

    "refers": it names other options by letter or by place, and so only means something in the
    order it was written in. It is made of option letters, place words and connectives alone,
    with two letters, or one letter and a word:
      English: "Both A and B", "A and C", "A, B and C only", "A,B", "A & B", "(A) and (C)",
               "Only A", "All except C", "Neither A nor B", "Option C", "Both of the above",
               "The first two";
      Chinese: "A和C", "A和C都对", "A、B", "A与B", "A及B", "A+B", "AB", "ACD", "除C外", "以上两项".
    A letter inside other words is not a reference: "Vitamin A and C", "Hepatitis B", "维生素A和C".
    "above": an all-of or none-of-the-above option, which stays last:
      English: "All of the above", "None of the above", "All the above", "None of these",
               "Neither of the above", "All are correct", "None is correct";
      Chinese: 以上都是, 以上均是, 以上皆是, 以上都对, 以上全是, 以上均非, 以上皆非, 以上都不是,
               以上都不对, 以上均不正确, 上述选项都不正确, ...
    None for every other option.
    """
    flat = re.sub(r"\s+", " ", text.strip().rstrip(".。!！")).strip()
    if _ABOVE_EN.fullmatch(flat.lower()) or _ABOVE_ZH.fullmatch(flat.replace(" ", "")):
        return "above"
    n_letters, words, places = 0, 0, 0
    for tok in _TOKEN.findall(flat):
        if tok.isupper() and len(set(tok)) == len(tok) and all(c in letters for c in tok) and list(tok) == sorted(tok):
            n_letters += len(tok)  # "A", or a run of letters in order: "AB", "ACD"
        elif tok.lower() in _FILLER_EN or tok in _FILLER_ZH:
            words += 1
        elif tok.lower() in _PLACE_EN or tok in _PLACE_ZH:
            places += 1
        elif tok.isalnum():
            return None  # a word of its own: the option says something
    if n_letters >= 2 or (n_letters == 1 and words + places) or (places and not n_letters):
        return "refers"
    return None


def shuffle_options(item: dict, rng: random.Random) -> tuple[dict[str, str], str]:
    """Options in a random order and the correct option's new letter (no position bias).

    Except where the order carries meaning (`option_position_kind`): an item with an option that
    names other options by letter or place keeps its order, and all/none-of-the-above options stay
    last (the others are shuffled above them).
    """
    letters = "".join(item["options"])
    texts = list(item["options"].values())
    kinds = [option_position_kind(t, letters) for t in texts]
    if "refers" in kinds:
        return dict(item["options"]), item["answer_idx"]
    order = [i for i, kind in enumerate(kinds) if kind != "above"]
    rng.shuffle(order)  # new position i holds old option order[i]
    order += [i for i, kind in enumerate(kinds) if kind == "above"]
    options = {LETTERS[i]: texts[j] for i, j in enumerate(order)}
    answer = LETTERS[order.index(list(item["options"]).index(item["answer_idx"]))]
    return options, answer

"""Step C's option shuffle is position-safe: options that name other options keep the item's order,
all/none of the above stays last, everything else is shuffled (made-up items, English and Chinese)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from atkd.option_order import option_position_kind, shuffle_options

REFERS = ["Both A and B", "A and C", "A, B and C only", "A,B", "A & B", "(A) and (C)", "Only A", "All except C",
          "Neither A nor B", "Option C", "Both of the above", "The first two", "A和C", "A和C都对", "A、B", "A与B",
          "A及B", "A+B", "AB", "ACD", "除C外", "以上两项"]
ABOVE = ["All of the above", "None of the above.", "all the above", "None of these", "Neither of the above",
         "All are correct", "None is correct", "以上都是", "以上均是", "以上皆是", "以上都对", "以上全是", "以上均非",
         "以上皆非", "以上都不是", "以上都不对", "以上均不正确", "上述选项都不正确"]
PLAIN = ["Vitamin A and C", "Hepatitis B", "Type A blood", "IgA nephropathy", "维生素A和C", "乙型肝炎", "aspirin",
         "A", "Blood pressure above 140/90", "Second-generation cephalosporin", "阿司匹林", "CA"]


@pytest.mark.parametrize("text", REFERS)
def test_options_naming_other_options_by_letter_or_place(text):
    assert option_position_kind(text, "ABCDE") == "refers"


@pytest.mark.parametrize("text", ABOVE)
def test_all_or_none_of_the_above(text):
    assert option_position_kind(text, "ABCDE") == "above"


@pytest.mark.parametrize("text", PLAIN)
def test_ordinary_options_including_letters_inside_words(text):
    assert option_position_kind(text, "ABCDE") is None


def test_a_letter_beyond_the_items_options_is_not_a_reference():
    assert option_position_kind("A and E", "ABCD") is None
    assert option_position_kind("A and E", "ABCDE") == "refers"


def shuffled(options: dict, answer: str, seed: int) -> tuple[dict, str]:
    return shuffle_options({"options": options, "answer_idx": answer}, random.Random(seed))


@pytest.mark.parametrize("options,answer", [
    ({"A": "Aspirin", "B": "Heparin", "C": "Both A and B", "D": "Neither"}, "C"),
    ({"A": "阿司匹林", "B": "肝素", "C": "华法林", "D": "A和C"}, "D"),
    ({"A": "Penicillin", "B": "Vancomycin", "C": "A,B", "D": "None of the above"}, "A"),
])
def test_an_item_with_a_letter_reference_keeps_its_order(options, answer):
    for seed in range(20):
        assert shuffled(options, answer, seed) == (options, answer)


@pytest.mark.parametrize("options,last", [
    ({"A": "All of the above", "B": "Heparin", "C": "Warfarin", "D": "Aspirin"}, "All of the above"),
    ({"A": "以上都不是", "B": "肝素", "C": "华法林", "D": "阿司匹林", "E": "氯吡格雷"}, "以上都不是"),
])
def test_all_or_none_of_the_above_stays_last_and_the_rest_is_shuffled(options, last):
    answer_text = options["B"]
    orders, positions = set(), Counter()
    for seed in range(40):
        new, answer = shuffled(options, "B", seed)
        assert list(new.values())[-1] == last
        assert new[answer] == answer_text and sorted(new.values()) == sorted(options.values())
        orders.add(tuple(new.values()))
        positions[answer] += 1
    assert len(orders) > 5 and set(positions) == set(list(new)[:-1])  # every other place is used


def test_plain_items_are_shuffled_as_before():
    """No position-bound option: the shuffle is the seeded permutation of all options (what it always was)."""
    options = {"A": "aspirin", "B": "heparin", "C": "warfarin", "D": "insulin"}
    for seed in range(10):
        order = list(range(4))
        random.Random(seed).shuffle(order)
        new, answer = shuffled(options, "C", seed)
        assert list(new.values()) == [list(options.values())[j] for j in order]
        assert new[answer] == "warfarin"

"""Near-duplicate detection: stems and option sets must both match; the prefix-filtered index is exact."""

import random

import pytest

from atkd.dedup import NearDupIndex, features, jaccard, similarity

STEM = "Which of the following is an anticoagulant?"


def test_templated_stem_over_new_options_is_not_a_duplicate():
    idx = NearDupIndex(0.6)
    idx.add(features(STEM, ["warfarin", "amoxicillin", "candida", "femur"]), "seed:1")
    label, sim = idx.most_similar(features(STEM, ["heparin", "ciprofloxacin", "aspergillus", "ulna"]))
    assert label is None and sim == 0.0


def test_reordered_options_and_one_changed_option_are_duplicates():
    idx = NearDupIndex(0.6)
    idx.add(features(STEM, {"A": "warfarin", "B": "amoxicillin", "C": "candida", "D": "femur"}), "seed:1")
    assert idx.most_similar(features(STEM, ["femur", "candida", "amoxicillin", "warfarin"])) == ("seed:1", 1.0)
    # one option of four replaced: option Jaccard 3/5
    label, sim = idx.most_similar(features(STEM, ["warfarin", "amoxicillin", "candida", "tibia"]))
    assert label == "seed:1" and sim == pytest.approx(0.6)
    # same options under an unrelated stem: a different question
    label, _ = idx.most_similar(features("Which organism causes thrush?", ["warfarin", "amoxicillin", "candida", "femur"]))
    assert label is None


def test_chinese_stems_compare_by_character():
    a = features("下列哪项属于抗凝药？", ["华法林", "阿莫西林", "念珠菌", "股骨"])
    b = features("下列哪一项属于抗凝药？", ["阿莫西林", "华法林", "股骨", "念珠菌"])
    assert jaccard(a.options, b.options) == 1.0
    assert similarity(a, b) >= 0.6


def test_index_equals_brute_force():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    items = [features(" ".join(rng.choices(vocab, k=rng.randint(0, 8))),
                      [rng.choice(vocab) for _ in range(4)]) for _ in range(400)]
    for t in (0.3, 0.6, 0.9, 1.0):
        idx = NearDupIndex(t)
        for i, f in enumerate(items):
            brute = max((similarity(f, g) for g in items[:i]), default=0.0)
            label, sim = idx.most_similar(f)
            assert (label is not None) == (brute >= t), (t, i)
            if label is not None:
                assert sim == pytest.approx(brute)
            idx.add(f, str(i))


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        NearDupIndex(0.0)


def test_signs_are_words_and_hyphens_between_letters_are_not():
    """One normalisation with atkd.leakage: comparison and sign symbols are tokens; a hyphen joining two
    words, spaces and width are not."""
    from atkd.dedup import comparison_key, words

    assert words("HbA1c > 9%") == ["hba1c", ">", "9"] and words("HbA1c＜9％") == ["hba1c", "<", "9"]
    assert words("血钾↑") != words("血钾↓") and words("HBsAg(+)") != words("HBsAg(-)")
    assert words("+/-") == ["+", "-"] and words("-5 mmol") == ["-", "5", "mmol"] and words("x − y") == ["x", "-", "y"]
    assert words("Beta-blocker") == words("beta blocker") == ["beta", "blocker"]
    assert words("COVID-19") == words("covid 19") and words("抗-HBc") == words("抗HBc")
    assert comparison_key("华法 林") == comparison_key("华法林") and comparison_key("Beta blocker") == "betablocker"
    a = features("Which is true when HbA1c > 9%?", ["insulin", "metformin"])
    b = features("Which is true when HbA1c < 9%?", ["insulin", "metformin"])
    assert a.stem != b.stem and a.options == b.options

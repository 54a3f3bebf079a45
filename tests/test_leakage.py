"""atkd.leakage: which questions repeat an evaluation question, the error main.py stops with, and step C
dropping generated questions that repeat one (near_duplicate_eval in step C's summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atkd import question_writing as qw
from atkd.errors import InputError
from atkd.io import write_jsonl
from atkd.leakage import EvalIndex, check_iteration_files
from atkd.records import load_questions, question_from_dict
from atkd.tree import tree_from_nested

STEM = "Which of these is a respiratory disease?"
EVAL = [
    {"id": "e0", "question": STEM, "options": {"A": "pleurisy", "B": "rivaroxaban", "C": "diaphragm", "D": "legionella"},
     "answer_idx": "A"},
    {"id": "e1", "question": "A 54-year-old man has crushing chest pain radiating to the left arm. Which drug first?",
     "options": {"A": "Aspirin", "B": "Warfarin", "C": "Digoxin", "D": "Insulin"}, "answer_idx": "A"},
    {"id": "e2", "question": "下列哪种药物属于抗凝药？", "options": {"A": "肝素", "B": "青霉素", "C": "胰岛素", "D": "地高辛"},
     "answer_idx": "A"},
]


def q(id_, question, options, answer):
    return question_from_dict({"id": id_, "question": question, "options": dict(zip("ABCDE", options)),
                               "answer_idx": answer})


@pytest.fixture
def index() -> EvalIndex:
    return EvalIndex([question_from_dict(r) for r in EVAL])


def test_the_same_question_in_any_order_case_or_width_is_a_repeat(index):
    r = index.repeat_of("t", "which of these is a RESPIRATORY disease ?", {"A": "Legionella", "B": "diaphragm",
                                                                          "C": "pleurisy", "D": "rivaroxaban"}, "B")
    assert r is not None and r.exact and r.eval_key == "e0"  # same question, even keyed otherwise
    r = index.repeat_of("t", "下列哪种药物属于抗凝药?", {"A": "青霉素", "B": "肝素", "C": "胰岛素", "D": "地高辛"}, "B")
    assert r is not None and r.exact and r.eval_key == "e2"


def test_a_near_duplicate_counts_only_when_it_keys_the_same_answer(index):
    # One distractor changed (option Jaccard 3/5), stem reworded slightly: the same question.
    near = q("t1", "A 54-year-old man has crushing chest pain radiating to his left arm. Which drug first?",
             ["Warfarin", "Aspirin", "Heparin", "Insulin"], "B")
    r = index.repeat_of(near.key, near.question, near.options, near.answer_idx)
    assert r is not None and not r.exact and r.eval_key == "e1" and 0.6 <= r.similarity < 1
    # The demo's templated pair: another ability in the stem, three shared options, another answer.
    other = q("t2", "Which of these is a cardiovascular disease?", ["atherosclerosis", "pleurisy", "diaphragm",
                                                                   "rivaroxaban"], "A")
    assert index.repeat_of(other.key, other.question, other.options, other.answer_idx) is None
    unrelated = q("t3", "Which nerve supplies the deltoid?", ["Axillary", "Radial", "Ulnar", "Median"], "A")
    assert index.repeats([near, other, unrelated]) == [index.repeat_of("t1", near.question, near.options, "B")]


def test_the_check_names_both_files_and_lines_or_returns_the_repeats_to_drop(tmp_path):
    write_jsonl(tmp_path / "eval.jsonl", EVAL)
    rows = [{"id": f"x{i}", "question": f"Which organ makes hormone number {i}?",
             "options": {"A": "liver", "B": "pancreas"}, "answer_idx": "B"} for i in range(5)]
    rows.insert(3, dict(EVAL[2], id="copy"))
    write_jsonl(tmp_path / "it1.jsonl", rows)
    write_jsonl(tmp_path / "it2.jsonl", rows[:2])
    files = {str(tmp_path / n): load_questions(tmp_path / n) for n in ("it1.jsonl", "it2.jsonl")}
    evals = load_questions(tmp_path / "eval.jsonl")
    with pytest.raises(InputError) as err:
        check_iteration_files(str(tmp_path / "eval.jsonl"), evals, files, drop=False, fix="set THE_CONSTANT")
    msg = err.value.message()
    assert msg.startswith(f"{tmp_path / 'it1.jsonl'}:4: question 'copy' repeats evaluation question 'e2' "
                          f"({tmp_path / 'eval.jsonl'}:3): the same question")
    assert "1 of 6 in" in msg and "set THE_CONSTANT" in msg and "it2.jsonl" not in msg
    found = check_iteration_files(str(tmp_path / "eval.jsonl"), evals, files, drop=True, fix="")
    assert [r.key for r in found[str(tmp_path / "it1.jsonl")]] == ["copy"] and found[str(tmp_path / "it2.jsonl")] == []


# --------------------------------------------------------------------------- step C

def step_c_setup(tmp_path, leaf: str):
    """Step C's leaves, config and dataset for one leaf `Med > leaf` seeded by three questions (no model)."""
    seeds = [{"id": f"s{i}", "question": f"Which of these treats condition {i}?",
              "options": {"A": "aspirin", "B": "heparin", "C": "insulin", "D": "digoxin"}, "answer_idx": "A"}
             for i in range(3)]
    write_jsonl(tmp_path / "data.jsonl", seeds)
    write_jsonl(tmp_path / "paths.jsonl", [{"id": s["id"], "ability_path": ["Med", leaf]} for s in seeds])
    dataset = load_questions(tmp_path / "data.jsonl")
    leaves = qw.leaves_with_seeds(tree_from_nested({"Med": {leaf: 0}}), dataset, tmp_path / "paths.jsonl")
    cfg = qw.QuestionWritingConfig(teacher_model_path="t", ability_tree_path="t.json",
                                   full_dataset_path=str(tmp_path / "data.jsonl"),
                                   ability_class_path=str(tmp_path / "paths.jsonl"),
                                   output_path=str(tmp_path / "C" / "generated.jsonl"), lang="en", domain="Med",
                                   max_retries=0)
    return leaves, cfg, dataset


def scripted(replies: list[str]):
    """A teacher for `qw.run_rounds` that writes replies[slot] for each task."""
    def produce(round_, batches):
        tasks = sorted((t for b in batches for t in b.tasks), key=lambda t: t.slot)
        return {t.id: replies[t.slot] for t in tasks}
    return produce


def test_step_c_drops_generated_repeats_of_evaluation_questions_and_counts_them(tmp_path):
    leaves, cfg, dataset = step_c_setup(tmp_path, "Resp")
    replies = [
        f"Question: {STEM}\nA. legionella\nB. pleurisy\nC. diaphragm\nD. rivaroxaban\nAnswer: B",  # e0 itself
        f"Question: {STEM}\nA. pleurisy\nB. rivaroxaban\nC. diaphragm\nD. tibia\nAnswer: A",  # near, same answer
        "Question: Which of these is a cardiovascular disease?\nA. atherosclerosis\nB. pleurisy\nC. diaphragm\n"
        "D. rivaroxaban\nAnswer: A",  # near the template, another answer: a new question
    ]

    produce = scripted(replies)

    evals = [question_from_dict(r) for r in EVAL]
    acc, _ = qw.run_rounds(leaves, [3], cfg, dataset, produce, evals)
    plan = qw.plan_report(leaves, [3], acc, 3, 1, {})
    assert plan["rejected"] == {"near_duplicate_eval": 2} and plan["achieved"] == 1
    assert plan["leaves"][0]["rejected"] == {"near_duplicate_eval": 2}
    assert acc.all_records()[0]["question"] == "Which of these is a cardiovascular disease?"

    without, _ = qw.run_rounds(leaves, [3], cfg, dataset, produce)  # no evaluation set: the copy of e0 is kept
    assert "near_duplicate_eval" not in qw.plan_report(leaves, [3], without, 3, 1, {})["rejected"]
    assert without.all_records()[0]["question"] == STEM
    assert json.dumps(plan)  # plain JSON, as written to step C's summary.json


def test_the_stage_reads_the_evaluation_set_as_an_input(tmp_path):
    cfg = qw.QuestionWritingConfig(teacher_model_path="t", ability_tree_path="t.json", full_dataset_path="d.jsonl",
                                   ability_class_path="p.jsonl", output_path=str(tmp_path / "g.jsonl"),
                                   eval_dataset_path=str(tmp_path / "eval.jsonl"))
    from atkd.fingerprint import fingerprint

    write_jsonl(tmp_path / "eval.jsonl", EVAL)
    before = fingerprint(cfg)["eval_dataset_path"]
    write_jsonl(tmp_path / "eval.jsonl", EVAL[:2])
    assert fingerprint(cfg)["eval_dataset_path"] != before  # a new evaluation set reruns step C
    assert Path(cfg.eval_dataset_path).name == "eval.jsonl"


# --------------------------------------------------------------------------- one normalisation for both rules

HBA1C = "A 58-year-old man with type 2 diabetes on metformin has HbA1c {} 9%. What is the next step?"
HBA1C_OPTIONS = ["Add basal insulin", "Continue metformin alone", "Stop all drugs", "Add an SGLT2 inhibitor"]
SIGN_EVAL = [
    {"id": "s0", "question": HBA1C.format(">"), "options": dict(zip("ABCD", HBA1C_OPTIONS)), "answer_idx": "A"},
    {"id": "s1", "question": "患者血钾↑，心电图最可能出现的改变是", "options": {"A": "T波高尖", "B": "U波明显", "C": "ST段抬高",
                                                              "D": "QT间期延长"}, "answer_idx": "A"},
    {"id": "s2", "question": "HBsAg(+)、HBeAg(+)、抗-HBc(+)提示", "options": {"A": "大三阳", "B": "小三阳", "C": "既往感染",
                                                                     "D": "接种疫苗后"}, "answer_idx": "A"},
    {"id": "s3", "question": "A patient with stable angina has a resting heart rate of 98 per minute. Which drug class "
                             "is first-line for rate control?",
     "options": {"A": "Beta-blocker", "B": "Nitrate", "C": "ACE inhibitor", "D": "Statin"}, "answer_idx": "A"},
    {"id": "s4", "question": "下列哪种药物属于口服维生素K拮抗剂类抗凝药？", "options": {"A": "华法林", "B": "青霉素", "C": "胰岛素",
                                                                   "D": "地高辛"}, "answer_idx": "A"},
    {"id": "s5", "question": "尿蛋白定性结果为(+/-)，其含义是", "options": {"A": "微量", "B": "阴性", "C": "阳性", "D": "强阳性"},
     "answer_idx": "A"},
]


@pytest.fixture
def sign_index() -> EvalIndex:
    return EvalIndex([question_from_dict(r) for r in SIGN_EVAL])


@pytest.mark.parametrize("question, options, answer", [
    # The other side of a comparison, keying another answer: another question (the exact rule dropped the sign).
    (HBA1C.format("<"), HBA1C_OPTIONS, "B"),
    (HBA1C.format("≤"), HBA1C_OPTIONS, "B"),
    ("患者血钾↓，心电图最可能出现的改变是", ["T波高尖", "U波明显", "ST段抬高", "QT间期延长"], "B"),
    ("HBsAg(-)、HBeAg(-)、抗-HBc(+)提示", ["大三阳", "小三阳", "既往感染", "接种疫苗后"], "C"),
    ("HBsAg(+)、HBeAg(-)、抗-HBc(+)提示", ["大三阳", "小三阳", "既往感染", "接种疫苗后"], "B"),
    ("尿蛋白定性结果为(-)，其含义是", ["微量", "阴性", "阳性", "强阳性"], "B"),
    ("尿蛋白定性结果为(+)，其含义是", ["微量", "阴性", "阳性", "强阳性"], "C"),
])
def test_questions_that_differ_in_a_sign_are_different_questions(sign_index, question, options, answer):
    r = sign_index.repeat_of("t", question, dict(zip("ABCD", options)), answer)
    assert r is None, r


@pytest.mark.parametrize("question, options, answer, eval_key", [
    # The very question, written with full-width or differently spaced signs: the same question.
    (HBA1C.format("＞"), HBA1C_OPTIONS[::-1], "D", "s0"),
    ("患者血钾 ↑ ，心电图最可能出现的改变是", ["U波明显", "T波高尖", "ST段抬高", "QT间期延长"], "B", "s1"),
    ("HBsAg（＋）、HBeAg（＋）、抗－HBc（＋）提示", ["大三阳", "小三阳", "既往感染", "接种疫苗后"], "A", "s2"),
])
def test_the_same_question_with_its_signs_written_otherwise_is_a_repeat(sign_index, question, options, answer,
                                                                       eval_key):
    r = sign_index.repeat_of("t", question, dict(zip("ABCD", options)), answer)
    assert r is not None and r.exact and r.eval_key == eval_key


@pytest.mark.parametrize("question, options, answer, eval_key", [
    # Reworded stem, reordered options, the answer written with a space for the hyphen (or none): the same answer.
    ("A patient with stable angina has a resting heart rate of 102 per minute. Which drug class is "
     "first-line for rate control?", ["Nitrate", "Beta blocker", "Statin", "ACE inhibitor"], "B", "s3"),
    ("A patient with stable angina has a resting heart rate of 102 per minute. Which drug class is "
     "first-line for rate control?", ["Nitrate", "BETA BLOCKER", "Statin", "ACE inhibitor"], "B", "s3"),
    ("下列哪一种药物属于口服维生素K拮抗剂类抗凝药？", ["青霉素", "华法 林", "胰岛素", "地高辛"], "B", "s4"),
])
def test_a_reworded_copy_whose_answer_is_spaced_or_hyphenated_otherwise_is_a_repeat(sign_index, question, options,
                                                                                  answer, eval_key):
    r = sign_index.repeat_of("t", question, dict(zip("ABCD", options)), answer)
    assert r is not None and not r.exact and r.eval_key == eval_key


def test_step_c_judges_evaluation_repeats_with_the_same_normalisation(tmp_path):
    leaves, cfg, dataset = step_c_setup(tmp_path, "Endo")
    block = "\n".join(f"{k}. {v}" for k, v in zip("ABCD", HBA1C_OPTIONS))
    replies = [
        # a reworded copy of s3 keying its answer as "Beta blocker": a leak
        "Question: A patient with stable angina has a resting heart rate of 102 per minute. Which drug class is "
        "first-line for rate control?\nA. Nitrate\nB. Beta blocker\nC. Statin\nD. ACE inhibitor\nAnswer: B",
        f"Question: {HBA1C.format('<')}\n{block}\nAnswer: B",  # the other side of s0's comparison: a new question
    ]

    produce = scripted(replies)

    acc, _ = qw.run_rounds(leaves, [2], cfg, dataset, produce, [question_from_dict(r) for r in SIGN_EVAL])
    plan = qw.plan_report(leaves, [2], acc, 2, 1, {})
    assert plan["rejected"] == {"near_duplicate_eval": 1} and plan["achieved"] == 1
    assert acc.all_records()[0]["question"] == HBA1C.format("<")

"""The shared core: records, jsonl io, the tree, the letter rule, prompt encoding, scoring."""

import json

import pytest
import torch

from atkd.errors import InputError
from atkd.io import PartLog, write_jsonl
from atkd.letters import extract_letter, letter_token_ids
from atkd.models import load_model, load_tokenizer
from atkd.prompts import encode_prompt, mcq_prompt
from atkd.records import load_ability_paths, load_questions, question_from_dict
from atkd.scoring import last_position_logits, scores_from_logits
from atkd.tree import load_tree, tree_from_nested


def test_load_questions_keeps_extra_fields(tmp_path, questions):
    rows = [dict(questions[0], source="x"), questions[1]]
    write_jsonl(tmp_path / "q.jsonl", rows)
    qs = load_questions(tmp_path / "q.jsonl")
    assert [q.key for q in qs] == ["0", "1"]
    assert qs[0].to_dict()["source"] == "x"


@pytest.mark.parametrize("line,problem", [
    ('{"id": 1, "question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "A"', "not valid JSON"),
    ('{"id": 1, "options": {"A": "a", "B": "b"}, "answer_idx": "A"}', 'missing field "question"'),
    ('{"id": 1, "question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "C"}', "answer_idx 'C' is not among"),
    ('{"id": 1, "question": "q", "options": {"A": "a", "C": "b"}, "answer_idx": "A"}', "consecutive capital letters"),
    ('{"id": 1, "question": "q", "options": {"A": "a"}, "answer_idx": "A"}', "2 to 26 entries"),
])
def test_bad_question_lines_name_file_and_line(tmp_path, line, problem):
    good = json.dumps({"id": 0, "question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "B"})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_questions(path)
    assert err.value.line == 2 and problem in err.value.problem
    assert err.value.message().startswith(f"{path}:2: ")


def test_duplicate_id_compares_as_string(tmp_path):
    rows = [{"id": 1, "question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "A"},
            {"id": "1", "question": "r", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match="duplicate id"):
        load_questions(tmp_path / "d.jsonl")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="empty"):
        load_ability_paths(tmp_path / "e.jsonl")


def test_tree_both_nested_forms_and_reference_score_keys(tmp_path):
    ref = {"临床医学": {"综合得分": 0.5, "内科学": {"综合得分": 0.4, "心血管疾病": 0, "呼吸疾病": None},
                       "外科学": {"骨科": {}}}}
    (tmp_path / "t.json").write_text(json.dumps(ref, ensure_ascii=False), encoding="utf-8")
    tree = load_tree(tmp_path / "t.json")
    assert tree.domain == "临床医学"
    assert [n.path for n in tree.leaves()] == [("临床医学", "内科学", "心血管疾病"), ("临床医学", "内科学", "呼吸疾病"),
                                              ("临床医学", "外科学", "骨科")]
    assert tree.match(["临床医学", "内科学", "心血管疾病"]).path == tree.match(["内科学", "心血管疾病"]).path
    assert tree.match(["内科学", "肾病"]) is None
    flat = tree_from_nested({"内科学": {"心血管疾病": 0}, "外科学": 0}, domain="临床医学")
    assert flat.domain == "临床医学" and len(flat.leaves()) == 2


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1}])
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]  # no temporary file left


def test_part_log_ignores_torn_line_and_other_arguments(tmp_path):
    out = tmp_path / "out.jsonl"
    log = PartLog(out, {"a": 1})
    assert log.open() == {}
    log.writer(0).write([{"id": 1, "v": 1}, {"id": 2, "v": 2}])
    with open(log.dir / "part-000.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"id": 3, "v"')  # killed mid-write
    assert sorted(PartLog(out, {"a": 1}).open()) == ["1", "2"]
    PartLog(out, {"a": 1}).writer(0).write([{"id": 3, "v": 3}])
    assert sorted(PartLog(out, {"a": 1}).open()) == ["1", "2", "3"]
    assert PartLog(out, {"a": 2}).open() == {}  # other arguments: old work discarded


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_plain_dir"])
def test_letter_tokens_decode_to_letters(request, fixture):
    tok = load_tokenizer(request.getfixturevalue(fixture))
    ids = letter_token_ids(tok, list("ABCD"))
    assert [tok.decode([i]).strip() for i in ids] == list("ABCD")
    # The letter token really is what follows the prompt when the reply is that letter.
    q = question_from_dict({"id": 0, "question": "Which?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"})
    prompt = mcq_prompt(tok, q, "en")
    prefix = "" if tok.chat_template else " "
    assert encode_prompt(tok, prompt + prefix + "B")[-1] == ids[1]


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_plain_dir"])
def test_batched_scoring_equals_per_item_full_forward(request, fixture, questions):
    path = request.getfixturevalue(fixture)
    tok, model = load_tokenizer(path), load_model(path)
    qs = [question_from_dict(q) for q in questions[:9]]
    ids = [encode_prompt(tok, mcq_prompt(tok, q, "en")) for q in qs]
    letters = [q.letters for q in qs]
    letter_ids = [letter_token_ids(tok, L) for L in letters]
    batched = scores_from_logits(last_position_logits(model, ids, tok.pad_token_id, letter_ids), letter_ids, letters)
    for q, seq, lids, got in zip(qs, ids, letter_ids, batched):
        with torch.no_grad():
            full = model(torch.tensor([seq])).logits[0, -1].double()
        ref = torch.log_softmax(full[lids], -1)
        assert max(abs(got.logprobs[L] - ref[i].item()) for i, L in enumerate(q.letters)) < 1e-5


def test_extract_letter_ignores_capitals_inside_words():
    letters = list("ABCD")
    assert extract_letter("Aspirin is best", letters) is None
    assert extract_letter("A patient would", letters) is None
    assert extract_letter("Because of the valve. Answer: C", letters) == "C"
    assert extract_letter("答案：B", letters) == "B"
    assert extract_letter("(D)", letters) == "D"
    assert extract_letter("Definitely (B).", letters) == "B"
    assert extract_letter("Either (A) or (C).", letters) is None

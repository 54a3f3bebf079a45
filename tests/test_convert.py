"""data/convert.py on small made-up files in each public layout (quirks included), and the split."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from atkd.errors import InputError
from atkd.records import question_problem
from atkd.convert.splitting import split_questions, split_sizes
from atkd.tree import load_tree

ROOT = Path(__file__).resolve().parent.parent


def convert(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "data/convert.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def ok(*args) -> subprocess.CompletedProcess:
    proc = convert(*args)
    assert proc.returncode == 0, proc.stderr
    return proc


def refused(out_dir: Path, *args) -> str:
    """Run a conversion that must fail on bad input; returns its one error line."""
    proc = convert(*args, "--output_dir", out_dir)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert not out_dir.exists() or not any(out_dir.iterdir()), "nothing is written on bad input"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def counts(stdout: str) -> dict[str, int]:
    """The printed counts: {"rows": n, "kept": n, "dropped": n, "no answer": n, ...}."""
    out = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"(rows|kept|dropped|with ability path|dropped \((.+)\)): (\d+)", line)
        if m:
            out[m.group(2) or m.group(1)] = int(m.group(3))
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl_raw(path: Path, rows: list) -> Path:
    """Rows as JSONL; a str row is written as is (for broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def outputs(out_dir: Path) -> tuple[list[dict], dict[str, list[str]] | None, dict]:
    """questions, ability paths by id (None when the file is absent) and the report."""
    questions = jsonl(out_dir / "questions.jsonl")
    for q in questions:
        assert question_problem(q) is None, q
    ids = [q["id"] for q in questions]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) for i in ids)
    paths_file = out_dir / "ability_paths.jsonl"
    paths = {p["id"]: p["ability_path"] for p in jsonl(paths_file)} if paths_file.exists() else None
    return questions, paths, json.loads((out_dir / "convert_report.json").read_text(encoding="utf-8"))


def test_help_shows_a_copy_pasteable_command():
    proc = ok("--help")
    assert proc.stdout.startswith("usage:") and proc.stderr == ""
    assert "medmcqa/dev.json \\\n        --output_dir" in proc.stdout  # the line continuation survives


# --------------------------------------------------------------------------- medqa

def medqa_rows() -> list[dict]:
    return [
        {"question": "A 23-year-old man has a painless penile ulcer. Which test is next?",
         "answer": "RPR", "options": {"A": "RPR", "B": "Biopsy", "C": "HSV PCR", "D": "Culture"},
         "meta_info": "step1", "answer_idx": "A", "metamap_phrases": ["painless", "ulcer"]},
        {"question": "A 60-year-old woman has crushing chest pain. What is the first drug to give?",
         "answer": "Aspirin", "options": {"A": "Warfarin", "B": "Heparin", "C": "Digoxin", "D": "Atenolol",
                                          "E": "Aspirin"}, "meta_info": "step2&3", "answer_idx": "E"},
        {"question": "Which vitamin deficiency causes scurvy?", "answer": "",
         "options": {"A": "A", "B": "B12", "C": "C", "D": "D"}, "meta_info": "step1"},  # no answer_idx
        {"question": "Which organ makes insulin?", "answer": "Pancreas",
         "options": {"A": "Liver", "B": "", "C": "Pancreas", "D": "Spleen"}, "meta_info": "step1",
         "answer_idx": "C"},  # empty option
        {"question": "Which nerve supplies the deltoid?", "answer": "?",
         "options": {"A": "Axillary", "B": "Radial", "C": "Ulnar", "D": "Median"}, "meta_info": "step1",
         "answer_idx": "E"},  # answer outside the four options
    ]


def test_medqa_keeps_five_options_and_meta_info_and_counts_drops(tmp_path):
    src = write_jsonl_raw(tmp_path / "US" / "train.jsonl", medqa_rows())
    out = tmp_path / "out"
    proc = ok("--format", "medqa", "--input", src, "--output_dir", out)
    questions, paths, report = outputs(out)
    assert paths is None and not (out / "ability_paths.jsonl").exists()  # MedQA has no categories
    assert not (out / "ability_tree.json").exists() and report["ability_tree"] is None
    assert [q["id"] for q in questions] == ["medqa-train-1", "medqa-train-2"]
    assert questions[0]["options"] == {"A": "RPR", "B": "Biopsy", "C": "HSV PCR", "D": "Culture"}
    assert questions[0]["answer_idx"] == "A" and questions[0]["meta_info"] == "step1"
    assert list(questions[1]["options"]) == ["A", "B", "C", "D", "E"]
    assert questions[1]["answer_idx"] == "E" and questions[1]["options"]["E"] == "Aspirin"
    assert questions[1]["meta_info"] == "step2&3"
    assert "metamap_phrases" not in questions[0]
    expected = {"rows": 5, "kept": 2, "dropped": 3, "no answer": 1, "empty option": 1, "answer outside options": 1}
    assert {k: v for k, v in counts(proc.stdout).items() if k != "with ability path"} == expected
    assert report["kept"] == 2 and report["dropped_by_reason"] == {
        "answer outside options": 1, "empty option": 1, "no answer": 1}
    assert report["files"] == {"questions.jsonl": 2}
    assert sorted(p.name for p in out.iterdir()) == ["convert_report.json", "questions.jsonl"]


def test_broken_json_line_exits_2_naming_file_and_line_and_writes_nothing(tmp_path):
    good = write_jsonl_raw(tmp_path / "dev.jsonl", medqa_rows()[:2])
    bad = write_jsonl_raw(tmp_path / "test.jsonl", [medqa_rows()[0], "", '{"question": "cut short', medqa_rows()[1]])
    error = refused(tmp_path / "out", "--format", "medqa", "--input", good, bad)
    assert error.startswith(f"error: {bad}:3: not valid JSON")


def test_text_that_is_not_utf8_exits_2_naming_its_line(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_bytes((json.dumps(medqa_rows()[0]) + "\n" + json.dumps(medqa_rows()[1], ensure_ascii=False)
                     .replace("Aspirin", "Asp\u00edrin") + "\n").encode("latin-1"))
    assert refused(tmp_path / "out", "--format", "medqa", "--input", src) == f"error: {src}:2: not UTF-8 text"


def test_medqa_options_that_are_not_an_object_exit_2(tmp_path):
    row = dict(medqa_rows()[0], options=["RPR", "Biopsy"])
    src = write_jsonl_raw(tmp_path / "train.jsonl", [medqa_rows()[1], row])
    error = refused(tmp_path / "out", "--format", "medqa", "--input", src)
    assert error.startswith(f"error: {src}:2: ") and '"options" must be an object' in error


# --------------------------------------------------------------------------- medmcqa

def medmcqa_row(qid: str, cop, subject="Anatomy", topic="Upper limb", **kw) -> dict:
    row = {"question": f"Question {qid}: which nerve supplies the muscle?", "exp": f"Explained {qid}.",
           "cop": cop, "opa": f"{qid} radial", "opb": f"{qid} ulnar", "opc": f"{qid} median",
           "opd": f"{qid} axillary", "subject_name": subject, "topic_name": topic, "id": f"uuid-{qid}",
           "choice_type": "single"}
    row.update(kw)
    if cop == "absent":
        del row["cop"]
    return row


def test_medmcqa_one_based_original_release(tmp_path):
    src = write_jsonl_raw(tmp_path / "dev.json", [
        medmcqa_row("q1", 1),
        medmcqa_row("q2", 4, subject="Pharmacology", topic=None),
        medmcqa_row("q3", 3, subject="Pharmacology", topic="", exp=None),
        medmcqa_row("q4", 2, opb="q4 radial"),  # same text as option A
    ])
    test = write_jsonl_raw(tmp_path / "test.json", [medmcqa_row("t1", -1), medmcqa_row("t2", "absent")])
    out = tmp_path / "out"
    proc = ok("--format", "medmcqa", "--input", src, test, "--output_dir", out)
    questions, paths, report = outputs(out)
    by_id = {q["id"]: q for q in questions}
    assert list(by_id) == ["medmcqa-dev-1", "medmcqa-dev-2", "medmcqa-dev-3"]
    assert [q["answer_idx"] for q in questions] == ["A", "D", "C"]  # cop 1 -> A, 4 -> D, 3 -> C
    assert by_id["medmcqa-dev-1"]["explanation"] == "Explained q1."
    assert "explanation" not in by_id["medmcqa-dev-3"]  # exp null: no explanation field
    assert by_id["medmcqa-dev-1"]["source_id"] == "uuid-q1"
    assert paths == {"medmcqa-dev-1": ["Anatomy", "Upper limb"], "medmcqa-dev-2": ["Pharmacology"],
                     "medmcqa-dev-3": ["Pharmacology"]}
    # The categories' tree, level-1 names at the top: main.py roots it at DOMAIN and every path is in it.
    tree_file = out / "ability_tree.json"
    assert json.loads(tree_file.read_text(encoding="utf-8")) == {"Anatomy": {"Upper limb": {}}, "Pharmacology": {}}
    assert f"wrote {tree_file} (2 level-1 abilities, 2 leaves)" in proc.stdout
    assert report["ability_tree"] == {"file": "ability_tree.json", "level_1": 2, "leaves": 2}
    tree = load_tree(tree_file, domain="Medicine")
    assert tree.domain == "Medicine" and all(tree.mismatch(p) is None for p in paths.values())
    c = counts(proc.stdout)
    assert (c["kept"], c["dropped"], c["no answer"], c["duplicate options"]) == (3, 3, 2, 1)
    assert "1-based" in proc.stdout and f"{src}:2" in proc.stdout  # where the 4 that decided it is
    assert report["per_file"]["test"] == {"path": str(test), "kept": 0, "dropped": 2,
                                          "dropped_by_reason": {"no answer": 2}}


def test_medmcqa_zero_based_hugging_face_copy(tmp_path):
    src = write_jsonl_raw(tmp_path / "train.jsonl", [medmcqa_row("q1", 0), medmcqa_row("q2", 3),
                                                     medmcqa_row("q3", 1), medmcqa_row("q4", -1)])
    out = tmp_path / "out"
    proc = ok("--format", "medmcqa", "--input", src, "--output_dir", out)
    questions, _, _ = outputs(out)
    assert [q["answer_idx"] for q in questions] == ["A", "D", "B"]  # cop 0 -> A, 3 -> D, 1 -> B
    assert counts(proc.stdout)["no answer"] == 1 and "0-based" in proc.stdout


def test_medmcqa_ambiguous_cop_is_refused_until_cop_base_settles_it(tmp_path):
    src = write_jsonl_raw(tmp_path / "dev.json", [medmcqa_row("q1", 1), medmcqa_row("q2", 2),
                                                  medmcqa_row("q3", 3)])
    error = refused(tmp_path / "out", "--format", "medmcqa", "--input", src)
    assert "cannot tell" in error and "--cop_base" in error
    ok("--format", "medmcqa", "--input", src, "--output_dir", tmp_path / "one", "--cop_base", "1")
    ok("--format", "medmcqa", "--input", src, "--output_dir", tmp_path / "zero", "--cop_base", "0")
    assert [q["answer_idx"] for q in jsonl(tmp_path / "one" / "questions.jsonl")] == ["A", "B", "C"]
    assert [q["answer_idx"] for q in jsonl(tmp_path / "zero" / "questions.jsonl")] == ["B", "C", "D"]


def test_medmcqa_mixed_zero_and_four_is_refused(tmp_path):
    a = write_jsonl_raw(tmp_path / "hf.jsonl", [medmcqa_row("q1", 0)])
    b = write_jsonl_raw(tmp_path / "orig.json", [medmcqa_row("q2", 2), medmcqa_row("q3", 4)])
    error = refused(tmp_path / "out", "--format", "medmcqa", "--input", a, b)
    assert error.startswith(f"error: {a}:1: ") and f"{b}:2" in error and "--cop_base" in error


def test_medmcqa_missing_option_field_exits_2(tmp_path):
    row = medmcqa_row("q2", 4)
    del row["opd"]
    src = write_jsonl_raw(tmp_path / "dev.json", [medmcqa_row("q1", 1), row])
    assert refused(tmp_path / "out", "--format", "medmcqa", "--input", src) == \
        f'error: {src}:2: missing field "opd"'


# --------------------------------------------------------------------------- cmexam

CMEXAM_HEADER = ["Question", "Options", "Answer", "Explanation", "Disease Group", "Clinical Department",
                 "Medical Discipline", "Competency", "Difficulty level"]


def cmexam_rows() -> list[list[str]]:
    return [
        CMEXAM_HEADER,
        ["患者男，45岁，突发胸痛2小时，首选的检查是", "A 心电图\nB 胸部CT\nC 腹部B超\nD 血常规\nE 尿常规", "A",
         "急性胸痛首先做心电图。", "循环系统疾病", "内科", "临床医学", "疾病诊断和鉴别诊断", "1"],
        ["下列哪些属于抗凝药", "A 华法林\nB 阿司匹林\nC 肝素\nD 氯吡格雷\nE 利伐沙班", "ACE",
         "", "血液或造血器官疾病", "内科", "临床医学", "疾病治疗", "2"],  # several answers
        ["小儿腹泻最常见的病原体是", "A 轮状病毒\nB 大肠杆菌\nC 腺病毒\nD 诺如病毒", "A",
         "", "消化系统疾病", "儿科", "临床医学", "医学基础知识", "3"],
        ["医疗机构从业人员的基本行为规范是", "A 以人为本\nB 遵纪守法\nC 廉洁自律\nD 爱岗敬业", "B",
         "考查法规。", "不符合", "不符合", "公卫预防", "公卫法律伦理", "2"],  # no department
        ["缺少答案的题目", "A 甲\nB 乙\nC 丙\nD 丁", "", "", "", "外科", "临床医学", "", ""],  # no answer
        ["选项写坏的题目", "心电图 胸部CT", "A", "", "", "外科", "临床医学", "", ""],  # unparsable options
    ]


def test_cmexam_drops_multi_answer_and_keeps_chinese_text(tmp_path):
    src = write_csv(tmp_path / "val.csv", cmexam_rows())
    out = tmp_path / "out"
    proc = ok("--format", "cmexam", "--input", src, "--output_dir", out)
    questions, paths, report = outputs(out)
    # Line numbers count the CSV's physical lines: the first row's Options cell spans lines 2-6.
    assert [q["id"] for q in questions] == ["cmexam-val-2", "cmexam-val-12", "cmexam-val-16"]
    first = questions[0]
    assert first["question"] == "患者男，45岁，突发胸痛2小时，首选的检查是"
    assert first["options"] == {"A": "心电图", "B": "胸部CT", "C": "腹部B超", "D": "血常规", "E": "尿常规"}
    assert first["answer_idx"] == "A" and first["explanation"] == "急性胸痛首先做心电图。"
    assert first["categories"]["Competency"] == "疾病诊断和鉴别诊断"
    assert questions[2]["answer_idx"] == "B"
    # The default path is the clinical department; "不符合" (not applicable) gives no path.
    assert paths == {"cmexam-val-2": ["内科"], "cmexam-val-12": ["儿科"]}
    c = counts(proc.stdout)
    assert (c["rows"], c["kept"], c["multi-answer"], c["no answer"], c["unparsable options"]) == (6, 3, 1, 1, 1)
    assert c["with ability path"] == 2
    assert report["dropped_by_reason"]["multi-answer"] == 1
    raw = (out / "questions.jsonl").read_text(encoding="utf-8")
    assert "心电图" in raw  # written as UTF-8, not \u escapes


def test_cmexam_path_columns_make_a_two_level_path(tmp_path):
    src = write_csv(tmp_path / "train.csv", cmexam_rows())
    out = tmp_path / "out"
    ok("--format", "cmexam", "--input", src, "--output_dir", out,
       "--path_columns", "Medical Discipline,Clinical Department")
    _, paths, _ = outputs(out)
    assert paths == {"cmexam-train-2": ["临床医学", "内科"], "cmexam-train-12": ["临床医学", "儿科"],
                     "cmexam-train-16": ["公卫预防"]}


def test_cmexam_unknown_path_column_and_missing_column_exit_2(tmp_path):
    src = write_csv(tmp_path / "train.csv", cmexam_rows())
    error = refused(tmp_path / "out", "--format", "cmexam", "--input", src, "--path_columns", "Department")
    assert error.startswith(f"error: {src}:1: ") and 'missing column "Department"' in error
    no_answer_col = write_csv(tmp_path / "bad.csv", [[c for c in row[:2]] + row[3:] for row in cmexam_rows()])
    error = refused(tmp_path / "out", "--format", "cmexam", "--input", no_answer_col)
    assert error.startswith(f"error: {no_answer_col}:1: ") and 'missing column "Answer"' in error


# --------------------------------------------------------------------------- mmlu, cmmlu

def test_mmlu_headerless_csv_subject_from_file_name(tmp_path):
    src = write_csv(tmp_path / "test" / "clinical_knowledge_test.csv", [
        ["Which of the following is true of insulin?", "It raises glucose.", "It lowers glucose, mostly.",
         "It is made in the liver.", "It is a steroid.", "B"],
        ["How many chambers does the heart have?", "4", "3", "2", "1", "A"],
        ["Which is a vitamin?", "C", "C", "Iron", "Zinc", "A"],  # duplicate options
    ])
    other = write_csv(tmp_path / "dev" / "college_medicine_dev.csv", [
        ["The normal resting heart rate, in beats per minute, is:", "20-40", "60-100", "120-160", "200-240", "B"]])
    out = tmp_path / "out"
    proc = ok("--format", "mmlu", "--input", src, other, "--output_dir", out)
    questions, paths, _ = outputs(out)
    assert [q["id"] for q in questions] == ["mmlu-clinical_knowledge_test-1", "mmlu-clinical_knowledge_test-2",
                                            "mmlu-college_medicine_dev-1"]
    assert questions[0]["options"]["B"] == "It lowers glucose, mostly."  # quoted comma kept
    assert questions[1]["options"] == {"A": "4", "B": "3", "C": "2", "D": "1"}
    assert paths == {"mmlu-clinical_knowledge_test-1": ["clinical knowledge"],
                     "mmlu-clinical_knowledge_test-2": ["clinical knowledge"],
                     "mmlu-college_medicine_dev-1": ["college medicine"]}
    c = counts(proc.stdout)
    assert (c["kept"], c["dropped"], c["duplicate options"]) == (3, 1, 1)


def test_mmlu_file_with_a_header_or_wrong_columns_exits_2(tmp_path):
    header = write_csv(tmp_path / "anatomy_test.csv", [["question", "A", "B", "C", "D", "answer"],
                                                       ["Q?", "a", "b", "c", "d", "A"]])
    assert "has a header row" in refused(tmp_path / "out", "--format", "mmlu", "--input", header)
    short = write_csv(tmp_path / "virology_test.csv", [["Q?", "a", "b", "c", "d", "A"], ["Q2?", "a", "b", "C"]])
    assert refused(tmp_path / "out", "--format", "mmlu", "--input", short).startswith(
        f"error: {short}:2: expected 6 columns")
    latin1 = tmp_path / "nutrition_test.csv"
    latin1.write_bytes("Q?,a,b,c,d,A\nCaf\u00e9?,a,b,c,d,B\n".encode("latin-1"))
    assert refused(tmp_path / "out", "--format", "mmlu", "--input", latin1) == f"error: {latin1}:2: not UTF-8 text"


def test_cmmlu_empty_first_header_column_and_same_file_names_in_dev_and_test(tmp_path):
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    dev = write_csv(tmp_path / "dev" / "clinical_knowledge.csv", [
        header, ["0", "急性心肌梗死最早升高的心肌标志物是", "肌红蛋白", "肌钙蛋白", "CK-MB", "LDH", "A"],
        ["1", "成人正常血钾浓度是", "3.5～5.5mmol/L", "2.5～3.5mmol/L", "5.5～6.5mmol/L", "1.5～2.5mmol/L", "A"]])
    test = write_csv(tmp_path / "test" / "clinical_knowledge.csv", [
        header, ["0", "缺铁性贫血的典型血象是", "小细胞低色素性", "大细胞性", "正细胞性", "", "A"],  # empty option
        ["1", "甲状腺功能亢进最常见的病因是", "Graves病", "甲状腺炎", "甲状腺腺瘤", "碘过量", "A"]])
    anatomy = write_csv(tmp_path / "test" / "anatomy.csv", [
        header, ["0", "人体最大的器官是", "皮肤", "肝脏", "肺", "脑", "A"]])
    out = tmp_path / "out"
    proc = ok("--format", "cmmlu", "--input", dev, test, anatomy, "--output_dir", out)
    questions, paths, report = outputs(out)
    assert [q["id"] for q in questions] == ["cmmlu-dev-clinical_knowledge-2", "cmmlu-dev-clinical_knowledge-3",
                                            "cmmlu-test-clinical_knowledge-3", "cmmlu-anatomy-2"]
    assert questions[0]["options"] == {"A": "肌红蛋白", "B": "肌钙蛋白", "C": "CK-MB", "D": "LDH"}
    assert paths["cmmlu-dev-clinical_knowledge-2"] == ["clinical knowledge"]
    assert paths["cmmlu-anatomy-2"] == ["anatomy"]
    assert counts(proc.stdout)["empty option"] == 1
    assert report["per_file"]["test-clinical_knowledge"]["kept"] == 1


def cmmlu_genetics_rows() -> list[list[str]]:
    """A CMMLU-layout file of questions whose options differ only in case (written for this test)."""
    return [
        ["", "Question", "A", "B", "C", "D", "Answer"],
        ["0", "豌豆高茎(G)对矮茎(g)为显性，矮茎豌豆的基因型是", "GG", "gg", "Gg", "GG或Gg", "B"],
        ["1", "两株杂合高茎豌豆杂交，亲本的基因型组合是", "Bb和Bb", "BB和BB", "bb和bb", "BB和bb", "A"],
        ["2", "煤气中毒是吸入了下列哪种物质", "Co", "CO", "CO2", "Cu", "B"],
        ["3", "镁的元素符号是", "mg", "Mg", "Mn", "Na", "B"],
        ["4", "下列哪项属于口服抗凝药", "华法林", "华法 林", "青霉素", "胰岛素", "A"],  # one option written twice
        ["5", "纯合子的基因型是", "AA", "ＡＡ", "Aa", "aA", "A"],  # full width: the same option
        ["6", "人体最大的器官是", "皮肤", "皮肤。", "肝脏", "肺", "A"],  # a final period: the same option
    ]


def test_cmmlu_options_differing_only_in_case_are_kept_and_true_repeats_dropped(tmp_path):
    src = write_csv(tmp_path / "test" / "genetics.csv", cmmlu_genetics_rows())
    out = tmp_path / "out"
    proc = ok("--format", "cmmlu", "--input", src, "--output_dir", out)
    questions, _, report = outputs(out)
    assert [q["options"]["B"] for q in questions] == ["gg", "BB和BB", "CO", "Mg"]
    assert [q["answer_idx"] for q in questions] == ["B", "A", "B", "B"]
    c = counts(proc.stdout)
    assert (c["kept"], c["dropped"], c["duplicate options"]) == (4, 3, 3)
    assert report["dropped_by_reason"] == {"duplicate options": 3}


def test_a_text_answer_names_its_option_with_case_deciding_between_case_twins(tmp_path):
    src = write_jsonl_raw(tmp_path / "genes.jsonl", [
        {"q": "Homozygous recessive?", "opts": ["GG", "gg", "Gg"], "ans": "gg"},
        {"q": "Carbon monoxide?", "opts": ["Co", "CO", "Cu"], "ans": "CO"},
        {"q": "Beta blocker?", "opts": ["Metoprolol", "Aspirin"], "ans": "metoprolol"},  # one option matches
        {"q": "Ambiguous?", "opts": ["GG", "gg", "Gg"], "ans": "gG"},  # matches none exactly, three folded
    ])
    out = tmp_path / "out"
    proc = ok("--format", "jsonl", "--input", src, "--output_dir", out, "--question_field", "q",
              "--options_field", "opts", "--answer_field", "ans", "--answer_format", "text")
    questions, _, _ = outputs(out)
    assert [q["answer_idx"] for q in questions] == ["B", "B", "A"]
    assert counts(proc.stdout)["answer outside options"] == 1


def test_cmmlu_missing_column_exits_2(tmp_path):
    src = write_csv(tmp_path / "anatomy.csv", [["", "Question", "A", "B", "C", "Answer"],
                                               ["0", "人体最大的器官是", "皮肤", "肝脏", "肺", "A"]])
    assert refused(tmp_path / "out", "--format", "cmmlu", "--input", src).startswith(
        f'error: {src}:1: missing column "D"')


# --------------------------------------------------------------------------- generic layouts

def test_generic_jsonl_with_list_options_index_answers_ids_and_paths(tmp_path):
    src = write_jsonl_raw(tmp_path / "bank.jsonl", [
        {"uid": "k-1", "stem": "Which drug is a beta blocker?", "choices": ["Metoprolol", "Amlodipine", "Losartan"],
         "label": 0, "area": "Pharmacology", "leaf": "Cardiac drugs", "why": "-olol."},
        {"uid": "k-2", "stem": "Which bone is in the leg?", "choices": ["Tibia", "Radius", "Ulna", "Humerus"],
         "label": [0, 2], "area": "Anatomy", "leaf": ""},  # several answers
        {"uid": "k-3", "stem": "Which is an antifungal?", "choices": ["Fluconazole", "Vancomycin"],
         "label": 1, "area": "Microbiology", "leaf": "Fungi"},
    ])
    out = tmp_path / "out"
    proc = ok("--format", "jsonl", "--input", src, "--output_dir", out, "--question_field", "stem",
              "--options_field", "choices", "--answer_field", "label", "--answer_format", "index0",
              "--id_field", "uid", "--path_fields", "area,leaf", "--explanation_field", "why")
    questions, paths, _ = outputs(out)
    assert [(q["id"], q["answer_idx"]) for q in questions] == [("k-1", "A"), ("k-3", "B")]
    assert questions[0]["options"] == {"A": "Metoprolol", "B": "Amlodipine", "C": "Losartan"}
    assert questions[0]["explanation"] == "-olol."
    assert paths == {"k-1": ["Pharmacology", "Cardiac drugs"], "k-3": ["Microbiology", "Fungi"]}
    assert counts(proc.stdout)["multi-answer"] == 1


def test_generic_csv_with_option_columns_and_text_answers(tmp_path):
    src = write_csv(tmp_path / "quiz.csv", [
        ["q", "o1", "o2", "o3", "o4", "correct", "topic"],
        ["Largest artery?", "Aorta", "Vena cava", "Carotid", "Femoral", "aorta", "Vessels"],
        ["Smallest bone?", "Stapes", "Femur", "Tibia", "Ulna", "Incus", "Bones"],  # answer not among options
    ])
    out = tmp_path / "out"
    proc = ok("--format", "csv", "--input", src, "--output_dir", out, "--question_field", "q",
              "--option_fields", "o1,o2,o3,o4", "--answer_field", "correct", "--answer_format", "text",
              "--path_fields", "topic")
    questions, paths, _ = outputs(out)
    assert [(q["id"], q["answer_idx"]) for q in questions] == [("csv-quiz-2", "A")]
    assert paths == {"csv-quiz-2": ["Vessels"]}
    assert counts(proc.stdout)["answer outside options"] == 1


def test_generic_flags_are_checked(tmp_path):
    src = write_jsonl_raw(tmp_path / "bank.jsonl", [{"question": "Q?", "options": {"A": "a", "B": "b"},
                                                     "answer": "A"}])
    proc = convert("--format", "jsonl", "--input", src, "--output_dir", tmp_path / "out")
    assert proc.returncode == 2 and "exactly one of --option_fields and --options_field" in proc.stderr
    proc = convert("--format", "mmlu", "--input", src, "--output_dir", tmp_path / "out", "--cop_base", "1")
    assert proc.returncode == 2 and "--cop_base applies to --format medmcqa only" in proc.stderr
    proc = convert("--format", "jsonl", "--input", src, "--output_dir", tmp_path / "out",
                   "--options_field", "options", "--seed", "3")
    assert proc.returncode == 2 and "give --iterations too" in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the split

def leaf_bank(tmp_path: Path, sizes: dict[tuple[str, str], int]) -> Path:
    """A generic JSONL bank with `n` questions per (area, leaf)."""
    rows = []
    for (area, leaf), n in sizes.items():
        for i in range(n):
            rows.append({"uid": f"{leaf}-{i}", "question": f"Question {i} about {leaf}?",
                         "options": {"A": f"{leaf} yes {i}", "B": f"{leaf} no {i}"}, "answer": "AB"[i % 2],
                         "area": area, "leaf": leaf})
    return write_jsonl_raw(tmp_path / "bank.jsonl", rows)


SPLIT_FLAGS = ("--format", "jsonl", "--options_field", "options", "--id_field", "uid", "--path_fields", "area,leaf")
LEAVES = {("Pharmacology", "Antibiotics"): 30, ("Pharmacology", "Anticoagulants"): 20,
          ("Anatomy", "Bones"): 10, ("Anatomy", "Nerves"): 3}


def test_split_is_disjoint_sized_stratified_and_seeded(tmp_path):
    src = leaf_bank(tmp_path, LEAVES)
    out = tmp_path / "out"
    proc = ok(*SPLIT_FLAGS, "--input", src, "--output_dir", out, "--iterations", "2", "--eval_fraction", "0.2",
              "--seed", "3")
    questions, paths, report = outputs(out)
    parts = {name: jsonl(out / f"{name}.jsonl") for name in ("eval", "iteration_1", "iteration_2")}
    ids = {name: [q["id"] for q in part] for name, part in parts.items()}
    all_ids = [i for part in ids.values() for i in part]
    assert sorted(all_ids) == sorted(q["id"] for q in questions)  # disjoint and complete
    assert {name: len(v) for name, v in ids.items()} == {"eval": 13, "iteration_1": 25, "iteration_2": 25}
    assert report["files"]["eval.jsonl"] == 13 and f"{out / 'eval.jsonl'} (13)" in proc.stdout
    order = [q["id"] for q in questions]
    for name, part in parts.items():
        assert ids[name] == sorted(ids[name], key=order.index)  # input order kept inside a part
        part_paths = {p["id"]: p["ability_path"] for p in jsonl(out / f"{name}_ability_paths.jsonl")}
        assert part_paths == {i: paths[i] for i in ids[name]}
        for q in part:
            assert question_problem(q) is None
    # Stratified: every leaf (and every area) is spread over the parts in proportion.
    n = len(questions)
    for level in (1, 2):
        groups = Counter(tuple(p[:level]) for p in paths.values())
        for group, size in groups.items():
            for name, part_ids in ids.items():
                got = sum(1 for i in part_ids if tuple(paths[i][:level]) == group)
                assert abs(got - size * len(part_ids) / n) < 2, (group, name, got)
    # Deterministic: the same seed gives the same files byte for byte; another seed another split.
    again = tmp_path / "again"
    ok(*SPLIT_FLAGS, "--input", src, "--output_dir", again, "--iterations", "2", "--eval_fraction", "0.2",
       "--seed", "3")
    for name in ("eval", "iteration_1", "iteration_2"):
        for suffix in (".jsonl", "_ability_paths.jsonl"):
            assert (out / f"{name}{suffix}").read_bytes() == (again / f"{name}{suffix}").read_bytes()
    other = tmp_path / "other"
    ok(*SPLIT_FLAGS, "--input", src, "--output_dir", other, "--iterations", "2", "--eval_fraction", "0.2",
       "--seed", "4")
    assert [q["id"] for q in jsonl(other / "eval.jsonl")] != ids["eval"]


def test_no_split_without_iterations_and_too_small_a_split_exits_2(tmp_path):
    src = leaf_bank(tmp_path, {("Anatomy", "Bones"): 3})
    out = tmp_path / "out"
    ok(*SPLIT_FLAGS, "--input", src, "--output_dir", out)
    assert sorted(p.name for p in out.iterdir()) == ["ability_paths.jsonl", "ability_tree.json", "convert_report.json",
                                                     "questions.jsonl"]
    error = refused(tmp_path / "small", *SPLIT_FLAGS, "--input", src, "--iterations", "3", "--eval_fraction", "0.1")
    assert "too few" in error


def test_split_function_spreads_many_abilities_in_proportion():
    """split_questions itself on 40 random splits: exact sizes, disjoint, each leaf within 2 of its share."""
    import random

    for trial in range(40):
        rng = random.Random(trial)
        iterations, fraction = rng.randint(1, 5), rng.choice([0.1, 0.2, 0.3])
        sizes = [rng.randint(1, 40) for _ in range(rng.randint(2, 12))]
        records = [{"id": f"{leaf}-{i}"} for leaf, m in enumerate(sizes) for i in range(m)]
        paths = {r["id"]: ["area", f"leaf {r['id'].split('-')[0]}"] for r in records}
        if min(split_sizes(len(records), iterations, fraction)) == 0:
            continue
        split = split_questions(records, paths, iterations, fraction, seed=trial)
        parts = [split.eval] + split.iterations
        assert [len(p) for p in parts] == split_sizes(len(records), iterations, fraction)
        assert sorted(r["id"] for p in parts for r in p) == sorted(r["id"] for r in records)
        for leaf, m in enumerate(sizes):
            for part in parts:
                got = sum(1 for r in part if r["id"].startswith(f"{leaf}-"))
                assert abs(got - m * len(part) / len(records)) < 2
        assert split == split_questions(records, paths, iterations, fraction, seed=trial)


def test_split_function_refuses_bad_settings():
    records = [{"id": "a"}, {"id": "b"}]
    with pytest.raises(InputError, match="eval_fraction"):
        split_questions(records, {}, 1, 1.0, 0)
    with pytest.raises(InputError, match="iterations"):
        split_questions(records, {}, 0, 0.5, 0)

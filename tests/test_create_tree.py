"""create_initial_tree.py: the list parser on every style, retries and shortfalls, a run on a tiny local model."""

from __future__ import annotations

import json
import re

import pytest

from atkd.tree import load_tree
from atkd.tree_building import TreeBuildError, build_tree, parse_names, usable_names

STYLES = {
    "numbered dot, with chatter, bold and explanations": (
        "Here are the sub-abilities of clinical medicine:\n\n1. Cardiology\n2. **Pulmonology**: lungs and breathing\n"
        "3. Nephrology - kidney disease\n4. `Neurology`.\n\nLet me know if you need more!",
        ["Cardiology", "Pulmonology", "Nephrology", "Neurology"]),
    "numbered paren": ("1) Cardiology\n2) Non-invasive imaging\n3) Oncology",
                       ["Cardiology", "Non-invasive imaging", "Oncology"]),
    "numbered (1)": ("(1) Cardiology\n(2) Oncology", ["Cardiology", "Oncology"]),
    "bold around the number, nested bullets": (
        "**1. Cardiology**: the heart\n   - heart failure\n   - arrhythmia\n**2. Neurology**\n   - stroke",
        ["Cardiology", "Neurology"]),
    "markdown headings": ("### 1. Cardiology\n### 2. Oncology", ["Cardiology", "Oncology"]),
    "dash bullets": ("- Cardiology\n- Oncology", ["Cardiology", "Oncology"]),
    "star bullets, italic": ("* *Cardiology*\n* Oncology", ["Cardiology", "Oncology"]),
    "dot bullets": ("• Cardiology\n•Oncology", ["Cardiology", "Oncology"]),
    "json array in a code block": ('Sure:\n```json\n["Cardiology", "Oncology", "Neurology"]\n```',
                                   ["Cardiology", "Oncology", "Neurology"]),
    "json array of objects": ('[{"name": "Cardiology", "description": "heart"}, {"name": "Oncology"}]',
                              ["Cardiology", "Oncology"]),
    "plain lines": ("Cardiology\nOncology\n", ["Cardiology", "Oncology"]),
    "one comma-separated line": ("Cardiology, Oncology, Neurology", ["Cardiology", "Oncology", "Neurology"]),
    "reasoning block dropped": ("<think>1. not this</think>\n1. Cardiology\n2. Oncology", ["Cardiology", "Oncology"]),
    "zh numbered 1、 with explanations": (
        "以下是子能力：\n1、心血管疾病\n2、呼吸系统疾病：肺部疾病\n3、消化系统疾病——胃肠道",
        ["心血管疾病", "呼吸系统疾病", "消化系统疾病"]),
    "zh numbered （1）": ("（1）内科学\n（2）外科学\n(3) 儿科学", ["内科学", "外科学", "儿科学"]),
    "zh numbered 1．": ("1．内科学\n2．外科学", ["内科学", "外科学"]),
    "zh Chinese numerals 一、": ("一、内科学\n二、外科学\n十一、妇产科学", ["内科学", "外科学", "妇产科学"]),
    "zh Chinese numerals （一）": ("（一）内科学\n（二）外科学", ["内科学", "外科学"]),
    "zh circled numbers": ("① 心电图\n② 超声心动图", ["心电图", "超声心动图"]),
    "zh bullets with bold": ("- **内科学**\n- 外科学", ["内科学", "外科学"]),
    "zh one line with 、": ("内科学、外科学、儿科学", ["内科学", "外科学", "儿科学"]),
    "zh json array": ('["内科学", "外科学"]', ["内科学", "外科学"]),
    "empty": ("", []),
    "a sentence is not a name": ("1. " + "word " * 30, []),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_parse_names_each_style(style):
    text, expected = STYLES[style]
    assert parse_names(text) == expected


def test_usable_names_drop_empty_duplicates_and_the_parent():
    names = ["Cardiology", "cardiology ", "", "Medicine", "ＣＡＲＤＩＯＬＯＧＹ", "Oncology", "内科学", "内科学"]
    assert usable_names(names, ("Medicine",)) == ["Cardiology", "Oncology", "内科学"]
    assert usable_names(["Oncology", "Surgery"], ("Medicine",), have=["oncology"]) == ["Surgery"]


class ScriptedModel:
    """Stands in for the LLM: replies from a script, keyed by the node named in the prompt."""

    def __init__(self, replies: dict[str, list[str]]):
        self.replies = replies
        self.calls: list[tuple[int, int]] = []  # (attempt, number of prompts)

    def __call__(self, prompts: list[str], attempt: int) -> list[str]:
        self.calls.append((attempt, len(prompts)))
        out = []
        for p in prompts:
            node = re.search(r'sub-abilities of "([^"]+)"', p).group(1).split(" > ")[-1]
            script = self.replies.get(node, [""])
            out.append(script[min(attempt, len(script) - 1)])
        return out


def test_build_tree_retries_short_nodes_then_keeps_what_there_is():
    model = ScriptedModel({
        "Med": ["1. Cardio\n2. Onco"],                       # full on the first try
        "Cardio": ["1. Heart failure", "- Heart failure\n- Arrhythmia\n- Valves"],  # short, then 3
        "Onco": ["nothing useful:", "1. Onco", "1. Lymphoma"],  # short every time: keeps 1
    })
    tree, shortfalls = build_tree(model, "Med", [2, 2], "en", max_retries=2)
    assert tree.to_nested() == {"Med": {"Cardio": {"Heart failure": {}, "Arrhythmia": {}}, "Onco": {"Lymphoma": {}}}}
    # level 1: one prompt; level 2: both nodes, then only the short ones (both, then Onco alone).
    assert model.calls == [(0, 1), (0, 2), (1, 2), (2, 1)]
    assert [(s.path, s.wanted, s.got, s.attempts) for s in shortfalls] == [(("Med", "Onco"), 2, 1, 3)]


def test_build_tree_without_level1_names_fails():
    with pytest.raises(TreeBuildError, match="no usable level-1"):
        build_tree(ScriptedModel({}), "Med", [3], "en", max_retries=1)


def test_end_to_end_on_a_tiny_local_model(tmp_path, run, llama_dir):
    """A random model writes junk names: the file must still be a valid tree of the asked shape at most,
    and every node that got fewer children than asked must be named in a shortfall line of the log."""
    res = run("create_initial_tree.py", "--model_path", llama_dir, "--domain", "Clinical medicine",
              "--nodes_per_level", "3,2", "--max_new_tokens", "12", "--max_retries", "2",
              "--output_dir", tmp_path / "trees", "--output_filename", "t.json")
    assert res.returncode == 0, res.stderr
    tree = load_tree(tmp_path / "trees" / "t.json")
    assert tree.domain == "Clinical medicine"
    level1 = tree.root.children
    assert 1 <= len(level1) <= 3
    short = set(re.findall(r"shortfall: (.+) got \d+ of \d+ sub-abilities", res.stderr))
    for node in [tree.root, *level1]:
        wanted = 3 if node is tree.root else 2
        assert len(node.children) <= wanted
        assert (len(node.children) < wanted) == (" > ".join(node.path) in short), node.path
        for child in node.children:
            assert child.name.strip() and child.name not in node.path
        names = [c.name.casefold() for c in node.children]
        assert len(set(names)) == len(names)
    assert all(len(c.path) == 3 and not c.children for n in level1 for c in n.children)
    record = json.loads((tmp_path / "trees" / "tree.done.json").read_text(encoding="utf-8"))
    argv = record["argv"]
    assert argv[argv.index("--nodes_per_level") + 1] == "3,2" and record["fingerprint"]["nodes_per_level"] == [3, 2]


@pytest.mark.parametrize("flags, problem", [
    (["--model_path", "/nonexistent/model"], "/nonexistent/model: model folder not found"),
    (["--nodes_per_level", "6,0"], "--nodes_per_level"),
    (["--api_base", "http://127.0.0.1:9/v1"], "--api_model"),
    (["--gpu_ids", "0,0"], "--gpu_ids must be distinct non-negative ids"),  # was --gpu_id N
])
def test_bad_settings_exit_2_without_output(tmp_path, run, flags, problem):
    res = run("create_initial_tree.py", *flags, "--output_dir", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and problem in res.stderr
    assert not (tmp_path / "out").exists()


def test_help(run):
    res = run("create_initial_tree.py", "--help")
    assert res.returncode == 0 and "--nodes_per_level" in res.stdout and "--api_base" in res.stdout

"""generate_distill_data.py and atkd.question_writing: tasks, acceptance, retries, plan, resume, bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from atkd import question_writing as qw
from atkd.allocation import allocate
from atkd.io import PartLog, parts_dir_for, write_jsonl
from atkd.model_source import LocalModel
from atkd.paths import summary_path
from atkd.records import load_questions, question_problem
from atkd.tree import load_tree, tree_from_nested
from conftest import ROOT, make_questions, send_chat_reply

NESTED = {"Med": {"Cardio": {"Arrhythmia": 0, "Valves": 0}, "Pharm": 0, "Surgery": {"Ortho": 0}}}
LEAVES = [["Med", "Cardio", "Arrhythmia"], ["Cardio", "Valves"], ["Med", "Pharm"]]  # Ortho: no seeds


# Two threads on a small machine shared with other jobs spin-wait at every op (60x slower here):
# the tiny models of these tests run on one thread, in this process and in the scripts they start.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # every test: torch on one thread (conftest)


@pytest.fixture
def inputs(tmp_path):
    """A dataset of 30 questions over three of four leaves (one path without the root, one on a branch)."""
    qs = make_questions(30, seed=1)
    write_jsonl(tmp_path / "data.jsonl", qs)
    paths = [{"id": q["id"], "ability_path": LEAVES[i % 3]} for i, q in enumerate(qs)]
    paths[-1]["ability_path"] = ["Med", "Cardio"]  # a branch: a seed for no leaf
    write_jsonl(tmp_path / "paths.jsonl", paths)
    tree = tree_from_nested(NESTED)
    for node, w in zip(tree.leaves(), [0.6, 0.3, 0.1, 0.9]):
        node.stats.update(n=10, correct=round(10 * (1 - w)), weakness=w)
    tree.save_scored(tmp_path / "tree.json")
    (tmp_path / "nested.json").write_text(json.dumps(NESTED), encoding="utf-8")
    return tmp_path


def config(folder: Path, **settings) -> qw.QuestionWritingConfig:
    """The stage's settings on the `inputs` folder, with the language and the domain resolved (as `run` does)."""
    base = dict(teacher_model_path="teacher-x", ability_tree_path=str(folder / "tree.json"),
                full_dataset_path=str(folder / "data.jsonl"), ability_class_path=str(folder / "paths.jsonl"),
                output_path=str(folder / "C" / "generated.jsonl"), lang="en", domain="Med")
    return qw.QuestionWritingConfig(**{**base, **settings})


def leaves_of(folder: Path, tree_name: str = "tree.json") -> tuple[list[qw.LeafSeeds], list]:
    dataset = load_questions(folder / "data.jsonl")
    return qw.leaves_with_seeds(load_tree(folder / tree_name), dataset, folder / "paths.jsonl"), dataset


def test_seed_pools_and_weakness_from_a_scored_or_plain_tree(inputs):
    leaves, _ = leaves_of(inputs)
    assert [leaf.path for leaf in leaves] == [("Med", "Cardio", "Arrhythmia"), ("Med", "Cardio", "Valves"),
                                             ("Med", "Pharm"), ("Med", "Surgery", "Ortho")]
    assert [len(leaf.seeds) for leaf in leaves] == [10, 10, 9, 0]  # id 29 is labelled with a branch
    assert [leaf.weakness for leaf in leaves] == [0.6, 0.3, 0.1, 0.9]
    plain, _ = leaves_of(inputs, "nested.json")
    assert [leaf.weakness for leaf in plain] == [1.0] * 4 and [len(x.seeds) for x in plain] == [10, 10, 9, 0]


TASK_LIST_SCRIPT = r"""
import json, random, sys
random.seed(int(sys.argv[2]))  # a different global RNG state in each "worker"
for _ in range(int(sys.argv[2])): random.random()
from pathlib import Path
from atkd import question_writing as qw
from atkd.records import load_questions
from atkd.tree import load_tree
folder = Path(sys.argv[1])
dataset = load_questions(folder / "data.jsonl")
leaves = qw.leaves_with_seeds(load_tree(folder / "tree.json"), dataset, folder / "paths.jsonl")
cfg = qw.QuestionWritingConfig(teacher_model_path="t", ability_tree_path=str(folder / "tree.json"),
                               full_dataset_path=str(folder / "data.jsonl"),
                               ability_class_path=str(folder / "paths.jsonl"), output_path=str(folder / "g.jsonl"),
                               seed=int(sys.argv[3]), seeds_per_prompt=3, lang="en", domain="Med")
tasks = qw.make_tasks(leaves, {0: 6, 1: 4, 2: 3}, {0: 2}, 1, cfg)
batches = qw.make_batches(tasks, 4, cfg.seed, 1)
print(json.dumps([[b.seed, [[t.id, t.seed_ids, t.user_text] for t in b.tasks]] for b in batches]))
"""


def task_list_in_fresh_process(folder: Path, rng_state: int, hash_seed: str, seed: int = 0) -> list:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", TASK_LIST_SCRIPT, str(folder), str(rng_state), str(seed)],
                         capture_output=True, text=True, env=env, timeout=120, cwd=folder)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_worker_builds_the_same_task_list(inputs):
    """Every process and rerun draws the same tasks and batch seeds, whatever its global RNG and hash seed
    (the reference drew seeds with an unseeded RNG before seeding, so its GPU workers disagreed)."""
    first = task_list_in_fresh_process(inputs, rng_state=1, hash_seed="1")
    second = task_list_in_fresh_process(inputs, rng_state=977, hash_seed="4242")
    assert first == second
    tasks = [t for _, batch in first for t in batch]
    assert len(tasks) == 13 and len({t[0] for t in tasks}) == 13
    assert len({tuple(t[1]) for t in tasks}) > 8  # seeds really are drawn per prompt, not fixed
    assert len({seed for seed, _ in first}) == len(first)  # one sampler seed per batch
    # ...and they depend on --seed, not on luck.
    assert task_list_in_fresh_process(inputs, rng_state=1, hash_seed="1", seed=5) != first


# ------------------------------------------------------------------ a deterministic text source

VOCAB = [f"{a}{b}{c}" for a in ("bra", "cor", "dex", "fil", "gan", "hep", "lum", "nor")
         for b in ("ta", "vi", "mo", "ke") for c in ("lin", "sol", "rax", "ide", "tor")]


def fresh_question(rng: random.Random, answer: str = "A") -> str:
    """A valid reply with random vocabulary (no two share many word pairs); the answer is always `answer`."""
    words = rng.sample(VOCAB, 14)
    q = f"Question: Which {' '.join(words[:8])} applies?"
    opts = [f"{L}. {w}" for L, w in zip("ABCD", words[10:14])]
    return "\n".join([q, *opts, f"Answer: {answer}"])


def first_example(user_text: str) -> str:
    """The first seed question shown in a question-writing prompt, as the reply format."""
    block = user_text.split("Example questions on this ability:\n\n", 1)[1].split("\n\n")[0]
    return block


class ScriptedTeacher:
    """Replies by slot: new question, copy of a seed, garbage, copy of an earlier reply, new question."""

    def __init__(self):
        self.by_task: dict[str, str] = {}
        self.by_slot: dict[tuple[int, int], str] = {}
        self.calls: list[tuple[int, int]] = []

    def reply(self, task: qw.Task) -> str:
        rng = random.Random(task.id)
        kind = task.slot % 5
        if kind == 1:
            return "Sure, here it is.\n" + first_example(task.user_text)
        if kind == 2:
            return "I am not able to write that question."
        if kind == 3:
            return self.by_slot[(task.leaf, task.slot - 3)]
        return fresh_question(rng)

    def __call__(self, round_: int, batches: list[qw.Batch]) -> dict[str, str]:
        self.calls.append((round_, sum(len(b.tasks) for b in batches)))
        for t in sorted((t for b in batches for t in b.tasks), key=lambda t: t.slot):
            self.by_task[t.id] = self.by_slot[(t.leaf, t.slot)] = self.reply(t)
        return {t.id: self.by_task[t.id] for b in batches for t in b.tasks}


def test_accept_path_dedup_shuffle_ids_and_retries(inputs):
    leaves, dataset = leaves_of(inputs)
    targets = allocate([x.weakness for x in leaves], [len(x.seeds) for x in leaves], 40).targets
    assert targets[3] == 0 and sum(targets) == 40
    cfg = config(inputs, seed=3, max_retries=4, id_prefix="it2", teacher_model_path="teacher-x", batch_size=4)
    teacher = ScriptedTeacher()
    acc, rounds = qw.run_rounds(leaves, targets, cfg, dataset, teacher)
    records = acc.all_records()

    # Only 2 of 5 replies are new questions, so retries were needed, and they filled every leaf.
    assert rounds > 1 and teacher.calls[0] == (0, 40)
    assert [acc.tally[x.index].accepted for x in leaves] == targets
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    plan = qw.plan_report(leaves, targets, acc, 40, rounds, {})
    assert plan["achieved"] == 40 and plan["shortfall"] == 0
    assert {"near_duplicate_seed", "near_duplicate_generated", "no_question"} <= set(plan["rejected"])
    assert plan["attempts"] == sum(plan["rejected"].values()) + plan["achieved"] + plan["surplus"]
    assert plan["leaves"][3]["target"] == 0 and "no seed" in plan["leaves"][3]["note"]

    seeds_of = {x.index: {q.key for q in x.seeds} for x in leaves}
    for r in records:
        assert question_problem(r) is None
        leaf = next(x for x in leaves if list(x.path) == r["ability_path"])
        assert r["id"].startswith(f"it2-{leaf.index}-") and r["teacher"] == "teacher-x"
        assert r["generated_from_seed"] and set(r["generated_from_seed"]) <= seeds_of[leaf.index]
        # The scripted teacher always marks A: after the shuffle the same text is still the answer.
        source = teacher.by_task[r["meta_info"]["task"]]
        assert r["options"][r["answer_idx"]] == source.split("\nA. ")[1].split("\n")[0]
    positions = Counter(r["answer_idx"] for r in records)
    assert set(positions) == set("ABCD") and max(positions.values()) <= 20  # no position bias

    again, _ = qw.run_rounds(leaves, targets, cfg, dataset, ScriptedTeacher())
    assert again.all_records() == records  # deterministic from the seed


def test_retries_are_bounded_and_the_shortfall_is_reported(inputs):
    leaves, dataset = leaves_of(inputs)
    targets = [3, 2, 1, 0]
    cfg = config(inputs, seed=0, max_retries=2)
    calls = []

    def garbage(round_, batches):
        calls.append(sum(len(b.tasks) for b in batches))
        return {t.id: "Question: ?\nA. x\nB. x\nAnswer: A" for b in batches for t in b.tasks}

    acc, rounds = qw.run_rounds(leaves, targets, cfg, dataset, garbage)
    assert rounds == 3 and calls == [6, 12, 12]  # a retry asks for at most 2x what is missing
    plan = qw.plan_report(leaves, targets, acc, 6, rounds, {})
    assert plan["achieved"] == 0 and plan["shortfall"] == 6 and plan["rejected"] == {"duplicate_options": 30}
    assert plan["leaves"][0]["note"] == "short by 3 after 3 round(s)"


def test_local_teacher_regenerates_a_batch_identically_on_its_own(inputs, llama_dir, tmp_path):
    """A resumed run regenerates only the unfinished batches: each must give what it gave in the full run."""
    leaves, _ = leaves_of(inputs)
    cfg = config(inputs, teacher_model_path=str(llama_dir), seed=0, max_new_tokens=10, temperature=1.0, top_p=1.0)
    batches = qw.make_batches(qw.make_tasks(leaves, {0: 3, 1: 3}, {}, 0, cfg), 2, 0, 0)

    def texts(batch_list, name):
        log = PartLog(tmp_path / name, {"t": 1})
        log.open()
        # A fresh teacher each time, as in a resumed run's new process.
        qw.teacher_producer(cfg.teacher, cfg, log, LocalModel(cfg.teacher), [])(0, batch_list)
        return {k: v["text"] for k, v in log.done().items()}

    full = texts(batches, "full.jsonl")
    alone = texts(batches[2:], "last.jsonl")  # as after a kill during batch 2
    assert len(full) == 6 and alone == {k: full[k] for k in alone} and len(alone) == 2
    assert len(set(full.values())) == 6  # sampled, not constant: the equality above is not vacuous


# ------------------------------------------------------------------ the CLI

def cli_args(folder: Path, out: Path, *extra) -> list:
    return ["--ability_tree_path", folder / "tree.json", "--full_dataset_path", folder / "data.jsonl",
            "--ability_class_path", folder / "paths.jsonl", "--output_path", out, *extra]


def test_cli_tiny_random_teacher_reports_its_shortfall(inputs, llama_dir, run):
    out = inputs / "C" / "generated.jsonl"
    res = run("generate_distill_data.py", "--teacher_model_path", llama_dir,
              *cli_args(inputs, out, "--num_samples", 6, "--max_retries", 1, "--max_new_tokens", 16,
                        "--batch_size", 8, "--id_prefix", "it1"), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    plan = json.loads(summary_path(out).read_text(encoding="utf-8"))
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == plan["achieved"] < 6  # a random model writes (almost) nothing parsable
    assert plan["shortfall"] == 6 - plan["achieved"] and "short by" in res.stderr
    assert plan["attempts"] == sum(plan["rejected"].values()) + plan["achieved"] + plan["surplus"]
    assert plan["rounds"] == 2 and plan["attempts"] >= 6
    targets = [row["target"] for row in plan["leaves"]]
    assert targets == [3, 2, 1, 0] and plan["leaves_without_seeds"] == [["Med", "Surgery", "Ortho"]]
    assert [row["seeds_available"] for row in plan["leaves"]] == [10, 10, 9, 0]
    assert (out.parent / "write_questions.done.json").is_file() and not parts_dir_for(out).exists()
    assert not (out.parent / "generated.args.json").exists()


def test_cli_unknown_ability_path_is_bad_input(inputs, llama_dir, run):
    rows = [json.loads(x) for x in (inputs / "paths.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[4]["ability_path"] = ["Med", "Neuro"]
    write_jsonl(inputs / "paths.jsonl", rows)
    out = inputs / "C" / "generated.jsonl"
    res = run("generate_distill_data.py", "--teacher_model_path", llama_dir, *cli_args(inputs, out))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {inputs / 'paths.jsonl'}:5: ability path")
    assert "Traceback" not in res.stderr and not out.parent.exists()


def test_cli_missing_teacher_and_help(inputs, run):
    res = run("generate_distill_data.py", "--teacher_model_path", inputs / "nope", *cli_args(inputs, inputs / "g.jsonl"))
    assert res.returncode == 2 and "model folder not found" in res.stderr
    assert run("generate_distill_data.py", "--help").returncode == 0


# ------------------------------------------------------------------ the HTTP backend, killed and resumed

class FakeEndpoint(ThreadingHTTPServer):
    """An OpenAI-compatible /chat/completions whose reply depends only on the request's seed.

    With `block_at`, the request of that number and every later one are held (never answered) and
    `blocked` is set, so a test can kill the client at a known point: every earlier reply is in.
    """

    daemon_threads = True

    def __init__(self, block_at: int | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.count = 0
        self.lock = threading.Lock()
        self.block_at = block_at
        self.blocked, self.release = threading.Event(), threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.count += 1
            number = self.server.count
        if self.server.block_at is not None and number >= self.server.block_at:
            self.server.blocked.set()
            self.server.release.wait(60)
            return
        seed = body["seed"]
        send_chat_reply(self, "no idea" if seed % 4 == 0 else fresh_question(random.Random(seed), answer="ABCD"[seed % 3]))

    def log_message(self, *args):
        pass


def api_cli(folder: Path, out: Path, url: str) -> list[str]:
    # One batch of 12 prompts in round 0, three requests in flight at a time.
    args = cli_args(folder, out, "--api_base", url, "--api_model", "fake-teacher", "--num_samples", 12,
                    "--batch_size", 12, "--api_concurrency", 3, "--max_retries", 2, "--id_prefix", "it3",
                    "--seed", 11)
    return [sys.executable, str(ROOT / "generate_distill_data.py"), *map(str, args)]


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost",
                no_proxy="127.0.0.1,localhost", **ONE_THREAD)


def test_cli_http_teacher_resumes_after_kill_to_the_same_file(inputs):
    whole, cut = inputs / "whole" / "generated.jsonl", inputs / "cut" / "generated.jsonl"
    server = FakeEndpoint()
    res = subprocess.run(api_cli(inputs, whole, server.url), capture_output=True, text=True, env=cli_env(), timeout=300)
    server.close()
    assert res.returncode == 0, res.stderr
    uninterrupted_requests = server.count
    records = [json.loads(x) for x in whole.read_text(encoding="utf-8").splitlines()]
    assert 0 < len(records) <= 12 and all(r["teacher"] == "fake-teacher" for r in records)

    # Kill the run (SIGKILL) with requests 9-11 in flight and 12 unsent: replies 1-8, two thirds of its
    # one batch, are each in the part log already (per reply, not per batch).
    server = FakeEndpoint(block_at=9)

    def logged() -> int:
        return sum(len(p.read_text(encoding="utf-8").splitlines()) for p in parts_dir_for(cut).glob("part-*.jsonl"))

    with open(inputs / "cut.log", "w") as log:
        proc = subprocess.Popen(api_cli(inputs, cut, server.url), stdout=log, stderr=log, env=cli_env())
        try:
            assert server.blocked.wait(240), "the run never reached its ninth request"
            deadline = time.monotonic() + 60
            # The 9th request is held; the 10th and 11th follow as their threads get the CPU (3 in flight).
            while (logged() < 8 or server.count < 11) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # a 12th request, if the client wrongly sent one, has time to arrive and be counted
            proc.kill()
            proc.wait(60)
        finally:
            server.close()
    assert not cut.exists()
    assert logged() == 8 and server.count == 11  # 8 answered, 3 held in flight, the 12th never sent

    server = FakeEndpoint()
    res = subprocess.run(api_cli(inputs, cut, server.url), capture_output=True, text=True, env=cli_env(), timeout=300)
    server.close()
    assert res.returncode == 0, res.stderr
    assert server.count == uninterrupted_requests - 8  # the logged replies were not asked again
    assert f"taking over the lock on {cut.parent}" in res.stderr  # the killed run's lock did not block this one
    assert cut.read_bytes() == whole.read_bytes()
    assert summary_path(cut).read_bytes() == summary_path(whole).read_bytes()
    assert not parts_dir_for(cut).exists()

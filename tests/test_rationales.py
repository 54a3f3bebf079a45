"""Rationales as a training signal (step D3): the teacher's answer line is checked against the label,
the reason becomes the response that E stores token-level logits for and F trains on with
token-level KD, and a dataset's own explanation is used where present."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import make_questions, send_chat_reply
from safetensors.torch import load_file, save_file

from atkd import paths
from atkd.io import iter_jsonl, write_jsonl
from atkd.logits_store import LogitsStore
from atkd.models import load_model, load_tokenizer
from atkd.records import load_questions
from atkd.teacher_logits import LogitsConfig
from atkd.teacher_logits import run as run_teacher_logits
from atkd.train_data import build_examples, collate, token_counts
from atkd.trainer import TrainConfig, micro_batch_loss

OPTS = {"A": "aspirin", "B": "heparin", "C": "digoxin", "D": "insulin"}
# The scripted teacher: one reply per marker in the question (stands in for a served model).
REPLIES = {
    "OK": "Answer: C\nDigoxin slows the heart; the others do not.",
    "WRONG": "Answer: B\nHeparin thins the blood.",  # the label is C: a reason for the wrong answer
    "MUTE": "I would rather not say.",
    "BARE": "Answer: C",
    "OWN": "Answer: C\nThe teacher's own words.",
}


def read_jsonl(path):
    return [obj for _, obj in iter_jsonl(path)]


class FakeTeacher(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.asked: list[str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        marker = next(m for m in REPLIES if f"{m}:" in prompt)
        self.server.asked.append(marker)
        send_chat_reply(self, REPLIES[marker])

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher():
    server = FakeTeacher()
    yield server
    server.shutdown()
    server.server_close()


def items() -> list[dict]:
    rows = [{"id": m.lower(), "question": f"{m}: which drug slows the heart?", "options": OPTS, "answer_idx": "C",
             "ability_path": ["Med", "Cardio"]} for m in ("OK", "WRONG", "MUTE", "BARE", "OWN")]
    rows[-1]["explanation"] = "The dataset's own explanation."
    return rows


def explain(run, tmp_path, server, *extra):
    write_jsonl(tmp_path / "validated.jsonl", items())
    out = tmp_path / "D3" / "explained.jsonl"
    env = {"OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    res = run("generate_rationales.py", "--input_file", tmp_path / "validated.jsonl", "--output_file", out,
              "--api_base", server.url, "--api_model", "teacher", *extra, env=env)
    assert res.returncode == 0, res.stderr
    return out


def test_answer_first_reasons_are_kept_and_the_rest_dropped_and_counted(tmp_path, run, teacher):
    out = explain(run, tmp_path, teacher)
    kept = {r["id"]: r for r in read_jsonl(out)}
    assert set(kept) == {"ok", "own"}
    assert kept["ok"]["explanation"] == "Digoxin slows the heart; the others do not."
    assert kept["ok"]["explanation_source"] == "teacher" and kept["ok"]["answer_idx"] == "C"
    # The dataset's explanation is used, and the teacher is not even asked about that item.
    assert kept["own"]["explanation"] == "The dataset's own explanation."
    assert kept["own"]["explanation_source"] == "dataset" and "OWN" not in teacher.asked
    dropped = {r["id"]: r for r in read_jsonl(paths.dropped_path(out))}
    assert {k: r["drop_reason"] for k, r in dropped.items()} == {"wrong": "disagrees", "mute": "unparsed",
                                                                 "bare": "no_reason"}
    assert dropped["wrong"]["teacher_letter"] == "B" and dropped["wrong"]["teacher_reply"] == REPLIES["WRONG"]
    report = json.loads(paths.summary_path(out).read_text())
    assert report["total"] == 5 and report["kept"] == 2 and report["dropped"] == 3
    assert report["from_teacher"] == 1 and report["from_dataset"] == 1
    assert report["by_reason"] == {"unparsed": 1, "disagrees": 1, "no_reason": 1}
    assert report["by_leaf"] == {"Med > Cardio": {"total": 5, "kept": 2}}


def test_the_teacher_is_asked_even_where_the_dataset_explains_when_told_to(tmp_path, run, teacher):
    out = explain(run, tmp_path, teacher, "--no-use_dataset_explanation")
    kept = {r["id"]: r for r in read_jsonl(out)}
    assert kept["own"]["explanation"] == "The teacher's own words." and kept["own"]["explanation_source"] == "teacher"
    assert sorted(teacher.asked) == sorted(REPLIES)


def test_a_teacher_that_keeps_nothing_fails_with_one_line(tmp_path, run, teacher):
    rows = [r for r in items() if r["id"] in ("wrong", "mute")]
    write_jsonl(tmp_path / "validated.jsonl", rows)
    out = tmp_path / "D3" / "explained.jsonl"
    res = run("generate_rationales.py", "--input_file", tmp_path / "validated.jsonl", "--output_file", out,
              "--api_base", teacher.url, "--api_model", "teacher",
              env={"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    assert res.returncode == 1 and "error: the teacher's replies kept no item" in res.stderr
    assert not out.exists() and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- token-level KD on the reasons

@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    rows = make_questions(12, seed=5)
    for q in rows:
        q["explanation"] = f"the {q['options'][q['answer_idx']]} is linked to the {q['question'].split()[-1]}"
    path = tmp_path_factory.mktemp("explained") / "explained.jsonl"
    write_jsonl(path, rows)
    return path


def store(llama_dir, data, out):
    run_teacher_logits(LogitsConfig(model_path=str(llama_dir), dataset_path=str(data), output_dir=str(out), top_k=8,
                                    batch_size=4, response_field="explanation"))
    return LogitsStore.open(out)


def loss_and_grad(student_dir, data, logits_dir, alpha_ce=0.5):
    """The training loss of one micro-batch of every item, and the gradient of the student's output head."""
    from atkd.head import HeadAtPositions

    tok = load_tokenizer(student_dir)
    examples, stats = build_examples(load_questions(data), LogitsStore.open(logits_dir), tok, "en", 512, str(data))
    batch = collate(examples, [1.0] * len(examples), tok.pad_token_id)
    model = load_model(student_dir)
    head = HeadAtPositions(model, len(tok))
    cfg = TrainConfig(student_model_path=str(student_dir), train_file_path=str(data),
                      teacher_logits_dir=str(logits_dir), output_dir="unused", alpha_ce=alpha_ce)
    loss, _ce, _kd = micro_batch_loss(head, batch, *token_counts(batch), cfg)
    loss.backward()
    return stats, loss.item(), model.get_output_embeddings().weight.grad.clone()


def test_reasons_are_stored_per_token_and_the_loss_follows_the_stored_top_k(tmp_path, llama_dir, explained):
    st = store(llama_dir, explained, tmp_path / "E")
    assert st.index["summary"]["token_level_items"] == 12 and st.response_field == "explanation"
    tok = load_tokenizer(llama_dir)
    for q in load_questions(explained):
        target_ids = st.token_level(q.key)[0].tolist()
        # Every token of "\n" + reason + eos has a row: the whole response after the letter.
        assert tok.decode(target_ids, skip_special_tokens=True).strip() == q.extra["explanation"]

    stats, loss, grad = loss_and_grad(llama_dir, explained, tmp_path / "E")
    assert stats.token_level == 12 and stats.option_only == 0
    _, ce_only, _ = loss_and_grad(llama_dir, explained, tmp_path / "E", alpha_ce=1.0)

    # The same store with another shape among the teacher's top-k (same top-k mass, so still a distribution
    # with the stored tail): only the token-level KD reads it.
    shard = next((tmp_path / "E").glob("shard-*.safetensors"))
    tensors = load_file(str(shard))
    old = tensors["topk_logprobs"]
    g = torch.Generator().manual_seed(0)
    shape = torch.log_softmax(4 * torch.randn(old.shape, generator=g), dim=-1)
    tensors["topk_logprobs"] = (old.logsumexp(-1, keepdim=True) + shape).contiguous()
    save_file(tensors, str(shard), metadata={"format": "atkd-teacher-logits/1"})
    _, loss2, grad2 = loss_and_grad(llama_dir, explained, tmp_path / "E")
    assert abs(loss2 - loss) > 1e-3 and not torch.allclose(grad, grad2, atol=1e-6)
    _, ce_only2, _ = loss_and_grad(llama_dir, explained, tmp_path / "E", alpha_ce=1.0)
    assert ce_only2 == pytest.approx(ce_only, abs=1e-6)  # CE alone does not read the teacher


# ----------------------------------------------------------------------------- both, in main.py on the demo

@pytest.mark.e2e
def test_demo_loop_trains_on_replayed_and_explained_items(tmp_path):
    """One small round of main.py with replay and rationales: D3 explains the validated items, then D2 adds the
    set share of the final training items (replay items train on their letter), E stores the reasons token by
    token and F trains on all of it, with token-level KD on the reasons."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    demo = ROOT / "data" / "demo"
    cmd = [sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(tmp_path / "wf"),
           "--models_output_dir", str(tmp_path / "models"), "--num_iterations", "1",
           "--dataset_files_per_iteration", str(demo / "iteration_1.jsonl"),
           "--ability_class_files_per_iteration", str(demo / "iteration_1_ability_paths.jsonl"),
           "--num_distill_samples", "48", "--train_epochs", "1", "--gpus_to_use", "",
           "--replay_fraction", "0.25", "--response_style", "rationale",
           "--eval_dataset_path", "", "--eval_ability_class_path", ""]  # the training items are what is checked
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[run] D2_replay" in proc.stdout and "[run] D3_rationales" in proc.stdout
    it = paths.IterationPaths(tmp_path / "wf", tmp_path / "models", 1)

    from atkd.replay import replay_count

    mix = read_jsonl(it.replay_mix)
    validated = read_jsonl(it.validated)
    explained = read_jsonl(it.explained)
    replayed = [r for r in mix if r.get("source") == "replay"]
    assert len(mix) == len(explained) + len(replayed) and len(replayed) == replay_count(len(explained), 0.25)
    report = json.loads(paths.summary_path(it.explained).read_text())
    assert report["total"] == len(validated) and report["kept"] == len(explained) >= 0.8 * len(validated)
    assert report["from_teacher"] == len(explained) and {r["explanation_source"] for r in explained} == {"teacher"}
    assert not any(r.get("source") == "replay" for r in explained) and not any("explanation" in r for r in replayed)
    assert sum(r["explanation"] == demo_reason(r) for r in explained) >= 0.9 * len(explained)  # the templated reason

    store = LogitsStore.open(it.logits_dir)
    assert set(store.items) == {str(r["id"]) for r in mix}
    assert store.index["summary"]["token_level_items"] == len(explained)
    state = json.loads((it.final_model / "trainer_state.json").read_text())
    assert state["examples"]["n_items"] == len(mix) and state["examples"]["token_level"] == len(explained)
    text = (tmp_path / "wf" / "report.md").read_text()
    assert f"- replayed from the round's questions: {len(replayed)} items" in text
    assert f"- items with a rationale: {len(explained)} of {len(validated)}" in text


def demo_reason(record: dict) -> str:
    import demo_recipe

    return demo_recipe.demo_reason(record)


def test_reason_weight_gives_each_items_reason_the_weight_of_its_letter(tmp_path, llama_dir, explained):
    """With --reason_weight w, an item's tokens after the letter share w (CE and token-level KD alike); 0 keeps
    the plain token average. A placeholder item (weight 0) stays at 0 either way."""
    store(llama_dir, explained, tmp_path / "E")
    tok = load_tokenizer(llama_dir)
    examples, _ = build_examples(load_questions(explained), LogitsStore.open(tmp_path / "E"), tok, "en", 512, "d")
    plain = collate(examples[:3], [1.0, 1.0, 0.0], tok.pad_token_id)
    assert plain["weights"].tolist() == [1.0] * sum(len(e.response_ids) for e in examples[:2]) + [0.0] * len(
        examples[2].response_ids)
    batch = collate(examples[:3], [1.0, 1.0, 0.0], tok.pad_token_id, reason_weight=0.5)
    at = 0
    for ex, item_weight in zip(examples[:3], (1.0, 1.0, 0.0)):
        n = len(ex.response_ids)
        got = batch["weights"][at:at + n]
        assert got[0] == item_weight and torch.allclose(got[1:], torch.full((n - 1,), 0.5 * item_weight / (n - 1)))
        at += n
    assert token_counts(batch) == pytest.approx((3.0, 3.0))  # two real items: (1 + 0.5) each, in CE and in KD
    assert batch["tok_weight"].sum().item() == pytest.approx(1.0)

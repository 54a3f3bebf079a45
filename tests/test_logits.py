"""generate_logits.py: the safetensors store, its numbers, resume, and bad input."""

import json
import logging
import os
import pickle

import pytest
import torch
from conftest import make_questions
from safetensors import safe_open

import generate_logits
from atkd import teacher_logits, workers
from atkd.io import parts_dir_for, write_jsonl
from atkd.logits_store import LogitsStore
from atkd.models import load_model, load_tokenizer
from atkd.records import load_questions
from atkd.scoring import score_questions

N_ITEMS, SHARD = 40, 16


def with_explanations(qs):
    """Two items in three get an explanation (token-level targets); the rest answer with the letter only."""
    for i, q in enumerate(qs):
        if i % 3:
            q["explanation"] = f"The {q['options'][q['answer_idx']]} fits the {q['question'].split()[-1]}"
    return qs


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("logits_data") / "validated.jsonl"
    write_jsonl(path, with_explanations(make_questions(N_ITEMS, seed=1)))
    return path


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, llama_dir, data_file):
    """The CLI run, as main.py makes it."""
    from conftest import run_script

    out = tmp_path_factory.mktemp("store") / "E_teacher_logits"
    res = run_script("generate_logits.py", "--model_path", llama_dir, "--dataset_path", data_file,
                     "--output_dir", out, "--response_field", "explanation", "--shard_size", SHARD,
                     "--top_k", 8, "--batch_size", 5)
    assert res.returncode == 0, res.stderr
    return out


def test_store_is_a_few_safetensors_shards_never_pickle(store_dir, monkeypatch):
    """Shards hold many items and are read without pickle (the reference loaded one .pt per item with torch.load)."""
    names = sorted(p.name for p in store_dir.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) == 3  # ceil(40 / 16), not one per item
    assert set(names) - set(shards) == {"index.json", "summary.json", "logits.done.json"}
    assert not list(store_dir.parent.glob("*.parts"))  # the part log is gone once the store is complete

    def forbidden(*a, **k):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    for name in shards:  # each shard is a plain safetensors file
        with safe_open(str(store_dir / name), framework="pt") as fh:
            assert set(fh.keys()) == {"option_logprobs", "topk_ids", "topk_logprobs", "tail_logprob", "target_ids"}
    store = LogitsStore.open(store_dir)
    assert len(store.items) == N_ITEMS
    for key in store.items:
        assert torch.allclose(store.option_logprobs(key).exp().sum(), torch.tensor(1.0), atol=1e-5)


def test_token_level_rows_are_top_k_plus_a_tail_that_sums_to_one(store_dir, data_file):
    store = LogitsStore.open(store_dir)
    idx = json.loads((store_dir / "index.json").read_text())
    assert idx["top_k"] == 8 and idx["response_field"] == "explanation"
    # Staleness is the done-record's business, not the index's.
    assert "fingerprint" not in idx
    record = json.loads((store_dir / "logits.done.json").read_text())
    assert (record["fingerprint"]["top_k"], record["fingerprint"]["response_field"]) == (8, "explanation")
    with_text = [str(q.id) for q in load_questions(data_file) if q.extra.get("explanation")]
    assert {k for k, v in store.items.items() if v["tok_len"]} == set(with_text)
    for key in with_text:
        targets, ids, logp, tail = store.token_level(key)
        assert ids.shape == (len(targets), 8)
        total = logp.exp().sum(-1) + tail.exp()
        assert torch.allclose(total, torch.ones_like(total), atol=1e-4)
        assert (logp[:, :-1] >= logp[:, 1:]).all()  # sorted, most probable first
    assert store.token_level(next(k for k in store.items if k not in with_text)) is None


def test_option_logprobs_and_accuracy_equal_mcq_scoring(store_dir, llama_dir, data_file):
    """The teacher's stored answer is what inference's scoring reads from the same prompt."""
    tok, model = load_tokenizer(llama_dir), load_model(llama_dir)
    questions = load_questions(data_file)
    scored = {}
    score_questions(model, tok, questions, "en", 8, lambda pairs: scored.update({q.key: s for q, s in pairs}))
    store = LogitsStore.open(store_dir)
    for q in questions:
        want = torch.tensor([scored[q.key].logprobs[L] for L in q.letters])
        assert torch.allclose(store.option_logprobs(q.key), want, atol=1e-5)
    correct = sum(scored[q.key].pred_letter == q.answer_idx for q in questions)
    summary = json.loads((store_dir / "summary.json").read_text())
    assert summary["correct"] == correct and summary["accuracy"] == pytest.approx(correct / N_ITEMS)
    assert json.loads((store_dir / "index.json").read_text())["summary"] == summary


def test_resume_keeps_written_shards_and_matches_an_uninterrupted_run(tmp_path, store_dir, llama_dir, data_file,
                                                                      monkeypatch, caplog):
    out = tmp_path / "E_teacher_logits"
    cfg = teacher_logits.LogitsConfig(model_path=str(llama_dir), dataset_path=str(data_file), output_dir=str(out),
                                      top_k=8, batch_size=5, response_field="explanation", shard_size=SHARD)
    real_run_workers, asked = workers.run_workers, []

    def second_shard_only(fn, tasks, gpu_ids, part_log, payload=None):
        """What a run killed after its second shard leaves behind: that shard alone is written."""
        asked.append(list(tasks))
        real_run_workers(fn, [1], gpu_ids, part_log, payload)

    monkeypatch.setattr(workers, "run_workers", second_shard_only)
    with pytest.raises(RuntimeError, match=r"shards \[0, 2\] were not written"):
        teacher_logits.run(cfg)
    assert asked == [[0, 1, 2]] and not out.exists()
    first = parts_dir_for(out) / "shard-00001.safetensors"
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)

    def spy(fn, tasks, gpu_ids, part_log, payload=None):
        asked.append(list(tasks))
        real_run_workers(fn, tasks, gpu_ids, part_log, payload)

    monkeypatch.setattr(workers, "run_workers", spy)
    with caplog.at_level(logging.INFO, logger="atkd"):
        assert teacher_logits.run(cfg)["n"] == N_ITEMS
    assert asked[-1] == [0, 2]  # only the shards the killed run had not written
    assert "resuming: 1 of 3 shards already done" in caplog.text
    assert not parts_dir_for(out).exists()
    moved = out / "shard-00001.safetensors"
    assert (moved.stat().st_ino, moved.stat().st_mtime_ns) == stamp  # not recomputed, only moved into place
    a, b = LogitsStore.open(out), LogitsStore.open(store_dir)
    assert a.items == b.items
    for key in a.items:
        assert torch.equal(a.option_logprobs(key), b.option_logprobs(key))
        ta, tb = a.token_level(key), b.token_level(key)
        assert (ta is None) == (tb is None)
        if ta is not None:
            assert all(torch.allclose(x.float(), y.float(), atol=1e-6) for x, y in zip(ta, tb))

    index_stamp = (out / "index.json").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atkd"):
        assert teacher_logits.run(cfg) is None  # complete for these inputs: nothing to do
    assert "nothing to do" in caplog.text and len(asked) == 2
    assert (out / "index.json").stat().st_mtime_ns == index_stamp


@pytest.mark.parametrize("extra,problem", [
    (["--top_k", "0"], "--top_k must be at least 1 (got 0)"),
    (["--top_k", "100000"], "--top_k must be between 1"),
    (["--response_field", "meta_info_num"], 'field "meta_info_num" must be a string'),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, llama_dir, capsys, extra, problem):
    rows = make_questions(4, seed=2)
    rows[2]["meta_info_num"] = 7
    data = tmp_path / "d.jsonl"
    write_jsonl(data, rows)
    out = tmp_path / "E"
    with pytest.raises(SystemExit) as err:
        generate_logits.main(["--model_path", str(llama_dir), "--dataset_path", str(data), "--output_dir", str(out),
                              *extra])
    assert err.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and problem in lines[0]
    assert not out.exists() and not os.path.exists(str(out) + ".parts")


def test_missing_model_folder_exits_2(tmp_path, data_file, run):
    res = run("generate_logits.py", "--model_path", tmp_path / "nope", "--dataset_path", data_file,
              "--output_dir", tmp_path / "E")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: model folder not found"
    assert "Traceback" not in res.stderr and not (tmp_path / "E").exists()

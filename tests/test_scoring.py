"""Letter scoring precision (atkd.scoring): bf16 logits 20 apart from zero by less than bf16's spacing
must not tie toward A; real ties are counted in every scoring summary, with the letter mass."""

import json
import logging

import pytest
import torch
from conftest import make_questions

from atkd import answering, cross_check, teacher_logits
from atkd.answering import InferenceConfig
from atkd.cross_check import CrossCheckConfig
from atkd.io import iter_jsonl, write_jsonl
from atkd.letters import letter_token_ids
from atkd.models import load_model, load_tokenizer
from atkd.prompts import encode_prompt, mcq_prompt
from atkd.records import question_from_dict
from atkd.scoring import score_questions
from atkd.teacher_logits import LogitsConfig
from atkd.tiny import build_model, save_model

N = 6


def tie_model(tok, margin: bool):
    """A bf16 Llama whose letter logits are all about 20, B above A by one bf16 step of one weight (margin)
    or exactly equal to A (no margin); C and D about 10.

    Every layer's output projection is zero, so the last hidden state is the normalised embedding of
    the prompt's last token, the same for every MCQ prompt (the template's generation prompt).
    """
    model = build_model(tok, seed=0, hidden=64, layers=1, heads=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
    model = model.to(torch.bfloat16)
    q = question_from_dict(make_questions(1, seed=0)[0])
    ids = torch.tensor([encode_prompt(tok, mcq_prompt(tok, q, "en"))])
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[0, -1].float()
        a, b, c, d = letter_token_ids(tok, list("ABCD"))
        head = model.get_output_embeddings().weight
        head[a] = (20.0 * h / h.dot(h)).to(torch.bfloat16)
        head[b] = head[a]
        if margin:  # one weight one bf16 step up, where the hidden state is largest: logit B - A ~ 0.01
            k = int(h.argmax())
            head[b, k] = (head[a, k].view(torch.int16) + 1).view(torch.bfloat16)
        head[c] = head[d] = (head[a].float() / 2).to(torch.bfloat16)
    return model


@pytest.fixture(scope="module")
def tok(llama_dir):
    return load_tokenizer(llama_dir)


@pytest.fixture(scope="module")
def questions():
    return [question_from_dict(q) for q in make_questions(N, seed=4)]


def scored(model, tok, questions):
    """OptionScores per question, in `questions` order (batches come longest first)."""
    got = {}
    score_questions(model, tok, questions, "en", batch_size=4, on_batch=lambda pairs: got.update(
        {q.key: s for q, s in pairs}))
    return [got[q.key] for q in questions]


def test_bf16_letter_logits_no_longer_tie_toward_a(tok, questions):
    model = tie_model(tok, margin=True)
    ids = [encode_prompt(tok, mcq_prompt(tok, q, "en")) for q in questions]
    letters = letter_token_ids(tok, list("ABCD"))
    with torch.no_grad():  # the model's own bf16 logits: A and B round to one value (the spacing at 20 is 0.125)
        bf16 = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1, letters] for s in ids])
    assert bf16.dtype == torch.bfloat16 and bool((bf16[:, 0] == bf16[:, 1]).all())
    scores = scored(model, tok, questions)
    assert [s.pred_letter for s in scores] == ["B"] * N  # float32: B is above A by ~0.01
    assert not any(s.tied for s in scores)
    assert all(s.logprobs["B"] > s.logprobs["A"] for s in scores)


def test_exact_ties_are_counted_and_go_to_the_earliest_letter(tok, questions):
    scores = scored(tie_model(tok, margin=False), tok, questions)
    assert all(s.tied for s in scores) and [s.pred_letter for s in scores] == ["A"] * N
    assert scores[0].logprobs["A"] == scores[0].logprobs["B"]


@pytest.fixture(scope="module")
def tie_dirs(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    return {m: save_model(tie_model(tok, margin=m), tok, root / f"margin_{m}") for m in (True, False)}


@pytest.fixture(scope="module")
def data(questions, tmp_path_factory):
    path = tmp_path_factory.mktemp("tie_data") / "q.jsonl"
    write_jsonl(path, [q.to_dict() for q in questions])
    return path


@pytest.mark.parametrize("margin", [True, False])
def test_inference_summary_reports_ties_and_letter_mass(tie_dirs, data, tmp_path, margin):
    out = tmp_path / "replies.jsonl"
    summary = answering.run(InferenceConfig(model_path=str(tie_dirs[margin]), dataset_path=str(data),
                                            output_path=str(out), dtype="bf16"))
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8")) == summary
    replies = [r for _, r in iter_jsonl(out)]
    assert summary["tied_top"] == (0 if margin else N) == sum(r["tied_top"] for r in replies)
    assert {r["pred_letter"] for r in replies} == ({"B"} if margin else {"A"})
    mass = summary["letter_mass"]
    assert mass["n"] == N and mass["mean_letter_mass"] == pytest.approx(sum(r["letter_mass"] for r in replies) / N)
    assert mass["mean_letter_mass"] > 0.99  # letters at 20, the rest of the vocabulary near 0


def test_agents_report_and_teacher_summary_count_ties_and_letter_mass(tie_dirs, llama_dir, data, tmp_path):
    report = cross_check.run(CrossCheckConfig(agent_model_1_path=str(tie_dirs[False]), agent_model_2_path=str(llama_dir),
                                              input_file=str(data), output_file=str(tmp_path / "D" / "v.jsonl"),
                                              dtype="bf16"))
    assert report["agents"]["agent_1"]["tied_top"] == N and report["agents"]["agent_2"]["tied_top"] == 0
    for agent in ("agent_1", "agent_2"):
        mass = report["agents"][agent]["letter_mass"]
        assert mass["n"] == N
        assert mass["mean_letter_mass"] == pytest.approx(report["agents"][agent]["mean_letter_mass"], abs=1e-4)
    summary = teacher_logits.run(LogitsConfig(model_path=str(tie_dirs[False]), dataset_path=str(data),
                                              output_dir=str(tmp_path / "E"), dtype="bf16"))
    assert json.loads((tmp_path / "E" / "summary.json").read_text(encoding="utf-8")) == summary
    assert summary["tied_top"] == N and summary["letter_mass"]["n"] == N
    assert summary["letter_mass"]["mean_letter_mass"] == pytest.approx(summary["mean_letter_mass"])


def test_low_letter_mass_is_in_the_summary_and_warned(llama_dir, data, tmp_path, caplog):
    """The tiny random Llama puts almost nothing on the letters: the summary says so and the log warns."""
    with caplog.at_level(logging.WARNING, logger="atkd.scoring"):
        summary = answering.run(InferenceConfig(model_path=str(llama_dir), dataset_path=str(data),
                                                output_path=str(tmp_path / "replies.jsonl")))
    assert summary["letter_mass"]["mean_letter_mass"] < 0.5 and summary["letter_mass"]["share_below_threshold"] == 1.0
    assert "option letters at the answer position" in caplog.text and str(llama_dir) in caplog.text


def test_float32_scores_equal_the_models_own_logits(llama_dir, questions):
    """In float32 the new path changes nothing: option log-probs and letter mass equal model(...).logits'."""
    model, tok = load_model(llama_dir), load_tokenizer(llama_dir)
    letters = letter_token_ids(tok, list("ABCD"))
    for q, s in zip(questions, scored(model, tok, questions)):
        with torch.no_grad():
            full = model(torch.tensor([encode_prompt(tok, mcq_prompt(tok, q, "en"))])).logits[0, -1].double()
        ref = torch.log_softmax(full[letters], -1)
        mass = torch.log_softmax(full, -1)[letters].exp().sum().item()
        assert max(abs(s.logprobs[L] - ref[i].item()) for i, L in enumerate("ABCD")) < 1e-5
        assert s.letter_mass == pytest.approx(mass, abs=1e-6)

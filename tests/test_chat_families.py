"""Chat formats of real model families, on tiny tokenizers shaped like each (atkd.tiny.CHAT_FORMATS):
which token is the answer letter, where generation stops, think blocks, the pinned date."""

import dataclasses
import datetime
import json
import logging
import shutil

import pytest
import torch

from atkd import answering, prompts
from atkd.answering import InferenceConfig
from atkd.fingerprint import DoneRecord
from atkd.generation import end_of_turn_id, generate_batch, stop_token_ids
from atkd.io import write_jsonl
from atkd.letters import letter_token_ids
from atkd.prompts import (CLOSE_THINK, encode_prompt, mcq_prompt, prompts_version, render, reply_token_ids,
                          think_handling)
from atkd.records import question_from_dict
from atkd.scoring import letter_mass_summary, score_questions
from atkd.sequence import training_sequence
from atkd.tiny import CHAT_FORMATS, generation_eos_ids, scripted_model, train_chat_tokenizer, train_tokenizer
from conftest import corpus, make_questions

END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": "</s>", "gemma": "<end_of_turn>",
               "r1": "<｜end▁of▁sentence｜>", "qwen3": "<|im_end|>"}


@pytest.fixture(scope="session")
def families():
    texts = corpus(make_questions(60, seed=3))
    return {name: train_chat_tokenizer(texts, name, vocab_size=400) for name in CHAT_FORMATS}


@pytest.fixture(scope="session")
def questions4():
    return [question_from_dict(q) for q in make_questions(6, seed=5)]


# ----------------------------------------------------------------------------- defect 6: the letter token

@pytest.mark.parametrize("name", list(CHAT_FORMATS))
def test_letter_token_is_the_first_token_of_the_templated_reply(families, name):
    tok = families[name]
    ids = letter_token_ids(tok, list("ABCD"))
    assert [tok.decode([i]).strip() for i in ids] == list("ABCD")
    assert len(set(ids)) == 4
    assert ids == [reply_token_ids(tok, L)[0] for L in "ABCD"]


def test_sentencepiece_chat_letter_carries_the_word_start_marker(families):
    """Llama-2/Mistral render the reply as " A": the model's first reply token is "▁A", not "A"."""
    tok = families["llama2"]
    assert tok.convert_ids_to_tokens(letter_token_ids(tok, list("ABCD"))) == ["▁A", "▁B", "▁C", "▁D"]


def test_template_without_assistant_turns_falls_back_to_the_bare_letter(caplog):
    tok = train_tokenizer(corpus(make_questions(10, seed=4)), vocab_size=300)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no replies') }}"
                         "{% endif %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n")
    with caplog.at_level(logging.WARNING, logger="atkd.letters"):
        ids = letter_token_ids(tok, list("AB"))
    assert ids == [encode_prompt(tok, render(tok, "?") + L)[-1] for L in "AB"]
    assert "cannot render an assistant reply" in caplog.text


def test_letter_mass_of_a_model_answering_in_the_llama2_format(families, questions4, caplog):
    """A model that answers "▁B" right after "[/INST]" holds (nearly) all its mass on the letters."""
    tok = families["llama2"]
    last = {encode_prompt(tok, mcq_prompt(tok, q, "en"))[-1] for q in questions4}
    assert len(last) == 1  # every prompt ends with the same token ("]" of "[/INST]")
    model = scripted_model(tok, {last.pop(): tok.convert_tokens_to_ids("▁B")})
    got = []
    score_questions(model, tok, questions4, "en", batch_size=4, on_batch=got.extend)
    assert all(s.pred_letter == "B" for _, s in got)
    with caplog.at_level(logging.WARNING, logger="atkd.scoring"):
        summary = letter_mass_summary([s.letter_mass for _, s in got], source="llama2")
    assert summary["n"] == len(questions4) and summary["mean_letter_mass"] > 0.99
    assert summary["share_below_threshold"] == 0.0 and not caplog.records


def test_letter_mass_summary_warns_when_the_mean_is_below_half(caplog):
    with caplog.at_level(logging.WARNING, logger="atkd.scoring"):
        summary = letter_mass_summary([0.9, 0.2, 0.1], source="student")
    assert summary["mean_letter_mass"] == pytest.approx(0.4) and summary["min_letter_mass"] == pytest.approx(0.1)
    assert summary["share_below_threshold"] == pytest.approx(2 / 3) and summary["threshold"] == 0.5
    [record] = caplog.records
    assert "student" in record.getMessage() and "prompt or chat template is probably wrong" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="atkd.scoring"):
        assert letter_mass_summary([0.9, 0.6])["mean_letter_mass"] == pytest.approx(0.75)
        assert letter_mass_summary([])["mean_letter_mass"] is None
    assert not caplog.records


# ----------------------------------------------------------------------------- defect 1: end of turn

@pytest.mark.parametrize("name", list(CHAT_FORMATS))
def test_end_of_turn_token_per_family(families, name):
    tok = families[name]
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids(END_OF_TURN[name])


def test_end_of_turn_of_the_minimal_template_and_of_plain_text():
    chat = train_tokenizer(["a b c"] * 5, vocab_size=300)
    plain = train_tokenizer(["a b c"] * 5, vocab_size=300, chat=False)
    assert end_of_turn_id(chat) == chat.convert_tokens_to_ids("<|end|>")
    assert end_of_turn_id(plain) is None


def chatty_model(tok, prompt_ids, end_of_turn, generation_eos):
    """Says "A", ends its turn, then keeps talking ("B B B ...") if nothing stops it."""
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    model = scripted_model(tok, {prompt_ids[0][-1]: a, a: end_of_turn, end_of_turn: b, b: b})
    model.generation_config.eos_token_id = generation_eos
    return model


def test_generation_stops_at_the_generation_config_eos_not_only_the_tokenizer_eos(families, questions4):
    """Llama-3: the tokenizer's eos is <|end_of_text|>, a turn ends with <|eot_id|> (in the generation config)."""
    tok = families["llama3"]
    ids = [encode_prompt(tok, mcq_prompt(tok, q, "en")) for q in questions4[:2]]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.eos_token_id
    model = chatty_model(tok, ids, eot, generation_eos_ids(tok, "llama3"))
    assert generate_batch(model, tok, ids, max_new_tokens=6) == ["A", "A"]
    assert stop_token_ids(model, tok) == sorted(generation_eos_ids(tok, "llama3"))


def test_generation_stops_at_the_templates_end_of_turn_when_the_config_lacks_it(families, questions4):
    """Gemma fine-tune whose generation config lists only <eos>: the template's <end_of_turn> still stops it."""
    tok = families["gemma"]
    ids = [encode_prompt(tok, mcq_prompt(tok, q, "en")) for q in questions4[:1]]
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    model = chatty_model(tok, ids, eot, tok.eos_token_id)  # an int, as many configs have it
    assert generate_batch(model, tok, ids, max_new_tokens=6) == ["A"]
    assert stop_token_ids(model, tok) == sorted({tok.eos_token_id, eot})


@pytest.mark.parametrize("name", list(CHAT_FORMATS))
def test_a_trained_response_ends_with_the_templates_end_of_turn(families, name):
    """E stores and F trains the response closed as the template closes a reply: <|eot_id|> for Llama-3 and
    <end_of_turn> for Gemma, whose tokenizer eos (<|end_of_text|>, <eos>) never ends a turn."""
    tok = families[name]
    q = question_from_dict({**make_questions(1, seed=6)[0], "explanation": "Because it is."})
    seq = training_sequence(tok, q, "en", response_field="explanation")
    end = tok.convert_tokens_to_ids(END_OF_TURN[name])
    assert seq.response_ids[-1] == end and seq.response_ids.count(end) == 1
    assert end in reply_token_ids(tok, f"{q.answer_idx}\nBecause it is.")  # what the template writes after it


def test_a_response_without_a_chat_template_ends_with_eos(qwen_plain_dir):
    from atkd.models import load_tokenizer

    tok = load_tokenizer(qwen_plain_dir)
    assert not tok.chat_template
    q = question_from_dict({**make_questions(1, seed=6)[0], "explanation": "Because it is."})
    assert training_sequence(tok, q, "en", response_field="explanation").response_ids[-1] == tok.eos_token_id


# ----------------------------------------------------------------------------- defect 7: think blocks

def fresh(name):
    """A tokenizer no other test has rendered with (the think log is once per tokenizer object)."""
    return train_chat_tokenizer(corpus(make_questions(10, seed=9)), name, vocab_size=300)


def test_qwen3_thinking_is_turned_off_by_its_own_switch(caplog):
    tok = fresh("qwen3")
    with caplog.at_level(logging.INFO, logger="atkd.prompts"):
        text = render(tok, "Which?")
        assert render(tok, "Which else?").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and text.count("</think>") == 1
    assert think_handling(tok) == "enable_thinking"
    assert [r.getMessage() for r in caplog.records if "think" in r.getMessage()] == [
        "chat template honours enable_thinking: thinking is turned off, the answer letter is the reply's first token"]


def test_r1_open_think_block_is_closed_before_the_letter(caplog):
    tok = fresh("r1")
    with caplog.at_level(logging.INFO, logger="atkd.prompts"):
        texts = [render(tok, f"Which {i}?") for i in range(3)]
    assert all(t.endswith("<｜Assistant｜><think>\n" + CLOSE_THINK) for t in texts)
    assert think_handling(tok) == "closed"
    assert len([r for r in caplog.records if "closed empty think block" in r.getMessage()]) == 1
    # the letter is the token after the closed block, as the model emits it after thinking
    ids = letter_token_ids(tok, list("AB"))
    assert encode_prompt(tok, texts[0] + "B")[-1] == ids[1]


@pytest.mark.parametrize("name", ["chatml", "llama3", "llama2", "gemma"])
def test_templates_without_think_blocks_are_left_alone(families, name):
    tok = families[name]
    assert think_handling(tok) == "none"
    quoting = "What does <think> mean here?"  # a question that quotes the tag opens nothing
    assert not render(tok, quoting).endswith(CLOSE_THINK)


# ----------------------------------------------------------------------------- defect 8: the pinned date

def test_llama3_prompt_says_the_pinned_date_not_today(families):
    text = render(families["llama3"], "Which?")
    assert "Today Date: 26 Jul 2024\n" in text
    assert datetime.date.today().strftime("%d %b %Y") not in text or datetime.date.today() == prompts.PINNED_DATE


def test_templates_that_call_strftime_now_get_the_pinned_date():
    tok = train_tokenizer(["a b c"] * 5, vocab_size=300)
    tok.chat_template = "{{ strftime_now('%Y-%m-%d') }}|{{ messages[0]['content'] }}"
    assert render(tok, "x") == "2024-07-26|x"


def test_prompts_version_names_every_prompt_text_and_the_date(monkeypatch):
    v = prompts_version()
    assert len(v) == 12 and int(v, 16) >= 0 and prompts_version() == v
    monkeypatch.setitem(prompts.LABELS, "en", dataclasses.replace(prompts.LABELS["en"], answer="Final answer:"))
    changed_label = prompts_version()
    monkeypatch.undo()
    assert prompts_version() == v
    monkeypatch.setattr(prompts, "PINNED_DATE", datetime.date(2025, 1, 1))
    assert len({v, changed_label, prompts_version()}) == 3


def test_pinned_rendering_is_the_same_whatever_today_is(families, monkeypatch):
    tok = families["llama3"]
    before = render(tok, "Which?")

    class Tomorrow(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 5, 17, tzinfo=tz)

    import transformers.utils.chat_template_utils as ctu
    monkeypatch.setattr(ctu, "datetime", Tomorrow, raising=False)
    assert render(tok, "Which?") == before
    assert torch.equal(torch.tensor(encode_prompt(tok, before)), torch.tensor(encode_prompt(tok, render(tok, "Which?"))))


# ----------------------------------------------------------------------------- the rendered prompt in the fingerprint

def edit_chat_template(model_dir, edit) -> None:
    """Rewrite only the folder's chat template (chat_template.jinja in transformers 5, else tokenizer_config.json)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(edit(jinja.read_text(encoding="utf-8")), encoding="utf-8")
        return
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = edit(config["chat_template"])
    config_file.write_text(json.dumps(config), encoding="utf-8")


def test_editing_only_the_chat_template_reruns_a_finished_stage(llama_dir, tmp_path):
    """The template renders every prompt: it is part of the model folder's content hash, so a finished
    stage whose model's template changed is redone (by hand or by main.py: the same done-record)."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    data = tmp_path / "q.jsonl"
    write_jsonl(data, make_questions(4, seed=2))
    out = tmp_path / "A" / "replies.jsonl"
    cfg = InferenceConfig(model_path=str(model), dataset_path=str(data), output_path=str(out))
    assert answering.run(cfg) is not None
    before = out.read_text(encoding="utf-8")
    assert answering.run(cfg) is None  # finished: nothing to do
    edit_chat_template(model, lambda t: t.replace("<|assistant|>\n", "<|assistant|>\nSure.\n"))
    state, why = DoneRecord(cfg).status()
    assert state == "changed" and "model_path" in why
    assert answering.run(cfg) is not None  # redone, with the new prompt
    assert out.read_text(encoding="utf-8") != before
    assert answering.run(cfg) is None

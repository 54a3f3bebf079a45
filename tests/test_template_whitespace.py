"""Chat templates whose generation prompt ends in whitespace ("... ASSISTANT: ").

A byte-level tokenizer writes "ASSISTANT: " + "B" as ":" + "ĠB". Encoding the prompt alone ends it
with a lone "Ġ", and scoring or training "ĠB" after it puts the letter after a double space the
model never saw. The scored and trained letter must be the token the tokenizer gives for the
template's prompt followed by the letter, with the prompt's ids before it; a template that cannot
be made so is refused (InputError, exit 2).
"""

import pytest

from atkd.answering import Answerer, answer_local
from atkd.errors import InputError
from atkd.letters import letter_token_ids
from atkd.prompts import (encode_prompt, mcq_prompt, mcq_user_text, render, reply_joined_whitespace, reply_prefix,
                          templated_prompt)
from atkd.records import question_from_dict
from atkd.sequence import training_sequence
from atkd.tiny import build_model, save_model, scripted_model, train_chat_tokenizer, train_tokenizer
from conftest import corpus, make_questions

# Vicuna-like turns, with the generation prompt ending in a space.
SPACED = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: "
          "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")
# The generation prompt ends in a space, its own assistant turns do not ("Bot:B"): no cut of the prompt
# gives the tokenizer's ids of the prompt followed by the letter.
SELF_CONTRADICTING = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Bot:"
                      "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}Bot: {% endif %}")
REFUSAL = "is not tokenized as the prompt's tokens then one letter token"


def tokenizer_with(template: str):
    tok = train_tokenizer(corpus(make_questions(60, seed=3)), vocab_size=400)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def spaced():
    return tokenizer_with(SPACED)


@pytest.fixture(scope="module")
def items():
    return [question_from_dict({**q, "explanation": "Heparin potentiates antithrombin."})
            for q in make_questions(6, seed=5)]


def generation_prompt(tok, q) -> str:
    """The template's own text for the MCQ prompt, as apply_chat_template writes it (trailing space kept)."""
    return tok.apply_chat_template([{"role": "user", "content": mcq_user_text(q, "en")}], tokenize=False,
                                   add_generation_prompt=True)


def test_the_template_ends_its_generation_prompt_in_a_space_joined_to_the_letter(spaced, items):
    text = generation_prompt(spaced, items[0])
    assert text.endswith("ASSISTANT: ") and templated_prompt(spaced, mcq_user_text(items[0], "en")) == text
    # the tokenizer joins that space to the letter: the prompt alone ends in a lone space token
    assert spaced.convert_ids_to_tokens(encode_prompt(spaced, text)[-1:]) == ["Ġ"]
    assert spaced.convert_ids_to_tokens(encode_prompt(spaced, text + "B")[-1:]) == ["ĠB"]
    assert reply_joined_whitespace(spaced) == " " == reply_prefix(spaced)


def test_scored_letter_follows_the_prompt_as_the_tokenizer_writes_prompt_then_letter(spaced, items):
    """Step A (and D, E): the prompt's ids and each letter's id are the ids of the template's prompt + letter."""
    for q in items:
        text, prompt_ids = generation_prompt(spaced, q), encode_prompt(spaced, mcq_prompt(spaced, q, "en"))
        letter_ids = letter_token_ids(spaced, q.letters)
        assert spaced.convert_ids_to_tokens(letter_ids) == [f"Ġ{L}" for L in q.letters]
        for letter, letter_id in zip(q.letters, letter_ids):
            assert encode_prompt(spaced, text + letter)[-1] == letter_id
            assert prompt_ids + [letter_id] == encode_prompt(spaced, text + letter)


def test_step_a_scores_the_letter_after_the_prompt_not_after_a_lone_space(spaced, items):
    """A model that answers "ĠB" after "ASSISTANT:" (as the tokenizer writes its turns) is read as B; after a
    lone "Ġ" (a position it never saw before a letter) it would say "ĠC"."""
    model = scripted_model(spaced, {spaced.convert_tokens_to_ids(":"): spaced.convert_tokens_to_ids("ĠB"),
                                    spaced.convert_tokens_to_ids("Ġ"): spaced.convert_tokens_to_ids("ĠC")})
    got = answer_local(model, spaced, items, Answerer(model_path="<in memory>", mode="score", lang="en"))
    assert [a["pred_letter"] for a in got] == ["B"] * len(items)
    assert min(a["letter_mass"] for a in got) > 0.99


def test_trained_sequence_is_the_tokenization_of_prompt_then_letter(spaced, items):
    """Steps E and F: prompt ids + the letter (+ the reason) are the ids of the template's prompt followed by them."""
    for q in items:
        text = generation_prompt(spaced, q)
        letter_only = training_sequence(spaced, q, "en")
        assert letter_only.prompt_ids + letter_only.response_ids == encode_prompt(spaced, text + q.answer_idx)
        assert letter_only.response_ids == [encode_prompt(spaced, text + q.answer_idx)[-1]]
        with_reason = training_sequence(spaced, q, "en", response_field="explanation")
        assert with_reason.response_ids[0] == letter_only.response_ids[0]
        assert with_reason.input_ids == encode_prompt(spaced, f"{text}{q.answer_idx}\n{q.extra['explanation']}")


@pytest.mark.parametrize("name", ["chatml", "llama3", "llama2", "qwen3"])
def test_templates_without_a_joined_trailing_space_render_as_before(name):
    """A generation prompt ending in a newline (or in no whitespace) keeps its text and its own tokens."""
    tok = train_chat_tokenizer(corpus(make_questions(10, seed=9)), name, vocab_size=300)
    assert reply_joined_whitespace(tok) == "" and render(tok, "Which?") == templated_prompt(tok, "Which?")


def test_a_template_that_cannot_be_scored_this_way_is_refused(items):
    tok = tokenizer_with(SELF_CONTRADICTING)
    with pytest.raises(InputError, match=REFUSAL):
        letter_token_ids(tok, list("ABCD"))
    with pytest.raises(InputError, match=REFUSAL):
        training_sequence(tok, items[0], "en")


def test_inference_refuses_it_with_one_line_and_exit_2(tmp_path, items, run):
    from atkd.io import write_jsonl

    tok = tokenizer_with(SELF_CONTRADICTING)
    model_dir = save_model(build_model(tok, hidden=32, layers=1, heads=4), tok, tmp_path / "model")
    data = tmp_path / "q.jsonl"
    write_jsonl(data, [q.to_dict() for q in items])
    out = tmp_path / "A" / "replies.jsonl"
    res = run("inference.py", "--model_path", model_dir, "--dataset_path", data, "--output_path", out)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {model_dir}: ") and REFUSAL in errors[0], res.stderr
    assert res.stderr.strip().splitlines()[-1] == errors[0]
    assert not out.exists()

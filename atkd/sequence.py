"""The teacher-forced token sequence of one item: the contract between steps E and F.

One rule builds the sequence for both generate_logits.py (the teacher's logits are taken on it)
and train.py (the student trains on it), so the student trains on exactly the prompt the
teacher saw (the reference re-tokenised a string holding a literal backslash-n):

    prompt ids  = encode_prompt(mcq_prompt(question))                 (atkd.prompts)
    response    = [letter token of the answer]                         (atkd.letters)
                  + ids of "\\n" + the item's response text + [end]    (only with a response field)
    model input = prompt ids + response[:-1]

The pieces are concatenated as ids, never re-tokenised as one string; prompt ids + letter token are
the tokenizer's own ids of the template's prompt followed by the letter (`atkd.letters` checks it; a
prompt ending in a space joined to the letter ends before it, and `reply_prefix` carries it). [end] is the token the chat
template closes an assistant turn with (`atkd.generation.end_of_turn_id`: <|eot_id|> for Llama-3,
<end_of_turn> for Gemma, <|im_end|> for ChatML), else the tokenizer's eos: Llama-3's and Gemma's
eos (<|end_of_text|>, <eos>) never follow a reply in their templates, and a student taught to
end with it would not stop at the end of its turn.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .errors import InputError
from .generation import end_of_turn_id
from .letters import letter_token_ids
from .prompts import encode_prompt, mcq_prompt, mcq_user_text, reply_prefix
from .records import Question

RESPONSE_SEPARATOR = "\n"  # a real newline between the answer letter and the response text


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_ids(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode("ascii")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id, added tokens included): equal means token ids agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def response_text(q: Question, field_name: str | None, source: str = "dataset") -> str | None:
    """The item's longer response (an explanation), or None when the field is unset or empty."""
    if not field_name:
        return None
    value = q.extra.get(field_name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(source, f'item {q.id!r}: field "{field_name}" must be a string, '
                                 f"got {type(value).__name__}")
    return value if value.strip() else None


def continuation_ids(tokenizer, lead: str, text: str) -> list[int]:
    """Ids of `text` as it continues `lead` (the reply so far), without special tokens.

    Encoding `lead + text` and dropping `lead`'s ids keeps a leading-space rule (Metaspace) from
    inventing a space; when the two do not split cleanly, `text` is encoded on its own.
    """
    base = tokenizer(lead, add_special_tokens=False)["input_ids"]
    full = tokenizer(lead + text, add_special_tokens=False)["input_ids"]
    if full[: len(base)] == base and len(full) > len(base):
        return list(full[len(base):])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def response_end_id(tokenizer) -> int | None:
    """The token that ends a response: the template's end of turn, else the tokenizer's eos."""
    end = end_of_turn_id(tokenizer)
    if end is None:
        end = tokenizer.eos_token_id
    return int(end) if end is not None else None


@dataclass
class TrainSequence:
    """The teacher-forced token sequence of one item, as the teacher and the student both see it."""

    user_text: str  # the MCQ prompt's words (tokenizer independent)
    prompt_text: str  # rendered through this tokenizer's chat template (or plain text + "Answer:")
    prompt_ids: list[int]
    response_ids: list[int]  # [answer letter token] (+ continuation + [end of turn])
    option_ids: list[int]  # this tokenizer's letter token of each option, A, B, ...

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids[:-1]


def training_sequence(tokenizer, q: Question, lang: str, response_field: str | None = None,
                      source: str = "dataset") -> TrainSequence:
    """Prompt ids + response ids of one item, concatenated as ids (never re-tokenised as one string)."""
    prompt_text = mcq_prompt(tokenizer, q, lang)
    prompt_ids = encode_prompt(tokenizer, prompt_text)
    option_ids = letter_token_ids(tokenizer, q.letters, lang, source=source)
    letter_id = option_ids[q.letters.index(q.answer_idx)]
    response = [letter_id]
    text = response_text(q, response_field, source)
    if text is not None:
        lead = reply_prefix(tokenizer, lang) + q.answer_idx
        response += continuation_ids(tokenizer, lead, RESPONSE_SEPARATOR + text.strip())
        end = response_end_id(tokenizer)
        if end is not None:
            response.append(end)
    return TrainSequence(user_text=mcq_user_text(q, lang), prompt_text=prompt_text, prompt_ids=prompt_ids,
                         response_ids=response, option_ids=option_ids)

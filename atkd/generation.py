"""Batched text generation with a local Hugging Face model (left-padded, one call per batch).

A reply ends at any of the model's stop tokens (`stop_token_ids`): the tokenizer's eos, every eos
id of the model's generation config, and the chat template's end-of-turn token. Passing only the
tokenizer's eos to `generate` would replace the generation config's list, and many checkpoints
end a turn with a token that is not the tokenizer's eos (Llama-3 `<|eot_id|>` where the tokenizer
says `<|end_of_text|>`, Gemma `<end_of_turn>` where it says `<eos>`): the model would then write
past its turn, and the extra text would be read as part of the answer.
"""

from __future__ import annotations

import logging
import weakref

import torch

from .batching import left_pad
from .models import input_device
from .prompts import has_chat_template, reply_token_ids

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_batch(model, tokenizer, batch_ids: list[list[int]], max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Decoded continuations (special tokens dropped), each up to its first stop token. temperature 0 is greedy.

    `seed` re-seeds the sampler before this batch, so a batch's output does not depend on what
    ran before it (a resumed run regenerates exactly what an uninterrupted one would).
    """
    if seed is not None:
        torch.manual_seed(seed)
    inputs = left_pad(batch_ids, tokenizer.pad_token_id, device=input_device(model))
    inputs.pop("position_ids")  # generate() derives them from the attention mask itself
    sampling = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=stop_token_ids(model, tokenizer))
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**inputs, **kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a reply: tokenizer eos, generation-config eos ids, the template's end of turn."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return sorted(int(i) for i in ids if i is not None)


# Per tokenizer object (weakly held), its template's end-of-turn id (None: no such token).
_END_OF_TURN: "weakref.WeakKeyDictionary[object, int | None]" = weakref.WeakKeyDictionary()


def end_of_turn_id(tokenizer) -> int | None:
    """The control token the chat template writes right after an assistant's reply, if any.

    Rendered from a one-turn conversation whose reply is "A" (`prompts.reply_token_ids`): past the
    reply's own tokens and any whitespace, the first token must be a special or added control
    token (`<|eot_id|>`, `<end_of_turn>`, `<|im_end|>`, `<|end|>`, `</s>`); plain text there (a
    template that ends turns with words) or nothing at all means there is none.
    """
    if tokenizer not in _END_OF_TURN:
        _END_OF_TURN[tokenizer] = _find_end_of_turn(tokenizer) if has_chat_template(tokenizer) else None
    return _END_OF_TURN[tokenizer]


def _find_end_of_turn(tokenizer) -> int | None:
    reply = "A"
    try:
        after = reply_token_ids(tokenizer, reply)
    except Exception as exc:  # a template that refuses a one-turn conversation: rely on the eos ids alone
        log.warning("could not render a one-turn conversation to find the end-of-turn token (%s)", exc)
        return None
    control = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    n = 1
    while n <= len(after) and tokenizer.decode(after[:n]).strip() != reply:
        n += 1  # the reply's own tokens
    for tok in after[n:]:
        if tok in control:
            return int(tok)
        if tokenizer.decode([tok]).strip():
            return None
    return None

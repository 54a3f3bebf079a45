"""Batched text generation with a local Hugging Face model (left-padded, one call per batch)."""

from __future__ import annotations

import torch

from .batching import left_pad
from .models import input_device


@torch.no_grad()
def generate_batch(model, tokenizer, batch_ids: list[list[int]], max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Decoded continuations (special tokens dropped). temperature 0 is greedy.

    `seed` re-seeds the sampler before this batch, so a batch's output does not depend on what
    ran before it (a resumed run regenerates exactly what an uninterrupted one would).
    """
    if seed is not None:
        torch.manual_seed(seed)
    inputs = left_pad(batch_ids, tokenizer.pad_token_id, device=input_device(model))
    inputs.pop("position_ids")  # generate() derives them from the attention mask itself
    sampling = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**inputs, **kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)

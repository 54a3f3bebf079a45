"""MCQ scoring from the option-letter logits at the answer position (DESIGN §7, §8).

One forward pass per left-padded batch; the model's head runs on the last position only
(`logits_to_keep=1`), so a batch costs B x V logits, not B x L x V. The probabilities are over the
item's own options; `letter_mass` is how much of the full-vocabulary probability the option
letters hold (low mass means the model is not answering in the expected format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .batching import left_pad
from .models import input_device, last_logits_kwarg


@dataclass
class OptionScores:
    """A model's answer to one question."""

    logprobs: dict[str, float]  # natural-log probabilities over the item's options (sum of exp = 1)
    letter_mass: float  # probability of all option letters together over the full vocabulary

    @property
    def pred_letter(self) -> str:
        return max(self.logprobs, key=lambda k: (self.logprobs[k], -ord(k)))

    def probs(self) -> dict[str, float]:
        return {k: math.exp(v) for k, v in self.logprobs.items()}


@torch.no_grad()
def last_position_logits(model, batch_ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """fp32 logits (B x V) at the last real token of each sequence."""
    inputs = left_pad(batch_ids, pad_id, device=input_device(model))
    out = model(**inputs, use_cache=False, **last_logits_kwarg(model))
    return out.logits[:, -1, :].float()


def scores_from_logits(logits: torch.Tensor, letter_ids: list[list[int]], letters: list[list[str]]) -> list[OptionScores]:
    """Turn B x V last-position logits into per-item option scores."""
    full = torch.log_softmax(logits, dim=-1)
    out = []
    for row, (ids, lets) in enumerate(zip(letter_ids, letters)):
        idx = torch.as_tensor(ids, device=logits.device)
        opt = torch.log_softmax(logits[row, idx], dim=-1)
        mass = torch.logsumexp(full[row, idx], dim=-1).exp().item()
        out.append(OptionScores(logprobs={L: float(v) for L, v in zip(lets, opt.tolist())}, letter_mass=mass))
    return out

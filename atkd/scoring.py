"""MCQ scoring from the option-letter logits at the answer position (ARCHITECTURE.md §6, §7).

One forward pass per left-padded batch; the output head runs on the last position only
(`atkd.head.HeadAtPositions`: the model's own head and its family's scaling, verified against the
model's logits once per model), so a batch costs B x V logits, not B x L x V. The option letters'
logits are computed in float32 from the upcast hidden state and head rows: in bf16, logits between
16 and 32 are 0.125 apart, so two letters closer than that round to the same value, and a tie goes
to the earliest letter. Ties that remain are counted (`OptionScores.tied`).
The probabilities are over the item's own options; `letter_mass` is how much of the
full-vocabulary probability the option letters hold (low mass means the model is not answering
in the expected format). `letter_mass_summary` condenses a scoring run's masses and warns when
they are low.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from .batching import left_pad
from .head import HeadAtPositions
from .models import input_device

log = logging.getLogger(__name__)

# Below this mean letter mass the model mostly wants to say something other than a letter, so
# the option probabilities are read from the margin of its distribution.
LOW_LETTER_MASS = 0.5


@dataclass
class OptionScores:
    """A model's answer to one question."""

    logprobs: dict[str, float]  # natural-log probabilities over the item's options (sum of exp = 1)
    letter_mass: float  # probability of all option letters together over the full vocabulary
    tied: bool = False  # the top option logit is shared by another option (the earliest letter was picked)

    @property
    def pred_letter(self) -> str:
        return max(self.logprobs, key=lambda k: (self.logprobs[k], -ord(k)))

    def probs(self) -> dict[str, float]:
        return {k: math.exp(v) for k, v in self.logprobs.items()}


@torch.no_grad()
def last_position_logits(model, batch_ids: list[list[int]], pad_id: int, letter_ids: list[list[int]],
                         n_vocab: int | None = None) -> torch.Tensor:
    """float32 logits (B x n_vocab) at the last real token of each sequence, the letters' in full float32.

    `n_vocab`: the tokenizer's vocabulary size (rows a checkpoint pads its head with are left out);
    None: every row of the head.
    """
    head = HeadAtPositions(model, n_vocab or model.get_output_embeddings().weight.shape[0])
    inputs = left_pad(batch_ids, pad_id, device=input_device(model))
    rows = torch.arange(len(batch_ids), device=inputs["input_ids"].device)
    cols = torch.full_like(rows, inputs["input_ids"].shape[1] - 1)
    return with_exact_letters(head, head.hidden_at(**inputs, rows=rows, cols=cols), letter_ids)


def with_exact_letters(head: HeadAtPositions, hidden: torch.Tensor, letter_ids: list[list[int]]) -> torch.Tensor:
    """float32 logits (N x V) of N hidden states: the head's output upcast, with every letter's entry
    recomputed in float32 (`HeadAtPositions.token_logits_fp32`)."""
    logits = head.logits(hidden).float()
    ids = torch.tensor(sorted({int(i) for row in letter_ids for i in row}), dtype=torch.long, device=logits.device)
    logits[:, ids] = head.token_logits_fp32(hidden, ids).to(logits.device)
    return logits


def scores_from_logits(logits: torch.Tensor, letter_ids: list[list[int]], letters: list[list[str]]) -> list[OptionScores]:
    """Turn B x V last-position logits into per-item option scores."""
    full = torch.log_softmax(logits, dim=-1)
    out = []
    for row, (ids, lets) in enumerate(zip(letter_ids, letters)):
        idx = torch.as_tensor(ids, device=logits.device)
        opt_logits = logits[row, idx]
        opt = torch.log_softmax(opt_logits, dim=-1)
        mass = torch.logsumexp(full[row, idx], dim=-1).exp().item()
        tied = int((opt_logits == opt_logits.max()).sum()) > 1
        out.append(OptionScores(logprobs={L: float(v) for L, v in zip(lets, opt.tolist())}, letter_mass=mass,
                                tied=tied))
    return out


def score_questions(model, tokenizer, questions, lang: str, batch_size: int, on_batch, progress=None) -> None:
    """Score `questions` (atkd.records.Question) in length-sorted batches of the MCQ prompt.

    Calls `on_batch(list of (question, OptionScores))` after each batch, so the caller can append
    the results to a part log before the next batch starts (a kill loses one batch at most).
    `progress` is an optional tqdm bar advanced by the batch size.
    """
    from .batching import length_sorted_batches
    from .letters import letter_token_ids
    from .prompts import encode_prompt, mcq_prompt

    ids = [encode_prompt(tokenizer, mcq_prompt(tokenizer, q, lang)) for q in questions]
    for batch in length_sorted_batches([len(s) for s in ids], batch_size):
        qs = [questions[i] for i in batch]
        letters = [q.letters for q in qs]
        letter_ids = [letter_token_ids(tokenizer, L, lang) for L in letters]
        logits = last_position_logits(model, [ids[i] for i in batch], tokenizer.pad_token_id, letter_ids, len(tokenizer))
        on_batch(list(zip(qs, scores_from_logits(logits, letter_ids, letters))))
        if progress is not None:
            progress.update(len(batch))


def letter_mass_summary(masses: Iterable[float], source: str = "the model") -> dict:
    """Mean, min and share below `LOW_LETTER_MASS` of a scoring run's letter masses (probabilities).

    Logs a warning when the mean is below `LOW_LETTER_MASS`: the model is not answering with a
    letter at the answer position, so the prompt or the chat template is probably wrong for it
    (e.g. a letter token without its word-start marker, or a reply that starts in a think block).
    """
    values = [float(m) for m in masses]
    n = len(values)
    summary = {"n": n, "mean_letter_mass": sum(values) / n if n else None, "min_letter_mass": min(values, default=None),
               "share_below_threshold": sum(v < LOW_LETTER_MASS for v in values) / n if n else None,
               "threshold": LOW_LETTER_MASS}
    if n and summary["mean_letter_mass"] < LOW_LETTER_MASS:
        log.warning("%s puts on average only %.3f of its probability on the option letters at the answer position "
                    "(%d items; threshold %.2f): the prompt or chat template is probably wrong for this model",
                    source, summary["mean_letter_mass"], n, LOW_LETTER_MASS)
    return summary


def scoring_summary(letter_masses: Iterable[float], tied: Iterable[bool], source: str = "the model") -> dict:
    """What every scoring summary reports (inference's summary.json, each agent in D's summary.json,
    E's summary.json): `letter_mass_summary` and `tied_top`, the number of items whose top option
    logit was shared (even in float32; the earliest letter was picked)."""
    return {"letter_mass": letter_mass_summary(letter_masses, source), "tied_top": sum(bool(t) for t in tied)}

"""Training examples for distillation (step F): the teacher's targets beside each sequence, and collation.

CE reads the logits that predict each response token (the prompt and the padding carry no loss);
option-level KD reads the answer position with the student's own letter-token ids, the same ids
CE trains; token-level KD reads the rest of the response when teacher and student share a
tokenizer. The sequences themselves come from `atkd.sequence` (what the teacher saw), or, for
an item the student practised on-policy, `atkd.on_policy` (its own letter and reason): there CE
reads only the answer position, towards the labelled letter, and every later token carries KD
alone (the GKD convention: no cross-entropy on the student's own samples).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .batching import left_pad
from .errors import InputError
from .records import MAX_OPTIONS, Question
from .on_policy import item_sequence, practised_letter
from .sequence import TrainSequence, sha256_ids, sha256_text, tokenizer_fingerprint

log = logging.getLogger(__name__)


@dataclass
class TrainExample:
    """One item ready for collation: ids plus the teacher's targets."""

    key: str
    prompt_ids: list[int]
    response_ids: list[int]
    option_ids: list[int]  # the student's letter tokens of the item's options
    teacher_option_logp: torch.Tensor  # [n_options] teacher log-probs over the options (fp32)
    topk_ids: torch.Tensor | None = None  # [len(response) - 1, k] teacher's top-k ids per later token
    topk_logp: torch.Tensor | None = None  # [len(response) - 1, k]
    tail_logp: torch.Tensor | None = None  # [len(response) - 1] log of the mass outside the top-k
    on_policy: bool = False  # the response is the student's own (atkd.on_policy): CE on the letter slot only
    ce_letter_id: int | None = None  # on-policy: the labelled letter's token, CE's target at the answer position

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids[:-1]


@dataclass
class ExampleStats:
    """What building the examples did, for the log."""

    n_items: int = 0
    token_level: int = 0
    option_only: int = 0
    truncated: int = 0
    on_policy: int = 0  # items trained on the student's own response
    skipped_too_long: list[str] = field(default_factory=list)
    token_level_off: dict[str, int] = field(default_factory=dict)  # reason -> items

    def note_off(self, reason: str) -> None:
        self.token_level_off[reason] = self.token_level_off.get(reason, 0) + 1


def build_examples(questions: list[Question], store, tokenizer, lang: str, max_length: int,
                   source: str) -> tuple[list[TrainExample], ExampleStats]:
    """Training examples for `questions` with the teacher's targets from `store` (an `atkd.logits_store.LogitsStore`).

    An item without teacher logits, or whose question/options differ from the ones the logits were
    taken on, is an `InputError` naming the item. Token-level KD is used for an item only when the
    store's tokenizer fingerprint equals the student's and the teacher's prompt and response ids
    are exactly the student's; otherwise the item gets option-level KD (counted by reason).
    An item whose prompt and answer letter do not fit in `max_length` is skipped (listed); a longer
    response is cut to fit.
    """
    same_vocab = store.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    stats = ExampleStats()
    examples: list[TrainExample] = []
    for q in questions:
        meta = store.items.get(q.key)
        if meta is None:
            raise InputError(source, f"item {q.id!r} has no teacher logits in {store.dir} "
                                     "(were they generated from another data file?)")
        seq = item_sequence(tokenizer, q, lang, store.response_field, source)
        if meta["letters"] != "".join(q.letters) or meta["user_sha256"] != sha256_text(seq.user_text):
            raise InputError(source, f"item {q.id!r}: question or options differ from the ones the teacher's "
                                     f"logits in {store.dir} were taken on")
        on_policy = practised_letter(q) is not None
        if bool(meta.get("on_policy")) != on_policy:
            raise InputError(source, f"item {q.id!r}: the teacher's logits in {store.dir} were taken on "
                                     f"{'the teacher' if on_policy else 'the student'}'s response, the file gives "
                                     f"{'the student' if on_policy else 'the teacher'}'s (another data file?)")
        stats.n_items += 1
        if len(seq.prompt_ids) + 1 > max_length:
            stats.skipped_too_long.append(q.key)
            continue
        response = seq.response_ids
        if len(seq.prompt_ids) + len(response) - 1 > max_length:
            response = response[: max_length - len(seq.prompt_ids) + 1]
            stats.truncated += 1
        ex = TrainExample(key=q.key, prompt_ids=seq.prompt_ids, response_ids=response, option_ids=seq.option_ids,
                          teacher_option_logp=store.option_logprobs(q.key), on_policy=on_policy,
                          ce_letter_id=seq.option_ids[q.letters.index(q.answer_idx)] if on_policy else None)
        stats.on_policy += on_policy
        tokens = store.token_level(q.key) if len(response) > 1 else None
        if tokens is not None:
            reason = _token_level_mismatch(same_vocab, meta, seq, tokens[0])
            if reason:
                stats.note_off(reason)
            else:
                n = len(response) - 1
                ex.topk_ids, ex.topk_logp, ex.tail_logp = (t[:n] for t in tokens[1:])
        if ex.topk_ids is not None:
            stats.token_level += 1
        else:
            stats.option_only += 1
        examples.append(ex)
    return examples, stats


def _token_level_mismatch(same_vocab: bool, meta: dict, seq: TrainSequence, target_ids: torch.Tensor) -> str | None:
    """Why the teacher's per-token targets cannot be used for this student, or None."""
    if not same_vocab:
        return "different tokenizer"
    if meta.get("prompt_ids_sha256") != sha256_ids(seq.prompt_ids):
        return "prompt tokens differ (another chat template?)"
    if target_ids.tolist() != seq.response_ids[1:]:
        return "response tokens differ"
    return None


# --------------------------------------------------------------------------- batches

def epoch_micro_batches(n_items: int, batch_size: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global micro-batches: item indices in a seeded order, `batch_size * world` each.

    The order depends only on (seed, epoch), so a resumed run sees what an uninterrupted one does.
    The last micro-batch is filled up with -1 (a placeholder item carrying no loss) so that every
    process runs the same number of forward/backward passes.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=g).tolist()
    per = batch_size * world
    n_micro = math.ceil(n_items / per)
    order += [-1] * (n_micro * per - n_items)
    return [order[i * per:(i + 1) * per] for i in range(n_micro)]


def local_slice(micro_batch: list[int], batch_size: int, rank: int) -> list[int]:
    """This process's part of a global micro-batch."""
    return micro_batch[rank * batch_size:(rank + 1) * batch_size]


def collate(examples: list[TrainExample], weights: list[float], pad_id: int,
            reason_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch (left-padded); `weights` is 1 for a real item, 0 for a placeholder.

    An on-policy item (`TrainExample.on_policy`): CE's target at the answer position is the labelled
    letter, not the sampled one in the sequence, and its later tokens carry no CE (weight 0), only
    token-level KD (flagged in `tok_on_policy`, for its own divergence).

    `reason_weight` 0: every response token weighs its item's weight (a plain token average);
    w > 0: the tokens after the answer letter share w per item (each w / their number), in CE and
    in token-level KD alike, and the letter keeps its weight.

    rows/cols: the positions whose logits predict a response token (position p predicts token p+1),
    targets: those tokens; opt_*: the answer position of each item with the student's letter ids
    and the teacher's option log-probs (padded to 26); tok_*: rows of later response tokens that
    have token-level teacher targets.
    """
    batch = left_pad([ex.input_ids for ex in examples], pad_id)
    width = batch["input_ids"].shape[1]
    rows, cols, targets, w = [], [], [], []
    opt_index = []
    opt_ids = torch.zeros((len(examples), MAX_OPTIONS), dtype=torch.long)
    opt_mask = torch.zeros((len(examples), MAX_OPTIONS), dtype=torch.bool)
    opt_teacher = torch.zeros((len(examples), MAX_OPTIONS), dtype=torch.float32)
    tok_index, tok_ids, tok_logp, tok_tail, tok_w, tok_on = [], [], [], [], [], []
    k = next((ex.topk_ids.shape[1] for ex in examples if ex.topk_ids is not None), 1)
    for b, (ex, weight) in enumerate(zip(examples, weights)):
        offset = width - len(ex.input_ids)
        first = offset + len(ex.prompt_ids) - 1  # the last prompt token predicts the letter
        start = len(rows)
        later = weight * reason_weight / (len(ex.response_ids) - 1) if reason_weight and len(ex.response_ids) > 1 \
            else weight  # the weight of each token after the letter
        for j, tok in enumerate(ex.response_ids):
            rows.append(b)
            cols.append(first + j)
            targets.append(ex.ce_letter_id if j == 0 and ex.ce_letter_id is not None else tok)
            w.append(weight if j == 0 else 0.0 if ex.on_policy else later)
        opt_index.append(start)
        m = len(ex.option_ids)
        opt_ids[b, :m] = torch.as_tensor(ex.option_ids)
        opt_mask[b, :m] = True
        opt_teacher[b, :m] = ex.teacher_option_logp
        if ex.topk_ids is not None:
            n = ex.topk_ids.shape[0]
            tok_index.extend(range(start + 1, start + 1 + n))
            tok_ids.append(ex.topk_ids.long())
            tok_logp.append(ex.topk_logp.float())
            tok_tail.append(ex.tail_logp.float())
            tok_w.extend([later] * n)
            tok_on.extend([ex.on_policy] * n)
    batch.update(
        rows=torch.as_tensor(rows, dtype=torch.long), cols=torch.as_tensor(cols, dtype=torch.long),
        targets=torch.as_tensor(targets, dtype=torch.long), weights=torch.as_tensor(w, dtype=torch.float32),
        opt_index=torch.as_tensor(opt_index, dtype=torch.long), opt_ids=opt_ids, opt_mask=opt_mask,
        opt_teacher=opt_teacher, opt_weight=torch.as_tensor(weights, dtype=torch.float32),
        tok_index=torch.as_tensor(tok_index, dtype=torch.long),
        tok_ids=torch.cat(tok_ids) if tok_ids else torch.zeros((0, k), dtype=torch.long),
        tok_logp=torch.cat(tok_logp) if tok_logp else torch.zeros((0, k)),
        tok_tail=torch.cat(tok_tail) if tok_tail else torch.zeros((0,)),
        tok_weight=torch.as_tensor(tok_w, dtype=torch.float32),
        tok_on_policy=torch.as_tensor(tok_on, dtype=torch.bool),
    )
    return batch


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(CE tokens, KD positions) carrying loss in a micro-batch: the window's normalisers add these up."""
    n_ce = float(batch["weights"].sum())
    n_kd = float(batch["opt_weight"].sum() + batch["tok_weight"].sum())
    return n_ce, n_kd

"""Step E through an endpoint: the teacher's targets from a served model, no teacher weights on this machine.

`teacher_logits.run` comes here when `--api_base` is set. Per item, as `atkd.served_logprobs` asks:

- **option level** (every item): one chat request at the answer position, the letters' log-probs read
  from the returned top-k (at most `--top_logprobs_cap`, 20 on hosted APIs and vLLM's default). A
  letter outside the returned top-k is tail: it gets min(k-th value, tail / letters missing), the
  rule `served_logprobs.letter_logprobs_from_top` documents; the summary counts such items;
- **token level** (items with response tokens after the letter, when the teacher's tokenizer is
  given): the log-probs of the rendered prompt + response, from the completions `echo` (vLLM,
  SGLang, llama.cpp) or vLLM's `prompt_logprobs`, aligned to the token ids the student trains on
  (`atkd.sequence.training_sequence` with the teacher's tokenizer). An item whose returned tokens do
  not align, or every item when the server gives no prompt log-probs (hosted chat APIs: say
  `--prompt_logprobs none`), keeps its option-level target; the summary says how many and why.

The teacher's folder (`--model_path`) may hold only its tokenizer files (token-level targets and the
prompt hashes train.py checks need it) or be empty (option level only; the student's prompt is
checked by its words alone).

Resume: every answer is logged the moment it arrives (a part log keyed by item and kind), so a kill
loses only the requests in flight; the server is asked greedily with logprobs, so a rerun writes what
an uninterrupted run would have. The shards and index are built from the log at the end, in the
same format as the local path (`atkd.logits_store`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .api import APIError
from .io import write_bytes
from .logits_store import FORMAT, assemble, pack, shard_name
from .model_source import ModelSource
from .on_policy import item_sequence, practised_letter
from .records import MAX_OPTIONS, Question
from .sequence import TrainSequence, sha256_ids, sha256_text
from .served_logprobs import (asked_top_k, echo_shift, mcq_messages, served_letter_logprobs_each,
                              served_prompt_targets_each)

log = logging.getLogger(__name__)

PROMPT_LOGPROB_MODES = ("echo", "prompt_logprobs", "none")


def letter_record(q: Question, lp) -> dict:
    """One item's option-level answer as the part log keeps it (`lp`: `served_logprobs.LetterLogprobs`)."""
    scores = lp.option_scores(q.letters)
    return {"key": f"L:{q.key}", "logprobs": [scores.logprobs[L] for L in q.letters], "pred": scores.pred_letter,
            "letter_mass": scores.letter_mass, "tied": scores.tied, "absent_letters": len(lp.absent),
            "top_mass": lp.top_mass}


def token_record(q: Question, targets) -> dict:
    """One item's token-level targets (`served_logprobs.TokenTargets`), or why there are none."""
    if targets is None:
        return {"key": f"T:{q.key}", "off": "the server's tokens do not align with the training tokens"}
    return {"key": f"T:{q.key}", "ids": targets.ids, "logprobs": targets.logprobs, "tail": targets.tail_logprobs}


def padded_rows(rec: dict, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(ids [n, k] int32, log-probs [n, k], tail [n]) of a token record, or None when it has no targets.

    A position where fewer than k returned tokens map to one id each (a server keys its top-k by
    text; two ids with the same text are left out) is filled with the lowest ids not among them at
    log-prob -inf: no teacher mass (the loss floors it), and the k ids of a row stay distinct, so the
    student's k + 1 buckets still partition its vocabulary."""
    if "ids" not in rec:
        return None
    ids, logp = [], []
    for row_ids, row_lp in zip(rec["ids"], rec["logprobs"]):
        taken = set(row_ids)
        fill = [i for i in range(k + len(taken)) if i not in taken][: k - len(row_ids)]
        ids.append(list(row_ids) + fill)
        logp.append(list(row_lp) + [-math.inf] * len(fill))
    return (torch.tensor(ids, dtype=torch.int32), torch.tensor(logp, dtype=torch.float32),
            torch.tensor(rec["tail"], dtype=torch.float32))


def item_entry(q: Question, rec: dict, seq: TrainSequence | None, user_text: str) -> dict:
    """The index entry of one item (the local path's keys; prompt hashes only with the teacher's tokenizer)."""
    entry = {"id": q.key, "letters": "".join(q.letters), "answer": q.answer_idx, "pred": rec["pred"],
             "correct": rec["pred"] == q.answer_idx, "letter_mass": rec["letter_mass"], "tied": rec["tied"],
             "user_sha256": sha256_text(user_text),
             "prompt_sha256": sha256_text(seq.prompt_text) if seq else None,
             "prompt_ids_sha256": sha256_ids(seq.prompt_ids) if seq else None}
    if practised_letter(q) is not None:
        entry["on_policy"] = True
    return entry


def shard_tensors(questions: list[Question], letter_recs: list[dict], token_recs: list[dict | None],
                  seqs: list[TrainSequence] | None, lang: str, k: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One shard's tensors and index entries from the logged answers (`questions` order)."""
    from .prompts import mcq_user_text

    option_rows = torch.full((len(questions), MAX_OPTIONS), float("-inf"))
    per_item_tokens: list[tuple | None] = []
    items = []
    for i, (q, rec, tok) in enumerate(zip(questions, letter_recs, token_recs)):
        option_rows[i, : len(q.letters)] = torch.tensor(rec["logprobs"])
        seq = seqs[i] if seqs else None
        rows = padded_rows(tok, k) if tok else None
        per_item_tokens.append(None if rows is None else rows + (torch.as_tensor(seq.response_ids[1:], dtype=torch.int32),))
        items.append(item_entry(q, rec, seq, seq.user_text if seq else mcq_user_text(q, lang)))
    return pack(option_rows, per_item_tokens, items, k)


def token_mode(api, tokenizer, seqs: list[TrainSequence] | None, token_items: list[int], asked: str,
               k: int) -> tuple[str, int, str | None]:
    """(mode, echo shift, why there are no token-level targets or None), asking the server once.

    No tokenizer, no response tokens or `--prompt_logprobs none`: "none". Echo: `echo_shift` is the
    probe (llama-cpp-python's echo is one position late without a BOS). vLLM's prompt_logprobs: the
    first item is asked. A server that refuses or answers without prompt log-probs: "none", with its
    words (a warning)."""
    if asked == "none" or not token_items or seqs is None:
        why = ("--prompt_logprobs none" if asked == "none" else
               "no teacher tokenizer (--model_path)" if seqs is None else None)
        return "none", 0, why
    first = seqs[token_items[0]]
    try:
        if asked == "echo":
            return "echo", echo_shift(api, tokenizer, first.prompt_ids), None
        next(served_prompt_targets_each(api, tokenizer, [(first.prompt_ids + first.response_ids,
                                                          len(first.prompt_ids) + 1)], k, k, mode=asked))
        return asked, 0, None
    except APIError as err:
        log.warning("%s gives no prompt log-probs (%s): items keep option-level targets", api.base_url, err)
        return "none", 0, f"the server gives no prompt log-probs ({asked}): {str(err)[:200]}"


def run_served(cfg, source: ModelSource, questions: list[Question], lang: str, tokenizer, parts) -> dict:
    """Step E at an endpoint: log every answer (a part log from `parts`, `atkd.lifecycle.Parts`), then build the
    store; its summary (`teacher_logits.run` checked the inputs)."""
    from safetensors.torch import save as st_save

    from .console import progress_bar as tqdm
    from .sequence import tokenizer_fingerprint
    from .teacher_logits import plan_shards

    api = source.client()
    k = asked_top_k(cfg.top_k, cfg.top_logprobs_cap)
    seqs = [item_sequence(tokenizer, q, lang, cfg.response_field) for q in questions] if tokenizer else None
    token_items = [i for i, s in enumerate(seqs or []) if len(s.response_ids) > 1]
    mode, shift, why_none = token_mode(api, tokenizer, seqs, token_items, cfg.prompt_logprobs, k)
    log.info("teacher at %s: letters from the top %d log-probs; token-level targets: %s", source.name, k,
             f"{mode} ({len(token_items)} items)" if mode != "none" else f"none ({why_none or 'no response tokens'})")

    output_dir = Path(cfg.output_dir)
    part_log = parts.log(output_dir, extra={"top_logprobs": k, "token_mode": mode, "echo_shift": shift},
                         key_field="key")
    done = part_log.open()
    writer = part_log.writer(0)
    todo = [i for i, q in enumerate(questions) if f"L:{q.key}" not in done]
    todo_tokens = [i for i in token_items if f"T:{questions[i].key}" not in done] if mode != "none" else []
    resumed = len(questions) - len(todo) + (len(token_items) - len(todo_tokens) if mode != "none" else 0)
    if resumed:
        log.info("resuming: %d answers already written by an earlier run", resumed)
    with tqdm(total=len(todo) + len(todo_tokens), desc="teacher logits (served)", unit="req") as bar:
        for j, lp in served_letter_logprobs_each(api, [mcq_messages(questions[i], lang) for i in todo],
                                                 [questions[i].letters for i in todo], k, cfg.top_logprobs_cap):
            writer.write([letter_record(questions[todo[j]], lp)])
            bar.update(1)
        items = [(seqs[i].prompt_ids + seqs[i].response_ids, len(seqs[i].prompt_ids) + 1) for i in todo_tokens]
        for j, targets in served_prompt_targets_each(api, tokenizer, items, k, cfg.top_logprobs_cap, mode=mode,
                                                     shift=shift) if items else ():
            writer.write([token_record(questions[todo_tokens[j]], targets)])
            bar.update(1)

    done = part_log.done()
    shards = plan_shards(len(questions), cfg.shard_size)
    records = []
    for s, ids in enumerate(shards):
        tensors, entries = shard_tensors([questions[i] for i in ids], [done[f"L:{questions[i].key}"] for i in ids],
                                         [done.get(f"T:{questions[i].key}") for i in ids],
                                         [seqs[i] for i in ids] if seqs else None, lang, k)
        write_bytes(part_log.dir / shard_name(s), st_save(tensors, metadata={"format": FORMAT}))
        records.append({"shard": s, "file": shard_name(s), "items": entries})
    token_recs = [done.get(f"T:{questions[i].key}") for i in token_items] if mode != "none" else []
    served = {
        "endpoint": source.api_base, "model": source.api_model, "top_logprobs": k,
        # letters outside the returned top-k: bounded by the k-th value, treated as tail
        "items_with_letters_outside_top_k": sum(1 for i in range(len(questions))
                                                if done[f"L:{questions[i].key}"]["absent_letters"]),
        "mean_top_k_mass": sum(done[f"L:{q.key}"]["top_mass"] for q in questions) / len(questions),
        "token_level_mode": mode,
        "token_level_asked": len(token_items),  # items with response tokens after the letter
        "token_level_kept_option_level": len(token_items) - sum(1 for r in token_recs if r and "ids" in r),
        "token_level_why_none": why_none,
    }
    header = {"teacher_model": source.identity, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)
              if tokenizer else None, "vocab_size": len(tokenizer) if tokenizer else None, "lang": lang, "top_k": k,
              "response_field": cfg.response_field, "served": served}
    index = assemble(output_dir, part_log.dir, records, header)
    summary = index["summary"]
    log.info("teacher accuracy %.3f (%d/%d) on %s; %d token-level items, %d kept option-level; %d items with a "
             "letter outside the top %d", summary["accuracy"], summary["correct"], summary["n"], cfg.dataset_path,
             summary["token_level_items"], served["token_level_kept_option_level"],
             served["items_with_letters_outside_top_k"], k)
    return summary

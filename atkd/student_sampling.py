"""Step D4 (RESPONSES student | mixed), sample_student_responses.py: the student answers its own practice items.

Every training signal of the letter and rationale styles is off-policy: the student imitates text
the teacher wrote. Here the iteration's input student answers the items chosen for on-policy
practice with the rationale prompt (`atkd.prompts.rationale_prompt`: the answer line, then why),
*sampled* at `temperature`, so step E can score the student's own text with the teacher and step F
can train the student towards the teacher's distribution on it (`atkd.on_policy`). The items are
the round's written ones (generated, validated): all of them (`share` 1, RESPONSES student) or a
seeded share (RESPONSES mixed). Replayed items (D2, `source: replay`) are never chosen: they are
there to keep what the student already knows, with the gold letter, and keeping them identical
across the response settings makes the ablation compare the response source alone.

Which items: ranked by SHA-256 of (seed, id), the first round(share x n) (half up), so the choice
depends on nothing but the seed and the ids. Resume: the batches (length-sorted) are planned once;
each batch is sampled with its own seed (seed x 1000003 + batch number), its replies logged to the
part log when it finishes, so a killed run redoes only the batch in flight and ends with the same
replies as an uninterrupted one.

Outputs: train.jsonl (every input item, in input order; chosen ones carry `student_reply`,
`student_letter`, `student_correct` and, when the answer line commits to a letter, `student_reason`)
and summary.json (how many were chosen and practised, the sampled letters right / wrong / unparsed,
overall and per ability, and the sampling's wall time).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import MISSING, dataclass
from pathlib import Path

import torch

from . import paths
from .answering import EXPLAIN, Answerer, prompt_ids, reply_letter
from .batching import length_sorted_batches
from .cli import INPUT, OUTPUT, StageConfig, at_least, between, lang, setting
from .lifecycle import Outputs, Parts, run_stage
from .model_source import STUDENT_FLAGS
from .models import check_model_dir, device_for, load, load_tokenizer, usable_gpu_ids
from .on_policy import STUDENT_CORRECT, STUDENT_LETTER, STUDENT_REASON, STUDENT_REPLY
from .prompts import language_of, reason_of
from .records import REPLAY_PREFIX, Question, ability_name, load_questions
from .workers import run_workers

log = logging.getLogger(__name__)

BATCH_SEED_STRIDE = 1_000_003  # batch b of seed s samples with torch seed s * stride + b


@dataclass(kw_only=True)
class StudentSamplingConfig(StageConfig):
    """sample_student_responses.py: the student's own sampled rationale reply for each practice item."""

    student_model_path: str = STUDENT_FLAGS.setting("model_path", default=MISSING,
                                                    help="the iteration's input student (model folder)")
    input_file: str = setting(role=INPUT, help="training items .jsonl (D's validated items, D2's mix or D3's "
                                               "explained items)")
    output_file: str = setting(role=OUTPUT, help="training items .jsonl with the student's replies on the chosen "
                                                 "ones (summary.json goes beside it)")
    share: float = setting(1.0, check=between(0.0, 1.0),
                           help="share of the written (non-replayed) items the student practises; 1: all")
    seed: int = setting(0, help="which items are chosen, and the sampler's seed per batch")
    temperature: float = setting(1.0, check=at_least(0.0),
                                 help="the student's sampling temperature (1: its own distribution; 0: greedy)")
    max_new_tokens: int = setting(128, check=at_least(1), help="reply length limit, in tokens")
    batch_size: int = setting(16, check=at_least(1),
                              help="prompts per generate call (sampled replies depend on the batch's padding)")
    lang: str = lang()
    gpu_ids: list[int] = STUDENT_FLAGS.setting("gpu_ids")
    dtype: str = STUDENT_FLAGS.setting("dtype")
    trust_remote_code: bool = STUDENT_FLAGS.setting("trust_remote_code")

    def outputs(self) -> list[Path]:
        return [Path(self.output_file), paths.summary_path(self.output_file)]


def chosen_keys(items: list[Question], share: float, seed: int) -> set[str]:
    """The ids of the written items chosen for practice: the first round(share x n), half up, by SHA-256 of
    (seed, id)."""
    written = [q.key for q in items if not is_replayed(q)]
    n = int(share * len(written) + 0.5)
    ranked = sorted(written, key=lambda key: hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).hexdigest())
    return set(ranked[:n])


def is_replayed(q: Question) -> bool:
    """A D2 replay item (one of the round's own questions, gold answer)."""
    return q.extra.get("source") == "replay" or q.key.startswith(REPLAY_PREFIX)


def sampling_worker(rank: int, gpu_id: int | None, tasks: list[tuple[int, list[int]]], writer, payload) -> None:
    """Sample the listed batches (batch number, item indices) with one copy of the student; one part-log write each."""
    from tqdm.auto import tqdm

    from .generation import generate_batch

    cfg, who, questions = payload
    model, tokenizer = load(cfg.student_model_path, device_for(gpu_id), cfg.dtype, cfg.trust_remote_code)
    with tqdm(total=sum(len(b) for _, b in tasks), desc="student samples", unit="q", disable=rank != 0) as bar:
        for number, batch in tasks:
            qs = [questions[i] for i in batch]
            texts = generate_batch(model, tokenizer, [prompt_ids(tokenizer, q, who) for q in qs], cfg.max_new_tokens,
                                   temperature=cfg.temperature, seed=cfg.seed * BATCH_SEED_STRIDE + number)
            writer.write([{"id": q.key, "raw_reply": t} for q, t in zip(qs, texts)])
            bar.update(len(qs))


def practice_record(q: Question, reply: str, who: Answerer) -> dict:
    """The item with the student's reply and what its answer line commits to."""
    letter = reply_letter(reply, q, who)
    rec = q.to_dict()
    rec.update({STUDENT_REPLY: reply, STUDENT_LETTER: letter,
                STUDENT_CORRECT: None if letter is None else letter == q.answer_idx})
    if letter is not None:
        rec[STUDENT_REASON] = reason_of(reply)
    return rec


def build_report(records: list[dict], items: list[Question], cfg: StudentSamplingConfig, seconds: float) -> dict:
    """summary.json: items chosen and practised, the sampled letters right / wrong / unparsed, per ability."""
    by_leaf: dict[str, dict] = {}
    totals = {"chosen": 0, "right": 0, "wrong": 0, "unparsed": 0}
    for q, rec in zip(items, records):
        if STUDENT_REPLY not in rec:
            continue
        kind = "unparsed" if rec[STUDENT_LETTER] is None else "right" if rec[STUDENT_CORRECT] else "wrong"
        row = by_leaf.setdefault(ability_name(q), {"chosen": 0, "right": 0, "wrong": 0, "unparsed": 0})
        for t in (row, totals):
            t["chosen"] += 1
            t[kind] += 1
    for row in [totals, *by_leaf.values()]:
        row["practised"] = row["right"] + row["wrong"]
        row["sampled_accuracy"] = round(row["right"] / row["chosen"], 4) if row["chosen"] else None
    return {"total": len(items), "written": sum(not is_replayed(q) for q in items), **totals,
            "share": cfg.share, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "student": cfg.student_model_path, "seconds": round(seconds, 2), "by_leaf": dict(sorted(by_leaf.items()))}


def run(cfg: StudentSamplingConfig) -> dict | None:
    """Sample the chosen items' replies (or finish an interrupted run); write the items and the report (returned)."""
    return run_stage(cfg, lambda: check_inputs(cfg), sampled)


@dataclass
class SamplingJob:
    cfg: StudentSamplingConfig
    items: list
    chosen: set
    ask: list  # the chosen items, in input order
    who: Answerer
    batches: list[list[int]]


def check_inputs(cfg: StudentSamplingConfig) -> SamplingJob:
    """The items, the student, the items chosen and their batches."""
    items = load_questions(cfg.input_file)
    check_model_dir(cfg.student_model_path)
    tokenizer = load_tokenizer(cfg.student_model_path, cfg.trust_remote_code)
    who = Answerer(model_path=cfg.student_model_path, mode=EXPLAIN, lang=language_of(items, cfg.lang))
    chosen = chosen_keys(items, cfg.share, cfg.seed)
    ask = [q for q in items if q.key in chosen]
    batches = length_sorted_batches([len(prompt_ids(tokenizer, q, who)) for q in ask], cfg.batch_size)
    return SamplingJob(cfg, items, chosen, ask, who, batches)


def sampled(job: SamplingJob, parts: Parts) -> Outputs:
    """The chosen items' sampled replies (the batches in the part log are not sampled again), the report."""
    cfg, ask, who = job.cfg, job.ask, job.who
    start = time.perf_counter()
    part_log = parts.log(cfg.output_file)
    done = part_log.open()
    todo = [(b, batch) for b, batch in enumerate(job.batches) if not all(ask[i].key in done for i in batch)]
    if len(todo) < len(job.batches):
        log.info("resuming: %d of %d batches already sampled", len(job.batches) - len(todo), len(job.batches))
    torch.manual_seed(cfg.seed)
    run_workers(sampling_worker, todo, usable_gpu_ids(cfg.gpu_ids), part_log, (cfg, who, ask))
    done = part_log.done()
    missing = [q.key for q in ask if q.key not in done]
    if missing:  # a worker died without raising: keep the parts so a rerun finishes the job
        raise RuntimeError(f"{len(missing)} items were not sampled (first: {missing[0]}); rerun to finish")
    records = [practice_record(q, done[q.key]["raw_reply"], who) if q.key in job.chosen else q.to_dict()
               for q in job.items]
    report = build_report(records, job.items, cfg, time.perf_counter() - start)
    log.info("on-policy practice: %d of %d written items chosen; sampled letters right %d, wrong %d, unparsed %d "
             "(practised: %d); %.1f s", report["chosen"], report["written"], report["right"], report["wrong"],
             report["unparsed"], report["practised"], report["seconds"])
    return Outputs(report, {Path(cfg.output_file): records, paths.summary_path(cfg.output_file): report})

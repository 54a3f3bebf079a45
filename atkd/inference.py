"""Answering a multiple-choice dataset with a local model: the logic of inference.py (step A).

Two modes (DESIGN §7, §8):
- score: one forward pass per length-sorted, left-padded batch of the MCQ prompt; the answer is
  the most probable option letter at the answer position (`atkd.scoring.score_questions`);
- generate: greedy generation of the chain-of-thought prompt, then a letter extraction. A reply
  that commits to no letter is data: `pred_letter` null, `correct` false, counted as unparsed.

The batches are planned once, over the whole dataset, before any work starts. A batch's numbers
therefore do not depend on how many GPUs ran it or how often the run was interrupted: finished
batches are appended to a part log, a rerun skips them, and the final file equals an
uninterrupted run's byte for byte (DESIGN §6).

Output contract (other stages read it): one reply per input question, in input order; a reply
is the question record plus `pred_letter`, `option_probs` ({letter: probability}, score mode),
`letter_mass` (score mode), `raw_reply` (generate mode), `correct` and `mode`. Fields that do
not apply to the mode are present and null, so every reply has the same keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .batching import length_sorted_batches
from .errors import InputError
from .generation import generate_batch
from .io import PartLog, write_json, write_jsonl
from .letters import extract_letter, letter_token_ids
from .models import (check_model_dir, device_for, load_model, load_tokenizer, parse_gpu_ids, resolve_dtype,
                     set_quiet_env, usable_gpu_ids)
from .paths import summary_path
from .prompts import encode_prompt, language_of, mcq_prompt
from .records import LETTERS, Question, load_questions
from .scoring import score_questions
from .workers import run_workers

log = logging.getLogger(__name__)

MODES = ("score", "generate")
REPLY_FIELDS = ("pred_letter", "option_probs", "letter_mass", "raw_reply", "correct", "mode")


@dataclass
class InferenceConfig:
    """What decides the replies' content (everything here goes into the part log's fingerprint)."""

    model_path: str
    mode: str = "score"
    lang: str = "en"  # resolved language ("en"/"zh"), never "auto" once the run starts
    batch_size: int = 16
    max_new_tokens: int = 256  # generate mode only
    seed: int = 0
    dtype: str = "auto"
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- records

def reply_record(q: Question, mode: str, pred_letter: str | None, option_probs: dict | None = None,
                 letter_mass: float | None = None, raw_reply: str | None = None) -> dict:
    """The question record plus the model's answer; the same keys in both modes."""
    rec = q.to_dict()
    rec.update(pred_letter=pred_letter, option_probs=option_probs, letter_mass=letter_mass, raw_reply=raw_reply,
               correct=pred_letter is not None and pred_letter == q.answer_idx, mode=mode)
    return rec


def summarize(replies: list[dict], mode: str, model_path: str, dataset_path: str, lang: str,
              items_per_s: float | None, seconds: float, n_resumed: int) -> dict:
    """n, correct, accuracy, unparsed (generate mode; null in score mode) and throughput."""
    n = len(replies)
    correct = sum(1 for r in replies if r["correct"])
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "unparsed": sum(1 for r in replies if r["pred_letter"] is None) if mode == "generate" else None,
        "items_per_s": items_per_s,  # items answered in this run / `seconds`
        "seconds": seconds,  # wall time of the answering phase, model loading included
        "resumed": n_resumed,  # items taken from an interrupted earlier run
        "mode": mode,
        "model_path": model_path,
        "dataset_path": dataset_path,
        "lang": lang,
    }


# --------------------------------------------------------------------------- the answering path

def prompt_ids(tokenizer, questions: list[Question], lang: str, mode: str) -> list[list[int]]:
    """Token ids of each question's prompt: the letter prompt (score) or the chain-of-thought one."""
    cot = mode == "generate"
    return [encode_prompt(tokenizer, mcq_prompt(tokenizer, q, lang, cot=cot)) for q in questions]


def plan_batches(tokenizer, questions: list[Question], lang: str, mode: str, batch_size: int) -> list[list[int]]:
    """Length-sorted batches of question indices, fixed for the whole run (and any rerun)."""
    return length_sorted_batches([len(s) for s in prompt_ids(tokenizer, questions, lang, mode)], batch_size)


def score_replies(model, tokenizer, questions: list[Question], lang: str, batch_size: int,
                  write: Callable[[list[dict]], None], progress=None) -> None:
    """Score mode: replies with the option probabilities, `write` called once per batch."""
    def on_batch(pairs):
        write([reply_record(q, "score", s.pred_letter, s.probs(), s.letter_mass) for q, s in pairs])

    score_questions(model, tokenizer, questions, lang, batch_size, on_batch, progress)


def generate_replies(model, tokenizer, questions: list[Question], lang: str, batch_size: int, max_new_tokens: int,
                     seed: int, write: Callable[[list[dict]], None], progress=None) -> None:
    """Generate mode: greedy chain-of-thought replies and the letter they commit to, once per batch."""
    ids = prompt_ids(tokenizer, questions, lang, "generate")
    for batch in length_sorted_batches([len(s) for s in ids], batch_size):
        texts = generate_batch(model, tokenizer, [ids[i] for i in batch], max_new_tokens, seed=seed)
        qs = [questions[i] for i in batch]
        write([reply_record(q, "generate", extract_letter(t, q.letters, q.options), raw_reply=t)
               for q, t in zip(qs, texts)])
        if progress is not None:
            progress.update(len(batch))


def answer_batches(model, tokenizer, questions: list[Question], batches: list[list[int]], cfg: InferenceConfig,
                   write: Callable[[list[dict]], None], progress=None) -> None:
    """Answer each planned batch exactly as planned (one forward or one generate call per batch)."""
    for batch in batches:
        qs = [questions[i] for i in batch]
        if cfg.mode == "score":
            score_replies(model, tokenizer, qs, cfg.lang, len(qs), write, progress)
        else:
            generate_replies(model, tokenizer, qs, cfg.lang, len(qs), cfg.max_new_tokens, cfg.seed, write, progress)


def inference_worker(rank: int, gpu_id: int | None, batches: list[list[int]], writer, payload) -> None:
    """One worker (one GPU, or the CPU): load the model, answer its batches, append them to its part file."""
    from tqdm.auto import tqdm

    cfg, questions = payload
    set_quiet_env()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code)
    model = load_model(cfg.model_path, device_for(gpu_id), cfg.dtype, cfg.trust_remote_code)
    total = sum(len(b) for b in batches)
    with tqdm(total=total, desc=f"inference ({cfg.mode})", unit="q", disable=rank != 0) as bar:
        answer_batches(model, tokenizer, questions, batches, cfg, writer.write, bar)


# --------------------------------------------------------------------------- the stage

def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_signature(path: Path) -> list:
    """Name, size and mtime of each file in the model folder: changes when the weights are rewritten
    (hashing gigabytes of weights on every start would cost more than it saves)."""
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())


def fingerprint(cfg: InferenceConfig, dataset_path: Path, device_type: str, dtype: torch.dtype) -> dict:
    """Everything that changes the replies' bytes; parts made under another fingerprint are discarded."""
    model_dir = Path(cfg.model_path).resolve()
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model_path"}  # spelling: model_dir
    return {"stage": "inference", "config": config, "model_dir": str(model_dir),
            "model_files": model_signature(model_dir), "dataset_sha256": file_digest(dataset_path),
            "device_type": device_type, "dtype": str(dtype)}


def check_settings(cfg: InferenceConfig, dataset_path: Path, output_path: Path) -> None:
    if cfg.mode not in MODES:
        raise InputError(None, f"--mode must be one of {', '.join(MODES)} (got {cfg.mode!r})")
    if cfg.batch_size < 1:
        raise InputError(None, f"--batch_size must be at least 1 (got {cfg.batch_size})")
    if cfg.mode == "generate" and cfg.max_new_tokens < 1:
        raise InputError(None, f"--max_new_tokens must be at least 1 (got {cfg.max_new_tokens})")
    if output_path.is_dir():
        raise InputError(output_path, "output path is a folder; give a .jsonl file name")
    if output_path.resolve() == dataset_path.resolve():
        raise InputError(output_path, "output path is the dataset itself; it would be overwritten")


def run_inference(dataset_path: str | Path, output_path: str | Path, cfg: InferenceConfig,
                  gpu_ids: str = "", lang: str = "auto") -> dict:
    """Answer every question of `dataset_path`, write the replies and the summary; return the summary.

    All inputs are validated before anything is written, so bad input (an `InputError`) leaves
    neither an output file nor a parts folder behind.
    """
    dataset_path, output_path = Path(dataset_path), Path(output_path)
    check_settings(cfg, dataset_path, output_path)
    questions = load_questions(dataset_path)
    check_model_dir(cfg.model_path)
    gpus = usable_gpu_ids(parse_gpu_ids(gpu_ids))
    device = device_for(gpus[0] if gpus else None)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code)
    cfg = dataclasses.replace(cfg, lang=language_of(questions, lang))
    if cfg.mode == "score":  # every letter used must be one token at the answer position
        letter_token_ids(tokenizer, list(LETTERS[: max(len(q.options) for q in questions)]), cfg.lang,
                         source=cfg.model_path)
    batches = plan_batches(tokenizer, questions, cfg.lang, cfg.mode, cfg.batch_size)

    part_log = PartLog(output_path, fingerprint(cfg, dataset_path, device.type, dtype))
    done = part_log.open()
    todo = [b for b in batches if not all(questions[i].key in done for i in b)]
    n_resumed = len(questions) - sum(len(b) for b in todo)
    if n_resumed:
        log.info("resuming: %d of %d questions already answered in %s", n_resumed, len(questions), part_log.dir)
    where = f"GPUs {gpus}" if gpus else "CPU"
    log.info("%s mode, %d questions in %d batches of up to %d, language %s, on %s (%s)", cfg.mode, len(questions),
             len(batches), cfg.batch_size, cfg.lang, where, str(dtype).replace("torch.", ""))

    start = time.perf_counter()
    run_workers(inference_worker, todo, gpus, part_log, (cfg, questions))
    seconds = time.perf_counter() - start

    done = part_log.done()
    missing = [q.key for q in questions if q.key not in done]
    if missing:  # a worker died without raising: keep the parts so a rerun finishes the job
        raise RuntimeError(f"{len(missing)} questions were not answered (first: {missing[0]}); rerun to finish")
    replies = [done[q.key] for q in questions]
    computed = len(questions) - n_resumed
    summary = summarize(replies, cfg.mode, cfg.model_path, str(dataset_path), cfg.lang,
                        computed / seconds if computed and seconds > 0 else None, seconds, n_resumed)
    write_jsonl(output_path, replies)
    write_json(summary_path(output_path), summary)
    part_log.remove()
    unparsed = f", {summary['unparsed']} unparsed" if summary["unparsed"] is not None else ""
    log.info("accuracy %.4f (%d/%d)%s; wrote %s", summary["accuracy"], summary["correct"], summary["n"], unparsed,
             output_path)
    return summary

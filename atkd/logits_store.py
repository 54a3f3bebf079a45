"""The teacher-logits store (DESIGN §9): a few safetensors shards plus one JSON index.

Layout of the output folder (step E):

    index.json                   format, teacher, tokenizer fingerprint, lang, top_k, response
                                 field, shard list, teacher accuracy, and per item id: shard,
                                 row, letters, answer, the teacher's pick, prompt hashes,
                                 token rows (tok_start, tok_len)
    summary.json                 the teacher's accuracy on the data (n, correct, accuracy)
    shard-00000.safetensors      per shard (about --shard_size items):
        option_logprobs [items, 26] fp32  teacher log-probs over the item's options (-inf pads)
        target_ids      [rows] int32      the response token each token-level row predicts
        topk_ids        [rows, k] int32   the teacher's top-k token ids at that position
        topk_logprobs   [rows, k] fp32    their log-probs (full vocabulary, T = 1)
        tail_logprob    [rows] fp32       log(1 - sum of the top-k probs), computed as a logsumexp

Items are never one file each and nothing is pickled: shards are read with safetensors only.
Token-level rows exist only when a response field is set (the response has tokens after the
letter); they cover the response tokens after the letter (the letter itself gets option-level KD).

Resume (DESIGN §6): each finished shard is written atomically into `<output_dir>.parts/` and
recorded in a part log; a rerun with the same inputs skips those shards. When every shard is
done they are moved into the output folder and index.json is written last, so a folder with an
index.json is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .batching import length_sorted_batches, left_pad
from .errors import InputError
from .io import PartLog, read_json, write_bytes, write_json, write_text
from .kd_loss import HeadAtPositions
from .paths import LOGITS_INDEX, logits_index, logits_summary
from .records import MAX_OPTIONS, Question, question_from_dict
from .scoring import scores_from_logits
from .train_data import sha256_ids, sha256_text, tokenizer_fingerprint, training_sequence

log = logging.getLogger(__name__)

FORMAT = "atkd-teacher-logits/1"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# --------------------------------------------------------------------------- reading

class LogitsStore:
    """A finished store: the index in memory, shards loaded (safetensors) on first use."""

    def __init__(self, store_dir: Path, index: dict):
        self.dir = store_dir
        self.index = index
        self.items: dict[str, dict] = index["items"]
        self._shards: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, store_dir: str | Path) -> "LogitsStore":
        store_dir = Path(store_dir)
        if not store_dir.is_dir():
            raise InputError(store_dir, "teacher logits folder not found")
        path = logits_index(store_dir)
        if not path.is_file():
            raise InputError(store_dir, f"no {LOGITS_INDEX}: not a teacher-logits folder, or generate_logits.py "
                                        "did not finish (run it again to complete it)")
        index = read_json(path)
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise InputError(path, f"not a teacher-logits index (expected format {FORMAT!r})")
        for shard in index["shards"]:
            if not (store_dir / shard).is_file():
                raise InputError(store_dir / shard, "shard listed in the index is missing")
        return cls(store_dir, index)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.index["tokenizer_fingerprint"]

    @property
    def response_field(self) -> str | None:
        return self.index.get("response_field")

    @property
    def lang(self) -> str:
        return self.index["lang"]

    def shard(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._shards:
            from safetensors.torch import load_file

            self._shards[name] = load_file(str(self.dir / name))
        return self._shards[name]

    def option_logprobs(self, key: str) -> torch.Tensor:
        """The teacher's log-probs over the item's options, in letter order (fp32)."""
        meta = self.items[key]
        return self.shard(meta["shard"])["option_logprobs"][meta["row"], : len(meta["letters"])].clone()

    def token_level(self, key: str):
        """(target_ids, topk_ids, topk_logprobs, tail_logprob) of the item's later response tokens, or None."""
        meta = self.items[key]
        if not meta.get("tok_len"):
            return None
        s = self.shard(meta["shard"])
        a, b = meta["tok_start"], meta["tok_start"] + meta["tok_len"]
        return (s["target_ids"][a:b].long(), s["topk_ids"][a:b].long(), s["topk_logprobs"][a:b].clone(),
                s["tail_logprob"][a:b].clone())


# --------------------------------------------------------------------------- computing

@dataclass
class LogitsJob:
    """Everything a worker needs (sent to spawned GPU workers, so plain data only)."""

    model_path: str
    lang: str
    top_k: int
    batch_size: int
    response_field: str | None
    dtype: str
    trust_remote_code: bool
    parts_dir: str
    questions: list[dict]
    shards: list[list[int]]  # item indices of each shard


def plan_shards(n_items: int, shard_size: int) -> list[list[int]]:
    """Contiguous shards of at most `shard_size` items (independent of the number of GPUs)."""
    return [list(range(i, min(i + shard_size, n_items))) for i in range(0, n_items, shard_size)]


@torch.no_grad()
def teacher_outputs(head: HeadAtPositions, tokenizer, questions: list[Question], lang: str, top_k: int,
                    batch_size: int, response_field: str | None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One shard's tensors and per-item index entries (in `questions` order)."""
    seqs = [training_sequence(tokenizer, q, lang, response_field) for q in questions]
    option_rows = torch.full((len(questions), MAX_OPTIONS), float("-inf"))
    per_item_tokens: list[tuple | None] = [None] * len(questions)
    items: list[dict] = [{} for _ in questions]
    device = head.model.get_input_embeddings().weight.device
    for batch in length_sorted_batches([len(s.input_ids) for s in seqs], batch_size):
        inputs = left_pad([seqs[i].input_ids for i in batch], tokenizer.pad_token_id)
        width = inputs["input_ids"].shape[1]
        rows, cols, spans = [], [], []
        for b, i in enumerate(batch):
            s = seqs[i]
            first = width - len(s.input_ids) + len(s.prompt_ids) - 1
            spans.append((len(rows), len(s.response_ids)))
            for j in range(len(s.response_ids)):
                rows.append(b)
                cols.append(first + j)
        logits = head(**{k: v.to(device) for k, v in inputs.items()},
                      rows=torch.as_tensor(rows, device=device), cols=torch.as_tensor(cols, device=device)).float()
        letter_rows = logits[[start for start, _ in spans]]
        scores = scores_from_logits(letter_rows, [seqs[i].option_ids for i in batch],
                                    [questions[i].letters for i in batch])
        for (start, n), i, sc in zip(spans, batch, scores):
            q = questions[i]
            option_rows[i, : len(q.letters)] = torch.tensor([sc.logprobs[L] for L in q.letters])
            items[i] = {"letters": "".join(q.letters), "answer": q.answer_idx, "pred": sc.pred_letter,
                        "correct": sc.pred_letter == q.answer_idx, "letter_mass": sc.letter_mass,
                        "user_sha256": sha256_text(seqs[i].user_text),
                        "prompt_sha256": sha256_text(seqs[i].prompt_text),
                        "prompt_ids_sha256": sha256_ids(seqs[i].prompt_ids)}
            if n > 1:
                per_item_tokens[i] = _topk_tail(logits[start + 1:start + n], top_k) + (
                    torch.as_tensor(seqs[i].response_ids[1:], dtype=torch.int32),)
    return _pack(option_rows, per_item_tokens, items, top_k)


def _topk_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    full = torch.log_softmax(logits, dim=-1)
    top_logp, top_ids = full.topk(k, dim=-1)
    tail = torch.logsumexp(full.scatter(-1, top_ids, float("-inf")), dim=-1)
    return top_ids.to(torch.int32).cpu(), top_logp.cpu(), tail.cpu()


def _pack(option_rows, per_item_tokens, items, top_k) -> tuple[dict[str, torch.Tensor], list[dict]]:
    ids, logp, tail, targets = [], [], [], []
    start = 0
    for row, (entry, tokens) in enumerate(zip(items, per_item_tokens)):
        entry["row"] = row
        entry["tok_start"], entry["tok_len"] = start, 0
        if tokens is not None:
            ids.append(tokens[0])
            logp.append(tokens[1])
            tail.append(tokens[2])
            targets.append(tokens[3])
            entry["tok_len"] = int(tokens[0].shape[0])
            start += entry["tok_len"]
    tensors = {
        "option_logprobs": option_rows.contiguous(),
        "topk_ids": torch.cat(ids) if ids else torch.zeros((0, top_k), dtype=torch.int32),
        "topk_logprobs": torch.cat(logp) if logp else torch.zeros((0, top_k)),
        "tail_logprob": torch.cat(tail) if tail else torch.zeros((0,)),
        "target_ids": torch.cat(targets) if targets else torch.zeros((0,), dtype=torch.int32),
    }
    return {k: v.contiguous() for k, v in tensors.items()}, items


def _logits_worker(rank: int, gpu_id: int | None, shard_ids: list[int], writer, job: LogitsJob) -> None:
    """Compute and write the listed shards with one copy of the teacher (one GPU or the CPU)."""
    from safetensors.torch import save as st_save
    from tqdm.auto import tqdm

    from .models import device_for, load_model, load_tokenizer, set_quiet_env

    set_quiet_env()
    tok = load_tokenizer(job.model_path, job.trust_remote_code)
    model = load_model(job.model_path, device_for(gpu_id), job.dtype, job.trust_remote_code)
    head = HeadAtPositions(model, len(tok))
    n_items = sum(len(job.shards[s]) for s in shard_ids)
    with tqdm(total=n_items, desc="teacher logits", unit="q", disable=rank != 0) as bar:
        for s in shard_ids:
            questions = [question_from_dict(job.questions[i]) for i in job.shards[s]]
            tensors, items = teacher_outputs(head, tok, questions, job.lang, job.top_k, job.batch_size,
                                             job.response_field)
            for q, entry in zip(questions, items):
                entry["id"] = q.key
            write_bytes(Path(job.parts_dir) / shard_name(s), st_save(tensors, metadata={"format": FORMAT}))
            writer.write([{"shard": s, "file": shard_name(s), "items": items}])
            bar.update(len(questions))


def questions_sha256(questions: list[Question]) -> str:
    text = json.dumps([q.to_dict() for q in questions], ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class StorePlan:
    """A store to compute: its shards, the part log that remembers finished ones, and the job."""

    output_dir: Path
    fingerprint: dict
    part_log: PartLog
    job: LogitsJob
    tokenizer: object
    job_args: dict

    def done_shards(self) -> dict[int, dict]:
        """Shards whose file and part-log record both exist (a kill between the two redoes the shard)."""
        return {int(k): v for k, v in self.part_log.done().items() if (self.part_log.dir / v["file"]).is_file()}

    def todo(self) -> list[int]:
        done = self.done_shards()
        return [s for s in range(len(self.job.shards)) if s not in done]


def plan_store(questions: list[Question], tokenizer, output_dir: str | Path, job_args: dict,
               shard_size: int) -> StorePlan | None:
    """The plan for `output_dir`, or None when it already holds a complete store for these inputs.

    `job_args`: model_path, lang, top_k, batch_size, response_field, dtype, trust_remote_code.
    Partial work made with other inputs or arguments is discarded (see `atkd.io.PartLog`).
    """
    output_dir = Path(output_dir)
    fingerprint = dict(job_args, format=FORMAT, shard_size=shard_size, questions=questions_sha256(questions),
                       tokenizer=tokenizer_fingerprint(tokenizer))
    fingerprint.pop("batch_size", None)  # batching does not change what is stored
    done_index = logits_index(output_dir)
    if done_index.is_file():
        try:
            old = json.loads(done_index.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("fingerprint") == fingerprint:
            return None
    part_log = PartLog(output_dir, fingerprint, key_field="shard")
    part_log.open()
    job = LogitsJob(parts_dir=str(part_log.dir), questions=[q.to_dict() for q in questions],
                    shards=plan_shards(len(questions), shard_size), **job_args)
    return StorePlan(output_dir, fingerprint, part_log, job, tokenizer, job_args)


def compute_shards(plan: StorePlan, shard_ids: list[int], gpu_ids: list[int]) -> None:
    """Compute the listed shards (one worker per GPU, or in this process on the CPU)."""
    from .workers import run_workers

    run_workers(_logits_worker, shard_ids, gpu_ids, plan.part_log, plan.job)


def finish_store(plan: StorePlan) -> dict:
    """Assemble the finished shards into the output folder; returns the summary."""
    done = plan.done_shards()
    missing = [s for s in range(len(plan.job.shards)) if s not in done]
    if missing:
        raise RuntimeError(f"shards {missing} were not written; run the same command again")
    index = assemble(plan.output_dir, plan.part_log.dir, [done[s] for s in range(len(plan.job.shards))],
                     plan.fingerprint, plan.tokenizer, plan.job_args)
    plan.part_log.remove()
    return index["summary"]


def generate_store(questions: list[Question], tokenizer, output_dir: str | Path, gpu_ids: list[int], job_args: dict,
                   shard_size: int) -> dict:
    """Compute (or finish) the store for `questions`; returns the summary (teacher accuracy).

    Inputs must already be validated (see `validate_inputs`).
    """
    plan = plan_store(questions, tokenizer, output_dir, job_args, shard_size)
    if plan is None:
        log.info("%s is complete for these inputs: nothing to do", output_dir)
        return read_json(logits_summary(output_dir))
    todo = plan.todo()
    if len(todo) < len(plan.job.shards):
        log.info("resuming: %d of %d shards already done", len(plan.job.shards) - len(todo), len(plan.job.shards))
    compute_shards(plan, todo, gpu_ids)
    return finish_store(plan)


def assemble(output_dir: Path, parts_dir: Path, records: list[dict], fingerprint: dict, tokenizer,
             job_args: dict) -> dict:
    """Move the shards into place and write index.json (last) and summary.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    index_file = logits_index(output_dir)
    if index_file.exists():
        index_file.unlink()  # the folder is incomplete until the new index lands
    names = [r["file"] for r in records]
    for stale in output_dir.glob("shard-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    items: dict[str, dict] = {}
    for r in records:
        os.replace(parts_dir / r["file"], output_dir / r["file"])
        for entry in r["items"]:
            entry = dict(entry)
            key = entry.pop("id")
            entry["shard"] = r["file"]
            items[key] = entry
    n = len(items)
    correct = sum(1 for e in items.values() if e["correct"])
    summary = {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
               "mean_letter_mass": sum(e["letter_mass"] for e in items.values()) / n if n else 0.0,
               "token_level_items": sum(1 for e in items.values() if e["tok_len"]),
               "shards": len(names)}
    index = {"format": FORMAT, "teacher_model": job_args["model_path"],
             "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
             "lang": job_args["lang"], "top_k": job_args["top_k"], "response_field": job_args["response_field"],
             "shards": names, "summary": summary, "fingerprint": fingerprint, "items": items}
    write_json(logits_summary(output_dir), summary)
    # index.json last: its presence marks the store complete.
    _write_index(index_file, index)
    return index


def _write_index(path: Path, index: dict) -> None:
    """Pretty header, then one line per item (a 10k-item index stays a few MB and diffable)."""
    head = json.dumps({k: v for k, v in index.items() if k != "items"}, ensure_ascii=False, indent=1)
    body = ",\n".join(f"  {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                      for k, v in index["items"].items())
    write_text(path, head[:-2] + ',\n "items": {\n' + body + "\n }\n}\n")


def validate_inputs(questions: list[Question], tokenizer, lang: str, top_k: int, response_field: str | None,
                    source: str) -> None:
    """Everything that can be wrong with the inputs, checked before any work (InputError)."""
    vocab = len(tokenizer)
    if not 1 <= top_k < vocab:
        raise InputError(None, f"--top_k must be between 1 and the vocabulary size - 1 ({vocab - 1}), got {top_k}")
    for q in questions:
        training_sequence(tokenizer, q, lang, response_field, source)  # letters are single tokens, field is text
    if response_field and not any(q.extra.get(response_field) for q in questions):
        log.warning('no item has a non-empty "%s" field: only option-level logits will be stored', response_field)

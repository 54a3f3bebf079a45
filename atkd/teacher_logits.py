"""Step E, generate_logits.py: the teacher's answer distributions on the validated data.

Per item: the teacher's log-probabilities over the option letters at the answer position
(tokenizer independent, so the student may come from another family) and, with a response
field, the top-k log-probabilities and the leftover tail mass at every later response token
(token-level KD when the student shares the teacher's vocabulary). An item the student practised
on-policy (step D4, `atkd.on_policy`) is scored on the student's own response: its sampled letter
and reason, every token of it, whatever the response field. The sequences are
`atkd.sequence.training_sequence`, exactly what train.py feeds the student; the store's format
is `atkd.logits_store`.

Resume: shards are planned over the whole dataset (independent of the number of GPUs); each
finished shard is written atomically into `<output_dir>.parts/` and recorded in a part log, so a
rerun skips it. When every shard is done they move into the output folder and index.json is
written last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from .batching import left_pad, length_sorted_batches
from .cli import INPUT, OUTPUT, StageConfig, at_least, lang, setting
from .errors import InputError
from .model_source import TREE_FLAGS, EndpointSettings
from .head import HeadAtPositions
from .io import write_bytes
from .lifecycle import Outputs, Parts, run_stage
from .logits_store import FORMAT, assemble, pack, shard_name
from .paths import done_record, logits_index, logits_summary
from .records import MAX_OPTIONS, Question, load_questions, question_from_dict
from .scoring import scores_from_logits, with_exact_letters
from .on_policy import item_sequence, practised_letter
from .sequence import sha256_ids, sha256_text, tokenizer_fingerprint
from .served_logprobs import DEFAULT_TOP_LOGPROBS
from .served_teacher import PROMPT_LOGPROB_MODES

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LogitsConfig(EndpointSettings, StageConfig):
    """generate_logits.py: store the teacher's logits for distillation."""

    # 2: letter logits in float32, ties recorded, head verified; responses end with the end-of-turn token
    version: ClassVar[int] = 2
    model_path: str = TREE_FLAGS.setting("model_path", help="the teacher: a local Hugging Face model folder; with "
                                                            "--api_base, a folder holding only its tokenizer "
                                                            "(token-level targets) or empty (option level only)")
    dataset_path: str = setting(role=INPUT, help="questions .jsonl (the data the student trains on)")
    output_dir: str = setting(role=OUTPUT, help="folder for index.json, summary.json and the shards")
    top_k: int = setting(20, check=at_least(1), help="token-level KD: teacher log-probs kept per response token")
    batch_size: int = setting(8, check=at_least(1), affects_output=False, help="items per teacher forward pass")
    lang: str = lang()
    response_field: str | None = setting(None, help="record field holding a longer response (e.g. an explanation) "
                                                    "for token-level KD; unset: option-level only")
    shard_size: int = setting(500, check=at_least(1), help="items per safetensors shard (the unit of resume)")
    # a served teacher (--api_base, atkd.served_teacher): what it is asked
    top_logprobs_cap: int = setting(DEFAULT_TOP_LOGPROBS, check=at_least(1),
                                    help="endpoint: the most log-probs asked per position (hosted APIs and vLLM's "
                                         "default allow 20); --top_k above it is lowered to it")
    prompt_logprobs: str = setting("echo", choices=PROMPT_LOGPROB_MODES,
                                   help="endpoint, token-level targets: echo = completions echo + logprobs (vLLM, "
                                        "SGLang, llama.cpp); prompt_logprobs = vLLM's extension; none = option level "
                                        "only (hosted chat APIs). A server that gives none: option level, counted")
    gpu_ids: list[int] = TREE_FLAGS.setting("gpu_ids")
    model_placement: str = TREE_FLAGS.setting("model_placement")
    dtype: str = TREE_FLAGS.setting("dtype")
    trust_remote_code: bool = TREE_FLAGS.setting("trust_remote_code")

    def unused_settings(self) -> tuple[str, ...]:
        return () if self.api_base else ("top_logprobs_cap", "prompt_logprobs")

    def outputs(self) -> list[Path]:
        return [logits_index(self.output_dir), logits_summary(self.output_dir)]

    def record_path(self) -> Path:
        return done_record(self.output_dir, type(self).__name__)


def plan_shards(n_items: int, shard_size: int) -> list[list[int]]:
    """Contiguous shards of at most `shard_size` items (independent of the number of GPUs)."""
    return [list(range(i, min(i + shard_size, n_items))) for i in range(0, n_items, shard_size)]


@torch.no_grad()
def teacher_outputs(head: HeadAtPositions, tokenizer, questions: list[Question], lang: str, top_k: int,
                    batch_size: int, response_field: str | None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One shard's tensors and per-item index entries (in `questions` order)."""
    seqs = [item_sequence(tokenizer, q, lang, response_field) for q in questions]
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
        hidden = head.hidden_at(**{k: v.to(device) for k, v in inputs.items()},
                                rows=torch.as_tensor(rows, device=device), cols=torch.as_tensor(cols, device=device))
        logits = head.logits(hidden).float()
        option_ids = [seqs[i].option_ids for i in batch]
        letter_rows = with_exact_letters(head, hidden[[start for start, _ in spans]], option_ids)
        scores = scores_from_logits(letter_rows, option_ids, [questions[i].letters for i in batch])
        for (start, n), i, sc in zip(spans, batch, scores):
            q = questions[i]
            option_rows[i, : len(q.letters)] = torch.tensor([sc.logprobs[L] for L in q.letters])
            items[i] = {"letters": "".join(q.letters), "answer": q.answer_idx, "pred": sc.pred_letter,
                        "correct": sc.pred_letter == q.answer_idx, "letter_mass": sc.letter_mass, "tied": sc.tied,
                        "user_sha256": sha256_text(seqs[i].user_text),
                        "prompt_sha256": sha256_text(seqs[i].prompt_text),
                        "prompt_ids_sha256": sha256_ids(seqs[i].prompt_ids)}
            if practised_letter(q) is not None:  # the response is the student's own (atkd.on_policy)
                items[i]["on_policy"] = True
            if n > 1:
                per_item_tokens[i] = topk_and_tail(logits[start + 1:start + n], top_k) + (
                    torch.as_tensor(seqs[i].response_ids[1:], dtype=torch.int32),)
    return pack(option_rows, per_item_tokens, items, top_k)


def topk_and_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k ids, their log-probs, log of the mass outside them) per row, at temperature 1."""
    full = torch.log_softmax(logits, dim=-1)
    top_logp, top_ids = full.topk(k, dim=-1)
    tail = torch.logsumexp(full.scatter(-1, top_ids, float("-inf")), dim=-1)
    return top_ids.to(torch.int32).cpu(), top_logp.cpu(), tail.cpu()


@dataclass
class LogitsJob:
    """What a worker needs (sent to spawned GPU workers, so plain data only)."""

    cfg: LogitsConfig  # with the language resolved
    parts_dir: str
    questions: list[dict]
    shards: list[list[int]]  # item indices of each shard
    spread: list[int]  # GPUs one copy of the teacher is spread over (then a single worker); [] = a copy per worker


def logits_worker(rank: int, gpu_id: int | None, shard_ids: list[int], writer, job: LogitsJob) -> None:
    """Compute and write the listed shards with one copy of the teacher (one GPU or the CPU)."""
    from safetensors.torch import save as st_save
    from .console import progress_bar as tqdm

    from .models import device_for, load

    cfg = job.cfg
    model, tok = load(cfg.model_path, device_for(gpu_id), cfg.dtype, cfg.trust_remote_code, spread_over=job.spread)
    head = HeadAtPositions(model, len(tok))
    n_items = sum(len(job.shards[s]) for s in shard_ids)
    with tqdm(total=n_items, desc="teacher logits", unit="q", disable=rank != 0) as bar:
        for s in shard_ids:
            questions = [question_from_dict(job.questions[i]) for i in job.shards[s]]
            tensors, items = teacher_outputs(head, tok, questions, cfg.lang, cfg.top_k, cfg.batch_size,
                                             cfg.response_field)
            for q, entry in zip(questions, items):
                entry["id"] = q.key
            write_bytes(Path(job.parts_dir) / shard_name(s), st_save(tensors, metadata={"format": FORMAT}))
            writer.write([{"shard": s, "file": shard_name(s), "items": items}])
            bar.update(len(questions))


def validate_inputs(questions: list[Question], tokenizer, lang: str, top_k: int, response_field: str | None,
                    source: str) -> None:
    """Everything that can be wrong with the inputs, checked before any work (InputError)."""
    vocab = len(tokenizer)
    if not 1 <= top_k < vocab:
        raise InputError(None, f"--top_k must be between 1 and the vocabulary size - 1 ({vocab - 1}) (got {top_k})")
    for q in questions:
        item_sequence(tokenizer, q, lang, response_field, source)  # letters are single tokens, fields are text
    if response_field and not any(q.extra.get(response_field) for q in questions):
        log.warning('no item has a non-empty "%s" field: only option-level logits will be stored', response_field)


def served_gives_letters(source, probe: Question, lang: str, cfg: LogitsConfig) -> bool:
    """Whether the served teacher returns the letters' log-probs (one request on `probe`). A server that
    gives none (`transformers serve`) leaves the work to the local teacher when --model_path holds its
    weights (a warning), else the stage fails saying so."""
    from .answering import Answerer, letter_logprobs_refused
    from .errors import StageFailed
    from .models import has_model

    source.check()
    refused = letter_logprobs_refused(Answerer.of(source, mode="score", lang=lang), probe, cfg.top_k,
                                      cfg.top_logprobs_cap)
    if refused is None:
        return True
    if not has_model(cfg.model_path):
        raise StageFailed(f"{refused}; step E needs the teacher's log-probs: serve it with an engine that returns "
                          "them (vLLM, SGLang, llama.cpp), or give its weights in --model_path") from None
    log.warning("%s gives no log-probs (%s): the teacher's weights in %s give them instead", source.name, refused,
                cfg.model_path)
    return False


def run(cfg: LogitsConfig) -> dict | None:
    """Compute (or finish) the store; returns its summary (the teacher's accuracy), None when done before."""
    return run_stage(cfg, lambda: check_inputs(cfg), stored_logits)


@dataclass
class LogitsRun:
    """Step E's inputs, checked: where the teacher is, the items, their language and the tokenizer."""

    cfg: LogitsConfig  # with the language resolved
    questions: list[Question]
    source: object  # atkd.model_source.ModelSource; served: scored at its endpoint
    served: bool
    tokenizer: object  # None for a served teacher without a tokenizer folder (option level only)
    workers: list[int]
    spread: list[int]


def check_inputs(cfg: LogitsConfig) -> LogitsRun:
    """The items and the teacher: served (it gives the letters' log-probs) or local weights; the items fit the
    tokenizer."""
    from .models import load_tokenizer, placement_plan, usable_gpu_ids
    from .prompts import language_of

    questions = load_questions(cfg.dataset_path)
    cfg = replace(cfg, lang=language_of(questions, cfg.lang))
    source = TREE_FLAGS.of(cfg)
    if source.is_served and served_gives_letters(source, questions[0], cfg.lang, cfg):
        tokenizer = None
        if cfg.model_path:
            tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code, weights=False)
            validate_inputs(questions, tokenizer, cfg.lang, cfg.top_k, cfg.response_field, cfg.dataset_path)
        elif cfg.response_field:
            log.warning("no teacher tokenizer (--model_path): option-level targets only, --response_field unused")
        return LogitsRun(cfg, questions, source, True, tokenizer, [], [])
    gpus = usable_gpu_ids(cfg.gpu_ids)
    tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code)
    validate_inputs(questions, tokenizer, cfg.lang, cfg.top_k, cfg.response_field, cfg.dataset_path)
    workers, spread = placement_plan(cfg.model_path, gpus, cfg.model_placement)
    return LogitsRun(cfg, questions, source, False, tokenizer, workers, spread)


def stored_logits(job: LogitsRun, parts: Parts) -> Outputs:
    """The store, written shard by shard (finished shards are kept by a killed run); its summary."""
    from .workers import run_workers

    cfg = job.cfg
    if job.served:
        from .served_teacher import run_served

        return Outputs(run_served(cfg, job.source, job.questions, cfg.lang, job.tokenizer, parts))
    output_dir = Path(cfg.output_dir)
    part_log = parts.log(output_dir, key_field="shard")
    part_log.open()
    shards = plan_shards(len(job.questions), cfg.shard_size)
    work = LogitsJob(cfg=cfg, parts_dir=str(part_log.dir), questions=[q.to_dict() for q in job.questions],
                     shards=shards, spread=job.spread)

    def done_shards() -> dict[int, dict]:
        """Shards whose file and part-log record both exist (a kill between the two redoes the shard)."""
        return {int(k): v for k, v in part_log.done().items() if (part_log.dir / v["file"]).is_file()}

    todo = [s for s in range(len(shards)) if s not in done_shards()]
    if len(todo) < len(shards):
        log.info("resuming: %d of %d shards already done", len(shards) - len(todo), len(shards))
    run_workers(logits_worker, todo, job.workers, part_log, work)
    done = done_shards()
    missing = [s for s in range(len(shards)) if s not in done]
    if missing:
        raise RuntimeError(f"shards {missing} were not written; run the same command again")
    header = {"teacher_model": cfg.model_path, "tokenizer_fingerprint": tokenizer_fingerprint(job.tokenizer),
              "vocab_size": len(job.tokenizer), "lang": cfg.lang, "top_k": cfg.top_k,
              "response_field": cfg.response_field}
    summary = assemble(output_dir, part_log.dir, [done[s] for s in range(len(shards))], header)["summary"]
    log.info("teacher accuracy %.3f (%d/%d) on %s; %d shard(s) in %s", summary["accuracy"], summary["correct"],
             summary["n"], cfg.dataset_path, summary["shards"], cfg.output_dir)
    return Outputs(summary)

"""Answering multiple-choice questions with a model: inference.py (steps A and G) and the agents of D.

One path answers for every stage (`answer_all`):
- score mode: one forward pass per length-sorted, left-padded batch; the answer is the most
  probable option letter at the answer position (`atkd.scoring`), with `option_probs` over the
  item's own options and `letter_mass` (the letters' share of the whole vocabulary);
- generate mode: greedy chain-of-thought text, then `atkd.letters.extract_letter`; a reply that
  commits to no letter is data (`pred_letter` null, counted as unparsed);
- an OpenAI-compatible endpoint: score mode from the letters' log-probs the server returns at the
  answer position (`atkd.served_logprobs`; one request per question), generate mode as above;
  `at_endpoint` asks the server once and keeps score mode only when it returns them;
- explain (`EXPLAIN`, used by generate_rationales.py, not an inference.py mode): the rationale
  prompt, whose reply gives the answer line first and then the reason; the letter is read from
  the reply's first line.

The batches are planned once, over the whole dataset, before any work starts, so a batch's
numbers do not depend on how many GPUs ran it or how often the run was interrupted: finished
batches go to a part log, a rerun skips them, and the final file equals an uninterrupted run's.

inference.py's output contract (other stages read it): one reply per input question, in input
order; a reply is the question record plus `pred_letter`, `option_probs` (score mode),
`letter_mass` and `tied_top` (score mode: whether another option shared the top logit), `raw_reply`
(generate mode), `correct` and `mode`. Fields that do not apply to the mode are present and null, so
every reply has the same keys.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from . import paths
from .batching import length_sorted_batches
from .cli import INPUT, OUTPUT, StageConfig, at_least, dtype, gpu_ids, lang, setting, trust_remote_code
from .errors import InputError
from .io import PartLog
from .lifecycle import Outputs, Parts, run_stage
from .model_source import TREE_FLAGS, EndpointSettings
from .prompts import encode_prompt, language_of, mcq_prompt, mcq_user_text, rationale_prompt, rationale_user_text
from .records import LETTERS, Question, load_questions
from .workers import run_workers

log = logging.getLogger(__name__)

MODES = ("score", "generate")
EXPLAIN = "explain"  # generative, with the rationale prompt (step D3); not offered by inference.py
ANSWER_FIELDS = ("pred_letter", "option_probs", "letter_mass", "tied_top", "raw_reply")


@dataclass
class Answerer:
    """Who answers and how: a local model folder, or an OpenAI-compatible endpoint."""

    model_path: str = ""
    api_base: str = ""
    api_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    mode: str = "score"
    lang: str = "en"  # resolved, never "auto"
    max_new_tokens: int = 256  # generate mode only
    seed: int = 0
    dtype: str = "auto"
    trust_remote_code: bool = False
    api_concurrency: int = 8  # endpoint: requests in flight at once
    api_timeout_s: float = 300.0  # endpoint: seconds per try of one request
    api_max_attempts: int = 4  # endpoint: tries per request
    spread_over: tuple[int, ...] = ()  # local: GPUs one copy is spread over (`models.placement_plan`)

    @classmethod
    def of(cls, source, **how) -> "Answerer":
        """`source` (an `atkd.model_source.ModelSource`) answering: its folder, or its endpoint (no folder then)."""
        return cls(model_path="" if source.is_served else source.model_path, api_base=source.api_base,
                   api_model=source.api_model, api_key_env=source.api_key_env, dtype=source.dtype,
                   trust_remote_code=source.trust_remote_code, api_concurrency=source.api_concurrency,
                   api_timeout_s=source.api_timeout_s, api_max_attempts=source.api_max_attempts, **how)

    @property
    def source(self):
        """Where this answerer's model is (`atkd.model_source.ModelSource`)."""
        from .model_source import ModelSource

        return ModelSource(model_path=self.model_path, api_base=self.api_base, api_model=self.api_model,
                           api_key_env=self.api_key_env, api_concurrency=self.api_concurrency,
                           api_timeout_s=self.api_timeout_s, api_max_attempts=self.api_max_attempts, dtype=self.dtype,
                           trust_remote_code=self.trust_remote_code)

    @property
    def name(self) -> str:
        return self.source.name

    def client(self):
        """The endpoint's client (`atkd.api.ChatAPI`)."""
        return self.source.client()


def answer_record(key: str, pred_letter: str | None, option_probs: dict | None = None,
                  letter_mass: float | None = None, tied_top: bool | None = None, raw_reply: str | None = None) -> dict:
    """One answer as the part logs hold it (the same keys in every mode)."""
    return {"id": key, "pred_letter": pred_letter, "option_probs": option_probs, "letter_mass": letter_mass,
            "tied_top": tied_top, "raw_reply": raw_reply}


def user_text(q: Question, who: Answerer) -> str:
    """The words of the prompt `who` answers: the rationale prompt, or the MCQ prompt (with chain of thought
    in generate mode)."""
    return rationale_user_text(q, who.lang) if who.mode == EXPLAIN else mcq_user_text(q, who.lang, who.mode == "generate")


def prompt_ids(tokenizer, q: Question, who: Answerer) -> list[int]:
    """The rendered prompt's token ids for a local model (the same words as `user_text`)."""
    text = (rationale_prompt(tokenizer, q, who.lang) if who.mode == EXPLAIN
            else mcq_prompt(tokenizer, q, who.lang, cot=who.mode == "generate"))
    return encode_prompt(tokenizer, text)


def reply_letter(text: str, q: Question, who: Answerer) -> str | None:
    """The letter a generated reply commits to; an explain reply commits on its first non-empty line."""
    from .letters import extract_letter

    if who.mode == EXPLAIN:
        text = next((line for line in text.splitlines() if line.strip()), "")
    return extract_letter(text, q.letters, q.options)


# --------------------------------------------------------------------------- batches

def plan_batches(who: Answerer, questions: list[Question], batch_size: int, tokenizer=None) -> list[list[int]]:
    """Question indices per batch of a local model, length-sorted, fixed for the whole run (none for an
    endpoint: it gets single questions and batches on its own)."""
    if who.api_base:
        return []
    return length_sorted_batches([len(prompt_ids(tokenizer, q, who)) for q in questions], batch_size)


def answer_local(model, tokenizer, questions: list[Question], who: Answerer) -> list[dict]:
    """Answers of one batch with a local model: one forward pass (score) or one generate call."""
    from .generation import generate_batch
    from .scoring import score_questions

    if who.mode == "score":
        out: list[dict] = []
        score_questions(model, tokenizer, questions, who.lang, len(questions), lambda pairs: out.extend(
            answer_record(q.key, s.pred_letter, s.probs(), s.letter_mass, s.tied) for q, s in pairs))
        return out
    ids = [prompt_ids(tokenizer, q, who) for q in questions]
    texts = generate_batch(model, tokenizer, ids, who.max_new_tokens, seed=who.seed)
    return [answer_record(q.key, reply_letter(t, q, who), raw_reply=t) for q, t in zip(questions, texts)]


def letter_logprobs_refused(who: Answerer, probe: Question, top_k: int = 20, cap: int = 20) -> str | None:
    """None when `who`'s server returns the letters' log-probs for `probe` (one request asking `top_k`, at
    most `cap`), else the server's words."""
    from .served_logprobs import LogprobsRefused, served_option_scores_each

    try:
        next(served_option_scores_each(who.client(), [probe], who.lang, top_k, cap))
    except LogprobsRefused as err:
        return str(err)
    return None


def at_endpoint(who: Answerer, probe: Question) -> Answerer:
    """How `who` answers at its endpoint: score mode stays when the server returns the letters'
    log-probs for `probe` (one request), else generate mode (a warning names the server's words).
    A local model, or generate mode, is returned unchanged."""
    if not who.api_base or who.mode != "score":
        return who
    refused = letter_logprobs_refused(who, probe)
    if refused:
        log.warning("%s gives no letter log-probs, so it answers in generate mode (%s)", who.name, refused)
        return replace(who, mode="generate")
    return who


def scoring_source(source, who: Answerer, probe: Question | None, folder: str):
    """(source, answerer) that answer `who`'s questions: `at_endpoint`'s choice, except that where the server
    gives no letter log-probs and `folder` (a served teacher's TEACHER_MODEL_PATH) holds the model's weights,
    those weights answer instead, in the mode asked (a warning). `probe` None: nothing is asked."""
    from .models import has_model

    if not source.is_served or probe is None:
        return source, who
    served = at_endpoint(who, probe)
    if served.mode == who.mode or not has_model(folder):
        return source, served
    log.warning("%s gives no letter log-probs: the model in %s answers in %s mode instead", source.name, folder,
                who.mode)
    local = replace(source, api_base="", api_model="")
    return local, Answerer.of(local, mode=who.mode, lang=who.lang, max_new_tokens=who.max_new_tokens, seed=who.seed)


def scores_by_api(who: Answerer, questions: list[Question], writer, desc: str) -> None:
    """Score mode at an endpoint (`at_endpoint` decided the server gives the letters' log-probs): every
    question's letter log-probs at the answer position, each answer logged the moment it arrives (a kill
    loses only the requests in flight). Deterministic, so a rerun asks the same."""
    from .console import progress_bar as tqdm
    from .served_logprobs import served_option_scores_each

    with tqdm(total=len(questions), desc=desc, unit="q") as bar:
        for i, scores, _ in served_option_scores_each(who.client(), questions, who.lang):
            q = questions[i]
            writer.write([answer_record(q.key, scores.pred_letter, scores.probs(), scores.letter_mass, scores.tied)])
            bar.update(1)


def replies_by_api(who: Answerer, questions: list[Question], part_log: PartLog,
                   desc: str) -> tuple[dict[str, dict], int]:
    """Generate (and explain) mode at an endpoint: greedy replies through `ModelSource.texts`, the one
    "prompts in, texts out" path (each reply logged as it arrives, a rerun asks only the rest), then the
    letter read from each reply; (answers by id, how many came from an earlier run)."""
    from .model_source import Prompt, PromptBatch

    # The part log holds replies as texts ({"id", "text"}), not answer records: parts of the older form
    # get another fingerprint, so they are discarded, never misread.
    part_log.fingerprint = {**part_log.fingerprint, "parts_format": "texts"}
    resumed = len(part_log.open().keys() & {q.key for q in questions})
    texts = who.source.texts([PromptBatch([Prompt(q.key, user_text(q, who)) for q in questions])],
                             max_new_tokens=who.max_new_tokens, temperature=0.0, part_log=part_log, desc=desc)
    return {q.key: answer_record(q.key, reply_letter(texts[q.key], q, who), raw_reply=texts[q.key])
            for q in questions}, resumed


class LoadedModel:
    """A local model loaded on first use and kept for the next `answer_all` call of this process (a
    stage that asks round after round, like labelling, loads its model once); spawned GPU workers
    receive it empty and load their own. Without one, each `answer_all` call loads and frees."""

    def __init__(self):
        self._loaded = None  # ((model_path, gpu_id, dtype, trust_remote_code), (model, tokenizer))

    def __getstate__(self) -> dict:
        return {"_loaded": None}

    def get(self, who: Answerer, gpu_id: int | None):
        from .models import device_for, load

        key = (who.model_path, gpu_id, who.dtype, who.trust_remote_code, tuple(who.spread_over))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the old one before loading the next
            self._loaded = (key, load(who.model_path, device_for(gpu_id), who.dtype, who.trust_remote_code,
                                      spread_over=who.spread_over))
        return self._loaded[1]

    def release(self) -> None:
        self._loaded = None


def answer_worker(rank: int, gpu_id: int | None, batches: list[list[int]], writer, payload) -> None:
    """One local worker (one GPU, GPUs it is spread over, or the CPU): answer its batches, one part-log
    write per batch."""
    import torch

    from .console import progress_bar as tqdm

    who, questions, desc, loaded = payload
    torch.manual_seed(who.seed)
    model, tokenizer = loaded.get(who, gpu_id)
    with tqdm(total=sum(len(b) for b in batches), desc=desc, unit="q", disable=rank != 0) as bar:
        for batch in batches:
            writer.write(answer_local(model, tokenizer, [questions[i] for i in batch], who))
            bar.update(len(batch))


def answer_all(who: Answerer, questions: list[Question], batches: list[list[int]], gpus: list[int],
               part_log: PartLog, desc: str, loaded: LoadedModel | None = None) -> tuple[dict[str, dict], int]:
    """(every question's answer by id, how many came from an earlier run): only what the part log
    does not hold yet is computed (whole batches locally, single questions at an endpoint).
    `gpus`: one local worker each (empty: one worker, on the CPU or spread over `who.spread_over`).
    `loaded` keeps the local model for the caller's next call."""
    if who.api_base and who.mode != "score":
        return replies_by_api(who, questions, part_log, desc)
    done = part_log.open()
    if who.api_base:
        todo = [q for q in questions if q.key not in done]
        resumed = len(questions) - len(todo)
    else:
        todo = [b for b in batches if not all(questions[i].key in done for i in b)]
        resumed = len(questions) - sum(len(b) for b in todo)
    if resumed:
        log.info("%s: %d of %d answers already written by an earlier run", desc, resumed, len(questions))
    if who.api_base:
        if todo:
            scores_by_api(who, todo, part_log.writer(0), desc)
    else:
        run_workers(answer_worker, todo, gpus, part_log, (who, questions, desc, loaded or LoadedModel()))
    done = part_log.done()
    missing = [q.key for q in questions if q.key not in done]
    if missing:  # a worker died without raising: keep the parts so a rerun finishes the job
        raise RuntimeError(f"{len(missing)} questions were not answered (first: {missing[0]}); rerun to finish")
    return done, resumed


# --------------------------------------------------------------------------- inference.py (steps A, G)

@dataclass(kw_only=True)
class InferenceConfig(EndpointSettings, StageConfig):
    """inference.py: answer a multiple-choice dataset with a local model or a served one."""

    version: ClassVar[int] = 2  # 2: letter logits in float32 through the verified head; tied_top
    model_path: str = TREE_FLAGS.setting("model_path", help="local Hugging Face model folder (unless --api_base "
                                                            "is set)")
    dataset_path: str = setting(help="questions .jsonl (id, question, options, answer_idx)", role=INPUT)
    output_path: str = setting(help="replies .jsonl to write (summary.json goes beside it)", role=OUTPUT)
    mode: str = setting("score", choices=MODES,
                        help="score: option-letter probabilities (one forward pass per batch; at an endpoint, the "
                             "letters' log-probs the server returns, else generate mode); generate: "
                             "chain-of-thought text, then the letter is extracted")
    max_new_tokens: int = setting(256, check=at_least(1), help="generate mode: reply length limit, in tokens")
    batch_size: int = setting(16, check=at_least(1), affects_output=False,
                              help="questions per forward pass / generate call")
    seed: int = setting(0, help="torch seed (greedy decoding does not depend on it)")
    lang: str = lang()
    gpu_ids: list[int] = gpu_ids()
    dtype: str = dtype()
    trust_remote_code: bool = trust_remote_code()

    def outputs(self) -> list[Path]:
        return [Path(self.output_path), paths.summary_path(self.output_path)]


def reply_record(q: Question, mode: str, answer: dict) -> dict:
    """The question record plus the model's answer and whether it is right."""
    rec = q.to_dict()
    rec.update({k: answer[k] for k in ANSWER_FIELDS})
    rec.update(correct=answer["pred_letter"] is not None and answer["pred_letter"] == q.answer_idx, mode=mode)
    return rec


def summarize(replies: list[dict], cfg: InferenceConfig, who: Answerer, items_per_s: float | None, seconds: float,
              n_resumed: int) -> dict:
    """n, correct, accuracy, unparsed (generate mode), letter mass and ties (score mode) and throughput."""
    from .scoring import scoring_summary

    n = len(replies)
    correct = sum(1 for r in replies if r["correct"])
    scored = (scoring_summary([r["letter_mass"] for r in replies], [r["tied_top"] for r in replies], who.name)
              if who.mode == "score" else {"letter_mass": None, "tied_top": None})
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "unparsed": sum(1 for r in replies if r["pred_letter"] is None) if who.mode == "generate" else None,
        **scored,  # score mode: letter_mass (mean, min, share below 0.5) and tied_top (items); else null
        "items_per_s": items_per_s,  # items answered in this run / `seconds`
        "seconds": seconds,  # wall time of the answering phase, model loading included
        "resumed": n_resumed,  # items taken from an interrupted earlier run
        "mode": who.mode,  # at an endpoint that gives no letter log-probs, generate although score was asked
        "model_path": cfg.model_path,
        "api_model": who.api_model or None,  # the served model's name, at an endpoint
        "dataset_path": cfg.dataset_path,
        "lang": who.lang,
    }


def run(cfg: InferenceConfig) -> dict | None:
    """Answer every question of the dataset; write the replies and the summary (returned); None when the
    outputs were already done. Every input is checked before anything is written (`atkd.lifecycle`)."""
    return run_stage(cfg, lambda: check_inputs(cfg), answer_dataset)


@dataclass
class AnswerJob:
    """What step A/G's inputs resolved to: the questions, who answers them where, and the batches."""

    cfg: InferenceConfig
    questions: list[Question]
    source: object  # atkd.model_source.ModelSource
    who: Answerer
    gpus: list[int]
    batches: list
    numbers: dict  # what the answers depend on beyond the settings (device type, dtype; the served mode)
    where: str


def check_inputs(cfg: InferenceConfig) -> AnswerJob:
    """Read and check the dataset, the model and the output path; plan the batches."""
    from .letters import letter_token_ids
    from .models import device_for, load_tokenizer, resolve_dtype, usable_gpu_ids

    output_path = Path(cfg.output_path)
    if output_path.is_dir():
        raise InputError(output_path, "output path is a folder; give a .jsonl file name")
    questions = load_questions(cfg.dataset_path)
    source = TREE_FLAGS.of(cfg)
    source.check()
    who = Answerer.of(source, mode=cfg.mode, lang=language_of(questions, cfg.lang), max_new_tokens=cfg.max_new_tokens,
                      seed=cfg.seed)
    source, who = scoring_source(source, who, questions[0], cfg.model_path)
    gpus = [] if source.is_served else usable_gpu_ids(cfg.gpu_ids)
    if source.is_served:
        return AnswerJob(cfg, questions, source, who, gpus, [], {"mode": who.mode}, source.name)
    device = device_for(gpus[0] if gpus else None)
    tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code)
    if cfg.mode == "score":  # every letter used must be one token at the answer position
        letter_token_ids(tokenizer, list(LETTERS[: max(len(q.options) for q in questions)]), who.lang,
                         source=cfg.model_path)
    batches = plan_batches(who, questions, cfg.batch_size, tokenizer)
    # Device type and dtype change the numbers: parts from a CPU run are not mixed into a GPU run.
    torch_dtype = resolve_dtype(cfg.dtype, device)
    where = (f"GPUs {gpus}" if gpus else "CPU") + f" ({str(torch_dtype).replace('torch.', '')})"
    return AnswerJob(cfg, questions, source, who, gpus, batches,
                     {"device_type": device.type, "dtype": str(torch_dtype)}, where)


def answer_dataset(job: AnswerJob, parts: Parts) -> Outputs:
    """Every question's reply (resuming the part log), and the summary."""
    cfg, questions, who = job.cfg, job.questions, job.who
    part_log = parts.log(cfg.output_path, extra=job.numbers)
    asked = (f"one request each, {job.source.api_concurrency} in flight" if job.source.is_served
             else f"in {len(job.batches)} batches of up to {cfg.batch_size}")
    log.info("%s mode, %d questions %s, language %s, on %s", who.mode, len(questions), asked, who.lang, job.where)
    start = time.perf_counter()
    done, n_resumed = answer_all(who, questions, job.batches, job.gpus, part_log, f"inference ({who.mode})")
    seconds = time.perf_counter() - start

    replies = [reply_record(q, who.mode, done[q.key]) for q in questions]
    computed = len(questions) - n_resumed
    summary = summarize(replies, cfg, who, computed / seconds if computed and seconds > 0 else None,
                        seconds, n_resumed)
    unparsed = f", {summary['unparsed']} unparsed" if summary["unparsed"] is not None else ""
    log.info("accuracy %.4f (%d/%d)%s", summary["accuracy"], summary["correct"], summary["n"], unparsed)
    return Outputs(summary, {Path(cfg.output_path): replies, paths.summary_path(cfg.output_path): summary})

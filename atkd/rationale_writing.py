"""Step D3 (RESPONSE_STYLE rationale), generate_rationales.py: the teacher explains each training item.

With letter-only items the student learns one token per question. Here the teacher answers
every item with the rationale prompt (`atkd.prompts.rationale_prompt`: the answer line first,
then a short reason), through the pipeline's one answering path (`atkd.answering`, greedy; a
local model on the GPUs, or an OpenAI-compatible endpoint). The reply's first line must commit
to the item's labelled answer; the lines after it are the reason. An item is dropped, and
counted, when its reply commits to no letter (`unparsed`), to another letter than the label
(`disagrees`: a reason for the wrong answer would teach the wrong thing), or gives no reason
(`no_reason`). An item that already carries an explanation (CMExam/MedMCQA records converted by
data/convert.py keep theirs in `explanation`) keeps it when `use_dataset_explanation` is on, and
the teacher is not asked.

The reason goes into `explanation_field`; step E (`--response_field`) stores the teacher's top-k
log-probs at every response token, and step F trains the student on the letter followed by the
reason under the MCQ prompt (`atkd.sequence`): CE over the whole response, option-level KD on the
letter, token-level KD on the reason. The MCQ prompt, not the rationale prompt, is the training
prompt because the letter is scored under it: the answer's signal lands where it is measured.

Outputs: explained.jsonl (kept items with their reason and `explanation_source`: teacher or
dataset), dropped.jsonl (with `drop_reason` and the teacher's reply) and summary.json (counts
overall, per reason and per ability). A killed run resumes from its part log.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .answering import EXPLAIN, Answerer, answer_all, plan_batches
from .cli import INPUT, OUTPUT, StageConfig, at_least, lang, setting
from .errors import StageFailed
from .lifecycle import Outputs, Parts, run_stage
from .model_source import TEACHER_FLAGS
from .prompts import language_of, reason_of
from .records import Question, ability_name, load_questions
from .sequence import response_text

log = logging.getLogger(__name__)

DROP_REASONS = ("unparsed", "disagrees", "no_reason")


@dataclass(kw_only=True)
class RationaleConfig(StageConfig):
    """generate_rationales.py: the teacher's rationale (answer first, then why) for each item."""

    teacher_model_path: str = TEACHER_FLAGS.setting("model_path", help="teacher model folder (unless --api_base)")
    input_file: str = setting(role=INPUT, help="questions .jsonl to explain (step D's validated items, or D2's mix)")
    output_file: str = setting(role=OUTPUT, help="explained questions .jsonl (summary.json and dropped.jsonl go "
                                                 "beside it)")
    explanation_field: str = setting("explanation", help="record field the reason goes into (the response "
                                                         "field step E stores token-level logits for)")
    use_dataset_explanation: bool = setting(True, help="keep an item's own non-empty explanation (e.g. CMExam, "
                                                       "MedMCQA via data/convert.py) instead of asking the teacher")
    max_new_tokens: int = setting(128, check=at_least(1), help="reply length limit, in tokens")
    batch_size: int = setting(16, check=at_least(1), affects_output=False, help="prompts per generate call")
    lang: str = lang()
    # where the teacher is (atkd.model_source)
    api_base: str = TEACHER_FLAGS.setting("api_base")
    api_model: str = TEACHER_FLAGS.setting("api_model", help="model name at --api_base")
    api_key_env: str = TEACHER_FLAGS.setting("api_key_env")
    api_concurrency: int = TEACHER_FLAGS.setting("api_concurrency")
    api_timeout_s: float = TEACHER_FLAGS.setting("api_timeout_s")
    api_max_attempts: int = TEACHER_FLAGS.setting("api_max_attempts")
    gpu_ids: list[int] = TEACHER_FLAGS.setting("gpu_ids")
    model_placement: str = TEACHER_FLAGS.setting("model_placement")
    dtype: str = TEACHER_FLAGS.setting("dtype")
    trust_remote_code: bool = TEACHER_FLAGS.setting("trust_remote_code")

    def problems(self) -> list[str]:
        return TEACHER_FLAGS.problems(self)

    def outputs(self) -> list[Path]:
        return [Path(self.output_file), paths.summary_path(self.output_file), paths.dropped_path(self.output_file)]


def judge(q: Question, answer: dict) -> tuple[str | None, str]:
    """(drop reason or None, the reason text) of the teacher's reply to `q`."""
    if answer["pred_letter"] is None:
        return "unparsed", ""
    if answer["pred_letter"] != q.answer_idx:
        return "disagrees", ""
    reason = reason_of(answer["raw_reply"] or "")
    return (None, reason) if reason else ("no_reason", "")


def explained_records(items: list[Question], own: dict[str, str], answers: dict[str, dict], field: str
                      ) -> tuple[list[dict], list[dict]]:
    """(kept, dropped) records in input order."""
    kept, dropped = [], []
    for q in items:
        rec = q.to_dict()
        if q.key in own:
            rec.update({field: own[q.key], "explanation_source": "dataset"})
            kept.append(rec)
            continue
        a = answers[q.key]
        why, reason = judge(q, a)
        if why is None:
            rec.update({field: reason, "explanation_source": "teacher"})
            kept.append(rec)
        else:
            rec.update(drop_reason=why, teacher_letter=a["pred_letter"], teacher_reply=a["raw_reply"])
            dropped.append(rec)
    return kept, dropped


def build_report(items: list[Question], kept: list[dict], dropped: list[dict], teacher: str) -> dict:
    """summary.json: how many items got a reason, from whom, and why the others were dropped."""
    reasons = Counter(r["drop_reason"] for r in dropped)
    by_leaf: dict[str, dict] = {}
    kept_ids = {str(r["id"]) for r in kept}
    for q in items:
        row = by_leaf.setdefault(ability_name(q), {"total": 0, "kept": 0})
        row["total"] += 1
        row["kept"] += q.key in kept_ids
    return {"total": len(items), "kept": len(kept), "dropped": len(dropped),
            "from_teacher": sum(r["explanation_source"] == "teacher" for r in kept),
            "from_dataset": sum(r["explanation_source"] == "dataset" for r in kept),
            "by_reason": {r: reasons.get(r, 0) for r in DROP_REASONS}, "teacher": teacher,
            "by_leaf": dict(sorted(by_leaf.items()))}


def run(cfg: RationaleConfig) -> dict | None:
    """Explain every item (or keep its own explanation); write explained, dropped and the report (returned)."""
    return run_stage(cfg, lambda: check_inputs(cfg), explained)


@dataclass
class RationaleJob:
    cfg: RationaleConfig
    items: list
    own: dict[str, str]  # item key -> the dataset's own explanation (kept, not asked)
    ask: list  # the items the teacher explains
    who: Answerer
    batches: list
    gpus: list[int]


def check_inputs(cfg: RationaleConfig) -> RationaleJob:
    """The items (and their own explanations), the teacher's settings, the batches."""
    from .models import load_tokenizer

    items = load_questions(cfg.input_file)
    lang = language_of(items, cfg.lang)
    own = {}
    if cfg.use_dataset_explanation:
        own = {q.key: text for q in items if (text := response_text(q, cfg.explanation_field, cfg.input_file))}
    ask = [q for q in items if q.key not in own]
    teacher = TEACHER_FLAGS.of(cfg)
    who = Answerer.of(teacher, mode=EXPLAIN, lang=lang, max_new_tokens=cfg.max_new_tokens)
    teacher.check()
    tokenizer, gpus = None, []
    if not teacher.is_served:
        tokenizer = load_tokenizer(teacher.model_path, teacher.trust_remote_code)
        gpus, spread = teacher.placement()
        who.spread_over = tuple(spread)
    batches = plan_batches(who, ask, cfg.batch_size, tokenizer) if ask else []
    return RationaleJob(cfg, items, own, ask, who, batches, gpus)


def explained(job: RationaleJob, parts: Parts) -> Outputs:
    """The teacher's rationales (resumed from the part log), the items kept and dropped, the report."""
    cfg = job.cfg
    part_log = parts.log(cfg.output_file)
    answers = answer_all(job.who, job.ask, job.batches, job.gpus, part_log, "rationales")[0] if job.ask else {}
    kept, dropped = explained_records(job.items, job.own, answers, cfg.explanation_field)
    if not kept:  # the part log stays: it holds every reply
        raise StageFailed(f"the teacher's replies kept no item ({len(dropped)} dropped: "
                          f"{dict(Counter(r['drop_reason'] for r in dropped))}); its replies are in {part_log.dir}")
    report = build_report(job.items, kept, dropped, job.who.name)
    log.info("kept %d of %d items with a rationale (%d from the teacher, %d from the dataset); dropped: %s",
             report["kept"], report["total"], report["from_teacher"], report["from_dataset"],
             {k: v for k, v in report["by_reason"].items() if v} or "none")
    return Outputs(report, {Path(cfg.output_file): kept, paths.dropped_path(cfg.output_file): dropped,
                            paths.summary_path(cfg.output_file): report})

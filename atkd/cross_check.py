"""Step D, evaluate_distilled_data.py: two agents answer every generated question; keep those both answer as labelled.

Each agent answers every item on its own, through the pipeline's one answering path
(`atkd.answering`): in score mode from its option-letter logits, in generate mode from a
chain-of-thought reply. Every agent answers in `--mode` (score by default); an agent behind an
OpenAI-compatible endpoint scores from the letters' log-probs its server returns, and answers in
generate mode when the server gives none (the log and summary.json say which, per agent). Agents run one after
the other, so one model is in memory at a time, and each keeps its own part log: a killed run
resumes per agent (an endpoint agent per answer), and an agent's answers depend on that agent and
the input only.

An item is kept when both agents pick its labelled answer and, with a minimum confidence, each
scoring agent gives that answer at least that probability. The reference implementation loaded the teacher
twice and called it two agents; here the two agents are whatever two models are given, and the
same model twice is allowed but flagged (`same_model` in the report, and a warning).
Outputs: validated.jsonl (kept items with both agents' answers), rejected.jsonl (with the reason),
summary.json (pass rate overall, per leaf and per reason; each agent's own numbers).
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import paths
from .answering import MODES, Answerer, answer_all, at_endpoint, plan_batches
from .cli import INPUT, OUTPUT, StageConfig, at_least, between, lang, setting
from .errors import InputError
from .fingerprint import MISSING_PATH, fingerprint, signature
from .lifecycle import Outputs, Parts, run_stage
from .model_source import AGENT_FLAGS
from .prompts import language_of
from .records import Question, ability_name, load_questions

log = logging.getLogger(__name__)

# Rejection reasons, in the order they are checked: an agent that gave no answer is reported
# as such even if the other one was wrong.
REASONS = ("unparsed", "both_wrong", "agent_1_wrong", "agent_2_wrong", "low_confidence")
AGENTS = (1, 2)


@dataclass(kw_only=True)
class CrossCheckConfig(StageConfig):
    """evaluate_distilled_data.py: two agents validate generated questions."""

    version: ClassVar[int] = 2  # 2: letter logits in float32 through the verified head; tied_top
    agent_model_1_path: str = AGENT_FLAGS[1].setting("model_path", help="first agent's model folder")
    agent_model_2_path: str = AGENT_FLAGS[2].setting("model_path", help="second agent's model folder (a different "
                                                                        "model)")
    input_file: str = setting(role=INPUT, help="generated questions .jsonl (step C)")
    output_file: str = setting(role=OUTPUT,
                               help="kept questions .jsonl (summary.json and rejected.jsonl go beside it)")
    mode: str = setting("score", choices=MODES,
                        help="score = option-letter probabilities (local: batched logits; at an endpoint: the "
                             "letters' log-probs, or generate mode when its server gives none); generate = "
                             "chain-of-thought reply, letter extracted")
    min_confidence: float = setting(0.0, check=between(0.0, 1.0),
                                    help="score mode: each scoring agent must give the labelled answer at least "
                                         "this probability (0: off)")
    batch_size: int = setting(16, check=at_least(1), affects_output=False,
                              help="questions per forward pass / generate call")
    max_new_tokens: int = setting(256, check=at_least(1), help="generate mode: reply length limit, in tokens")
    lang: str = lang()
    # where each agent is (atkd.model_source): its own folder or endpoint; the rest is shared
    agent_1_api_base: str = AGENT_FLAGS[1].setting("api_base", help="agent 1 at this OpenAI-compatible endpoint "
                                                                    "instead of a folder")
    agent_1_api_model: str = AGENT_FLAGS[1].setting("api_model", help="model name of agent 1 at its endpoint")
    agent_2_api_base: str = AGENT_FLAGS[2].setting("api_base", help="agent 2 at this OpenAI-compatible endpoint "
                                                                    "instead of a folder")
    agent_2_api_model: str = AGENT_FLAGS[2].setting("api_model", help="model name of agent 2 at its endpoint")
    api_key_env: str = AGENT_FLAGS[1].setting("api_key_env")
    api_concurrency: int = AGENT_FLAGS[1].setting("api_concurrency")
    api_timeout_s: float = AGENT_FLAGS[1].setting("api_timeout_s")
    api_max_attempts: int = AGENT_FLAGS[1].setting("api_max_attempts")
    gpu_ids: list[int] = AGENT_FLAGS[1].setting("gpu_ids")
    model_placement: str = AGENT_FLAGS[1].setting("model_placement")
    dtype: str = AGENT_FLAGS[1].setting("dtype")
    trust_remote_code: bool = AGENT_FLAGS[1].setting("trust_remote_code")

    def problems(self) -> list[str]:
        out = []
        if self.min_confidence > 0 and self.mode != "score":
            out.append("--min_confidence needs --mode score (generated replies carry no probabilities)")
        for n in AGENTS:
            out += AGENT_FLAGS[n].problems(self)
        return out

    def outputs(self) -> list[Path]:
        return [Path(self.output_file), paths.summary_path(self.output_file), paths.rejected_path(self.output_file)]


def agent_fields(n: int) -> tuple[str, ...]:
    """Agent n's own settings (its source's folder and endpoint)."""
    return tuple(AGENT_FLAGS[n].flag(name) for name in ("model_path", "api_base", "api_model"))


def answerer(cfg: CrossCheckConfig, n: int, lang: str) -> Answerer:
    return Answerer.of(AGENT_FLAGS[n].of(cfg), mode=cfg.mode, lang=lang, max_new_tokens=cfg.max_new_tokens)


def same_model(a: Answerer, b: Answerer) -> bool:
    """True when both agents are one model: one endpoint model, or folders with the same weights."""
    if a.api_base or b.api_base:
        return (a.api_base.rstrip("/"), a.api_model) == (b.api_base.rstrip("/"), b.api_model)
    sig_a = signature(a.model_path)
    return sig_a != MISSING_PATH and sig_a == signature(b.model_path)


def verdict(label: str, pred_1: str | None, pred_2: str | None, prob_1: float | None = None,
            prob_2: float | None = None, min_confidence: float = 0.0) -> str | None:
    """The rejection reason, or None when the item is kept. A probability of None is an agent that
    answered in generate mode: the minimum confidence applies to the scoring agents only."""
    if pred_1 is None or pred_2 is None:
        return "unparsed"
    wrong_1, wrong_2 = pred_1 != label, pred_2 != label
    if wrong_1 and wrong_2:
        return "both_wrong"
    if wrong_1:
        return "agent_1_wrong"
    if wrong_2:
        return "agent_2_wrong"
    if min_confidence > 0 and any(p is not None and p < min_confidence for p in (prob_1, prob_2)):
        return "low_confidence"
    return None


def label_prob(answer: dict, label: str) -> float | None:
    """The probability the agent gave the labelled answer (score mode), else None."""
    probs = answer.get("option_probs")
    return probs[label] if probs else None


# --------------------------------------------------------------------------- outputs and report

Answers = dict[int, dict[str, dict]]  # agent number -> item id (as str) -> answer record


def judged_records(items: list[Question], answers: Answers, min_confidence: float
                   ) -> tuple[list[dict], list[dict]]:
    """(kept, rejected) records in input order, each with both agents' answers."""
    kept, rejected = [], []
    for q in items:
        a = {n: answers[n][q.key] for n in AGENTS}
        probs = {n: label_prob(a[n], q.answer_idx) for n in AGENTS}
        reason = verdict(q.answer_idx, a[1]["pred_letter"], a[2]["pred_letter"], probs[1], probs[2], min_confidence)
        rec = q.to_dict()
        for n in AGENTS:
            rec[f"agent_{n}_pred"] = a[n]["pred_letter"]
            rec[f"agent_{n}_label_prob"] = probs[n]
        if reason is None:
            kept.append(rec)
        else:
            rec["reject_reason"] = reason
            for n in AGENTS:
                if a[n].get("raw_reply") is not None:
                    rec[f"agent_{n}_reply"] = a[n]["raw_reply"]
            rejected.append(rec)
    return kept, rejected


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def build_report(items: list[Question], answers: Answers, kept: list[dict], rejected: list[dict],
                 agents: list[Answerer], is_same: bool, min_confidence: float) -> dict:
    """summary.json: pass rate overall, per leaf and per rejection reason; each agent's own numbers
    (in score mode with its letter mass and tied top letters, `atkd.scoring.scoring_summary`)."""
    from .scoring import scoring_summary
    reason_of = {str(r["id"]): r["reject_reason"] for r in rejected}
    by_leaf: dict[str, dict] = {}
    for q in items:
        row = by_leaf.setdefault(ability_name(q), {"total": 0, "kept": 0, "rejected": Counter()})
        row["total"] += 1
        if q.key in reason_of:
            row["rejected"][reason_of[q.key]] += 1
        else:
            row["kept"] += 1
    agent_rows = {}
    for n, who in zip(AGENTS, agents):
        got = [answers[n][q.key] for q in items]
        probs = [label_prob(a, q.answer_idx) for a, q in zip(got, items)]
        agent_rows[f"agent_{n}"] = {
            "model": who.name,
            "mode": who.mode,
            "accuracy": _rate(sum(a["pred_letter"] == q.answer_idx for a, q in zip(got, items)), len(items)),
            "unparsed": sum(a["pred_letter"] is None for a in got),
            "mean_label_prob": _mean([p for p in probs if p is not None]),
            "mean_letter_mass": _mean([a["letter_mass"] for a in got if a.get("letter_mass") is not None]),
            **(scoring_summary([a["letter_mass"] for a in got], [a.get("tied_top") for a in got],
                               f"agent {n} ({who.name})")
               if who.mode == "score" else {"letter_mass": None, "tied_top": None}),
        }
    preds = [(answers[1][q.key]["pred_letter"], answers[2][q.key]["pred_letter"]) for q in items]
    reasons = Counter(r["reject_reason"] for r in rejected)
    return {
        "total": len(items), "kept": len(kept), "pass_rate": _rate(len(kept), len(items)),
        "min_confidence": min_confidence,
        "same_model": is_same,
        "agents": agent_rows,
        "agents_agree": _rate(sum(a is not None and a == b for a, b in preds), len(items)),
        "by_reason": {r: reasons.get(r, 0) for r in REASONS},
        "by_reason_rate": {r: _rate(reasons.get(r, 0), len(items)) for r in REASONS},
        "by_leaf": {name: {"total": row["total"], "kept": row["kept"], "pass_rate": _rate(row["kept"], row["total"]),
                           "rejected": dict(sorted(row["rejected"].items()))}
                    for name, row in sorted(by_leaf.items())},
    }


# --------------------------------------------------------------------------- the stage

def run(cfg: CrossCheckConfig) -> dict | None:
    """Both agents answer every item; write validated, rejected and the report (returned)."""
    return run_stage(cfg, lambda: check_inputs(cfg), cross_checked)


@dataclass
class CrossCheckJob:
    cfg: CrossCheckConfig
    items: list
    agents: list  # the two Answerers, in score mode where they can score
    workers: dict[int, list[int]]  # agent -> GPUs with one local worker each
    is_same: bool


def check_inputs(cfg: CrossCheckConfig) -> CrossCheckJob:
    """The items, and both agents: their settings checked, served agents probed for the letters' log-probs."""
    path = Path(cfg.input_file)
    if path.is_file() and not path.read_text(encoding="utf-8").strip():
        raise InputError(path, "no questions to validate (the generation step wrote none: see its summary.json)")
    items = load_questions(path)
    lang = language_of(items, cfg.lang)
    agents = [answerer(cfg, n, lang) for n in AGENTS]
    workers = {}
    for n, who in zip(AGENTS, agents):
        source = AGENT_FLAGS[n].of(cfg)
        source.check()
        if source.is_served:  # score mode only when the server gives the letters' log-probs
            agents[n - 1] = at_endpoint(who, items[0])
        else:
            workers[n], spread = source.placement()
            who.spread_over = tuple(spread)
    is_same = same_model(*agents)
    if is_same:
        log.warning("both agents are the same model (%s): validation is one model's opinion twice, "
                    "not a cross-check (summary.json says same_model: true)", agents[0].name)
    return CrossCheckJob(cfg, items, agents, workers, is_same)


def cross_checked(job: CrossCheckJob, parts: Parts) -> Outputs:
    """Each agent's answers (its own part log), then the items both answer as labelled, and the report."""
    from .models import load_tokenizer

    cfg, items, agents = job.cfg, job.items, job.agents
    answers = {}
    for n, who in zip(AGENTS, agents):  # one after the other: one model in memory at a time
        # An agent's answers depend on it, its mode and the input only: not on the other agent.
        part_log = parts.log(paths.agent_answers_path(cfg.output_file, n), extra={"agent_mode": who.mode},
                             fingerprint=fingerprint(cfg, exclude=agent_fields(3 - n)))
        batches = [] if who.api_base else plan_batches(who, items, cfg.batch_size,
                                                        load_tokenizer(who.model_path, who.trust_remote_code))
        log.info("agent %d: %s, %s mode", n, who.name, who.mode)
        answers[n], _ = answer_all(who, items, batches, job.workers.get(n, []), part_log, f"agent {n}")
        _free_memory()

    kept, rejected = judged_records(items, answers, cfg.min_confidence)
    report = build_report(items, answers, kept, rejected, agents, job.is_same, cfg.min_confidence)
    log.info("kept %d of %d questions (pass rate %s); rejected by reason: %s", report["kept"], report["total"],
             report["pass_rate"], {k: v for k, v in report["by_reason"].items() if v} or "none")
    for name, row in report["agents"].items():
        if row["mode"] == "generate":  # a reply that commits to no single letter is data, not a guess
            log.info("%s: %d of %d replies unread (unparsed)", name.replace("_", " "), row["unparsed"], report["total"])
    return Outputs(report, {Path(cfg.output_file): kept, paths.rejected_path(cfg.output_file): rejected,
                            paths.summary_path(cfg.output_file): report})


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

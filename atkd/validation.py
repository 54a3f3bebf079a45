"""Dual-agent validation of generated questions (DESIGN §10): answers, verdicts, the report.

Each agent answers every item on its own: in score mode from its option-letter logits (batched,
one forward pass per batch), in generate mode from a chain-of-thought reply read by
`atkd.letters.extract_letter` (local model or an OpenAI-compatible endpoint). An item is kept when
both agents pick its labelled answer, and, with a minimum confidence, both give that answer at
least that probability. The reference implementation loaded the teacher twice and called it two
agents; here the two agents are whatever two models are given, and the same model twice is
allowed but flagged (`same_model` in the report, and a warning).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .records import Question

log = logging.getLogger(__name__)

# Rejection reasons, in the order they are checked: an agent that gave no answer is reported
# as such even if the other one was wrong.
REASONS = ("unparsed", "both_wrong", "agent_1_wrong", "agent_2_wrong", "low_confidence")
AGENTS = (1, 2)


@dataclass
class AgentConfig:
    """One agent: a local model folder, or (generate mode) an OpenAI-compatible endpoint."""

    number: int  # 1 or 2
    model_path: str = ""
    api_base: str = ""
    api_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    mode: str = "score"  # score | generate
    lang: str = "en"
    batch_size: int = 16
    max_new_tokens: int = 256
    dtype: str = "auto"
    trust_remote_code: bool = False

    @property
    def name(self) -> str:
        return f"{self.api_model} @ {self.api_base}" if self.api_base else self.model_path


def fingerprint(cfg: AgentConfig) -> dict:
    """What decides an agent's answers. Not the batch size: a rerun after running out of memory
    with a smaller batch keeps the answers already written (padding changes nothing else)."""
    fp = {k: v for k, v in vars(cfg).items() if k not in ("batch_size", "api_key_env", "number")}
    fp["api_base"] = cfg.api_base.rstrip("/")
    return fp


def verdict(label: str, pred_1: str | None, pred_2: str | None, prob_1: float | None = None,
            prob_2: float | None = None, min_confidence: float = 0.0) -> str | None:
    """The rejection reason, or None when the item is kept."""
    if pred_1 is None or pred_2 is None:
        return "unparsed"
    wrong_1, wrong_2 = pred_1 != label, pred_2 != label
    if wrong_1 and wrong_2:
        return "both_wrong"
    if wrong_1:
        return "agent_1_wrong"
    if wrong_2:
        return "agent_2_wrong"
    if min_confidence > 0 and min(p if p is not None else 0.0 for p in (prob_1, prob_2)) < min_confidence:
        return "low_confidence"
    return None


def ability_name(q: Question) -> str:
    path = q.extra.get("ability_path")
    if isinstance(path, list) and path:
        return " > ".join(str(p) for p in path)
    return "(no ability_path)"


# --------------------------------------------------------------------------- same model?

def _weights_signature(folder: Path) -> list[tuple[str, int, str]] | None:
    """(name, size, digest of first and last MiB) per weight file; None when there are none."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    sig = []
    for f in files:
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))  # the header: names, shapes, dtypes
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
            h.update(fh.read(1 << 20))  # some weights: two finetunes of one base differ here
        sig.append((f.name, size, h.hexdigest()))
    return sig


def same_model(a: AgentConfig, b: AgentConfig) -> bool:
    """True when both agents are one model: one folder (or a copy of its weights), or one endpoint model."""
    if a.api_base or b.api_base:
        return (a.api_base.rstrip("/"), a.api_model) == (b.api_base.rstrip("/"), b.api_model)
    pa, pb = Path(a.model_path).resolve(), Path(b.model_path).resolve()
    if pa == pb:
        return True
    sa = _weights_signature(pa)
    return sa is not None and sa == _weights_signature(pb)


# --------------------------------------------------------------------------- running an agent

def agent_worker(rank: int, gpu_id: int | None, items: list[Question], writer, cfg: AgentConfig) -> None:
    """Answer `items` with one agent, appending one answer record per item, a batch at a time."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=f"agent {cfg.number}", unit="q", disable=rank != 0)
    try:
        if cfg.api_base:
            _answer_by_api(items, writer, cfg, bar)
        elif cfg.mode == "generate":
            _answer_by_generation(items, writer, cfg, gpu_id, bar)
        else:
            _answer_by_scores(items, writer, cfg, gpu_id, bar)
    finally:
        bar.close()


def _load(cfg: AgentConfig, gpu_id: int | None):
    from .models import device_for, load_model, load_tokenizer

    tok = load_tokenizer(cfg.model_path, cfg.trust_remote_code)
    return load_model(cfg.model_path, device_for(gpu_id), cfg.dtype, cfg.trust_remote_code), tok


def _answer_by_scores(items, writer, cfg: AgentConfig, gpu_id, bar) -> None:
    from .scoring import score_questions

    model, tok = _load(cfg, gpu_id)

    def on_batch(pairs):
        writer.write([{"id": q.key, "pred": s.pred_letter,
                       "label_prob": s.probs()[q.answer_idx], "letter_mass": s.letter_mass} for q, s in pairs])

    score_questions(model, tok, items, cfg.lang, cfg.batch_size, on_batch, progress=bar)


def _answer_by_generation(items, writer, cfg: AgentConfig, gpu_id, bar) -> None:
    from .batching import length_sorted_batches
    from .generation import generate_batch
    from .letters import extract_letter
    from .prompts import encode_prompt, mcq_prompt

    model, tok = _load(cfg, gpu_id)
    ids = [encode_prompt(tok, mcq_prompt(tok, q, cfg.lang, cot=True)) for q in items]
    for batch in length_sorted_batches([len(s) for s in ids], cfg.batch_size):
        texts = generate_batch(model, tok, [ids[i] for i in batch], cfg.max_new_tokens, temperature=0.0)
        writer.write([_generated_answer(cfg, items[i], t, extract_letter) for i, t in zip(batch, texts)])
        bar.update(len(batch))


def _answer_by_api(items, writer, cfg: AgentConfig, bar) -> None:
    from .api import ChatAPI
    from .batching import chunks
    from .letters import extract_letter
    from .prompts import mcq_user_text

    api = ChatAPI(cfg.api_base, cfg.api_model, cfg.api_key_env)
    for batch in chunks(items, cfg.batch_size):
        texts = api.chat_many([mcq_user_text(q, cfg.lang, cot=True) for q in batch], cfg.max_new_tokens)
        writer.write([_generated_answer(cfg, q, t, extract_letter) for q, t in zip(batch, texts)])
        bar.update(len(batch))


def _generated_answer(cfg: AgentConfig, q: Question, text: str, extract_letter) -> dict:
    return {"id": q.key, "pred": extract_letter(text, q.letters, q.options),
            "label_prob": None, "reply": text}


# --------------------------------------------------------------------------- outputs and report

Answers = dict[int, dict[str, dict]]  # agent number -> item id (as str) -> answer record


def judged_records(items: list[Question], answers: Answers, min_confidence: float
                   ) -> tuple[list[dict], list[dict]]:
    """(kept, rejected) records in input order, each with both agents' answers."""
    kept, rejected = [], []
    for q in items:
        a = {n: answers[n][q.key] for n in AGENTS}
        reason = verdict(q.answer_idx, a[1]["pred"], a[2]["pred"], a[1]["label_prob"], a[2]["label_prob"],
                         min_confidence)
        rec = q.to_dict()
        for n in AGENTS:
            rec[f"agent_{n}_pred"] = a[n]["pred"]
            rec[f"agent_{n}_label_prob"] = a[n]["label_prob"]
        if reason is None:
            kept.append(rec)
        else:
            rec["reject_reason"] = reason
            for n in AGENTS:
                if a[n].get("reply") is not None:
                    rec[f"agent_{n}_reply"] = a[n]["reply"]
            rejected.append(rec)
    return kept, rejected


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def build_report(items: list[Question], answers: Answers, kept: list[dict], rejected: list[dict],
                 agents: list[AgentConfig], is_same: bool, min_confidence: float) -> dict:
    """report.json: pass rate overall, per leaf and per rejection reason; each agent's own numbers."""
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
    for cfg in agents:
        got = [answers[cfg.number][q.key] for q in items]
        agent_rows[f"agent_{cfg.number}"] = {
            "model": cfg.name,
            "accuracy": _rate(sum(a["pred"] == q.answer_idx for a, q in zip(got, items)), len(items)),
            "unparsed": sum(a["pred"] is None for a in got),
            "mean_label_prob": _mean([a["label_prob"] for a in got if a["label_prob"] is not None]),
            "mean_letter_mass": _mean([a["letter_mass"] for a in got if a.get("letter_mass") is not None]),
        }
    preds = [(answers[1][q.key]["pred"], answers[2][q.key]["pred"]) for q in items]
    reasons = Counter(r["reject_reason"] for r in rejected)
    return {
        "total": len(items), "kept": len(kept), "pass_rate": _rate(len(kept), len(items)),
        "mode": agents[0].mode, "min_confidence": min_confidence,
        "same_model": is_same,
        "agents": agent_rows,
        "agents_agree": _rate(sum(a is not None and a == b for a, b in preds), len(items)),
        "by_reason": {r: reasons.get(r, 0) for r in REASONS},
        "by_reason_rate": {r: _rate(reasons.get(r, 0), len(items)) for r in REASONS},
        "by_leaf": {name: {"total": row["total"], "kept": row["kept"], "pass_rate": _rate(row["kept"], row["total"]),
                           "rejected": dict(sorted(row["rejected"].items()))}
                    for name, row in sorted(by_leaf.items())},
    }

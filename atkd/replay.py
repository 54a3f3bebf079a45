"""Step D2 (REPLAY_FRACTION > 0), add_replay.py: mix questions the student already answers into its training data.

Trained only on questions written for its weak abilities, the student forgets some of the others
(on the demo, the eight abilities it knew fell from 100% to 97% over two rounds). Replay adds to
the validated generated items a share of the round's own questions (the iteration's dataset,
with their gold answers), drawn in favour of the abilities the student already answers well:

- how many: `replay_fraction` f of the training items. The count is taken over the final training
  items: the file given as `validated_file` is the last step before D2 (D's validated items, or
  D3's explained ones in rationale style, so nothing is dropped after the count is fixed). Of the
  two whole numbers around f * n / (1 - f) (n: the items before replay), the count is the one
  whose share r / (n + r) is nearest f, the larger on a tie (`replay_count`); e.g. 2 items at
  0.2 get 1 replay item (share 1/3, 0.13 from 0.2; none would be 0.2 from it). That count is
  drawn exactly, even when it is more than the dataset holds;
- which: a weighted draw without replacement (Efraimidis-Spirakis: the n largest keys
  u ** (1 / w), u uniform), where a question's weight w is its ability's smoothed accuracy in B's
  scored tree (`1 - weakness`, ARCHITECTURE.md §7). When n exceeds the dataset, every question is
  taken once and the rest comes from further passes, each a new weighted draw over the whole
  dataset (so the abilities the student knows are the ones repeated). A seeded RNG draws the keys
  pass by pass in dataset order, so the same seed and inputs give the same items.

Replay items keep their question, options and gold answer; their id becomes `replay-<id>`
(`replay<pass>-<id>` from the second pass on; `replay_of` keeps the original) and they carry
`source: "replay"`, `replay_pass` and their `ability_path`. In rationale style a replay item is
not explained by the teacher: it trains on its letter (option-level KD), or on the dataset's own
explanation when it carries one; `drop_field` removes that field (USE_DATASET_EXPLANATION off).
Step E takes the teacher's logits for them like for generated items, and F trains on both.
Outputs: train.jsonl (the generated items, then the replay items in dataset order) and
summary.json (the counts, the share, the seed, and per ability: available, weight, drawn).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from . import paths
from .allocation import leaf_weakness
from .cli import INPUT, OUTPUT, Check, StageConfig, setting
from .errors import InputError
from .io import iter_jsonl
from .lifecycle import Outputs, run_stage
from .records import REPLAY_PREFIX, Question, load_questions
from .tree import load_tree

log = logging.getLogger(__name__)

@dataclass(kw_only=True)
class ReplayConfig(StageConfig):
    """add_replay.py: add replayed dataset questions to the validated generated ones."""

    validated_file: str = setting(role=INPUT, help="the training items before replay .jsonl (step D's validated "
                                                   "items, or step D3's explained ones): the share is of these "
                                                   "plus the replayed ones")
    dataset_path: str = setting(role=INPUT, help="the round's questions .jsonl; replay items are drawn from it, "
                                                 "with their gold answers")
    ability_class_path: str = setting(role=INPUT, help="ability paths .jsonl of those questions")
    ability_tree_path: str = setting(role=INPUT, help="scored tree (step B's tree.json): each ability's smoothed "
                                                      "accuracy weighs its questions")
    output_path: str = setting(role=OUTPUT, help="training questions .jsonl (summary.json goes beside it)")
    replay_fraction: float = setting(0.2, check=Check(lambda v: 0 <= v < 1, "in [0, 1)"),
                                     help="share of the training items drawn from the dataset (0: none)")
    seed: int = setting(0, help="seed of the draw")
    drop_field: str = setting("", help="record field removed from replay items (e.g. a dataset explanation "
                                       "the run does not train on); empty: they keep every field")

    version = 2  # 2: the count is the share nearest the fraction (was Python's round: 0 for 2 items at 0.2)

    def outputs(self) -> list[Path]:
        return [Path(self.output_path), paths.summary_path(self.output_path)]


def replay_count(n_generated: int, fraction: float) -> int:
    """Replay items r that make `fraction` of a training set holding `n_generated` other items: of the two
    whole numbers around f * n / (1 - f), the one whose share r / (n + r) is nearest f (the larger on a tie).

    The fraction is taken as the decimal it is written as (0.2 is 1/5), in exact arithmetic.
    """
    f = Fraction(repr(float(fraction)))
    if n_generated <= 0 or f <= 0:
        return 0
    n = n_generated
    low = math.floor(f * n / (1 - f))
    return low if abs(Fraction(low, n + low) - f) < abs(Fraction(low + 1, n + low + 1) - f) else low + 1


def question_weights(questions: list[Question], ability_file: str | Path, tree) -> dict[str, tuple[tuple, float]]:
    """{question id: (its ability's path, its weight = the ability's smoothed accuracy)} for every question
    that has an ability path; a path naming no node of the tree is an `InputError`."""
    by_id = {q.key for q in questions}
    out: dict[str, tuple[tuple, float]] = {}
    for lineno, obj in iter_jsonl(ability_file):
        key, path = str(obj.get("id")), obj.get("ability_path")
        node = tree.match(path) if isinstance(path, list) else None
        if node is None:
            raise InputError(ability_file, f"ability path {path!r} names no node of the ability tree "
                                           f"(root {tree.domain!r})", lineno)
        if key in by_id:
            out[key] = (node.path, 1.0 - leaf_weakness(node, tree))
    return out


def draw(questions: list[Question], weights: dict[str, float], n: int, seed: int) -> list[tuple[int, Question]]:
    """`n` (pass, question) pairs: weighted samples without replacement, pass after pass, each pass in
    dataset order.

    Keys u ** (1 / w) (Efraimidis-Spirakis); weight 0 gets a key below every positive weight's,
    so such questions are drawn only when the others run out.
    """
    if not questions:
        return []
    rng = random.Random(f"{seed}|replay")
    out: list[tuple[int, Question]] = []
    for pass_ in range(1, math.ceil(n / len(questions)) + 1):
        keys = {}
        for q in questions:
            u, w = rng.random(), weights.get(q.key, 0.0)
            keys[q.key] = u ** (1.0 / w) if w > 0 else u - 1.0
        chosen = set(sorted(keys, key=lambda k: -keys[k])[:n - len(out)])
        out += [(pass_, q) for q in questions if q.key in chosen]
    return out


def replay_record(q: Question, path: tuple, pass_: int, drop_field: str = "") -> dict:
    rec = q.to_dict()
    if drop_field:
        rec.pop(drop_field, None)
    prefix = REPLAY_PREFIX if pass_ == 1 else f"replay{pass_}-"
    rec.update(id=f"{prefix}{q.id}", replay_of=q.id, replay_pass=pass_, source="replay", ability_path=list(path))
    return rec


def run(cfg: ReplayConfig) -> dict | None:
    """Write the training mix and its summary (returned); None when it was already done."""
    return run_stage(cfg, lambda: training_mix(cfg), lambda out, _parts: out)


def training_mix(cfg: ReplayConfig) -> Outputs:
    """The generated items, then the replay items drawn for them, and the summary: computed from the inputs
    alone (no model), so the whole step is its input check."""
    validated = Path(cfg.validated_file)
    # D writes an empty file when it rejected every item (replay then adds none: its count is a share).
    generated = [] if validated.is_file() and not validated.read_text(encoding="utf-8").strip() else \
        load_questions(validated)
    dataset = load_questions(cfg.dataset_path)
    tree = load_tree(cfg.ability_tree_path)
    weighted = question_weights(dataset, cfg.ability_class_path, tree)
    candidates = [q for q in dataset if q.key in weighted]
    wanted = replay_count(len(generated), cfg.replay_fraction)
    if wanted > len(candidates):
        log.info("replay: %d items wanted, the dataset has %d with an ability path: some are replayed %d times",
                 wanted, len(candidates), math.ceil(wanted / max(1, len(candidates))))
    chosen = draw(candidates, {k: w for k, (_p, w) in weighted.items()}, wanted, cfg.seed)
    mix = [q.to_dict() for q in generated] + [replay_record(q, weighted[q.key][0], p, cfg.drop_field)
                                              for p, q in chosen]
    seen: set[str] = set()
    for rec in mix:
        if str(rec["id"]) in seen:
            raise InputError(cfg.dataset_path, f"replay id {rec['id']!r} is also a generated item's id")
        seen.add(str(rec["id"]))
    summary = replay_summary(cfg, len(generated), wanted, candidates, chosen, weighted)
    log.info("training items: %d generated + %d replayed (share %.3f, asked %.3f; %d pass(es) over the dataset)",
             len(generated), len(chosen), summary["share"], cfg.replay_fraction, summary["passes"])
    return Outputs(summary, {Path(cfg.output_path): mix, paths.summary_path(cfg.output_path): summary})


def replay_summary(cfg: ReplayConfig, n_generated: int, wanted: int, candidates: list[Question],
                   chosen: list[tuple[int, Question]], weighted: dict[str, tuple[tuple, float]]) -> dict:
    """summary.json: what was drawn, from what, and why."""
    by_ability: dict[str, dict] = {}
    for q in candidates:
        path, weight = weighted[q.key]
        row = by_ability.setdefault(" > ".join(path), {"available": 0, "weight": round(weight, 4), "drawn": 0})
        row["available"] += 1
    for _p, q in chosen:
        by_ability[" > ".join(weighted[q.key][0])]["drawn"] += 1
    total = n_generated + len(chosen)
    return {"replay_fraction": cfg.replay_fraction, "seed": cfg.seed, "generated": n_generated,
            "replay_wanted": wanted, "replay": len(chosen), "training_items": total,
            "share": len(chosen) / total if total else 0.0,  # of the final training items: nothing drops after D2
            "rounding": "the count whose share is nearest the fraction (the larger on a tie)",
            "passes": max((p for p, _q in chosen), default=0),
            "weight": "the ability's smoothed accuracy in the scored tree (1 - weakness)",
            "replay_ids": [q.key for _p, q in chosen], "by_ability": dict(sorted(by_ability.items()))}

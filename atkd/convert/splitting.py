"""The seeded split of a converted question set into an evaluation set and one pool per iteration.

data/convert.py's `--iterations N` writes `eval.jsonl` and `iteration_1.jsonl` ... `iteration_N.jsonl`
from it: disjoint parts, each in input order, stratified by ability path so every ability is spread
over the parts in proportion to their sizes; the same records, paths and seed give the same split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Sequence

from ..allocation import largest_remainder
from ..errors import InputError

@dataclass
class Split:
    """Disjoint parts of a question set: the evaluation set and one pool per iteration."""

    eval: list[dict]
    iterations: list[list[dict]]


def split_sizes(n: int, iterations: int, eval_fraction: float) -> list[int]:
    """Questions in [eval, iteration 1, ..., iteration N]: eval gets `eval_fraction` of n, the
    iterations share the rest equally; largest remainder, so they sum to n exactly."""
    shares = [eval_fraction] + [(1.0 - eval_fraction) / iterations] * iterations
    return largest_remainder([n * s for s in shares], n)


def dealing_order(records: Sequence[dict], paths: dict[str, list[str]], seed: int) -> list[int]:
    """Record indices grouped by ability path (sorted, so sibling abilities sit together; items
    without a path form one more group) and shuffled within each group by a seed of its own, so a
    group's order does not depend on the other groups."""
    groups: dict[tuple, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(tuple(paths.get(str(rec["id"]), ())), []).append(i)
    order = []
    for stratum in sorted(groups):
        members = groups[stratum]
        random.Random(json.dumps([seed, list(stratum)], ensure_ascii=False)).shuffle(members)
        order.extend(members)
    return order


def deal(order: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Deal indices in `order` to parts of the given sizes, each to the part furthest behind its
    share so far, so every run of the order (one ability's items, or one branch's) is spread over
    the parts in proportion: less than two items off its share (at most 1.34 over 200 random
    splits of 1 to 15 abilities, 1 to 60 items each, 2 to 7 parts)."""
    n = len(order)
    parts: list[list[int]] = [[] for _ in sizes]
    for pos, index in enumerate(order, start=1):
        open_parts = [b for b in range(len(sizes)) if len(parts[b]) < sizes[b]]
        best = max(open_parts, key=lambda b: (sizes[b] * pos / n - len(parts[b]), -b))
        parts[best].append(index)
    return parts


def split_questions(records: Sequence[dict], paths: dict[str, list[str]], iterations: int,
                    eval_fraction: float, seed: int) -> Split:
    """Seeded, disjoint split into an eval set and `iterations` pools, stratified by ability path.

    Each part keeps the input order. The same records, paths and seed give the same split.
    """
    if iterations < 1:
        raise InputError(None, f"--iterations must be at least 1 (got {iterations})")
    if not 0.0 < eval_fraction < 1.0:
        raise InputError(None, f"--eval_fraction must be between 0 and 1, exclusive (got {eval_fraction})")
    sizes = split_sizes(len(records), iterations, eval_fraction)
    if min(sizes) == 0:
        raise InputError(None, f"{len(records)} questions are too few for an eval fraction of {eval_fraction} "
                               f"and {iterations} iterations: a part would be empty (sizes {sizes})")
    parts = [sorted(p) for p in deal(dealing_order(records, paths, seed), sizes)]
    return Split(eval=[records[i] for i in parts[0]], iterations=[[records[i] for i in p] for p in parts[1:]])

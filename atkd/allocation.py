"""How many questions the teacher writes for each leaf ability (ARCHITECTURE.md §7).

A leaf's share is proportional to its weakness sharpened by a temperature,
`weakness ** (1 / temperature)` (temperature 1: plain proportional; below 1: more to the weakest;
above 1: flatter; a power rather than a softmax so that a weakness of 0 gets no share beyond the
floor and the result does not depend on the scale of the numbers). Every leaf that has seed
questions gets at least `floor` samples; a leaf without seeds gets none (the teacher would have
no examples to write from). Integer counts come from the largest-remainder method, so they sum
exactly to the total.

The reference implementation weighted leaves by `1 / (score - min_score + 1e-6)`: the weakest
leaf's weight is 1e6 and every other leaf's is at most a few hundred, so it took nearly all the
samples and the other weak leaves got nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .tree import AbilityTree, Node


@dataclass
class Allocation:
    """Integer targets per leaf, and the floor that could really be honoured."""

    targets: list[int]
    floor_used: int  # lower than the requested floor when total < floor x leaves with seeds


def sharpened_weights(weakness: list[float], temperature: float) -> list[float]:
    """weakness ** (1 / temperature), negative or missing weakness counted as 0."""
    if temperature <= 0:
        raise ValueError(f"allocation temperature must be > 0 (got {temperature})")
    return [max(0.0, float(w or 0.0)) ** (1.0 / temperature) for w in weakness]


def largest_remainder(shares: list[float], total: int) -> list[int]:
    """Integers that sum to `total`, each the floor of its share or one more.

    The leftover units go to the largest fractional parts; ties go to the larger share, then to
    the earlier leaf, so the result is deterministic.
    """
    base = [int(math.floor(s + 1e-9)) for s in shares]
    left = total - sum(base)
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - base[i]), -shares[i], i))
    for i in order[:max(0, left)]:
        base[i] += 1
    return base


def allocate(weakness: list[float], seeds_available: list[int], total: int,
             temperature: float = 1.0, floor: int = 1) -> Allocation:
    """Targets per leaf: proportional to sharpened weakness, at least `floor` where there are seeds.

    The floor is applied by water-filling: leaves whose proportional share falls below the floor
    are set to the floor and the rest of the budget is shared among the others in proportion, so
    leaves above the floor keep exactly the ratios of their weights.
    """
    if len(weakness) != len(seeds_available):
        raise ValueError("one weakness and one seed count per leaf")
    if total < 0 or floor < 0:
        raise ValueError("total and floor must be >= 0")
    eligible = [i for i, s in enumerate(seeds_available) if s > 0]
    targets = [0] * len(weakness)
    if not eligible or total == 0:
        return Allocation(targets, 0)
    weights = sharpened_weights(weakness, temperature)
    if sum(weights[i] for i in eligible) <= 0:
        weights = [1.0] * len(weakness)  # nobody is weak: spread evenly
    floor_used = min(floor, total // len(eligible))
    shares = _water_fill({i: weights[i] for i in eligible}, total, floor_used)
    counts = largest_remainder([shares[i] for i in eligible], total)
    for i, c in zip(eligible, counts):
        targets[i] = c
    return Allocation(targets, floor_used)


def _water_fill(weights: dict[int, float], total: int, floor: int) -> dict[int, float]:
    """Real-valued shares summing to `total`, proportional to weight, none below `floor`."""
    clamped: set[int] = set()
    while True:
        free = [i for i in weights if i not in clamped]
        budget = total - floor * len(clamped)
        mass = sum(weights[i] for i in free)
        shares = {i: float(floor) for i in clamped}
        for i in free:
            shares[i] = budget * weights[i] / mass if mass > 0 else budget / len(free)
        low = [i for i in free if shares[i] < floor]
        if not low or len(low) == len(free):
            if low:  # every free leaf is under the floor: the budget is exactly floor x leaves
                shares.update({i: float(floor) for i in low})
            return shares
        clamped.update(low)


def leaf_weakness(node: Node, tree: AbilityTree) -> float:
    """The leaf's weakness in a scored tree (step B's), else its nearest scored ancestor's, else 1 (unscored):
    what its share of the questions is computed from (step C) and what replay weighs against (step D2)."""
    path = node.path
    while path:
        found = tree.node(path)
        w = found.stats.get("weakness") if found is not None else None
        if isinstance(w, (int, float)) and not isinstance(w, bool):
            return float(w)
        path = path[:-1]
    return 1.0

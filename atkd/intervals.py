"""How sure a per-ability figure is: its 95% interval, and whether a before -> after change is noise.

- `wilson_interval`: the Wilson score interval of a binomial proportion, on the raw counts. It
  stays inside [0, 1], is not empty at 0/n or n/n (the normal-approximation interval collapses to
  a point there) and keeps close to its nominal 95% coverage down to n of about 10, which is where
  per-ability counts of an evaluation set live. It describes the raw accuracy; the smoothed
  accuracy that ranks abilities for allocation (atkd/weakness.py) is a different, shrunk estimate
  and usually lies inside it.
- `mcnemar_exact`: the exact McNemar test of two evaluations of the same questions: under "no
  change", a question answered right on exactly one side is equally likely to be either side, so
  the two-sided p-value is that of a binomial test of the discordant counts with p = 1/2.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
ALPHA = 0.05  # a change is marked when the paired test's p-value is below this


def wilson_interval(correct: int, n: int, z: float = Z95) -> list[float] | None:
    """[low, high], fractions in [0, 1], of `correct` out of `n`; None when n is 0 (nothing measured)."""
    if not n:
        return None
    p = correct / n
    zz = z * z
    centre = (p + zz / (2 * n)) / (1 + zz / n)
    half = z / (1 + zz / n) * math.sqrt(p * (1 - p) / n + zz / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: twice the smaller binomial(b + c, 1/2) tail, at most 1.

    Only the discordant questions count (right on one side only); with none, nothing changed: 1.
    """
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    k = min(right_to_wrong, wrong_to_right)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integers until the one division

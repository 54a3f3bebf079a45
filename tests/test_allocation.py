"""Allocation of samples over leaves (ARCHITECTURE.md §7), against the reference implementation's rule."""

import random

import pytest

from atkd.allocation import allocate, largest_remainder, sharpened_weights


def reference_allocation(scores: list[float], total: int) -> list[int]:
    """The reference implementation's rule: weight 1 / (score - min + 1e-6), rounded down."""
    low = min(scores)
    weights = [1.0 / (s - low + 1e-6) for s in scores]
    return [int(total * w / sum(weights)) for w in weights]


def test_weakest_leaf_does_not_take_nearly_everything():
    """Samples are shared in proportion to weakness: a leaf nearly as weak as the weakest gets nearly as much
    (the reference weighted by 1 / (score - min), so the weakest leaf took almost the whole budget)."""
    accuracy = [0.50, 0.52, 0.60, 0.75, 0.90]  # five leaves, two of them about equally weak
    weakness = [1 - a for a in accuracy]
    total = 1000
    ref = reference_allocation(accuracy, total)
    assert ref[0] >= 0.99 * total  # the reference's rule, reproduced: leaf 0 takes ~everything, leaf 1 ~nothing
    ours = allocate(weakness, [10] * 5, total).targets
    assert sum(ours) == total
    # Proportional to weakness: 0.50 / 1.73 of the total to the weakest, and the nearly-as-weak
    # second leaf gets almost as much instead of nothing.
    assert ours[0] == pytest.approx(total * 0.50 / 1.73, abs=1)
    assert ours[1] >= 0.9 * ours[0]
    assert ours == sorted(ours, reverse=True)


def test_exact_sum_floor_and_zero_for_seedless_leaves():
    rng = random.Random(3)
    for _ in range(300):
        n = rng.randint(1, 30)
        weakness = [rng.random() ** 3 for _ in range(n)]
        seeds = [rng.choice([0, 1, 5]) for _ in range(n)]
        total = rng.randint(0, 500)
        floor = rng.randint(0, 4)
        temperature = rng.choice([0.25, 0.5, 1.0, 2.0])
        alloc = allocate(weakness, seeds, total, temperature, floor)
        eligible = [i for i in range(n) if seeds[i]]
        assert all(alloc.targets[i] == 0 for i in range(n) if not seeds[i])
        if not eligible:
            assert sum(alloc.targets) == 0
            continue
        assert sum(alloc.targets) == total
        assert alloc.floor_used == min(floor, total // len(eligible))
        assert all(alloc.targets[i] >= alloc.floor_used for i in eligible)


def test_floor_lifts_strong_leaves_and_the_rest_stays_proportional():
    alloc = allocate([0.8, 0.4, 0.01, 0.0], [3, 3, 3, 3], 100, floor=5)
    assert alloc.targets[2:] == [5, 5]
    assert alloc.targets[:2] == [60, 30]  # the other 90 split 2:1, as their weakness


def test_leaf_without_seeds_gets_nothing_even_when_weakest():
    assert allocate([0.9, 0.2, 0.1], [0, 4, 4], 10).targets == [0, 7, 3]


def test_temperature_sharpens_and_flattens():
    weakness = [0.6, 0.3, 0.1]
    sharp = allocate(weakness, [1, 1, 1], 1000, temperature=0.5, floor=0).targets
    plain = allocate(weakness, [1, 1, 1], 1000, temperature=1.0, floor=0).targets
    flat = allocate(weakness, [1, 1, 1], 1000, temperature=4.0, floor=0).targets
    assert sharp[0] > plain[0] > flat[0]
    assert plain == [600, 300, 100]
    assert sharp == [782, 196, 22]  # weakness squared: 782.6, 195.7, 21.7 -> largest remainders round up


def test_nobody_weak_spreads_evenly_and_small_totals_drop_the_floor():
    assert allocate([0.0, 0.0, 0.0], [1, 1, 1], 7).targets == [3, 2, 2]
    tiny = allocate([0.5, 0.3, 0.2], [1, 1, 1], 2, floor=1)
    assert tiny.floor_used == 0 and tiny.targets == [1, 1, 0]


def test_largest_remainder_is_exact_and_deterministic():
    assert largest_remainder([1 / 3] * 3, 1) == [1, 0, 0]
    assert largest_remainder([2.5, 2.5, 5.0], 10) == [3, 2, 5]
    with pytest.raises(ValueError):
        sharpened_weights([0.5], 0.0)

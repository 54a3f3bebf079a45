"""Near-duplicate detection for generated questions (DESIGN §10).

Two questions are near-duplicates when the Jaccard similarity of their feature sets reaches a
threshold. Features are word unigrams and bigrams of the normalized question and of each option
separately (so reordering the options changes nothing); each CJK character counts as a word, so
Chinese text without spaces is compared just as well.

The index is exact (no hashing approximations) and fast through prefix filtering: with every
feature set sorted in one fixed global order, two sets with Jaccard >= t must share a feature
among the first `n - ceil(t * n) + 1` of each, so only those are indexed and probed.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import defaultdict

from .qparse import normalize_text

_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u9fff\uf900-\ufaff]+")
DEFAULT_THRESHOLD = 0.6  # one changed detail (an age, one option) in a 4-option item scores ~0.6-0.7


def words(text: str) -> list[str]:
    return _WORD.findall(normalize_text(text))


def _ngrams(tokens: list[str], tag: str) -> set[str]:
    grams = {f"{tag}1:{t}" for t in tokens}
    grams.update(f"{tag}2:{a} {b}" for a, b in zip(tokens, tokens[1:]))
    return grams


def features(question: str, options: dict[str, str] | list[str]) -> frozenset[str]:
    """The feature set of a question and its options (option order does not matter)."""
    texts = options.values() if isinstance(options, dict) else options
    feats = _ngrams(words(question), "q")
    for opt in texts:
        feats |= _ngrams(words(opt), "o")
    return frozenset(feats)


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _order_key(feature: str) -> tuple[int, str]:
    # crc32, not hash(): Python's string hash changes from process to process.
    return zlib.crc32(feature.encode("utf-8")), feature


class NearDupIndex:
    """Feature sets seen so far; `most_similar` finds any with Jaccard >= threshold."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"dedup threshold must be in (0, 1] (got {threshold})")
        self.threshold = threshold
        self._sets: list[frozenset] = []
        self._labels: list[str] = []
        self._postings: dict[str, list[int]] = defaultdict(list)

    def __len__(self) -> int:
        return len(self._sets)

    def _prefix(self, feats: frozenset) -> list[str]:
        ordered = sorted(feats, key=_order_key)
        # 1e-9 keeps float error (0.7 * 10 = 7.000000000000001) from shortening the prefix.
        keep = len(ordered) - math.ceil(self.threshold * len(ordered) - 1e-9) + 1
        return ordered[:keep]

    def most_similar(self, feats: frozenset) -> tuple[str | None, float]:
        """(label, similarity) of the most similar indexed set at or above the threshold, else (None, best)."""
        candidates = {i for f in self._prefix(feats) for i in self._postings.get(f, ())}
        best_label, best = None, 0.0
        for i in sorted(candidates):
            sim = jaccard(feats, self._sets[i])
            if sim > best:
                best, best_label = sim, self._labels[i]
        if best >= self.threshold:
            return best_label, best
        return None, best

    def add(self, feats: frozenset, label: str) -> None:
        idx = len(self._sets)
        self._sets.append(feats)
        self._labels.append(label)
        for f in self._prefix(feats):
            self._postings[f].append(idx)

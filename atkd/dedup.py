"""Near-duplicate detection for generated questions (ARCHITECTURE.md §9).

Two questions are near-duplicates when BOTH their stems and their option sets are similar: the
Jaccard similarity of the stems' features reaches the threshold and so does that of the options'.
Features are word unigrams and bigrams of the text's `words`, each option taken separately (so
reordering the options changes nothing).

`words` is the one normalisation of question text for comparing questions (here, and the two rules
of `atkd.leakage`): Unicode NFKC (width), case folded, invisible format characters, spaces and
punctuation dropped; each CJK character is a word, so Chinese text without spaces is compared just
as well and "华法 林" is "华法林". Comparison and sign symbols are words of their own, because they
change what a question asks: `< > ≤ ≥ = ≠ ≈ + ± ∓ ↑ ↓` (and their full-width forms, ≦ ≧ ⩽ ⩾ read as
≤ ≥), so "HbA1c > 9%" and "HbA1c < 9%", "血钾↑" and "血钾↓", "(+)" and "(-)" differ. The hyphen `-` is
a minus sign unless it joins two letters or digits: "Beta-blocker", "COVID-19", "抗-HBc" and "5-10" are
joined words ("Beta-blocker" is "Beta blocker"), while "-5", "(-)", "+/-", "Rh -" and a lone "-" keep
it as a sign; the minus sign U+2212 ("−", also what NFKC makes of "⁻") is always one.
`comparison_key` runs a text's words together: the identity of an option or an answer text, so
"Beta blocker", "Beta-blocker" and "betablocker" are one answer.

Why both: a question is its stem together with its options. One templated stem ("Which of the
following is a beta-lactam?") over different options is a different item, and so is a new stem
over the same options; a single Jaccard over the union lets the longer stem drown the options and
rejected every templated question of the embedded demo as a copy of its seed.

The index is exact (no hashing approximations) and fast through prefix filtering on the stems:
with every feature set sorted in one fixed global order, two sets with Jaccard >= t must share a
feature among the first `n - ceil(t * n) + 1` of each, so only those are indexed and probed. Any
fixed order is exact; the default (a hash) suits an index that grows as it goes, and when the
indexed questions are known up front `rarest_first` puts each stem's rarest words in its prefix,
so common words ("which", "of the") never make every indexed question a candidate.
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from typing import Callable, Iterable, NamedTuple

_CJK = "\u3400-\u9fff\uf900-\ufaff"
_SIGNS = "<>≤≥=≠≈+±∓↑↓"
# A CJK character; a run of letters and digits; a sign; a hyphen that does not stand between two
# letters or digits ([^\W_]: a letter or digit, CJK included).
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+|[{_SIGNS}]|(?<![^\W_])-|-(?![^\W_])")
# Forms NFKC leaves alone: the variant inequalities, and the minus sign, spaced so that it is a sign
# wherever it stands.
_SIGN_FORMS = str.maketrans({"≦": "≤", "⩽": "≤", "≧": "≥", "⩾": "≥", "\u2212": " - "})
# A reworded detail of the stem (an age, a drug) scores ~0.6-0.8; one changed option of four
# single-word options scores 3/5 = 0.6.
DEFAULT_THRESHOLD = 0.6


def words(text: str) -> list[str]:
    """The words of `text` for comparing questions (the module's docstring says what counts)."""
    if text.isascii():  # the common case, and a hot path: ASCII holds no Cf character and NFKC keeps it
        return _WORD.findall(text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold().translate(_SIGN_FORMS))


def comparison_key(text: str) -> str:
    """A text's `words` run together: what two options or answers of compared questions must differ in."""
    return "".join(words(text))


def _ngrams(tokens: list[str], tag: str) -> set[str]:
    grams = {f"{tag}1:{t}" for t in tokens}
    grams.update(f"{tag}2:{a} {b}" for a, b in zip(tokens, tokens[1:]))
    return grams


class Features(NamedTuple):
    """The feature sets of one question: its stem and its options (order-free)."""

    stem: frozenset[str]
    options: frozenset[str]


def features(question: str, options: dict[str, str] | list[str]) -> Features:
    """The feature sets of a question's stem and of its options (option order does not matter)."""
    texts = options.values() if isinstance(options, dict) else options
    return features_of_words(words(question), [words(opt) for opt in texts])


def features_of_words(stem: list[str], options: list[list[str]]) -> Features:
    """`features` from the `words` of the stem and of each option (for callers that need the words too)."""
    opts: set[str] = set()
    for opt in options:
        opts |= _ngrams(opt, "o")
    return Features(frozenset(_ngrams(stem, "q")), frozenset(opts))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _order_key(feature: str) -> tuple[int, str]:
    # crc32, not hash(): Python's string hash changes from process to process.
    return zlib.crc32(feature.encode("utf-8")), feature


def rarest_first(indexed: Iterable[Features]) -> Callable[[str], tuple]:
    """A global feature order for `NearDupIndex`: features in fewer of the `indexed` stems first
    (features they never use first of all: no indexed question shares them anyway)."""
    counts = Counter(f for feats in indexed for f in feats.stem)
    return lambda feature: (counts.get(feature, 0), *_order_key(feature))


def similarity(a: Features, b: Features) -> float:
    """The lower of the stem and the option-set Jaccard similarities."""
    return min(jaccard(a.stem, b.stem), jaccard(a.options, b.options))


class NearDupIndex:
    """Questions seen so far; `most_similar` finds any whose `similarity` reaches the threshold."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, order: Callable[[str], tuple] = _order_key):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"dedup threshold must be in (0, 1] (got {threshold})")
        self.threshold = threshold
        self._order = order  # the global feature order of the prefixes (fixed for the index's life)
        self._sets: list[Features] = []
        self._labels: list[str] = []
        self._postings: dict[str, list[int]] = defaultdict(list)

    def __len__(self) -> int:
        return len(self._sets)

    def _prefix(self, feats: Features) -> list[str]:
        if not feats.stem:
            return [""]  # stems without a word: all such questions are candidates of each other
        ordered = sorted(feats.stem, key=self._order)
        # 1e-9 keeps float error (0.7 * 10 = 7.000000000000001) from shortening the prefix.
        keep = len(ordered) - math.ceil(self.threshold * len(ordered) - 1e-9) + 1
        return ordered[:keep]

    def most_similar(self, feats: Features) -> tuple[str | None, float]:
        """(label, similarity) of the most similar indexed question at or above the threshold, else (None, best)."""
        candidates = {i for f in self._prefix(feats) for i in self._postings.get(f, ())}
        best_label, best = None, 0.0
        for i in sorted(candidates):
            sim = similarity(feats, self._sets[i])
            if sim > best:
                best, best_label = sim, self._labels[i]
        if best >= self.threshold:
            return best_label, best
        return None, best

    def similar(self, feats: Features) -> list[tuple[str, float]]:
        """(label, similarity) of every indexed question at or above the threshold, most similar first."""
        found = []
        for i in sorted({i for f in self._prefix(feats) for i in self._postings.get(f, ())}):
            stem = jaccard(feats.stem, self._sets[i].stem)
            if stem < self.threshold:
                continue  # most candidates fail here: their options need no comparing
            sim = min(stem, jaccard(feats.options, self._sets[i].options))
            if sim >= self.threshold:
                found.append((i, sim))
        return [(self._labels[i], sim) for i, sim in sorted(found, key=lambda x: -x[1])]

    def add(self, feats: Features, label: str) -> None:
        idx = len(self._sets)
        self._sets.append(feats)
        self._labels.append(label)
        for f in self._prefix(feats):
            self._postings[f].append(idx)

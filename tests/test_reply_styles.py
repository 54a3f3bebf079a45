"""Reading the answer letter from free-text replies: a corpus of reply styles met in practice.

Every line of tests/data/reply_styles.jsonl is one reply (`text`), the item's `letters` and
`options` (or null), and the letter it commits to (`expected`, null when it commits to none); `why`
says what the line guards. Add a line for every new reply format met.
"""

import json
from pathlib import Path

import pytest

from atkd.letters import extract_letter

CORPUS = Path(__file__).parent / "data" / "reply_styles.jsonl"
ROWS = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}:{r['text'][:30]!r}" for i, r in enumerate(ROWS)])
def test_reply_style(row):
    assert extract_letter(row["text"], row["letters"], row["options"]) == row["expected"], row.get("why", "")


def test_corpus_covers_both_languages_and_both_outcomes():
    zh = [r for r in ROWS if any("\u4e00" <= ch <= "\u9fff" for ch in r["text"])]
    assert len(zh) >= 10 and len(ROWS) - len(zh) >= 30
    assert sum(r["expected"] is None for r in ROWS) >= 15
    assert len({r["text"] for r in ROWS}) == len(ROWS)  # no line twice

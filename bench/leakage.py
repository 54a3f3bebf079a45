"""main.py's check for evaluation questions in the iteration files: prefixes ordered rarest-first against
the hash order the growing index of step C was built with, in one run.

    python -m bench.leakage                        # 20,000 pool questions against 2,000 evaluation questions
    python -m bench.leakage --pool 180000 --eval 4000 --skip_hash   # MedMCQA's train/dev sizes, ours alone

Both sides run `atkd.leakage.EvalIndex.repeats` (the same exact answer: the order of the prefix
features decides only which candidates are looked at). The questions are made up the way exam sets
are: templated stems ("Which of the following is true about ...") over a few thousand words, four
options each, and `--repeats` copies of evaluation questions (options reordered) hidden in the pool.
With the hash order the template's common words sit in most prefixes, so nearly every evaluation
question is a candidate of every pool question. Prints a table and writes bench/results/leakage.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from atkd.leakage import EvalIndex
from atkd.records import Question

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "leakage.json"
TEMPLATES = ("Which of the following is true about {}?", "A patient with {} most likely has which condition?",
             "Which of the following drugs is used to treat {}?", "What is the most common cause of {}?")


def made_up(n: int, prefix: str, vocab: list[str], rng: random.Random) -> list[Question]:
    return [Question(id=f"{prefix}{i}", question=rng.choice(TEMPLATES).format(" ".join(rng.sample(vocab, 6))),
                     options=dict(zip("ABCD", rng.sample(vocab, 4))), answer_idx=rng.choice("ABCD"))
            for i in range(n)]


def timed_repeats(evals: list[Question], pool: list[Question], rarest: bool) -> tuple[list[tuple[str, str]], float]:
    """The repeats found and the seconds taken (index built and probed) with one prefix order."""
    start = time.perf_counter()
    found = [(r.key, r.eval_key) for r in EvalIndex(evals, rarest=rarest).repeats(pool)]
    return found, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=20000, help="questions in the iteration files")
    p.add_argument("--eval", type=int, default=2000, help="questions in the evaluation set")
    p.add_argument("--vocab", type=int, default=3000, help="distinct words the questions are made of")
    p.add_argument("--repeats", type=int, default=20, help="evaluation questions copied into the pool")
    p.add_argument("--skip_hash", action="store_true", help="time the rarest-first order alone (the hash order "
                                                             "takes minutes at large sizes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    vocab = [f"w{i}" for i in range(args.vocab)]
    evals, pool = made_up(args.eval, "e", vocab, rng), made_up(args.pool, "p", vocab, rng)
    hidden = sorted(rng.sample(range(args.pool), args.repeats))
    for k, i in enumerate(hidden):
        src = evals[k]
        texts = list(src.options.values())[::-1]
        pool[i] = Question(id=f"p{i}", question=src.question, options=dict(zip("ABCD", texts)),
                           answer_idx="ABCD"[3 - "ABCD".index(src.answer_idx)])
    expected = [(f"p{i}", f"e{k}") for k, i in enumerate(hidden)]

    rows = {}
    for order in ("rarest_first",) + (() if args.skip_hash else ("hash",)):
        found, seconds = timed_repeats(evals, pool, rarest=order == "rarest_first")
        assert found == expected, f"{order}: found {found[:3]}..., expected {expected[:3]}..."
        rows[order] = {"seconds": seconds, "pool_per_s": args.pool / seconds, "repeats_found": len(found)}

    print(f"{args.pool} pool questions against {args.eval} evaluation questions ({args.vocab} words, "
          f"{args.repeats} hidden repeats)")
    print(f"{'prefix order':<14} {'seconds':>9} {'pool q/s':>10} {'found':>6}")
    for order, r in rows.items():
        print(f"{order:<14} {r['seconds']:>9.2f} {r['pool_per_s']:>10.0f} {r['repeats_found']:>6}")
    if "hash" in rows:
        print(f"speed-up: {rows['hash']['seconds'] / rows['rarest_first']['seconds']:.1f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "results": rows,
                                   "machine": {"python": platform.python_version(),
                                               "cpu": platform.processor() or platform.machine()}}, indent=2) + "\n",
                       encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

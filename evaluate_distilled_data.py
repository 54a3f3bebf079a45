"""Step D: two agent models answer every generated question; keep those both answer as labelled.

An alias of `python -m atkd cross_check`: `python evaluate_distilled_data.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("cross_check", argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Score the ability tree with the student's answers (steps B and H): per-node accuracy, smoothed accuracy, weakness.

An alias of `python -m atkd analyze`: `python student_data_analyzer.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("analyze", argv)


if __name__ == "__main__":
    raise SystemExit(main())

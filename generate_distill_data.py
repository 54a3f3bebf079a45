"""Step C: the teacher writes new questions for the abilities where the student is weak.

An alias of `python -m atkd write_questions`: `python generate_distill_data.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("write_questions", argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""The student's own sampled rationale replies for its on-policy practice items (step D4).

An alias of `python -m atkd student_responses`: `python sample_student_responses.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("student_responses", argv)


if __name__ == "__main__":
    raise SystemExit(main())

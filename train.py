"""Distil the teacher into the student (step F): checkpoint-<step>/ folders, then final_model/.

An alias of `python -m atkd train`: `python train.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("train", argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Answer a multiple-choice dataset with a local or served model (steps A and G): replies.jsonl and summary.json.

An alias of `python -m atkd answer`: `python inference.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("answer", argv)


if __name__ == "__main__":
    raise SystemExit(main())

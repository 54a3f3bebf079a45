"""The teacher's rationale for each training item: the answer line first, then a short reason (step D3).

An alias of `python -m atkd rationales`: `python generate_rationales.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("rationales", argv)


if __name__ == "__main__":
    raise SystemExit(main())

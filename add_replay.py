"""Add replayed dataset questions to the validated generated ones (step D2, when REPLAY_FRACTION > 0).

An alias of `python -m atkd replay`: `python add_replay.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("replay", argv)


if __name__ == "__main__":
    raise SystemExit(main())

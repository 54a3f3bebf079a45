"""Place questions that come without ability paths in the ability tree, with a model (the teacher).

An alias of `python -m atkd label`: `python label_abilities.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("label", argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Store the teacher's answer distributions for distillation (step E): safetensors shards + index.json.

An alias of `python -m atkd logits`: `python generate_logits.py --help` shows a command to copy and every flag
(the text is the stage's entry in atkd/stages.py).
"""

from atkd.__main__ import run_stage


def main(argv=None) -> int:
    return run_stage("logits", argv)


if __name__ == "__main__":
    raise SystemExit(main())

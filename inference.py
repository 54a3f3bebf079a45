"""Answer a multiple-choice dataset with a local model (steps A and G): replies.jsonl and summary.json.

    python inference.py --model_path data/demo/models/student --dataset_path data/demo/iteration_1.jsonl --output_path output/workflow/iteration_1/A_student_reply/replies.jsonl

Score mode (default) reads the option-letter probabilities at the answer position, one forward
pass per batch; generate mode writes a chain-of-thought reply and extracts the letter. A killed
run keeps its finished batches; running the same command again completes the rest, and running
it after it finished does nothing (its done-record says the replies are up to date).
"""

from atkd.answering import InferenceConfig, run
from atkd.cli import stage_main


def main(argv=None) -> int:
    return stage_main(InferenceConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

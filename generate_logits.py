"""Store the teacher's answer distributions for distillation (step E): safetensors shards + index.json.

    python generate_logits.py --model_path data/demo/models/teacher --dataset_path output/workflow/iteration_1/D_validated_data/validated.jsonl --output_dir output/workflow/iteration_1/E_teacher_logits

Per item: the teacher's log-probabilities over the option letters at the answer position
(tokenizer independent, so the student may come from another family). With --response_field,
also the top-k log-probabilities and the leftover tail mass at every response token after the
letter (usable for token-level KD when the student shares the teacher's vocabulary; the index
records a tokenizer fingerprint so train.py can tell). index.json also holds the teacher's
accuracy (summary.json too). A killed run keeps its finished shards; the same command resumes.
"""

from atkd.cli import stage_main
from atkd.teacher_logits import LogitsConfig, run


def main(argv=None) -> int:
    return stage_main(LogitsConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

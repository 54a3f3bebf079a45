"""The teacher's rationale for each training item: the answer line first, then a short reason (step D3).

    python generate_rationales.py --teacher_model_path data/demo/models/teacher --input_file output/workflow/iteration_1/D_validated_data/validated.jsonl --output_file output/workflow/iteration_1/D3_rationales/explained.jsonl

An item is kept when the teacher's answer line gives the item's labelled answer and a reason
follows; the reason goes into the `explanation` field, which generate_logits.py
(--response_field explanation) and train.py turn into token-level distillation. Items that
already have an explanation keep it (--no-use_dataset_explanation asks the teacher anyway).
Writes explained.jsonl, dropped.jsonl and report.json; a killed run resumes.
"""

from atkd.cli import stage_main
from atkd.rationale_writing import RationaleConfig, run


def main(argv=None) -> int:
    return stage_main(RationaleConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

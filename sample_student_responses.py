"""The student's own sampled rationale replies for its on-policy practice items (step D4).

    python sample_student_responses.py --student_model_path data/demo/models/student --input_file output/workflow/iteration_1/D2_replay/train.jsonl --output_file output/workflow/iteration_1/D4_student_responses/train.jsonl

The student answers each written (not replayed) item, or a seeded --share of them, with the
rationale prompt (answer line, then why), sampled at --temperature; the item keeps its reply
(`student_reply`), the letter its answer line commits to (`student_letter`, `student_correct`) and
the reason (`student_reason`). generate_logits.py then takes the teacher's log-probs at every token
of the student's response and train.py trains it on-policy. Writes train.jsonl (every item) and
report.json (right / wrong / unparsed sampled letters per ability); a killed run resumes.
"""

from atkd.cli import stage_main
from atkd.student_sampling import StudentSamplingConfig, run


def main(argv=None) -> int:
    return stage_main(StudentSamplingConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

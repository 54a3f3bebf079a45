"""Step C: the teacher writes new questions for the abilities where the student is weak.

    python generate_distill_data.py --teacher_model_path data/demo/models/teacher --ability_tree_path output/workflow/iteration_1/B_student_tree/tree.json --full_dataset_path data/demo/iteration_1.jsonl --ability_class_path data/demo/iteration_1_ability_paths.jsonl --output_path output/workflow/iteration_1/C_distill_data/generated.jsonl --num_samples 100

Samples are allocated over the leaves in proportion to weakness (atkd/allocation.py); each prompt
shows a few seed questions of the leaf; replies are parsed strictly, near-duplicates dropped, the
correct option's position shuffled, and short leaves retried at most --max_retries times.
Writes generated.jsonl and plan.json (target, achieved, seeds and rejection reasons per leaf).
A killed run resumes where it stopped when rerun with the same arguments.
"""

from atkd.cli import stage_main
from atkd.question_writing import QuestionWritingConfig, run


def main(argv=None) -> int:
    return stage_main(QuestionWritingConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

"""Add replayed dataset questions to the validated generated ones (step D2, when REPLAY_FRACTION > 0).

    python add_replay.py --validated_file output/workflow/iteration_1/D_validated_data/validated.jsonl --dataset_path data/demo/iteration_1.jsonl --ability_class_path data/demo/iteration_1_ability_paths.jsonl --ability_tree_path output/workflow/iteration_1/B_student_tree/tree.json --output_path output/workflow/iteration_1/D2_replay/train.jsonl --replay_fraction 0.2

The replay items (ids `replay-<id>`, gold answers) make --replay_fraction of the training items;
they are drawn with the seed, favouring abilities with a high smoothed accuracy in the scored
tree. Writes train.jsonl (the generated items, then the replay items) and replay.json beside it.
"""

from atkd.cli import stage_main
from atkd.replay import ReplayConfig, run


def main(argv=None) -> int:
    return stage_main(ReplayConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

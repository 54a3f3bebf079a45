"""Score the ability tree with the student's answers (steps B and H): per-node accuracy, smoothed accuracy, weakness.

    python student_data_analyzer.py --initial_tree_path ability_trees/demo_tree.json --paths_file data/demo/iteration_1_ability_paths.jsonl --answers_file data/demo/iteration_1.jsonl --student_responses_file output/workflow/iteration_1/A_student_reply/replies.jsonl --output_tree_path output/workflow/iteration_1/B_student_tree/tree.json --output_stats_path output/workflow/iteration_1/B_student_tree/stats.json

The formulas (a Beta prior centred on the parent's smoothed accuracy) and everything the stats
file reports are described in `atkd/weakness.py`. Replies need only `id` and `pred_letter`.
"""

from atkd.cli import stage_main
from atkd.weakness import AnalyzerConfig, run


def main(argv=None) -> int:
    return stage_main(AnalyzerConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

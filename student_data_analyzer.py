"""Score the ability tree with the student's answers: per-node counts, accuracy, smoothed accuracy, weakness.

    python student_data_analyzer.py --initial_tree_path ability_trees/initial_tree.json \
        --paths_file data/ability_paths.jsonl --answers_file data/questions.jsonl \
        --student_responses_file output/replies.jsonl \
        --output_tree_path output/B/tree.json --output_stats_path output/B/stats.json

The formulas (a Beta prior centred on the parent's smoothed accuracy) and everything the stats
file reports are described in `atkd/analysis.py`.
"""

from __future__ import annotations

import argparse
import logging

from atkd.analysis import analyze, check_some_path_matches, tree_for_analysis
from atkd.errors import exit_on_input_error
from atkd.io import read_json, write_json
from atkd.records import load_ability_paths, load_questions, load_replies
from atkd.stage import record_args, setup_logging

log = logging.getLogger("student_data_analyzer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--initial_tree_path", required=True,
                   help="ability tree JSON (nested form, with or without the domain key, or a scored tree)")
    p.add_argument("--paths_file", required=True, help='JSONL of {"id", "ability_path": [...]}')
    p.add_argument("--answers_file", required=True, help="the question JSONL with gold answer_idx")
    p.add_argument("--student_responses_file", required=True,
                   help="inference.py replies JSONL (id, pred_letter, correct)")
    p.add_argument("--output_tree_path", required=True, help="where the scored tree JSON goes")
    p.add_argument("--output_stats_path", required=True, help="where the stats JSON goes")
    p.add_argument("--prior_strength", type=float, default=4.0,
                   help="Beta prior strength in pseudo-questions; each node shrinks toward its parent "
                        "(0 = raw accuracy; default 4)")
    p.add_argument("--domain", default=None,
                   help="root name for a tree file that lists level-1 abilities directly (default: the "
                        "first element shared by all ability paths when it is not a level-1 node, else 'root')")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    with exit_on_input_error():
        # Read and check every input before writing anything.
        paths = load_ability_paths(args.paths_file)
        questions = load_questions(args.answers_file)
        replies = load_replies(args.student_responses_file)
        tree = tree_for_analysis(read_json(args.initial_tree_path), args.initial_tree_path, args.domain, paths)
        check_some_path_matches(tree, paths, args.paths_file)
        analysis = analyze(tree, questions, paths, replies, args.student_responses_file, args.prior_strength)
    analysis.log_warnings()
    stats = analysis.stats()
    tree.save_scored(args.output_tree_path)
    write_json(args.output_stats_path, stats)
    record_args(args, args.output_tree_path)
    log.info("scored %d of %d questions on %d nodes: accuracy %s", stats["scored"], len(questions),
             len(stats["nodes"]), "n/a" if stats["accuracy"] is None else f"{stats['accuracy']:.4f}")
    for leaf in stats["leaves_weakest_first"][:5]:
        log.info("  weak: %-50s n=%-4d weakness=%.3f", " > ".join(leaf["path"]), leaf["n"], leaf["weakness"])
    log.info("wrote %s and %s", args.output_tree_path, args.output_stats_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

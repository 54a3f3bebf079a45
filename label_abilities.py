"""Place questions that come without ability paths in the ability tree, with a model (the teacher).

    python label_abilities.py --model_path data/demo/models/teacher --ability_tree_path ability_trees/demo_tree.json --dataset_path data/demo/eval.jsonl --output_path output/labels/eval_ability_paths.jsonl

Level by level, the model picks the child ability each question tests, as a multiple-choice
question over the children's names scored like any answer. The choice does not depend on the order
the tree lists the children in: they are offered sorted by name, under every cyclic shift of that
order (k prompts for k children; `--rotations n`: n evenly spaced shifts), and the child with the
highest mean probability wins. Levels of more than 26 children are picked within chunks of at most
26, then among the chunk winners. Writes
`{"id", "ability_path", "confidence"}` lines, ready for main.py's ability-class files, and
`<stem>.summary.json` (confidence per level, questions per ability). A killed run keeps its
finished batches; the same command completes it, and does nothing once it is done.
"""

from atkd.cli import stage_main
from atkd.labelling import LabelConfig, run


def main(argv=None) -> int:
    return stage_main(LabelConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

"""How well a model labels questions into the ability tree (label_abilities.py), per level, against known paths.

    python -m bench.labelling                                     # the demo teacher on the demo's evaluation set
    python -m bench.labelling --model_path /models/Qwen2.5-7B-Instruct --tree ability_trees/my_tree.json \
        --questions data/medmcqa/eval.jsonl --paths data/medmcqa/eval_ability_paths.jsonl --name medmcqa

Runs the stage itself (`atkd.labelling.run`, in a temporary folder) on the questions twice: with the
tree as given, and with every node's children listed in reverse order (the choice must not depend on
it). Compares each run's paths with the known ones (with or without the domain; lines whose known
path names no node of the tree are left out and counted). Per order and level: the accuracy of the
path down to that level, the accuracy of the level's choice when the level above was right, what
picking a child at random would score there, and the model's mean confidence on right and on wrong
choices. Then the agreement of the two orders (share of questions given the same path down to each
level) and each run's cost (labelling prompts scored, forward passes, seconds in all and placing
only). Prints the tables and writes bench/results/labelling[_<name>].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from atkd.labelling import LabelConfig, run
from atkd.records import load_ability_paths, load_questions
from atkd.tree import AbilityTree, load_tree

ROOT = Path(__file__).resolve().parent.parent  # run from the repository root: python -m bench.labelling
DEMO = ROOT / "data" / "demo"


def known_paths(tree: AbilityTree, paths_file: str) -> tuple[dict[str, tuple[str, ...]], int]:
    """{id: path below the root} of every known path that names a node, and how many do not."""
    out, unmatched = {}, 0
    for key, path in load_ability_paths(paths_file).items():
        node = tree.match(path)
        if node is None:
            unmatched += 1
        else:
            out[key] = node.path[1:]
    return out, unmatched


def chance(tree: AbilityTree, path: tuple[str, ...], depth: int) -> float:
    """1 / the number of children the level-`depth` choice of `path` was made among."""
    parent = tree.node((tree.domain, *path[:depth - 1]))
    return 1.0 / len(parent.children)


def per_level(tree: AbilityTree, gold: dict[str, tuple[str, ...]], labels: dict[str, dict]) -> list[dict]:
    """The table's rows: one per level of the known paths."""
    rows = []
    for depth in range(1, max(len(p) for p in gold.values()) + 1):
        keys = [k for k, p in gold.items() if len(p) >= depth and k in labels]
        right_prefix = [k for k in keys if tuple(labels[k]["ability_path"][:depth]) == gold[k][:depth]]
        parent_right = [k for k in keys if tuple(labels[k]["ability_path"][:depth - 1]) == gold[k][:depth - 1]]
        conf = {k: labels[k]["confidence"][depth - 1] for k in keys if len(labels[k]["confidence"]) >= depth}
        right = [conf[k] for k in right_prefix if k in conf]
        wrong = [conf[k] for k in keys if k in conf and k not in set(right_prefix)]
        rows.append({
            "level": depth, "n": len(keys),
            "path_accuracy": len(right_prefix) / len(keys),
            "accuracy_given_parent": len(right_prefix) / len(parent_right) if parent_right else None,
            "chance_given_parent": statistics.fmean(chance(tree, gold[k], depth) for k in parent_right)
            if parent_right else None,
            "confidence_right": statistics.fmean(right) if right else None,
            "confidence_wrong": statistics.fmean(wrong) if wrong else None,
        })
    return rows


def reversed_nested(node):
    """A nested tree (JSON) with every node's children in reverse order."""
    return {k: reversed_nested(v) for k, v in reversed(node.items())} if isinstance(node, dict) else node


def agreement(a: dict[str, dict], b: dict[str, dict], depth: int) -> float:
    """Share of the questions whose paths in `a` and `b` agree down to `depth`."""
    return statistics.fmean(a[k]["ability_path"][:depth] == b[k]["ability_path"][:depth] for k in a)


def label_once(args, tree_path: str, tmp: Path) -> tuple[dict[str, dict], dict, float]:
    """(labels by id, the stage's summary, seconds) of one run of the stage."""
    out = tmp / "labels.jsonl"
    extra = {"rotations": args.rotations} if args.rotations is not None else {}
    cfg = LabelConfig(model_path=args.model_path, ability_tree_path=tree_path, dataset_path=args.questions,
                      output_path=str(out), batch_size=args.batch_size,
                      gpu_ids=[int(g) for g in args.gpu_ids.split(",") if g.strip()], **extra)
    start = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - start
    labels = {str(r["id"]): r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    return labels, summary, seconds


def print_levels(rows: list[dict]) -> None:
    print(f"{'level':>5} {'n':>6} {'path acc':>9} {'acc|parent':>10} {'chance':>7} {'conf right':>10} "
          f"{'conf wrong':>10}")
    for r in rows:
        print(f"{r['level']:>5} {r['n']:>6} {fmt(r['path_accuracy']):>9} {fmt(r['accuracy_given_parent']):>10} "
              f"{fmt(r['chance_given_parent']):>7} {fmt(r['confidence_right']):>10} {fmt(r['confidence_wrong']):>10}")


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(DEMO / "models" / "teacher"))
    p.add_argument("--tree", default=str(ROOT / "ability_trees" / "demo_tree.json"))
    p.add_argument("--questions", default=str(DEMO / "eval.jsonl"))
    p.add_argument("--paths", default=str(DEMO / "eval_ability_paths.jsonl"), help="the known ability paths")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rotations", type=int, default=None,
                   help="label_abilities.py --rotations (default: the stage's own default)")
    p.add_argument("--gpu_ids", default="", help="comma-separated GPU ids (empty: the CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--name", default="", help="suffix of the result file: labelling_<name>.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tree = load_tree(args.tree)
    gold, unmatched = known_paths(tree, args.paths)
    n_questions = len(load_questions(args.questions))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        flipped = Path(tmp) / "reversed_tree.json"
        flipped.write_text(json.dumps(reversed_nested(json.loads(Path(args.tree).read_text(encoding="utf-8"))),
                                      ensure_ascii=False), encoding="utf-8")
        for order, tree_path in (("tree", args.tree), ("reversed", str(flipped))):
            (Path(tmp) / order).mkdir()
            runs[order] = label_once(args, tree_path, Path(tmp) / order)
    depth = max(len(p) for p in gold.values())
    labels = {order: r[0] for order, r in runs.items()}
    result = {"model_path": args.model_path, "tree": args.tree, "questions": args.questions, "paths": args.paths,
              "known": len(gold), "known_unmatched": unmatched, "labelled": n_questions,
              "agreement": {f"level_{d}": agreement(labels["tree"], labels["reversed"], d)
                            for d in range(1, depth + 1)},
              "orders": {order: {"levels": per_level(tree, gold, lab), "seconds": seconds,
                                 "labelling_seconds": summary["seconds"],
                                 "cost": summary.get("cost"), "letter_mass": summary["letter_mass"]}
                         for order, (lab, summary, seconds) in runs.items()},
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": args.threads, "cpu": platform.processor() or platform.machine()}}

    print(f"model {args.model_path}; {len(gold)} questions with a known path ({unmatched} known paths name no node; "
          f"{n_questions} questions labelled per order)")
    for order, r in result["orders"].items():
        cost = r["cost"] or {}
        print(f"\nchildren in {'the tree' if order == 'tree' else 'reversed'} order: {r['seconds']:.1f} s "
              f"({r['labelling_seconds']:.1f} s placing, model loaded), "
              f"{cost.get('prompts', '-')} labelling prompts ({fmt(cost.get('prompts_per_question'))} per question), "
              f"{cost.get('forward_passes', '-')} forward passes")
        print_levels(r["levels"])
    print("\nagreement of the two orders (same path down to the level): "
          + ", ".join(f"level {d}: {100 * result['agreement'][f'level_{d}']:.1f}%" for d in range(1, depth + 1)))
    results = ROOT / "bench" / "results" / (f"labelling_{args.name}.json" if args.name else "labelling.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Step B (and H), student_data_analyzer.py: per-node statistics of the student's answers over the ability tree.

A question counts at the node its ability path names and at every ancestor of that node, root
included. Correctness is recomputed from the reply's `pred_letter` against the answers file's
`answer_idx`; a null `pred_letter` (an unparsed reply) counts as wrong.

Smoothing. Every node's accuracy is shrunk toward its parent's smoothed accuracy by a Beta prior
of strength `s` (the prior is worth `s` pseudo-questions):

    smoothed(node) = (correct + s * smoothed(parent)) / (n + s)
    smoothed(root) = (correct + s * 0.5) / (n + s)      # the root's "parent" is 0.5
    weakness       = 1 - smoothed

The root shrinks toward 0.5 (a symmetric Beta(s/2, s/2) prior) rather than toward its own raw
accuracy, so one formula holds at every node and a root with no answers gets 0.5 instead of an
undefined value; the root usually has hundreds of answers, so the pull is negligible there.
A node with n = 0 inherits its parent's smoothed accuracy; raw `accuracy` is null when n = 0.

Intervals. Each node's raw accuracy comes with `ci95`, its 95% Wilson score interval on the raw
counts (`atkd.intervals`; null when n = 0): how far the measured accuracy may be from the true
one. The smoothed accuracy is the allocation's point estimate and is not bounded by it.

Paired comparisons. `per_question` lists every counted question (id, the node it counted at, and
whether it was answered right, as recomputed here), so that two measurements of the same
questions (the evaluation before and after an iteration) can be compared question by question
(the run report's McNemar test).

Nothing is dropped silently: questions without a reply or without an ability path, ability paths
that match no node, ids of the paths or replies file that the answers file does not know, null
predictions, letters that are not among the item's options, and replies whose `correct` field
disagrees with the recomputed one are each counted, listed (with example ids) in the stats and
logged as a warning.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .cli import INPUT, OUTPUT, StageConfig, at_least, setting
from .errors import InputError
from .intervals import wilson_interval
from .io import iter_jsonl, read_json
from .lifecycle import Outputs, run_stage
from .records import Question, load_ability_paths, load_questions, load_replies
from .tree import DEFAULT_ROOT, SCORE_KEYS, AbilityTree, Node, is_scored, tree_from_nested, tree_from_scored

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AnalyzerConfig(StageConfig):
    """student_data_analyzer.py: score the ability tree with the student's answers."""

    initial_tree_path: str = setting(role=INPUT, help="ability tree JSON (nested form, with or without the "
                                                      "domain key, or a scored tree)")
    paths_file: str = setting(role=INPUT, help='JSONL of {"id", "ability_path": [...]}')
    answers_file: str = setting(role=INPUT, help="the question JSONL with gold answer_idx")
    student_responses_file: str = setting(role=INPUT, help="inference.py replies JSONL (id, pred_letter)")
    output_tree_path: str = setting(role=OUTPUT, help="where the scored tree JSON goes")
    output_stats_path: str = setting(role=OUTPUT, help="where the stats JSON goes (main.py: summary.json beside the tree)")
    prior_strength: float = setting(4.0, check=at_least(0),
                                    help="Beta prior strength, in pseudo-questions: each node shrinks toward its "
                                         "parent (0 = raw accuracy)")
    domain: str | None = setting(None, help="root name for a tree file that lists level-1 abilities directly "
                                            "(default: the first element shared by all ability paths when it is "
                                            "not a level-1 node, else 'root')")

    version = 2  # 2: the stats (summary.json in main.py's runs) carry each node's ci95 and the per-question results

    def outputs(self) -> list[Path]:
        return [Path(self.output_tree_path), Path(self.output_stats_path)]

ROOT_PRIOR = 0.5  # the root's smoothed accuracy is shrunk toward this
EXAMPLE_IDS = 10  # ids listed per reported problem (the count is always complete)


# --------------------------------------------------------------------------- loading the tree

def level1_names_if_flat(obj) -> list[str] | None:
    """The top-level names when a nested tree file holds the level-1 nodes directly, else None.

    Mirrors `tree.tree_from_nested`: a file with one top-level key whose value is an object is
    rooted at that key (the domain); anything else lists the level-1 nodes.
    """
    if not isinstance(obj, dict) or is_scored(obj):
        return None
    keys = [k for k in obj if k not in SCORE_KEYS]
    if len(keys) == 1 and isinstance(obj[keys[0]], dict):
        return None
    return [str(k).strip() for k in keys]


def infer_domain(level1: list[str], ability_paths: dict[str, list[str]]) -> str:
    """The first element shared by every ability path when it is not a level-1 node, else "root"."""
    firsts = {p[0] for p in ability_paths.values() if p}
    if len(firsts) == 1:
        (first,) = firsts
        if first not in level1:
            return first
    return DEFAULT_ROOT


def tree_for_analysis(obj, source: str | Path, domain: str | None,
                      ability_paths: dict[str, list[str]]) -> AbilityTree:
    """The tree to score, from a nested or scored tree file's JSON (old stats are discarded)."""
    if is_scored(obj):
        tree = tree_from_scored(obj, source=source)
        for node in tree.nodes():
            node.stats = {}
        return tree
    level1 = level1_names_if_flat(obj)
    if level1 is not None and domain is None:
        domain = infer_domain(level1, ability_paths)
        log.info("the tree file lists level-1 abilities directly; root named %r (set --domain to change)", domain)
    return tree_from_nested(obj, domain=domain, source=source)


def line_of(path: str | Path, key: str) -> int | None:
    """The line of `path` that holds id `key` (only used to point an error message at a line)."""
    for lineno, obj in iter_jsonl(path):
        if str(obj.get("id")) == key:
            return lineno
    return None


# --------------------------------------------------------------------------- counting

@dataclass
class Analysis:
    """The scored tree plus every group of ids that was left out of (or flagged in) the counts."""

    tree: AbilityTree
    prior_strength: float
    unmatched_paths: "OrderedDict[tuple[str, ...], list[str]]" = field(default_factory=OrderedDict)
    path_ids_not_in_answers: list[str] = field(default_factory=list)
    questions_without_reply: list[str] = field(default_factory=list)
    replies_for_unknown_ids: list[str] = field(default_factory=list)
    questions_without_path: list[str] = field(default_factory=list)
    unparsed_replies: list[str] = field(default_factory=list)
    letters_not_in_options: list[str] = field(default_factory=list)
    correct_field_disagrees: list[str] = field(default_factory=list)
    counted: list[tuple[str, tuple[str, ...], bool]] = field(default_factory=list)  # (id, node path, correct)

    def problems(self) -> dict[str, tuple[list[str], str]]:
        """name -> (ids, what it means), for every reported group except unmatched paths."""
        return {
            "questions_without_reply": (self.questions_without_reply,
                                        "questions in the answers file with no reply: not counted"),
            "questions_without_path": (self.questions_without_path,
                                       "questions in the answers file with no ability path: not counted"),
            "path_ids_not_in_answers": (self.path_ids_not_in_answers,
                                        "ids in the paths file that the answers file does not have: ignored"),
            "replies_for_unknown_ids": (self.replies_for_unknown_ids,
                                        "replies whose id the answers file does not have: ignored"),
            "unparsed_replies": (self.unparsed_replies,
                                 "replies with a null pred_letter (unparsed): counted as wrong"),
            "letters_not_in_options": (self.letters_not_in_options,
                                       "replies whose pred_letter is not one of the item's options: counted as wrong"),
            "correct_field_disagrees": (self.correct_field_disagrees,
                                        "replies whose \"correct\" field disagrees with pred_letter vs answer_idx: "
                                        "the recomputed value is used"),
        }

    def log_warnings(self) -> None:
        for _name, (ids, meaning) in self.problems().items():
            if ids:
                log.warning("%d %s (e.g. ids %s)", len(ids), meaning, ", ".join(ids[:EXAMPLE_IDS]))
        if self.unmatched_paths:
            total = sum(len(v) for v in self.unmatched_paths.values())
            log.warning("%d questions carry %d ability paths that match no node of the tree: not counted",
                        total, len(self.unmatched_paths))
            for path, ids in self.unmatched_paths.items():
                log.warning("  unmatched path %s: %d questions (e.g. ids %s)", " > ".join(path), len(ids),
                            ", ".join(ids[:EXAMPLE_IDS]))

    def stats(self) -> dict:
        """The stats file's content (see the module docstring)."""
        root = self.tree.root.stats
        nodes = [node_stats(n) for n in self.tree.nodes()]
        leaves = [node_stats(n) for n in weakest_first(self.tree.leaves())]
        return {
            "domain": self.tree.domain,
            "prior_strength": self.prior_strength,
            "root_prior": ROOT_PRIOR,
            "scored": root["n"],
            "correct": root["correct"],
            "accuracy": root["accuracy"],
            "ci95": wilson_interval(root["correct"], root["n"]),
            "nodes": nodes,
            "leaves_weakest_first": leaves,
            "unmatched_paths": [{"path": list(p), "count": len(ids), "example_ids": ids[:EXAMPLE_IDS]}
                                for p, ids in sorted(self.unmatched_paths.items(), key=lambda kv: -len(kv[1]))],
            **{name: {"count": len(ids), "example_ids": ids[:EXAMPLE_IDS], "meaning": meaning}
               for name, (ids, meaning) in self.problems().items()},
            "per_question": [{"id": key, "path": list(path), "correct": correct}
                             for key, path, correct in self.counted],
        }


def node_stats(node: Node) -> dict:
    out = {"path": list(node.path)}
    out.update({k: node.stats.get(k) for k in ("n", "correct", "accuracy", "smoothed_accuracy", "weakness")})
    out["ci95"] = wilson_interval(node.stats.get("correct") or 0, node.stats.get("n") or 0)
    return out


def weakest_first(nodes: list[Node]) -> list[Node]:
    """Highest weakness first; ties keep tree order (sorted is stable)."""
    return sorted(nodes, key=lambda n: -n.stats["weakness"])


def pred_is_correct(reply: dict, q: Question, replies_path: str | Path, analysis: Analysis) -> bool:
    """pred_letter == answer_idx, noting null and out-of-range letters; a non-string is bad input."""
    pred = reply["pred_letter"]
    if pred is None:
        analysis.unparsed_replies.append(q.key)
        return False
    if not isinstance(pred, str):
        raise InputError(replies_path, f'"pred_letter" must be a letter or null, got {pred!r}',
                         line_of(replies_path, q.key))
    pred = pred.strip()
    if pred not in q.options:
        analysis.letters_not_in_options.append(q.key)
    return pred == q.answer_idx


def count_answers(tree: AbilityTree, questions: list[Question], paths: dict[str, list[str]],
                  replies: dict[str, dict], replies_path: str | Path, prior_strength: float) -> Analysis:
    """Fill n/correct at every node; collect every id that could not be counted, and why."""
    analysis = Analysis(tree=tree, prior_strength=prior_strength)
    for node in tree.nodes():
        node.stats = {"n": 0, "correct": 0}
    known = {q.key for q in questions}
    analysis.path_ids_not_in_answers = [k for k in paths if k not in known]
    analysis.replies_for_unknown_ids = [k for k in replies if k not in known]
    for q in questions:
        path = paths.get(q.key)
        reply = replies.get(q.key)
        node = tree.match(path) if path is not None else None
        if path is None:
            analysis.questions_without_path.append(q.key)
        elif node is None:
            analysis.unmatched_paths.setdefault(tuple(path), []).append(q.key)
        if reply is None:
            analysis.questions_without_reply.append(q.key)
            continue
        correct = pred_is_correct(reply, q, replies_path, analysis)
        if isinstance(reply.get("correct"), bool) and reply["correct"] != correct:
            analysis.correct_field_disagrees.append(q.key)
        if node is None:
            continue
        analysis.counted.append((q.key, node.path, correct))
        # The node and all its ancestors: every prefix of its path (root first).
        for depth in range(1, len(node.path) + 1):
            counted = tree.node(node.path[:depth])
            counted.stats["n"] += 1
            counted.stats["correct"] += int(correct)
    return analysis


def smooth(tree: AbilityTree, prior_strength: float) -> None:
    """accuracy, smoothed_accuracy and weakness at every node (formula in the module docstring)."""
    def visit(node: Node, prior: float) -> None:
        n, c = node.stats["n"], node.stats["correct"]
        node.stats["accuracy"] = c / n if n else None
        denom = n + prior_strength
        smoothed = (c + prior_strength * prior) / denom if denom > 0 else prior
        node.stats["smoothed_accuracy"] = smoothed
        node.stats["weakness"] = 1.0 - smoothed
        for child in node.children:
            visit(child, smoothed)
    visit(tree.root, ROOT_PRIOR)


def analyze(tree: AbilityTree, questions: list[Question], paths: dict[str, list[str]],
            replies: dict[str, dict], replies_path: str | Path, prior_strength: float) -> Analysis:
    """Counts, smoothed accuracies and weaknesses on `tree` (in place), plus the problem report."""
    analysis = count_answers(tree, questions, paths, replies, replies_path, prior_strength)
    smooth(tree, prior_strength)
    return analysis


def check_some_path_matches(tree: AbilityTree, paths: dict[str, list[str]], paths_file: str | Path) -> None:
    """No ability path matching the tree means the wrong tree (or root name): stop, it is bad input."""
    if any(tree.match(p) is not None for p in paths.values()):
        return
    first_key, first = next(iter(paths.items()))
    raise InputError(paths_file, f"no ability path matches a node of the tree rooted at {tree.domain!r} "
                                 f"(e.g. {' > '.join(first)}); wrong tree file or --domain?",
                     line_of(paths_file, first_key))


def run(cfg: AnalyzerConfig) -> dict | None:
    """Score the tree; write the scored tree and the stats (returned)."""
    return run_stage(cfg, lambda: analysis_of(cfg), scored_outputs)


def analysis_of(cfg: AnalyzerConfig) -> tuple[AnalyzerConfig, Analysis, int]:
    """Read and check every input; score the tree (no model: this is all the step computes)."""
    paths = load_ability_paths(cfg.paths_file)
    questions = load_questions(cfg.answers_file)
    replies = load_replies(cfg.student_responses_file)
    tree = tree_for_analysis(read_json(cfg.initial_tree_path), cfg.initial_tree_path, cfg.domain, paths)
    check_some_path_matches(tree, paths, cfg.paths_file)
    return cfg, analyze(tree, questions, paths, replies, cfg.student_responses_file, cfg.prior_strength), len(questions)


def scored_outputs(job: tuple[AnalyzerConfig, Analysis, int], _parts) -> Outputs:
    """The scored tree and the stats file (returned as the summary)."""
    cfg, analysis, n_questions = job
    analysis.log_warnings()
    stats = analysis.stats()
    log.info("scored %d of %d questions on %d nodes: accuracy %s", stats["scored"], n_questions,
             len(stats["nodes"]), "n/a" if stats["accuracy"] is None else f"{stats['accuracy']:.4f}")
    for leaf in stats["leaves_weakest_first"][:5]:
        log.info("  weak: %-50s n=%-4d weakness=%.3f", " > ".join(leaf["path"]), leaf["n"], leaf["weakness"])
    return Outputs(stats, {Path(cfg.output_tree_path): analysis.tree.to_scored(), Path(cfg.output_stats_path): stats})

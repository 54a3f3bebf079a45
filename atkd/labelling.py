"""label_abilities.py: a model (the teacher) places questions that come without ability paths in the tree.

Top down: at each level the model picks one child of the question's current node, and the question
moves there, until it reaches a leaf. The choice is an ordinary multiple-choice question
(`atkd.prompts.ability_question`: "which ability does this question test?", the children's names
as the options), answered exactly like any other (`atkd.answering`, score mode: the option-letter
probabilities at the answer position, one forward pass per length-sorted, left-padded batch).

Blind to the tree's order: a model prefers some option positions (an untrained or small one may pick
the first option whatever it says), so the order in which a tree file lists the children must not
decide the choice. The children are put in one canonical order (sorted by name), and the choice is
asked under several cyclic shifts (rotations) of that order: by default all k of them for k options,
so every child stands at every position once. A child's probability is its probability averaged over
the rotations (by child, not by letter); the child with the highest mean wins (ties: the first in
canonical order), and that mean is the choice's confidence. `--rotations n` asks n evenly spaced
shifts instead (cheaper; still independent of the tree's order, less of the position bias averaged
out). Cost: a choice among k children takes k labelling prompts (one row of a forward pass each)
instead of 1; the demo tree (4 areas of 3 leaves) 4 + 3 = 7 per question instead of 2.

Levels with more than 26 children (one option per letter A-Z): the children, in canonical order, are
cut into consecutive chunks of at most 26, as even as possible (30 children: two chunks of 15, so no
chunk is a near-walkover of a few names), the model picks within each chunk (under its rotations),
then among the chunk winners, again in canonical order (chunked again if there are still more than
26). Chunks and rounds depend only on the children's names. The level's confidence is the product
of the winner's mean probabilities in the rounds it won. A node with a single child is taken with
confidence 1, without asking.

Output: one line per question, in input order: `{"id", "ability_path": [level 1, ..., leaf],
"confidence": [p_level1, ..., p_leaf]}`, the path without the domain (every stage accepts paths
with or without it), `confidence[i]` the probability of the choice at level i+1. Beside it,
`summary.json`: per level, how many questions were placed and their confidence (mean,
quartiles, share below 0.5); the questions under each node; the letter mass (how much of its
probability the model put on the option letters at all); the cost (labelling prompts scored and
forward passes, resumed ones included).

Resume: the answers of every prompt go to one part log, keyed
`<question id>#<level>.<round>.<chunk>.<shift>`. A rerun recomputes each level's choices from the
answers logged and scores only the batches still missing; batches are planned over all of a round's
prompts before any is scored, so the output equals an uninterrupted run's, whatever the number of GPUs.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar

from . import paths
from .answering import Answerer, LoadedModel, answer_all, plan_batches, scoring_source
from .cli import INPUT, OUTPUT, StageConfig, at_least, lang, setting
from .errors import InputError
from .lifecycle import Outputs, Parts, run_stage
from .model_source import TREE_FLAGS, EndpointSettings
from .prompts import ABILITY_SEP, ability_question
from .records import LETTERS, Question, load_questions
from .tree import AbilityTree, Node, load_tree
from .workers import split_evenly

log = logging.getLogger(__name__)

MAX_CHOICES = len(LETTERS)  # options one question can offer: the letters A-Z
LOW_CONFIDENCE = 0.5  # the summary counts choices made with a probability below this


@dataclass(kw_only=True)
class LabelConfig(EndpointSettings, StageConfig):
    """label_abilities.py: place each question in the ability tree with a model, level by level."""

    version: ClassVar[int] = 2  # 2: children in canonical order, each choice asked under rotations of it
    model_path: str = TREE_FLAGS.setting("model_path", help="local Hugging Face model folder (the teacher), unless "
                                                            "--api_base is set")
    ability_tree_path: str = setting(role=INPUT, help="ability tree JSON (nested, with or without the domain "
                                                      "key, or a scored tree)")
    dataset_path: str = setting(role=INPUT, help="questions .jsonl to label (id, question, options, answer_idx)")
    output_path: str = setting(role=OUTPUT, help="ability paths .jsonl to write (summary.json goes beside it)")
    batch_size: int = setting(16, check=at_least(1), affects_output=False, help="questions per forward pass")
    rotations: int = setting(0, check=at_least(0),
                             help="option orders each choice among k children is asked in: 0 = all k cyclic shifts "
                                  "(every child at every position once; k prompts); n = n evenly spaced shifts")
    lang: str = lang()
    gpu_ids: list[int] = TREE_FLAGS.setting("gpu_ids")
    dtype: str = TREE_FLAGS.setting("dtype")
    trust_remote_code: bool = TREE_FLAGS.setting("trust_remote_code")

    def outputs(self) -> list[Path]:
        return [Path(self.output_path), paths.summary_path(self.output_path)]


@dataclass
class Placement:
    """One question on its way down the tree."""

    question: Question
    node: Node  # where it stands now
    confidence: list[float] = field(default_factory=list)  # one per level passed

    @property
    def path(self) -> list[str]:
        """The names chosen so far, below the root."""
        return list(self.node.path[1:])


# A round's questions -> every answer logged so far, by key (the scorer of `place_all`).
Ask = Callable[[list[Question], str], dict[str, dict]]


def chunks(candidates: list, limit: int = MAX_CHOICES) -> list[list]:
    """`candidates` cut into consecutive chunks of at most `limit`, sizes differing by at most one."""
    return split_evenly(candidates, math.ceil(len(candidates) / limit))


def canonical(running: list[tuple[Node, float]]) -> list[tuple[Node, float]]:
    """The candidates in the order every choice is asked from: by name, never the tree file's order."""
    return sorted(running, key=lambda c: c[0].name)


def rotation_shifts(k: int, rotations: int) -> list[int]:
    """The cyclic shifts a choice among k options is asked under: all k (0), or `rotations` evenly spaced."""
    n = k if rotations <= 0 else min(k, rotations)
    return [i * k // n for i in range(n)]  # distinct, since n <= k


def question_key(q: Question, level: int, round_: int, chunk: int, shift: int) -> str:
    # The suffix never holds "#", so a key splits back into one (id, level, round, chunk, shift) at its last "#".
    return f"{q.key}#{level}.{round_}.{chunk}.{shift}"


@dataclass
class Chunk:
    """Candidates still in the running (canonical order), each with the probability it has won with so
    far, and the labelling questions that pick among them: one per shift (none for a chunk of one)."""

    candidates: list[tuple[Node, float]]
    asked: list[tuple[int, Question]] = field(default_factory=list)  # (shift, question)


def rotated_question(p: Placement, names: list[str], shift: int, key: str, lang: str) -> Question:
    """The labelling question over `names` cyclically shifted left by `shift` (option A: names[shift])."""
    return replace(ability_question(p.question, names[shift:] + names[:shift], lang), id=key)


def round_chunks(p: Placement, running: list[tuple[Node, float]], level: int, round_: int, lang: str,
                 rotations: int) -> list[Chunk]:
    """One placement's chunks for this round, each with its labelling questions, one per rotation."""
    out = []
    for c, candidates in enumerate(chunks(canonical(running))):
        names = [child.name for child, _ in candidates]
        asked = [] if len(names) == 1 else [
            (s, rotated_question(p, names, s, question_key(p.question, level, round_, c, s), lang))
            for s in rotation_shifts(len(names), rotations)]
        out.append(Chunk(candidates, asked))
    return out


def mean_probs(chunk: Chunk, answers: dict[str, dict]) -> list[float]:
    """Each candidate's probability averaged over the chunk's rotations (candidate i stands at position
    (i - shift) mod k in the rotation by `shift`)."""
    k = len(chunk.candidates)
    sums = [0.0] * k
    for shift, mcq in chunk.asked:
        probs = answers[mcq.key]["option_probs"]
        for pos, letter in enumerate(LETTERS[:k]):
            sums[(pos + shift) % k] += probs[letter]
    return [total / len(chunk.asked) for total in sums]


def chunk_winner(chunk: Chunk, answers: dict[str, dict]) -> tuple[Node, float]:
    """The child with the highest mean probability (ties: the first in canonical order), with its
    probability so far times this round's mean."""
    if not chunk.asked:
        return chunk.candidates[0]
    means = mean_probs(chunk, answers)
    best = max(range(len(means)), key=lambda i: (means[i], -i))
    child, won = chunk.candidates[best]
    return child, won * means[best]


def choose_children(level_placements: list[Placement], level: int, lang: str, ask: Ask, rotations: int = 0) -> None:
    """Move every placement to one of its node's children (in place), asking round by round: each
    round picks within chunks of at most 26, until one child is left per placement."""
    running = [[(child, 1.0) for child in p.node.children] for p in level_placements]
    round_ = 0
    while any(len(r) > 1 for r in running):
        plans = [round_chunks(p, r, level, round_, lang, rotations) if len(r) > 1 else [Chunk(r)]
                 for p, r in zip(level_placements, running)]
        asked = [mcq for plan in plans for chunk in plan for _, mcq in chunk.asked]
        answers = ask(asked, f"labelling level {level}" + (f", round {round_ + 1}" if round_ else ""))
        running = [[chunk_winner(chunk, answers) for chunk in plan] for plan in plans]
        round_ += 1
    for p, ((child, prob),) in zip(level_placements, running):
        p.node = child
        p.confidence.append(prob)


def place_all(tree: AbilityTree, questions: list[Question], lang: str, ask: Ask, rotations: int = 0) -> list[Placement]:
    """Every question taken from the root down to a leaf, one level at a time."""
    placements = [Placement(question=q, node=tree.root) for q in questions]
    level = 1
    while moving := [p for p in placements if p.node.children]:
        choose_children(moving, level, lang, ask, rotations)
        level += 1
    return placements


def labelling_probe(tree: AbilityTree, questions: list[Question], lang: str) -> list[Question]:
    """The first labelling question asked (the first question's first choice among the root's children), or
    none: what an endpoint is asked once to see whether it gives the letters' log-probs."""
    if not questions:
        return []
    running = [(child, 1.0) for child in tree.root.children]
    chunks_ = round_chunks(Placement(question=questions[0], node=tree.root), running, 1, 0, lang, 0)
    return [mcq for chunk in chunks_ for _, mcq in chunk.asked][:1]


def label_records(placements: list[Placement]) -> list[dict]:
    return [{"id": p.question.id, "ability_path": p.path, "confidence": p.confidence} for p in placements]


def confidence_stats(values: list[float]) -> dict:
    """Mean, min, quartiles and the share below `LOW_CONFIDENCE` of one level's choice probabilities."""
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"placed": len(values), "mean": statistics.fmean(values), "min": min(values),
            "q1": quartiles[0], "median": quartiles[1], "q3": quartiles[2],
            "share_below_0.5": sum(v < LOW_CONFIDENCE for v in values) / len(values)}


def summarize(placements: list[Placement], tree: AbilityTree, letter_mass: dict, cost: dict, seconds: float,
              resumed: int, cfg: LabelConfig, lang: str) -> dict:
    """The summary file: confidence per level, questions per node, letter mass, cost, provenance."""
    depth = max(len(p.confidence) for p in placements)
    levels = [{"level": d + 1, **confidence_stats([p.confidence[d] for p in placements if len(p.confidence) > d])}
              for d in range(depth)]
    per_node = {ABILITY_SEP.join(n.path[1:]): 0 for n in tree.nodes()[1:]}
    for p in placements:
        for d in range(2, len(p.node.path) + 1):
            per_node[ABILITY_SEP.join(p.node.path[1:d])] += 1
    return {"n": len(placements), "levels": levels, "questions_per_node": per_node, "letter_mass": letter_mass,
            "cost": {**cost, "prompts_per_question": cost["prompts"] / len(placements), "rotations": cfg.rotations},
            "seconds": seconds, "resumed": resumed, "lang": lang, "model_path": cfg.model_path,
            "ability_tree_path": cfg.ability_tree_path, "dataset_path": cfg.dataset_path}


def run(cfg: LabelConfig) -> dict | None:
    """Label every question of the dataset; write the ability paths and the summary (returned).

    Every input is checked before anything is written (an `InputError` leaves no output and no
    parts folder). None when the outputs were already done.
    """
    return run_stage(cfg, lambda: check_inputs(cfg), labelled)


@dataclass
class LabelJob:
    cfg: LabelConfig
    questions: list[Question]
    tree: AbilityTree
    who: Answerer
    widest: int  # the most children of one node
    tokenizer: object  # None at an endpoint
    gpus: list[int]
    numbers: dict  # what the answers depend on beyond the settings (device type, dtype)
    where: str


def check_inputs(cfg: LabelConfig) -> LabelJob:
    """The dataset, the tree and the model (which must give the letters' probabilities)."""
    from .letters import letter_token_ids
    from .models import device_for, load_tokenizer, resolve_dtype, usable_gpu_ids
    from .prompts import language_of

    output = Path(cfg.output_path)
    if output.is_dir():
        raise InputError(output, "output path is a folder; give a .jsonl file name")
    questions = load_questions(cfg.dataset_path)
    tree = load_tree(cfg.ability_tree_path)
    source = TREE_FLAGS.of(cfg)
    source.check()
    who = Answerer.of(source, mode="score", lang=language_of(questions, cfg.lang))
    probe = next(iter(labelling_probe(tree, questions, who.lang)), None)
    source, who = scoring_source(source, who, probe, cfg.model_path)
    if who.mode != "score":
        raise InputError(source.name, "the server gives no letter log-probs, and labelling needs the teacher's "
                                      "probabilities: give the questions' ability paths, or a teacher folder")
    widest = max(len(n.children) for n in tree.nodes())
    if source.is_served:
        return LabelJob(cfg, questions, tree, who, widest, None, [], {}, source.name)
    gpus = usable_gpu_ids(cfg.gpu_ids)
    device = device_for(gpus[0] if gpus else None)
    tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code)
    letter_token_ids(tokenizer, list(LETTERS[:min(widest, MAX_CHOICES)]), who.lang, source=cfg.model_path)
    # Device type and dtype change the numbers: parts from a CPU run are not mixed into a GPU run.
    numbers = {"device_type": device.type, "dtype": str(resolve_dtype(cfg.dtype, device))}
    return LabelJob(cfg, questions, tree, who, widest, tokenizer, gpus, numbers, f"GPUs {gpus}" if gpus else "CPU")


def labelled(job: LabelJob, parts: Parts) -> Outputs:
    """Every question placed level by level (the model's answers resumed from the part log), and the summary."""
    from .scoring import letter_mass_summary

    cfg, who, tree = job.cfg, job.who, job.tree
    part_log = parts.log(cfg.output_path, extra=job.numbers)
    loaded, masses, resumed = LoadedModel(), [], 0
    cost = {"prompts": 0, "forward_passes": 0}  # labelling prompts scored, and the batches they went in

    def ask(mcqs: list[Question], desc: str) -> dict[str, dict]:
        nonlocal resumed
        batches = plan_batches(who, mcqs, cfg.batch_size, job.tokenizer)
        cost["prompts"] += len(mcqs)
        cost["forward_passes"] += len(batches)
        done, n_resumed = answer_all(who, mcqs, batches, job.gpus, part_log, desc, loaded)
        resumed += n_resumed
        masses.extend(done[q.key]["letter_mass"] for q in mcqs)
        return done

    log.info("labelling %d questions on a tree of %d leaves (widest node: %d children), language %s, on %s",
             len(job.questions), len(tree.leaves()), job.widest, who.lang, job.where)
    start = time.perf_counter()
    placements = place_all(tree, job.questions, who.lang, ask, cfg.rotations)
    loaded.release()
    summary = summarize(placements, tree, letter_mass_summary(masses, who.name), cost,
                        time.perf_counter() - start, resumed, cfg, who.lang)
    for level in summary["levels"]:
        log.info("level %d: %d placed, confidence mean %.3f, median %.3f, %.1f%% below %.1f", level["level"],
                 level["placed"], level["mean"], level["median"], 100 * level["share_below_0.5"], LOW_CONFIDENCE)
    log.info("%d labelling prompts (%.1f per question, every choice under %s), %d forward passes",
             cost["prompts"], summary["cost"]["prompts_per_question"],
             f"{cfg.rotations} rotations at most" if cfg.rotations else "every rotation", cost["forward_passes"])
    return Outputs(summary, {Path(cfg.output_path): label_records(placements),
                             paths.summary_path(cfg.output_path): summary})

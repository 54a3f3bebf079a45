"""Step C, generate_distill_data.py: the teacher writes new questions for the abilities where the student is weak.

The work is split so that everything random is decided once, in the main process, from `seed`:

1. `leaves_with_seeds` finds each leaf's seed questions (dataset questions labelled with it);
2. `make_tasks` draws the seeds of every prompt with an RNG keyed by (seed, leaf, round, slot),
   so the task list is the same in every process and every rerun (the reference drew seeds with
   an unseeded RNG before seeding, and its GPU workers disagreed on the tasks);
3. `make_batches` fixes each round's batches and a sampling seed per batch, so a batch that is
   regenerated after a kill gives exactly the text an uninterrupted run got;
4. the teacher (`atkd.model_source.ModelSource.texts`: a local model, one worker per GPU, or an
   HTTP endpoint) only turns batches into text;
5. `Acceptor` reads the texts in task order: strict parse, repeats of evaluation questions
   dropped (`atkd.leakage`, with --eval_dataset_path), near-duplicate check against the dataset
   and earlier accepted items, the options shuffled with a seeded RNG (`atkd.option_order`:
   options that name other options by letter or place keep the item's order, all/none of the
   above stays last).

`run_rounds` repeats 2-5 for leaves still short of their target, at most `max_retries` times;
`run` is the whole stage: allocation (`atkd.allocation`), rounds, generated.jsonl and its summary.json,
the plan (target, achieved, seeds and rejection reasons per leaf). A killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import paths
from .allocation import allocate, leaf_weakness
from .cli import INPUT, OUTPUT, Check, StageConfig, above, at_least, lang, setting
from .dedup import DEFAULT_THRESHOLD, NearDupIndex, features, rarest_first
from .errors import InputError
from .io import PartLog, iter_jsonl
from .lifecycle import Outputs, Parts, run_stage
from .leakage import EvalIndex
from .model_source import TEACHER_FLAGS, LocalModel, ModelSource, Prompt, PromptBatch
from .option_order import shuffle_options
from .qparse import parse_question
from .records import Question, load_ability_paths, load_questions
from .tree import AbilityTree, load_tree

log = logging.getLogger(__name__)

# A retry round asks for short / acceptance-rate prompts, but never more than this many per missing
# item, so a teacher that ignores the format costs at most 1 + 2 x max_retries times the budget.
MAX_OVERSAMPLE = 2.0


@dataclass
class LeafSeeds:
    """A leaf ability, its weakness and its seed questions: what allocation and prompts need."""

    index: int  # position among the tree's leaves (stable for a given tree)
    path: tuple[str, ...]  # from the root (the domain) down to this leaf
    weakness: float
    n: int | None  # questions the student answered under this leaf (scored trees), else None
    seeds: list[Question] = field(default_factory=list)  # in dataset order


@dataclass
class Task:
    """One prompt to the teacher: write a question for `leaf` from these seeds."""

    id: str  # "r<round>-l<leaf>-<slot>", unique within a run
    leaf: int
    round: int
    slot: int  # attempt number within the leaf, counted across rounds
    seed_ids: list[str]
    n_options: int
    user_text: str


@dataclass
class Batch:
    """Tasks generated together, with the sampler seed of that generate call."""

    round: int
    index: int
    seed: int
    tasks: list[Task]


@dataclass(kw_only=True)
class QuestionWritingConfig(StageConfig):
    """generate_distill_data.py: the teacher writes questions for the weak abilities."""

    version = 2  # 2: position-bound options keep their place; repeats of evaluation questions are dropped

    teacher_model_path: str = TEACHER_FLAGS.setting("model_path", help="teacher model folder (unless --api_base)")
    ability_tree_path: str = setting(role=INPUT, help="scored tree (B's tree.json) or a nested initial tree")
    full_dataset_path: str = setting(role=INPUT, help="question .jsonl the seeds come from")
    ability_class_path: str = setting(role=INPUT, help="ability paths .jsonl of those questions")
    output_path: str = setting(role=OUTPUT, help="generated questions .jsonl (summary.json, the plan, goes beside it)")
    eval_dataset_path: str = setting("", role=INPUT, help="evaluation questions .jsonl: generated questions that "
                                                          "repeat one (atkd/leakage.py) are dropped; empty: none")
    num_samples: int = setting(100, check=at_least(1), help="questions to generate in total")
    max_retries: int = setting(3, check=at_least(0), help="extra rounds for leaves short of their target")
    seed: int = setting(0, help="seed of seed-drawing, sampling and option shuffling")
    # Not `affects_output=False`: each batch is sampled with its own seed, so batching changes the text.
    batch_size: int = setting(16, check=at_least(1), help="prompts per generate call (each batch has its own seed)")
    temperature: float = setting(0.8, check=at_least(0), help="sampling temperature (0: greedy)")
    top_p: float = setting(0.95, check=Check(lambda v: 0 < v <= 1, "in (0, 1]"),
                           help="nucleus sampling mass (local models)")
    max_new_tokens: int = setting(512, check=at_least(1), help="reply length limit, in tokens")
    alloc_temperature: float = setting(1.0, check=above(0),
                                       help="share ~ weakness^(1/T): below 1 favours the weakest leaves, above 1 flattens")
    alloc_floor: int = setting(1, check=at_least(0), help="minimum samples for every leaf that has seeds")
    seeds_per_prompt: int = setting(3, check=at_least(0), help="example questions shown in each prompt")
    dedup_threshold: float = setting(DEFAULT_THRESHOLD, check=Check(lambda v: 0 < v <= 1, "in (0, 1]"),
                                     help="Jaccard similarity (word 1-2 grams) of stems and of option sets at "
                                          "which an item is a near-duplicate; 1: exact only")
    id_prefix: str = setting("gen", check=Check(lambda v: bool(v.strip()) and not any(c.isspace() for c in v),
                                                "non-empty, without spaces"),
                             help="ids are <prefix>-<leaf index>-<n>; use one prefix per iteration")
    lang: str = lang()
    domain: str | None = setting(None, help="domain name when the tree file has several top-level abilities")
    # where the teacher is (atkd.model_source)
    api_base: str = TEACHER_FLAGS.setting("api_base")
    api_model: str = TEACHER_FLAGS.setting("api_model", help="model name at --api_base")
    api_key_env: str = TEACHER_FLAGS.setting("api_key_env")
    api_concurrency: int = TEACHER_FLAGS.setting("api_concurrency")
    api_timeout_s: float = TEACHER_FLAGS.setting("api_timeout_s")
    api_max_attempts: int = TEACHER_FLAGS.setting("api_max_attempts")
    gpu_ids: list[int] = TEACHER_FLAGS.setting("gpu_ids")
    model_placement: str = TEACHER_FLAGS.setting("model_placement")
    dtype: str = TEACHER_FLAGS.setting("dtype")
    trust_remote_code: bool = TEACHER_FLAGS.setting("trust_remote_code")

    def problems(self) -> list[str]:
        return TEACHER_FLAGS.problems(self)

    @property
    def teacher(self) -> ModelSource:
        return TEACHER_FLAGS.of(self)

    def outputs(self) -> list[Path]:
        return [Path(self.output_path), paths.summary_path(self.output_path)]

    @property
    def teacher_name(self) -> str:
        return self.teacher.identity


# --------------------------------------------------------------------------- leaves and seeds

def leaves_with_seeds(tree: AbilityTree, questions: list[Question], ability_file: str | Path) -> list[LeafSeeds]:
    """Every leaf with its seed questions; an ability path naming no node is an `InputError`."""
    by_id = {q.key: q for q in questions}
    leaves = [LeafSeeds(index=i, path=node.path, weakness=leaf_weakness(node, tree), n=_count(node.stats.get("n")))
              for i, node in enumerate(tree.leaves())]
    leaf_of = {leaf.path: leaf for leaf in leaves}
    not_in_dataset = 0
    for lineno, obj in iter_jsonl(ability_file):
        path = obj.get("ability_path")
        node = tree.match(path) if isinstance(path, list) else None
        if node is None:
            raise InputError(ability_file, f"ability path {path!r} names no node of the ability tree "
                                           f"(root {tree.domain!r})", lineno)
        question = by_id.get(str(obj.get("id")))
        not_in_dataset += question is None
        if question is not None and node.path in leaf_of:
            leaf_of[node.path].seeds.append(question)
    if not_in_dataset:
        log.info("%d ability paths name ids that are not in the dataset (ignored)", not_in_dataset)
    order = {q.key: i for i, q in enumerate(questions)}
    for leaf in leaves:
        leaf.seeds.sort(key=lambda q: order[q.key])
    return leaves


def _count(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _rng(*parts) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, the same in every process and platform.
    return random.Random("|".join(str(p) for p in parts))


def draw_seeds(leaf: LeafSeeds, k: int, seed: int, round_: int, slot: int) -> list[Question]:
    """k seeds of the leaf for one prompt, from an RNG keyed by (seed, leaf, round, slot) alone."""
    rng = _rng(seed, "seeds", leaf.index, " > ".join(leaf.path), round_, slot)
    return rng.sample(leaf.seeds, min(k, len(leaf.seeds)))


def n_options_of(seeds: list[Question], default: int = 4) -> int:
    """The most common option count among the seeds (first seen wins a tie)."""
    if not seeds:
        return default
    return Counter(len(s.options) for s in seeds).most_common(1)[0][0]


# --------------------------------------------------------------------------- tasks and batches

def make_tasks(leaves: list[LeafSeeds], wanted: dict[int, int], first_slot: dict[int, int], round_: int,
               cfg: QuestionWritingConfig) -> list[Task]:
    """`wanted[leaf]` prompts per leaf for this round, in leaf order, slots continuing from `first_slot`."""
    from .prompts import write_question_user_text

    tasks = []
    for leaf in leaves:
        for slot in range(first_slot.get(leaf.index, 0), first_slot.get(leaf.index, 0) + wanted.get(leaf.index, 0)):
            seeds = draw_seeds(leaf, cfg.seeds_per_prompt, cfg.seed, round_, slot)
            n_opt = n_options_of(seeds or leaf.seeds[:1])
            text = write_question_user_text(leaf.path[1:], seeds, n_opt, cfg.lang, cfg.domain or leaf.path[0])
            tasks.append(Task(id=f"r{round_}-l{leaf.index}-{slot}", leaf=leaf.index, round=round_, slot=slot,
                              seed_ids=[s.key for s in seeds], n_options=n_opt, user_text=text))
    return tasks


def batch_seed(seed: int, round_: int, index: int) -> int:
    """The sampler seed of one batch (31 bits: every backend accepts it)."""
    digest = hashlib.sha256(f"{seed}|batch|{round_}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def make_batches(tasks: list[Task], batch_size: int, seed: int, round_: int) -> list[Batch]:
    """Length-sorted batches (by prompt characters, longest first: less padding, OOM shows early)."""
    order = sorted(range(len(tasks)), key=lambda i: (-len(tasks[i].user_text), i))
    return [Batch(round=round_, index=b, seed=batch_seed(seed, round_, b),
                  tasks=[tasks[i] for i in order[start:start + batch_size]])
            for b, start in enumerate(range(0, len(order), batch_size))]


# --------------------------------------------------------------------------- acceptance

@dataclass
class LeafTally:
    """Per-leaf outcome counts."""

    attempts: int = 0
    accepted: int = 0
    surplus: int = 0  # valid items written after the target was reached (a retry round oversamples)
    rejected: Counter = field(default_factory=Counter)


class Acceptor:
    """Turns teacher replies into records, in task order, keeping tallies for the plan."""

    def __init__(self, leaves: list[LeafSeeds], targets: list[int], cfg: QuestionWritingConfig, dataset: list[Question],
                 eval_questions: list[Question] = ()):
        self.leaves = {leaf.index: leaf for leaf in leaves}
        self.targets = targets
        self.cfg = cfg
        self.eval_index = EvalIndex(list(eval_questions), cfg.dedup_threshold) if eval_questions else None
        seeds = [features(q.question, q.options) for q in dataset]
        # Rare words first in the prefixes: the seeds are known up front (same result as any order, much faster).
        self.index = NearDupIndex(cfg.dedup_threshold, rarest_first(seeds))
        for q, feats in zip(dataset, seeds):
            self.index.add(feats, f"seed:{q.key}")
        self.tally = {leaf.index: LeafTally() for leaf in leaves}
        self.records: dict[int, list[dict]] = {leaf.index: [] for leaf in leaves}

    def take(self, task: Task, text: str | None) -> str | None:
        """Accept or reject one reply; returns the rejection reason (None when accepted or surplus)."""
        tally = self.tally[task.leaf]
        tally.attempts += 1
        item, reason = parse_question(text or "")
        if item is None:
            tally.rejected[reason] += 1
            return reason
        if self.eval_index is not None and self.eval_index.repeat_of(
                task.id, item["question"], item["options"], item["answer_idx"]) is not None:
            tally.rejected["near_duplicate_eval"] += 1
            return "near_duplicate_eval"
        feats = features(item["question"], item["options"])
        label, _ = self.index.most_similar(feats)
        if label is not None:
            reason = "near_duplicate_seed" if label.startswith("seed:") else "near_duplicate_generated"
            tally.rejected[reason] += 1
            return reason
        if tally.accepted >= self.targets[task.leaf]:
            tally.surplus += 1
            return None
        options, answer = shuffle_options(item, _rng(self.cfg.seed, "shuffle", task.id))
        leaf = self.leaves[task.leaf]
        record = {"id": f"{self.cfg.id_prefix}-{leaf.index}-{tally.accepted}", "question": item["question"],
                  "options": options, "answer_idx": answer,
                  "meta_info": {"source": "generated", "task": task.id},
                  "ability_path": list(leaf.path), "generated_from_seed": list(task.seed_ids),
                  "teacher": self.cfg.teacher_name}
        self.index.add(feats, f"gen:{record['id']}")
        self.records[task.leaf].append(record)
        tally.accepted += 1
        return None

    def short(self) -> dict[int, int]:
        """Missing items per leaf that still has a shortfall."""
        return {i: self.targets[i] - t.accepted for i, t in self.tally.items() if t.accepted < self.targets[i]}

    def all_records(self) -> list[dict]:
        """Accepted records, leaf by leaf in tree order, each leaf's in acceptance order."""
        return [r for i in sorted(self.records) for r in self.records[i]]


def prompts_for_round(acc: Acceptor, round_: int) -> dict[int, int]:
    """How many prompts each short leaf gets this round.

    Round 0 asks for exactly the target. A retry asks for `missing / rate`, where `rate` is the
    leaf's acceptance rate so far, capped at MAX_OVERSAMPLE x missing.
    """
    wanted = {}
    for i, missing in acc.short().items():
        t = acc.tally[i]
        if round_ == 0 or t.attempts == 0:
            wanted[i] = missing
        else:
            rate = t.accepted / t.attempts
            wanted[i] = math.ceil(missing / max(rate, 1.0 / MAX_OVERSAMPLE))
    return wanted


Produce = Callable[[int, list[Batch]], dict[str, str]]


def run_rounds(leaves: list[LeafSeeds], targets: list[int], cfg: QuestionWritingConfig, dataset: list[Question],
               produce: Produce, eval_questions: list[Question] = ()) -> tuple[Acceptor, int]:
    """Generate, accept, and retry leaves short of target; returns the acceptor and rounds run.

    `produce(round, batches)` returns the teacher's text for every task of those batches by task
    id (a local model, an HTTP endpoint, or a part log of an interrupted run).
    """
    acc = Acceptor(leaves, targets, cfg, dataset, eval_questions)
    next_slot: dict[int, int] = {}
    rounds = 0
    for round_ in range(cfg.max_retries + 1):
        wanted = prompts_for_round(acc, round_)
        if not wanted:
            break
        tasks = make_tasks(leaves, wanted, next_slot, round_, cfg)
        for i, n in wanted.items():
            next_slot[i] = next_slot.get(i, 0) + n
        if round_ > 0:
            log.info("retry %d/%d: %d prompts for %d leaves short of target", round_, cfg.max_retries,
                     len(tasks), len(wanted))
        texts = produce(round_, make_batches(tasks, cfg.batch_size, cfg.seed, round_))
        for task in tasks:
            acc.take(task, texts.get(task.id))
        rounds += 1
    return acc, rounds


# --------------------------------------------------------------------------- the plan file

def plan_report(leaves: list[LeafSeeds], targets: list[int], acc: Acceptor | None, total: int, rounds: int,
                allocation: dict) -> dict:
    """The plan (summary.json): per leaf target / achieved / seeds / weakness / rejections, and totals."""
    rows, rejected = [], Counter()
    for leaf, target in zip(leaves, targets):
        t = acc.tally[leaf.index] if acc is not None else LeafTally()
        rejected.update(t.rejected)
        row = {"path": list(leaf.path), "weakness": round(leaf.weakness, 6), "n_answered": leaf.n,
               "seeds_available": len(leaf.seeds), "target": target, "achieved": t.accepted,
               "attempts": t.attempts, "surplus": t.surplus, "rejected": dict(sorted(t.rejected.items()))}
        if not leaf.seeds:
            row["note"] = "no seed questions for this leaf: nothing generated"
        elif t.accepted < target:
            row["note"] = f"short by {target - t.accepted} after {rounds} round(s)"
        rows.append(row)
    achieved = sum(r["achieved"] for r in rows)
    attempts = sum(r["attempts"] for r in rows)
    return {
        "num_samples": total, "achieved": achieved, "shortfall": total - achieved,
        "attempts": attempts, "acceptance_rate": round(achieved / attempts, 4) if attempts else None,
        "rounds": rounds, "surplus": sum(r["surplus"] for r in rows),
        "rejected": dict(sorted(rejected.items())),
        "allocation": allocation,
        "leaves_without_seeds": [r["path"] for r in rows if not r["seeds_available"]],
        "leaves": rows,
    }


# --------------------------------------------------------------------------- the teacher

def teacher_producer(teacher: ModelSource, cfg: QuestionWritingConfig, part_log: PartLog, local: LocalModel,
                     workers: list[int]) -> Produce:
    """A `produce` that sends a round's batches through the teacher (`ModelSource.texts`), skipping the
    work already in the part log. A local batch is one generate call with its batch's seed; at an
    endpoint each task is its own request, seeded with its batch's seed + its place in the batch, so
    its seed alone fixes its text. Without a chat template a local prompt ends with the format's first
    label, so the model starts writing the question itself (the label is put back in front of the reply)."""
    from .prompts import LABELS

    def produce(round_: int, batches: list[Batch]) -> dict[str, str]:
        prompts = [PromptBatch([Prompt(t.id, t.user_text, b.seed + i) for i, t in enumerate(b.tasks)], seed=b.seed,
                               cue=LABELS[cfg.lang].question) for b in batches]
        return teacher.texts(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, part_log=part_log, local=local, workers=workers,
                             desc=f"writing questions (round {round_})")

    return produce


# --------------------------------------------------------------------------- the stage

def run(cfg: QuestionWritingConfig) -> dict | None:
    """Allocate, write, accept; write generated.jsonl and the plan, summary.json (returned)."""
    return run_stage(cfg, lambda: check_inputs(cfg), written_questions)


@dataclass
class WriteJob:
    cfg: QuestionWritingConfig  # with the language and the domain resolved
    leaves: list[LeafSeeds]
    dataset: list[Question]
    eval_questions: list[Question]
    workers: list[int]
    spread: list[int]


def check_inputs(cfg: QuestionWritingConfig) -> WriteJob:
    """The teacher's settings, the tree, the dataset and its ability paths, the evaluation set."""
    from .prompts import language_of

    cfg.teacher.check()
    tree = load_tree(cfg.ability_tree_path, domain=cfg.domain)
    dataset = load_questions(cfg.full_dataset_path)
    load_ability_paths(cfg.ability_class_path)  # field and duplicate-id checks, with line numbers
    eval_questions = load_questions(cfg.eval_dataset_path) if cfg.eval_dataset_path else []
    leaves = leaves_with_seeds(tree, dataset, cfg.ability_class_path)
    if not any(leaf.seeds for leaf in leaves):
        raise InputError(cfg.ability_class_path, "no question of the dataset is labelled with a leaf of "
                                                 "the ability tree: there is nothing to write from")
    workers, spread = cfg.teacher.placement()
    return WriteJob(replace(cfg, lang=language_of(dataset, cfg.lang), domain=tree.domain), leaves, dataset,
                    eval_questions, workers, spread)


def written_questions(job: WriteJob, parts: Parts) -> Outputs:
    """The samples allocated over the leaves, written by the teacher (its replies resumed from the part log)
    and accepted round by round; the plan (summary)."""
    cfg, leaves = job.cfg, job.leaves
    alloc = allocate([leaf.weakness for leaf in leaves], [len(leaf.seeds) for leaf in leaves],
                     cfg.num_samples, cfg.alloc_temperature, cfg.alloc_floor)
    allocation = {"rule": "share ~ weakness^(1/temperature), floor for leaves with seeds, largest remainder",
                  "temperature": cfg.alloc_temperature, "floor": cfg.alloc_floor, "floor_used": alloc.floor_used}
    if alloc.floor_used < cfg.alloc_floor:
        log.warning("--num_samples %d is too small to give %d to each of %d leaves with seeds; floor %d used",
                    cfg.num_samples, cfg.alloc_floor, sum(bool(leaf.seeds) for leaf in leaves), alloc.floor_used)
    for leaf, target in zip(leaves, alloc.targets):
        log.info("%-60s weakness %.3f  seeds %4d  target %d", " > ".join(leaf.path), leaf.weakness,
                 len(leaf.seeds), target)

    part_log = parts.log(cfg.output_path)
    part_log.open()
    teacher = cfg.teacher
    local = LocalModel(teacher, job.spread)  # loaded once, kept over the rounds
    acc, rounds = run_rounds(leaves, alloc.targets, cfg, job.dataset,
                             teacher_producer(teacher, cfg, part_log, local, job.workers), job.eval_questions)
    local.release()

    plan = plan_report(leaves, alloc.targets, acc, cfg.num_samples, rounds, allocation)
    log.info("%d of %d questions written (acceptance rate %s; rejected: %s)", plan["achieved"],
             cfg.num_samples, plan["acceptance_rate"], plan["rejected"] or "none")
    if plan["shortfall"]:
        log.warning("short by %d questions after %d round(s): see %s", plan["shortfall"], rounds,
                    paths.summary_path(cfg.output_path))
    return Outputs(plan, {Path(cfg.output_path): acc.all_records(), paths.summary_path(cfg.output_path): plan})

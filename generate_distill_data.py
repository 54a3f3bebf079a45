"""Step C: the teacher writes new questions for the abilities where the student is weak.

    python generate_distill_data.py --teacher_model_path models/teacher \
        --ability_tree_path output/workflow/iteration_1/B_student_tree/tree.json \
        --full_dataset_path data/demo/train_1.jsonl --ability_class_path data/demo/paths_1.jsonl \
        --output_path output/workflow/iteration_1/C_distill_data/generated.jsonl --num_samples 100

Samples are allocated over the leaves in proportion to weakness (atkd/allocation.py); each prompt
shows a few seed questions of the leaf; replies are parsed strictly, near-duplicates dropped, the
correct option's position shuffled, and short leaves retried at most --max_retries times.
Writes generated.jsonl and plan.json (target, achieved, seeds and rejection reasons per leaf).
A killed run resumes where it stopped when rerun with the same arguments.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("generate_distill_data")


def build_parser() -> argparse.ArgumentParser:
    from atkd.dedup import DEFAULT_THRESHOLD
    from atkd.stage import add_common_model_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher_model_path", default="", help="teacher model folder (unless --api_base)")
    p.add_argument("--ability_tree_path", required=True, help="scored tree (B's tree.json) or a nested initial tree")
    p.add_argument("--full_dataset_path", required=True, help="question .jsonl the seeds come from")
    p.add_argument("--ability_class_path", required=True, help="ability paths .jsonl of those questions")
    p.add_argument("--output_path", required=True, help="generated questions .jsonl (plan.json goes beside it)")
    p.add_argument("--num_samples", type=int, default=100, help="questions to generate in total")
    p.add_argument("--max_retries", type=int, default=3, help="extra rounds for leaves short of their target")
    p.add_argument("--seed", type=int, default=0, help="seed of seed-drawing, sampling and option shuffling")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass (local models)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="reply length limit, in tokens")
    p.add_argument("--alloc_temperature", type=float, default=1.0,
                   help="share ~ weakness^(1/T): below 1 favours the weakest leaves, above 1 flattens")
    p.add_argument("--alloc_floor", type=int, default=1, help="minimum samples for every leaf that has seeds")
    p.add_argument("--seeds_per_prompt", type=int, default=3, help="example questions shown in each prompt")
    p.add_argument("--dedup_threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="Jaccard similarity (word 1-2 grams) at which an item is a near-duplicate; 1: exact only")
    p.add_argument("--id_prefix", default="gen", help="ids are <prefix>-<leaf index>-<n>; use one prefix per iteration")
    p.add_argument("--lang", default="auto", choices=["auto", "en", "zh"], help="prompt language (auto: from the data)")
    p.add_argument("--domain", default=None, help="domain name when the tree file has several top-level abilities")
    p.add_argument("--api_base", default="", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api_model", default="", help="model name at --api_base")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    add_common_model_flags(p)
    return p


def check_args(args) -> None:
    from atkd.errors import InputError
    from atkd.models import check_model_dir

    rules = [(args.num_samples >= 1, "--num_samples must be at least 1"),
             (args.max_retries >= 0, "--max_retries must be >= 0"),
             (args.batch_size >= 1, "--batch_size must be at least 1"),
             (args.temperature >= 0, "--temperature must be >= 0"),
             (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
             (args.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
             (args.alloc_temperature > 0, "--alloc_temperature must be > 0"),
             (args.alloc_floor >= 0, "--alloc_floor must be >= 0"),
             (args.seeds_per_prompt >= 0, "--seeds_per_prompt must be >= 0"),
             (0 < args.dedup_threshold <= 1, "--dedup_threshold must be in (0, 1]"),
             (bool(args.id_prefix.strip()) and not any(c.isspace() for c in args.id_prefix),
              "--id_prefix must be non-empty, without spaces")]
    for ok, problem in rules:
        if not ok:
            raise InputError(None, problem)
    if args.api_base:
        if not args.api_model:
            raise InputError(None, "--api_base needs --api_model")
    elif not args.teacher_model_path:
        raise InputError(None, "give --teacher_model_path (or --api_base and --api_model)")
    else:
        check_model_dir(args.teacher_model_path)


def fingerprint(args) -> dict:
    """What decides the generated text: the arguments and the inputs' identity, not where the teacher
    runs (GPUs, endpoint URL: a server restarted on another port still resumes the run)."""
    fp = {k: v for k, v in vars(args).items() if k not in ("gpu_ids", "api_base", "api_key_env")}
    for name in ("ability_tree_path", "full_dataset_path", "ability_class_path"):
        st = os.stat(getattr(args, name))
        fp[name + "_stat"] = [st.st_size, st.st_mtime_ns]
    return fp


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from atkd import distill, paths
    from atkd.allocation import allocate
    from atkd.errors import InputError, exit_on_input_error
    from atkd.io import PartLog, write_json, write_jsonl
    from atkd.models import parse_gpu_ids, set_quiet_env, usable_gpu_ids
    from atkd.prompts import language_of
    from atkd.records import load_ability_paths, load_questions
    from atkd.stage import record_args, setup_logging
    from atkd.tree import load_tree

    setup_logging()
    set_quiet_env()
    with exit_on_input_error():
        check_args(args)
        gpu_ids = usable_gpu_ids(parse_gpu_ids(args.gpu_ids))
        tree = load_tree(args.ability_tree_path, domain=args.domain)
        dataset = load_questions(args.full_dataset_path)
        load_ability_paths(args.ability_class_path)  # field and duplicate-id checks, with line numbers
        leaves = distill.leaves_with_seeds(tree, dataset, args.ability_class_path)
        if not any(leaf.seeds for leaf in leaves):
            raise InputError(args.ability_class_path, "no question of the dataset is labelled with a leaf of "
                                                      "the ability tree: there is nothing to write from")
        lang = language_of(dataset, args.lang)

        alloc = allocate([leaf.weakness for leaf in leaves], [len(leaf.seeds) for leaf in leaves],
                         args.num_samples, args.alloc_temperature, args.alloc_floor)
        allocation = {"rule": "share ~ weakness^(1/temperature), floor for leaves with seeds, largest remainder",
                      "temperature": args.alloc_temperature, "floor": args.alloc_floor,
                      "floor_used": alloc.floor_used}
        if alloc.floor_used < args.alloc_floor:
            log.warning("--num_samples %d is too small to give %d to each of %d leaves with seeds; floor %d used",
                        args.num_samples, args.alloc_floor, sum(bool(leaf.seeds) for leaf in leaves), alloc.floor_used)
        for leaf, target in zip(leaves, alloc.targets):
            log.info("%-60s weakness %.3f  seeds %4d  target %d", " > ".join(leaf.path), leaf.weakness,
                     len(leaf.seeds), target)

        teacher_name = args.api_model if args.api_base else args.teacher_model_path
        cfg = distill.DistillConfig(seed=args.seed, seeds_per_prompt=args.seeds_per_prompt,
                                    batch_size=args.batch_size, max_retries=args.max_retries,
                                    dedup_threshold=args.dedup_threshold, lang=lang, domain=tree.domain,
                                    id_prefix=args.id_prefix, teacher=teacher_name)
        teacher = distill.TeacherConfig(model_path=args.teacher_model_path, api_base=args.api_base,
                                        api_model=args.api_model, api_key_env=args.api_key_env, dtype=args.dtype,
                                        trust_remote_code=args.trust_remote_code,
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_p=args.top_p, lang=lang)
        part_log = PartLog(args.output_path, fingerprint(args))
        part_log.open()
        produce = distill.part_log_producer(part_log, gpu_ids, teacher)
        acc, rounds = distill.run_rounds(leaves, alloc.targets, cfg, dataset, produce)
        distill.release_teacher()

        records = acc.all_records()
        plan = distill.plan_report(leaves, alloc.targets, acc, args.num_samples, rounds, allocation)
        write_jsonl(args.output_path, records)
        write_json(paths.plan_path(args.output_path), plan)
        record_args(args, args.output_path)
        part_log.remove()
    log.info("wrote %d of %d questions to %s (acceptance rate %s; rejected: %s)", plan["achieved"],
             args.num_samples, args.output_path, plan["acceptance_rate"], plan["rejected"] or "none")
    if plan["shortfall"]:
        log.warning("short by %d questions after %d round(s): see %s", plan["shortfall"], rounds,
                    paths.plan_path(args.output_path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

r"""Convert a public medical multiple-choice dataset to AT-KD's question and ability-path files.

    python data/convert.py --format medmcqa --input medmcqa/train.json medmcqa/dev.json \
        --output_dir data/medmcqa --iterations 2 --eval_fraction 0.1 --seed 0

Formats: medqa, medmcqa, cmexam, mmlu, cmmlu (their published layouts, see atkd/convert/datasets.py) and
jsonl / csv (any layout, fields named by flags, e.g. `--format csv --question_field stem
--option_fields A,B,C,D --answer_field key --answer_format letter --path_fields chapter,section`).

Writes DIR/questions.jsonl, DIR/ability_paths.jsonl and DIR/ability_tree.json (the tree of the
categories, when the source has them) and DIR/convert_report.json (rows kept, rows dropped by
reason, per file); prints the same counts.
With --iterations N it also writes DIR/iteration_1.jsonl ... iteration_N.jsonl and DIR/eval.jsonl
(with their *_ability_paths.jsonl): a seeded, disjoint split stratified by ability path, ready for
main.py's --dataset_files_per_iteration and --eval_dataset_path.

Rows that are not one clean single-answer question (no answer, several answers, an answer not
among the options, an empty or repeated option) are dropped and counted. Options repeat when they
are the same text after Unicode NFKC with spaces and a final period removed; case counts ("GG",
"gg" and "Gg" are three options). A file that cannot be read
as its format stops the conversion with `error: <file>:<line>: <problem>` (exit status 2) before
anything is written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from atkd.cli import setup_logging
from atkd.convert import conversion, datasets
from atkd.convert.splitting import split_questions
from atkd.errors import InputError, exit_on_input_error
from atkd.io import write_json, write_jsonl

log = logging.getLogger("convert")

GENERIC_FLAGS = ("question_field", "option_fields", "options_field", "answer_field", "answer_format",
                 "id_field", "path_fields", "explanation_field")
DEFAULT_EVAL_FRACTION, DEFAULT_SEED = 0.1, 0


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=conversion.FORMATS, help="layout of the input files")
    p.add_argument("--input", required=True, nargs="+", help="input files (one format, any number)")
    p.add_argument("--output_dir", required=True, help="folder for questions.jsonl and the other outputs")

    g = p.add_argument_group("medmcqa")
    g.add_argument("--cop_base", type=int, choices=(0, 1), default=None,
                   help="cop counts options from 0 (Hugging Face copies) or 1 (original release); "
                        "default: read from the data (a 0 means 0-based, a 4 means 1-based)")
    g = p.add_argument_group("cmexam")
    g.add_argument("--path_columns", type=comma_list, default=None,
                   help="category columns that make the ability path, in order, comma-separated (default "
                        f"{','.join(datasets.CMEXAM_DEFAULT_PATH_COLUMNS)}; e.g. "
                        "'Medical Discipline,Clinical Department' for two levels)")

    g = p.add_argument_group("jsonl / csv (generic)")
    g.add_argument("--question_field", default=None, help="field with the question text (default question)")
    g.add_argument("--option_fields", type=comma_list, default=None,
                   help="one field per option, in order, comma-separated, e.g. A,B,C,D")
    g.add_argument("--options_field", default=None,
                   help='one field with all options: {"A": ...}, a list, or "A xxx" lines')
    g.add_argument("--answer_field", default=None, help="field with the answer (default answer)")
    g.add_argument("--answer_format", default=None, choices=datasets.ANSWER_FORMATS,
                   help="letter (A), index0 (0 = first option), index1 (1 = first option) or text "
                        "(the correct option's text); default letter")
    g.add_argument("--id_field", default=None, help="field with unique ids (default: <format>-<file>-<line>)")
    g.add_argument("--path_fields", type=comma_list, default=None,
                   help="fields that make the ability path, in order, comma-separated")
    g.add_argument("--explanation_field", default=None, help="field kept as the record's explanation")

    g = p.add_argument_group("split")
    g.add_argument("--iterations", type=int, default=None,
                   help="also split into iteration_1..N.jsonl and eval.jsonl (default: no split)")
    g.add_argument("--eval_fraction", type=float, default=None,
                   help=f"share of the questions in eval.jsonl (default {DEFAULT_EVAL_FRACTION})")
    g.add_argument("--seed", type=int, default=None, help=f"seed of the split (default {DEFAULT_SEED})")
    args = p.parse_args(argv)
    check_flag_use(p, args)
    return args


def check_flag_use(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flags that the chosen format would silently ignore."""
    if args.cop_base is not None and args.format != "medmcqa":
        p.error("--cop_base applies to --format medmcqa only")
    if args.path_columns is not None and args.format != "cmexam":
        p.error("--path_columns applies to --format cmexam only")
    generic_given = [f"--{f}" for f in GENERIC_FLAGS if getattr(args, f) is not None]
    if args.format not in ("jsonl", "csv"):
        if generic_given:
            p.error(f"{', '.join(generic_given)} apply to --format jsonl or csv only")
    elif (args.option_fields is None) == (args.options_field is None):
        p.error(f"--format {args.format} needs exactly one of --option_fields and --options_field")
    if args.iterations is None and (args.eval_fraction is not None or args.seed is not None):
        p.error("--eval_fraction and --seed apply to the split: give --iterations too")
    args.eval_fraction = DEFAULT_EVAL_FRACTION if args.eval_fraction is None else args.eval_fraction
    args.seed = DEFAULT_SEED if args.seed is None else args.seed


def mapping_of(args: argparse.Namespace) -> datasets.FieldMapping:
    return datasets.FieldMapping(
        question=args.question_field or "question", option_fields=args.option_fields or [],
        options_field=args.options_field, answer=args.answer_field or "answer",
        answer_format=args.answer_format or "letter", id_field=args.id_field,
        path_fields=args.path_fields or [], explanation=args.explanation_field)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    out_dir = Path(args.output_dir)
    with exit_on_input_error():
        # Everything is read and checked before the first file is written.
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(out_dir, "--output_dir is a file, not a folder")
        generic = mapping_of(args) if args.format in ("jsonl", "csv") else None
        conv = conversion.read_format(args.format, args.input, args.cop_base, args.path_columns, generic)
        if not conv.records:
            raise InputError(args.input[0], f"no usable question in the input ({sum(conv.dropped.values())} rows "
                                            f"dropped: {dict(conv.dropped)})")
        split = None
        if args.iterations is not None:
            split = split_questions(conv.records, conv.paths, args.iterations, args.eval_fraction, args.seed)
    if conv.paths and len(conv.paths) < len(conv.records):
        log.warning("%d of %d questions have no ability path (empty category); they are in questions.jsonl "
                    "but not in ability_paths.jsonl", len(conv.records) - len(conv.paths), len(conv.records))
    files = conversion.planned_files(conv, split)
    split_settings = None if args.iterations is None else {"iterations": args.iterations,
                                                           "eval_fraction": args.eval_fraction, "seed": args.seed}
    tree = conversion.tree_of(conv.records, conv.paths) if conv.paths else None
    report = conversion.report_of(args.format, args.input, conv, files, split_settings, tree, vars(args))
    for name, lines in files.items():
        write_jsonl(out_dir / name, lines)
    if tree is not None:
        write_json(out_dir / conversion.TREE_FILE, tree)
        if len(tree) == 1:  # one top key reads as the domain: main.py asks for DOMAIN = that name
            log.warning("every question is under %r: %s has one top key, which main.py reads as the domain",
                        next(iter(tree)), conversion.TREE_FILE)
    write_json(out_dir / conversion.REPORT_FILE, report)
    stale = sorted(p.name for p in out_dir.glob("*.jsonl") if p.name not in files)
    if stale:  # from an earlier run with other settings; left alone, but they would mislead
        log.warning("%s also holds %s, not written by this run", out_dir, ", ".join(stale))
    print("\n".join(conversion.summary_lines(report, out_dir)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

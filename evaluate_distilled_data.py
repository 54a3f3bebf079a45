"""Step D: two agent models answer every generated question; keep those both answer as labelled.

    python evaluate_distilled_data.py --agent_model_1_path models/agent_a --agent_model_2_path models/agent_b \
        --input_file output/workflow/iteration_1/C_distill_data/generated.jsonl \
        --output_file output/workflow/iteration_1/D_validated_data/validated.jsonl

Agents are run one after the other (one model in memory at a time), in score mode from their
option-letter logits by default, or with --mode generate from a chain-of-thought reply (local
models or OpenAI-compatible endpoints). Writes validated.jsonl (kept items with both agents'
answers), rejected.jsonl (with the reason) and report.json (pass rate overall, per leaf, per
reason). Using one model for both agents is allowed but flagged in the report and the log.
A killed run resumes per agent: answers already written are kept (each agent's own log).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from pathlib import Path

log = logging.getLogger("evaluate_distilled_data")


def build_parser() -> argparse.ArgumentParser:
    from atkd.stage import add_common_model_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--agent_model_1_path", default="", help="first agent's model folder")
    p.add_argument("--agent_model_2_path", default="", help="second agent's model folder (a different model)")
    p.add_argument("--input_file", required=True, help="generated questions .jsonl (step C)")
    p.add_argument("--output_file", required=True, help="kept questions .jsonl (report.json, rejected.jsonl beside it)")
    p.add_argument("--mode", default="score", choices=["score", "generate"],
                   help="score: option-letter logits (batched); generate: chain-of-thought reply, letter extracted")
    p.add_argument("--min_confidence", type=float, default=0.0,
                   help="score mode: both agents must give the labelled answer at least this probability (0: off)")
    p.add_argument("--batch_size", type=int, default=16, help="questions per forward pass / generate call")
    p.add_argument("--max_new_tokens", type=int, default=256, help="generate mode: reply length limit, in tokens")
    p.add_argument("--lang", default="auto", choices=["auto", "en", "zh"], help="prompt language (auto: from the data)")
    for n in (1, 2):
        p.add_argument(f"--agent_{n}_api_base", default="",
                       help=f"generate mode: agent {n} at this OpenAI-compatible endpoint instead of a folder")
        p.add_argument(f"--agent_{n}_api_model", default="", help=f"model name of agent {n} at its endpoint")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    add_common_model_flags(p)
    return p


def agent_configs(args, lang: str):
    """Both agents' settings, checked; bad settings raise `InputError`."""
    from atkd.errors import InputError
    from atkd.models import check_model_dir
    from atkd.validation import AgentConfig

    agents = []
    for n in (1, 2):
        folder, base, name = (getattr(args, f"agent_model_{n}_path"), getattr(args, f"agent_{n}_api_base"),
                              getattr(args, f"agent_{n}_api_model"))
        if base:
            if args.mode != "generate":
                raise InputError(None, f"--agent_{n}_api_base needs --mode generate (an endpoint gives no logits)")
            if not name:
                raise InputError(None, f"--agent_{n}_api_base needs --agent_{n}_api_model")
        elif not folder:
            raise InputError(None, f"give --agent_model_{n}_path (or --agent_{n}_api_base with --mode generate)")
        else:
            check_model_dir(folder)
        agents.append(AgentConfig(number=n, model_path=folder if not base else "", api_base=base, api_model=name,
                                  api_key_env=args.api_key_env, mode=args.mode, lang=lang,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  dtype=args.dtype, trust_remote_code=args.trust_remote_code))
    return agents


def check_args(args) -> None:
    from atkd.errors import InputError

    if args.batch_size < 1:
        raise InputError(None, "--batch_size must be at least 1")
    if args.max_new_tokens < 1:
        raise InputError(None, "--max_new_tokens must be at least 1")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise InputError(None, "--min_confidence must be in [0, 1]")
    if args.min_confidence > 0 and args.mode != "score":
        raise InputError(None, "--min_confidence needs --mode score (generated replies carry no probabilities)")
    path = Path(args.input_file)
    if path.is_file() and not path.read_text(encoding="utf-8").strip():
        raise InputError(path, "no questions to validate (the generation step wrote none: see its plan.json)")


def fingerprint(agent, input_file: str) -> dict:
    """An agent's answers depend on the agent and the input, not on the other agent."""
    from atkd.validation import fingerprint as agent_fingerprint

    st = os.stat(input_file)
    return {**agent_fingerprint(agent), "input_file": str(Path(input_file).resolve()),
            "input_file_stat": [st.st_size, st.st_mtime_ns]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from atkd import paths
    from atkd.errors import exit_on_input_error
    from atkd.io import PartLog, write_json, write_jsonl
    from atkd.models import parse_gpu_ids, set_quiet_env, usable_gpu_ids
    from atkd.prompts import language_of
    from atkd.records import load_questions
    from atkd.stage import record_args, setup_logging
    from atkd.validation import agent_worker, build_report, judged_records, same_model
    from atkd.workers import run_workers

    setup_logging()
    set_quiet_env()
    with exit_on_input_error():
        check_args(args)
        items = load_questions(args.input_file)
        agents = agent_configs(args, language_of(items, args.lang))
        gpu_ids = usable_gpu_ids(parse_gpu_ids(args.gpu_ids))
        is_same = same_model(*agents)
        if is_same:
            log.warning("both agents are the same model (%s): validation is one model's opinion twice, "
                        "not a cross-check (report.json says same_model: true)", agents[0].name)

        answers, logs = {}, []
        for agent in agents:  # one after the other: one model in memory at a time
            part_log = PartLog(paths.agent_answers_path(args.output_file, agent.number),
                               fingerprint(agent, args.input_file))
            done = part_log.open()
            todo = [q for q in items if q.key not in done]
            if len(todo) < len(items):
                log.info("agent %d: %d of %d answers already written by an earlier run", agent.number,
                         len(items) - len(todo), len(items))
            run_workers(agent_worker, todo, gpu_ids, part_log, agent)
            gc.collect()
            _empty_cuda_cache()
            answers[agent.number] = part_log.done()
            logs.append(part_log)

        kept, rejected = judged_records(items, answers, args.min_confidence)
        report = build_report(items, answers, kept, rejected, agents, is_same, args.min_confidence)
        write_jsonl(args.output_file, kept)
        write_jsonl(paths.rejected_path(args.output_file), rejected)
        write_json(paths.report_path(args.output_file), report)
        record_args(args, args.output_file)
        for part_log in logs:
            part_log.remove()
    log.info("kept %d of %d questions (pass rate %s); rejected by reason: %s", report["kept"], report["total"],
             report["pass_rate"], {k: v for k, v in report["by_reason"].items() if v} or "none")
    return 0


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())

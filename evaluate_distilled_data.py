"""Step D: two agent models answer every generated question; keep those both answer as labelled.

    python evaluate_distilled_data.py --agent_model_1_path data/demo/models/teacher --agent_model_2_path data/demo/models/agent --input_file output/workflow/iteration_1/C_distill_data/generated.jsonl --output_file output/workflow/iteration_1/D_validated_data/validated.jsonl

Agents run one after the other (one model in memory at a time), in score mode from their
option-letter logits by default, or with --mode generate from a chain-of-thought reply (local
models or OpenAI-compatible endpoints). Writes validated.jsonl (kept items with both agents'
answers), rejected.jsonl (with the reason) and report.json (pass rate overall, per leaf, per
reason). Using one model for both agents is allowed but flagged in the report and the log.
A killed run resumes per agent: answers already written are kept (each agent's own log).
"""

from atkd.cli import stage_main
from atkd.cross_check import CrossCheckConfig, run


def main(argv=None) -> int:
    return stage_main(CrossCheckConfig, run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())

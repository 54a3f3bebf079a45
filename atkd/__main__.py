"""`python -m atkd <stage> [flags]`: run any stage of the table (`atkd.stages`) from the installed package.

    python -m atkd --help                 # the stages, one line each
    python -m atkd answer --help          # one stage's flags (the same as python inference.py --help)
    python -m atkd workflow ...           # main.py's loop, every setting given as a flag

The top-level scripts (inference.py, train.py, ...) are aliases of these commands; main.py's step
runner (`atkd.steps`) runs every step this way, so a non-editable install runs the workflow from
any folder. Exit status: the stage's (2 for bad input, as everywhere; 2 for an unknown stage).
"""

from __future__ import annotations

import sys

from .stages import STAGES, WORKFLOW, stage_named


def overview() -> str:
    """`python -m atkd --help`: every stage with its alias and one line."""
    width = max(len(s.name) for s in (*STAGES, WORKFLOW))
    lines = ["usage: python -m atkd <stage> [flags]   (python -m atkd <stage> --help: its flags)", "",
             "stages (the top-level script of the checkout is the same command):"]
    lines += [f"  {s.name:<{width}}  {s.script:<28} {s.about}" for s in (*STAGES, WORKFLOW)]
    return "\n".join(lines)


def run_stage(name: str, argv: list[str] | None = None, defaults: dict | None = None) -> int:
    """Parse `argv` as stage `name`'s flags and run it (`atkd.cli.stage_main`); `defaults` replace its config's."""
    from .cli import stage_main

    stage = stage_named(name)
    config, run = stage.load()
    return stage_main(config, run, argv, stage.description, defaults)


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(overview())
        return 0
    try:
        stage = stage_named(argv[0]) if argv else None
    except KeyError as err:
        stage = None
        print(f"error: {err.args[0]}", file=sys.stderr)
    if stage is None:
        print(overview(), file=sys.stderr)
        return 2
    if from_shell:  # the stage's usage line and done-record name the command as typed, not __main__.py
        sys.argv[0] = f"python -m atkd {argv[0]}"
    return run_stage(argv[0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

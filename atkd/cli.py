"""Stage settings declared once: a config dataclass per stage, its command line, its command.

Every stage (and main.py) has one `StageConfig` dataclass. Each field is made with `setting()`,
which holds the field's default, its help (with the unit), an optional check, its role (a model
folder, an input, an output) and whether it can change the stage's results. From that one
declaration come:

- the stage's argparse command line: `build_parser(ConfigClass)`, a flag `--<field>` per field,
  typed from the annotation (`list[int]` is comma-separated, `bool` is `--x/--no-x`);
- the command main.py runs: `to_argv(config)`, which writes every value back as a flag, so a
  printed command reruns the stage by hand with exactly the same settings;
- the fingerprint that decides whether the stage's outputs are stale (`atkd.fingerprint`):
  every setting that can change results, with model folders and input files replaced by a hash
  of their contents;
- the checks: `StageConfig.__post_init__` runs each field's check and the class's `problems()`,
  and a failure is the usual one-line input error (exit status 2).

A stage script is then `stage_main(ConfigClass, run, argv)`: parse, log, run, one error format.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

from .errors import InputError, StageFailed, exit_on_input_error

MODEL, INPUT, OUTPUT = "model", "input", "output"  # roles of path settings


class Check(NamedTuple):
    """A condition on one setting and how to say it ("at least 1")."""

    ok: Callable[[Any], bool]
    text: str


def at_least(low) -> Check:
    return Check(lambda v: v >= low, f"at least {low}")


def above(low) -> Check:
    return Check(lambda v: v > low, f"above {low}")


def between(low, high) -> Check:
    """low <= v <= high."""
    return Check(lambda v: low <= v <= high, f"between {low} and {high}")


def one_of(*values) -> Check:
    return Check(lambda v: v in values, "one of " + ", ".join(map(str, values)))


def setting(default: Any = MISSING, *, help: str, check: Check | None = None, choices: tuple | None = None,
            role: str | None = None, affects_output: bool = True) -> Any:
    """A config field: default, help (say the unit), check, role, and whether it changes results.

    `affects_output=False` marks settings that cannot change what the stage writes (where it
    runs, batch sizes of deterministic passes, endpoints, logging): they are left out of the
    fingerprint, so changing them neither reruns a finished stage nor discards partial work.
    `role` marks paths: MODEL folders and INPUT files/folders enter the fingerprint by content,
    OUTPUT paths not at all (where results go does not change them).
    """
    if choices is not None and check is None:
        check = one_of(*choices)
    meta = {"help": help, "check": check, "choices": choices, "role": role, "affects_output": affects_output}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def fed(cls, name: str, help: str | None = None) -> Any:
    """A setting that feeds `cls.<name>` (main.py's, whose constants are its values): that field's check,
    choices, role, whether it changes results, and help (unless `help` says it in main.py's terms); no
    default. One declaration: the check cannot drift from the stage's."""
    meta = next(f for f in fields(cls) if f.name == name).metadata
    return setting(help=help or meta["help"], check=meta["check"], choices=meta["choices"], role=meta["role"],
                   affects_output=meta["affects_output"])


@dataclass(kw_only=True)
class StageConfig:
    """Base of every stage's settings: checks on construction, outputs, where its record goes."""

    # Bump when a code change makes the stage write something else for the same settings and
    # inputs: it is part of the fingerprint, so finished outputs of older code are redone.
    version: ClassVar[int] = 1
    # How a setting is named in messages: "--batch_size" (main.py says "BATCH_SIZE (--batch_size)").
    source: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and value is not None and not check.ok(value):
                raise InputError(self.source, f"{self.flag(f.name)} must be {check.text} (got {value!r})")
        for problem in self.overwritten_inputs() + self.problems():
            raise InputError(self.source, problem)

    def overwritten_inputs(self) -> list[str]:
        """An OUTPUT path that names an INPUT (writing it would destroy what the stage reads)."""
        def named(role: str) -> dict[str, Path]:
            return {f.name: Path(v).resolve() for f in fields(self)
                    if f.metadata.get("role") == role and isinstance(v := getattr(self, f.name), str) and v}

        inputs = named(INPUT)
        return [f"{self.flag(out)} is {self.flag(inp)} itself; it would be overwritten"
                for out, path in named(OUTPUT).items() for inp, other in inputs.items() if path == other]

    def problems(self) -> list[str]:
        """Rules that involve several settings (one message each); none by default."""
        return []

    def unused_settings(self) -> tuple[str, ...]:
        """Settings that these values make irrelevant (LoRA's alpha with LoRA off): left out of the fingerprint."""
        return ()

    @classmethod
    def flag(cls, name: str) -> str:
        return f"--{name}"

    def outputs(self) -> list[Path]:
        """The files (or folders) whose existence, with a matching record, means the stage is done."""
        raise NotImplementedError

    def record_path(self) -> Path:
        """The done-record, `<stage>.done.json` (`atkd.paths.done_record`): beside the first output (inside
        an output folder)."""
        from .paths import done_record

        out = self.outputs()[0]
        return done_record(out.parent if out.suffix else out, type(self).__name__)

    def locked_folders(self) -> list[Path]:
        """The folders this run holds the lock of while it runs (`atkd.lock`): its record's folder."""
        return [self.record_path().parent]


# --------------------------------------------------------------------------- types

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unoptional(tp) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def parser_type(tp) -> Callable[[str], Any]:
    """The argparse `type=` of an annotation: lists are comma-separated; '' is None for optionals."""
    inner, optional = _unoptional(tp)
    if typing.get_origin(inner) is list:
        item = typing.get_args(inner)[0]

        def parse_list(text: str) -> list:
            try:
                return [item(p.strip()) for p in text.split(",") if p.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}")
        return parse_list
    if optional:
        return lambda text: None if text == "" else inner(text)
    return inner


def format_value(value) -> str:
    """A setting's value as its flag's text (the inverse of `parser_type`)."""
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)  # repr round-trips exactly: 5e-06, 0.001
    return str(value)


# --------------------------------------------------------------------------- command lines

class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help (not for required flags), and the docstring shown as written (it holds a command)."""

    def _get_help_string(self, action):
        return action.help if action.required else super()._get_help_string(action)


def build_parser(cls, description: str | None = None, defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line of `cls`: one `--<field>` per field; `defaults` replaces the dataclass defaults."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__, formatter_class=_Formatter)
    hints = _hints(cls)
    defaults = defaults or {}
    for f in fields(cls):
        tp = hints[f.name]
        meta = f.metadata
        default = defaults[f.name] if f.name in defaults else _default(f)
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "dest": f.name}
        if default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if _unoptional(tp)[0] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs.setdefault("default", False)
        else:
            kwargs["type"] = parser_type(tp)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if isinstance(default, list):
                kwargs["help"] += " (comma-separated)"
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(cls, argv=None, description: str | None = None, defaults: dict | None = None):
    """Parse `argv` into a checked `cls` instance (`InputError` when a check fails)."""
    args = build_parser(cls, description, defaults).parse_args(argv)
    return cls(**vars(args))


def to_argv(cfg: StageConfig) -> list[str]:
    """Every setting of `cfg` as flags; left out are empty values that are the default anyway
    (None, "", []), and bools that are their default (else --x / --no-x)."""
    out: list[str] = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or (value in ("", []) and value == _default(f)):
            continue
        if isinstance(value, bool):
            if value:
                out.append(f"--{f.name}")
            elif f.default is True:
                out.append(f"--no-{f.name}")
            continue
        out += [f"--{f.name}", format_value(value)]
    return out


def _default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


# --------------------------------------------------------------------------- running a stage

def is_main_process() -> bool:
    """Rank 0 of a launched job (accelerate/torchrun set RANK), or a plain process."""
    return os.environ.get("RANK", "0") == "0"


def setup_logging(main_process: bool = True) -> None:
    """INFO on the main process, warnings only elsewhere (one voice per run)."""
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(cls, run: Callable, argv=None, description: str | None = None, defaults: dict | None = None) -> int:
    """What every stage script does: parse its config, then `run(config)`; bad input exits 2."""
    from .lock import holding
    from .console import set_quiet_env

    parser = build_parser(cls, description, defaults)
    args = parser.parse_args(argv)
    setup_logging(is_main_process())
    set_quiet_env()
    if not is_main_process():  # one voice: rank 0 prints the error (and holds the lock), the others only exit
        try:
            return _status(run(cls(**vars(args))))
        except InputError:
            return 2
    try:
        with exit_on_input_error():
            cfg = cls(**vars(args))
            with holding(cfg.locked_folders()):  # one run per output folder; a second one exits 2 here
                return _status(run(cfg))
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1


def _status(result) -> int:
    """A run's exit status: its own when it returns one (main.py), else 0."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


# --------------------------------------------------------------------------- settings several stages share

LANGS = ("auto", "en", "zh")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def gpu_ids(default: list[int] | None = None) -> list[int]:
    return setting(list(default or []), affects_output=False,
                   check=Check(lambda ids: len(set(ids)) == len(ids) and min(ids, default=0) >= 0,
                               "distinct non-negative ids"),
                   help="GPU ids, e.g. 0,1: one worker per GPU (empty: the CPU; the CPU too when there is no CUDA)")


def dtype() -> str:
    return setting("auto", choices=DTYPES, help="weights dtype; auto = bf16 on GPU, fp32 on CPU")


def lang() -> str:
    return setting("auto", choices=LANGS, help="prompt language; auto detects it from the questions")


def trust_remote_code() -> bool:
    return setting(False, help="allow model code from the checkpoint folder (off by default)")


def api_key_env() -> str:
    return setting("OPENAI_API_KEY", affects_output=False,
                   help="environment variable holding the API key (never a flag: it would land in logs)")


def api_concurrency() -> int:
    return setting(8, check=at_least(1), affects_output=False,
                   help="requests in flight at once to the endpoint (each reply is logged as it completes)")


def api_timeout_s() -> float:
    return setting(300.0, check=above(0), affects_output=False,
                   help="seconds one request may take before it counts as failed and is retried")


def api_max_attempts() -> int:
    return setting(4, check=at_least(1), affects_output=False,
                   help="tries per request before the stage fails (waits of 1 s, 2 s, 4 s, ... between tries)")


PLACEMENTS = ("auto", "per_gpu", "spread")


def model_placement() -> str:
    return setting("auto", choices=PLACEMENTS, affects_output=False,
                   help="with several GPUs: per_gpu = one whole copy of the model per GPU, each worker "
                        "taking a share of the work; spread = one copy split over all the listed GPUs "
                        "(device_map auto, for a model larger than one GPU); auto = spread only when the "
                        "weights (safetensors bytes x 1.25 for activations) exceed the emptiest GPU's free memory")

"""Experiment trackers (main.py's REPORT_TO, train.py's --report_to): TensorBoard, Weights & Biases, MLflow.

Through accelerate's trackers (`Accelerator(log_with=..., project_dir=...)`, `init_trackers`,
`log`, `end_training`); their packages stay optional and are checked before any work
(`require_trackers`: one `error:` line naming the package, exit status 2).

One run per workflow folder: its name and id are made once and stored in
`<workflow>/tracking/run.json`, so a resumed main.py (and every train.py it starts) logs into the
same run. Its TensorBoard event files are under `<workflow>/tracking/<run name>/`
(`tensorboard --logdir <workflow>/tracking`); W&B and MLflow runs go where their own settings say
(WANDB_*, MLFLOW_TRACKING_URI), in project / experiment `atkd`, under the run's name.

One step counter for the whole run: the optimizer steps of iteration 2 continue after those of
iteration 1 (train.py's --tracking_step_offset: the steps of the earlier iterations), a resumed
training continues its count, and the per-iteration scalars (accuracy per ability on the
evaluation set, questions written, validated and replayed) are logged at the step that ends the
iteration's training (the student before any training: step 0).
"""

from __future__ import annotations

import importlib.util
import time
import uuid
from pathlib import Path

from .cli import Check, setting
from .errors import InputError
from .io import read_json, write_json

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the package it needs
NONE = "none"
PROJECT = "atkd"  # W&B project, MLflow experiment (MLFLOW_EXPERIMENT_NAME overrides)
TRACKING_DIR = "tracking"  # under the workflow folder (train.py alone: under its --output_dir)
RUN_FILE = "run.json"


def tracker_names(report_to: str) -> list[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; "none" or "" -> []."""
    names = [p.strip().lower() for p in report_to.split(",") if p.strip()]
    return [] if names in ([], [NONE]) else list(dict.fromkeys(names))


def _valid(report_to: str) -> bool:
    names = [p.strip().lower() for p in report_to.split(",") if p.strip()]
    return names == [NONE] or (bool(names) and all(n in PACKAGES for n in names))


def report_to_setting(default: str | None = NONE):
    """The REPORT_TO / --report_to setting (where results go does not change them: not fingerprinted)."""
    kwargs = {} if default is None else {"default": default}
    return setting(**kwargs, affects_output=False,
                   check=Check(_valid, f"{NONE}, or a comma-separated list of {', '.join(PACKAGES)}"),
                   help="experiment trackers: none, or a comma-separated list of tensorboard, wandb, mlflow "
                        "(per optimizer step: loss, CE, KD, learning rate, tokens/s; per iteration: accuracy "
                        "per ability, questions written/validated/replayed)")


def require_trackers(report_to: str, source: str | None = None) -> list[str]:
    """The trackers named, else `InputError` naming the first one whose package is not installed."""
    names = tracker_names(report_to)
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise InputError(source, f"report_to names {name}, but the package {PACKAGES[name]!r} is not installed: "
                                     f"pip install {PACKAGES[name]} (or leave {name} out)")
    return names


def tracking_dir(folder: str | Path) -> Path:
    """Where a run's tracker files go: `<folder>/tracking`."""
    return Path(folder) / TRACKING_DIR


def run_identity(tracking: Path, make: bool = True) -> dict:
    """{"name", "id"} of the run logging into `tracking`: read from its run.json, or made and stored
    there (name: the folder above `tracking` and the time it was made, e.g. workflow-20250101-120000)."""
    path = tracking / RUN_FILE
    if path.is_file():
        return read_json(path)
    run = {"name": f"{tracking.resolve().parent.name}-{time.strftime('%Y%m%d-%H%M%S')}", "id": uuid.uuid4().hex[:16]}
    if make:
        write_json(path, run)
    return run


def accelerator_kwargs(names: list[str], tracking: Path, main_process: bool) -> dict:
    """Accelerator(...)'s tracking arguments: TensorBoard as accelerate's tracker writing to
    `tracking/<run name>/`, W&B and MLflow by name (run name and id: `init_kwargs`)."""
    if not names or not main_process:
        return {}
    from accelerate.tracking import TensorBoardTracker

    run = run_identity(tracking)
    log_with = [TensorBoardTracker(run["name"], str(tracking)) if n == "tensorboard" else n for n in names]
    return {"log_with": log_with, "project_dir": str(tracking)}


def init_kwargs(tracking: Path) -> dict:
    """Per-tracker `init_trackers` arguments that put every process of the run into one run."""
    run = run_identity(tracking)
    mlflow = {"run_name": run["name"]}
    if run.get("mlflow_run_id"):
        mlflow["run_id"] = run["mlflow_run_id"]
    return {"wandb": {"name": run["name"], "id": run["id"], "resume": "allow"}, "mlflow": mlflow}


def start(accelerator, tracking: Path, config: dict) -> None:
    """init_trackers on the main process (a no-op without trackers); `config` goes to W&B and MLflow
    (TensorBoard would write it as extra runs: its settings are in the done-records instead)."""
    if not accelerator.is_main_process or not accelerator.log_with:
        return
    accelerator.init_trackers(PROJECT, config=None, init_kwargs=init_kwargs(tracking))
    flat = {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in config.items()}
    for tracker in accelerator.trackers:
        if tracker.name != "tensorboard":
            tracker.store_init_configuration(flat)
        active = getattr(tracker, "active_run", None)  # MLflow: the id it gave, for the next process
        run = run_identity(tracking)
        if tracker.name == "mlflow" and active is not None and not run.get("mlflow_run_id"):
            write_json(tracking / RUN_FILE, {**run, "mlflow_run_id": active.info.run_id})


# --------------------------------------------------------------------------- what is logged

def train_scalars(entry: dict, tokens_per_s: float) -> dict[str, float]:
    """One training log entry (trainer's log_history row) as tracker scalars."""
    return {"train/loss": entry["loss"], "train/ce": entry["ce"], "train/kd": entry["kd"],
            "train/learning_rate": entry["lr"], "train/tokens_per_s": tokens_per_s}


def _tag(ability: str) -> str:
    """"Area > Leaf" -> "Area/Leaf" (trackers group scalars by "/")."""
    return "/".join(ability.split(" > "))


def accuracy_scalars(accs: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    """Accuracy per ability (and "overall") of a report's node_accuracies, with its 95% interval where
    the report has one (`ci95`: [low, high])."""
    out = {}
    for name, row in (accs or {}).items():
        if not row or row.get("accuracy") is None:
            continue
        out[f"{prefix}/accuracy/{_tag(name)}"] = float(row["accuracy"])
        ci = row.get("ci95")
        if ci and len(ci) == 2 and None not in ci:
            out[f"{prefix}/ci95_low/{_tag(name)}"] = float(ci[0])
            out[f"{prefix}/ci95_high/{_tag(name)}"] = float(ci[1])
    return out


def iteration_scalars(entry: dict) -> dict[str, float]:
    """One iteration of report.json: accuracy per ability after it, and its question counts."""
    out = accuracy_scalars(entry.get("eval_after") or {})
    counts = {"written": entry.get("generated"), "validated": entry.get("validated"),
              "replayed": (entry.get("replay") or {}).get("replay")}
    out.update({f"data/{k}": float(v) for k, v in counts.items() if v is not None})
    return out


def steps_through(models_dir: Path, iteration: int) -> int:
    """Optimizer steps of iterations 1..`iteration` together (each final_model's trainer_state):
    the tracker step where iteration `iteration + 1`'s training starts counting."""
    from .checkpoint import STATE_FILE
    from .paths import IterationPaths

    total = 0
    for i in range(1, iteration + 1):
        state = IterationPaths(Path("."), Path(models_dir), i).final_model / STATE_FILE
        if state.is_file():
            total += int(read_json(state).get("global_step", 0))
    return total


def log_iteration(report_to: str, workflow_dir: Path, models_dir: Path, report: dict, iteration: int,
                  config: dict | None = None) -> dict[int, dict[str, float]]:
    """Log iteration `iteration` of a finished report (and, with iteration 1, the student before any
    training, at step 0) to the run's trackers; returns {step: scalars} as logged ({} without trackers)."""
    names = tracker_names(report_to)
    entries = [e for e in report.get("iterations", []) if e.get("iteration") == iteration]
    if not names or not entries:
        return {}
    from accelerate import Accelerator

    tracking = tracking_dir(workflow_dir)
    logged = {}
    if iteration == 1 and report.get("baseline_eval"):
        logged[0] = accuracy_scalars(report["baseline_eval"])
    step = steps_through(models_dir, iteration)
    logged.setdefault(step, {}).update(iteration_scalars(entries[0]))
    logged[step]["iteration"] = float(iteration)
    acc = Accelerator(cpu=True, **accelerator_kwargs(names, tracking, True))
    start(acc, tracking, config or {})
    for at, values in sorted(logged.items()):
        acc.log(values, step=at)
    acc.end_training()
    return logged

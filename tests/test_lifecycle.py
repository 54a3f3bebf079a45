"""One stage lifecycle (atkd.lifecycle): done-check, input check, work, outputs, done-record, in that order,
written once; every stage of the table is a `run_stage` call."""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from atkd import paths
from atkd.cli import INPUT, OUTPUT, StageConfig, setting
from atkd.errors import InputError
from atkd.lifecycle import Outputs, run_stage
from atkd.stages import STAGES


@dataclass(kw_only=True)
class SquareConfig(StageConfig):
    """A stage made for the test: squares the numbers of a JSON Lines file."""

    input_path: str = setting(role=INPUT, help="numbers .jsonl ({\"id\", \"x\"})")
    output_path: str = setting(role=OUTPUT, help="squares .jsonl (summary.json beside it)")

    def outputs(self) -> list[Path]:
        return [Path(self.output_path), paths.summary_path(self.output_path)]

    def record_path(self) -> Path:  # not in the stage table, which names the others' records
        return Path(self.output_path).parent / "square.done.json"


def check_numbers(cfg: SquareConfig) -> list[dict]:
    rows = [json.loads(line) for line in Path(cfg.input_path).read_text().splitlines()]
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("x"), int):
            raise InputError(cfg.input_path, "x must be an integer", n)
    return rows


def squaring(cfg: SquareConfig, seen: list, stop_after: int | None = None):
    """work(): one part-log line per number (a number already there is not squared again; `seen` lists those
    squared); raises after `stop_after` new ones, as a kill would end it."""
    rows_path = cfg.output_path

    def work(rows: list[dict], parts) -> Outputs:
        part_log = parts.log(rows_path)
        done = part_log.open()
        writer = part_log.writer(0)
        for row in rows:
            if str(row["id"]) in done:
                continue
            if stop_after is not None and len(seen) >= stop_after:
                raise RuntimeError("killed")
            seen.append(row["id"])
            writer.write([{"id": row["id"], "y": row["x"] ** 2}])
        done = part_log.done()
        out = [done[str(row["id"])] for row in rows]
        summary = {"n": len(out), "sum": sum(r["y"] for r in out)}
        return Outputs(summary, {Path(rows_path): out, paths.summary_path(rows_path): summary})
    return work


@pytest.fixture
def stage(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "x": i}) + "\n" for i in range(6)))
    (tmp_path / "out").mkdir()
    return SquareConfig(input_path=str(src), output_path=str(tmp_path / "out" / "squares.jsonl"))


def test_outputs_then_the_record_then_the_part_logs_go(stage):
    seen: list = []
    summary = run_stage(stage, lambda: check_numbers(stage), squaring(stage, seen))
    assert summary == {"n": 6, "sum": 55}
    out = Path(stage.output_path)
    assert [json.loads(line)["y"] for line in out.read_text().splitlines()] == [0, 1, 4, 9, 16, 25]
    assert json.loads(paths.summary_path(out).read_text()) == summary
    record = json.loads(stage.record_path().read_text())
    assert sorted(record["outputs"]) == ["squares.jsonl", "summary.json"]
    assert not list(out.parent.glob("*.parts"))  # the part log is gone once the record is written
    # done: nothing is computed or written again
    mtimes = {p: p.stat().st_mtime_ns for p in out.parent.iterdir()}
    assert run_stage(stage, lambda: pytest.fail("a finished stage checks no input"), squaring(stage, seen)) is None
    assert {p: p.stat().st_mtime_ns for p in out.parent.iterdir()} == mtimes and len(seen) == 6


def test_bad_input_writes_nothing(stage):
    Path(stage.input_path).write_text('{"id": 0, "x": 1}\n{"id": 1, "x": "two"}\n')
    with pytest.raises(InputError, match=r"in.jsonl:2"):
        run_stage(stage, lambda: check_numbers(stage), squaring(stage, []))
    assert list(Path(stage.output_path).parent.iterdir()) == []


def test_work_cut_short_keeps_its_part_log_and_the_rerun_finishes_it(stage):
    first: list = []
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(stage, lambda: check_numbers(stage), squaring(stage, first, stop_after=4))
    out = Path(stage.output_path)
    assert not out.exists() and not stage.record_path().exists()
    assert (out.parent / "squares.jsonl.parts").is_dir()
    second: list = []
    assert run_stage(stage, lambda: check_numbers(stage), squaring(stage, second)) == {"n": 6, "sum": 55}
    assert first == [0, 1, 2, 3] and second == [4, 5]  # only the work not in the part log is done again


def test_a_finished_stage_whose_input_changed_is_redone(stage):
    run_stage(stage, lambda: check_numbers(stage), squaring(stage, []))
    Path(stage.input_path).write_text('{"id": 0, "x": 3}\n')
    assert run_stage(stage, lambda: check_numbers(stage), squaring(stage, [])) == {"n": 1, "sum": 9}


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_runs_through_the_lifecycle(stage):
    """A stage's `run` is a `run_stage` call: no stage writes its own done-record or removes its own part logs."""
    module = importlib.import_module(f"atkd.{stage.module}")
    assert "run_stage(" in inspect.getsource(module.run)
    source = inspect.getsource(module)
    for own in ("DoneRecord(", "record.write(", "record.start(", ".remove()"):
        assert own not in source, (stage.module, own)

"""The README's quick start as it is: `python main.py` with the default constants, two iterations on the demo.

Its own file so that a parallel run (pytest-xdist, one file per worker) runs it beside test_main.py's runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from test_main import ROOT, env


@pytest.mark.e2e
def test_default_demo_improves_the_weakest_abilities(tmp_path):
    """The README's quick start as it is: two iterations with the default constants."""
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(tmp_path / "workflow"),
                           "--models_output_dir", str(tmp_path / "models"), "--report_to", "tensorboard"],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "workflow" / "report.json").read_text())
    assert len(report["iterations"]) == 2
    whole = report["whole_run"]
    assert whole["after_iteration"] == 2 and len(whole["weakest_of_iteration_1"]) == 3
    before, after = whole["eval_before"], whole["eval_after"]
    for name in whole["weakest_of_iteration_1"]:
        assert after[name]["accuracy"] >= before[name]["accuracy"] + 0.2, (name, before[name], after[name])
    assert after["overall"]["accuracy"] >= before["overall"]["accuracy"] + 0.1
    assert "## Whole run" in proc.stdout

    # What a user of training tools expects from the same run: intervals and paired tests in the report, the
    # chart, a model card, the trackers' scalars, and step logs made of lines.
    text = (tmp_path / "workflow" / "report.md").read_text()
    assert "McNemar" in text and "% (" in text
    assert (tmp_path / "workflow" / "report_accuracy.png").stat().st_size > 10_000
    card = (tmp_path / "models" / "iteration_2_student_model" / "final_model" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and "distillation" in header["tags"]
    assert header["base_model"].endswith("iteration_1_student_model/final_model")
    from test_tracking import scalars

    run_folders = {events.parent for events in (tmp_path / "workflow" / "tracking").rglob("events.out.tfevents.*")}
    tags = set().union(*(scalars(folder) for folder in run_folders))
    assert {"train/loss", "train/ce", "train/kd", "train/learning_rate", "eval/accuracy/overall"} <= tags
    for log in (tmp_path / "workflow").rglob("*.log"):
        assert "\r" not in log.read_text(), log

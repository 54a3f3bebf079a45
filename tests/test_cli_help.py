"""Every script at the root answers --help (and imports nothing heavy enough to fail doing so)."""

import pytest

SCRIPTS = ["main.py", "create_initial_tree.py", "inference.py", "student_data_analyzer.py",
           "generate_distill_data.py", "evaluate_distilled_data.py", "generate_logits.py", "train.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(run, script):
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--" in proc.stdout
    assert proc.stderr == ""

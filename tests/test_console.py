"""A quiet, useful console: no "Loading weights" bars, no carriage-return progress in logs, a summary line per step."""

import io

from atkd.answering import InferenceConfig
from atkd.steps import LogLines, Step, run_step


def test_a_stage_writing_to_a_pipe_prints_lines_without_loading_bars(run, llama_dir, mcq_file, tmp_path):
    out = tmp_path / "replies.jsonl"
    proc = run("inference.py", "--model_path", llama_dir, "--dataset_path", mcq_file, "--output_path", out,
               "--batch_size", "8")  # stdout and stderr are pipes, not a terminal
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "\r" not in text and "Loading weights" not in text
    progress = [ln for ln in text.splitlines() if "40/40" in ln]
    assert len(progress) == 1 and "100%" in progress[0]  # the bar's end, once, as a line


def test_main_py_step_log_holds_lines_and_the_step_ends_with_a_summary(llama_dir, mcq_file, tmp_path, capsys):
    cfg = InferenceConfig(model_path=str(llama_dir), dataset_path=str(mcq_file),
                          output_path=str(tmp_path / "A" / "replies.jsonl"), batch_size=8)
    log = tmp_path / "A_student_reply.log"
    assert run_step(Step("A_student_reply", "inference.py", cfg, log_path=log)) == "new"
    text = log.read_bytes().decode()
    assert "\r" not in text and "Loading weights" not in text and "40/40" in text
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[done] A_student_reply in ") and last.endswith(f": {tmp_path / 'A'} (log: {log})")


def test_log_lines_keep_a_redrawn_lines_last_state_across_chunks():
    fh = io.BytesIO()
    lines = LogLines(fh)
    for chunk in (b"start\nbar  10%", b"\rbar  50%\r", b"bar 100%\r\nnext line\n", b"tail"):
        lines.write(chunk)
    lines.close()
    assert fh.getvalue() == b"start\nbar 100%\nnext line\ntail\n"

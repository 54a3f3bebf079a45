"""On-policy distillation (RESPONSES student | mixed): the loss on the student's own text, step D4's sampling,
and steps E and F on its output."""

from __future__ import annotations

import json

import pytest
import torch

from atkd.kd_loss import combined_loss, response_loss_sums
from atkd.train_data import TrainExample, collate, token_counts

# ----------------------------------------------------------------------------- the loss, float64, by hand

V, K, T, ALPHA = 9, 3, 2.0, 0.4
LETTERS = [5, 6, 7]  # the letter tokens of options A, B, C


def direct_loss(z: torch.Tensor, items: list[dict], reason_weight: float, off_kind: str, on_kind: str) -> torch.Tensor:
    """The loss written out plainly, item by item: what on-policy distillation is meant to compute.

    Each item: `rows` (indices into z of its response positions, the letter's first), `gold` (the labelled
    letter's token), `teacher_opt` (log-probs over the options), `tokens` (per later row: top-k ids, top-k
    log-probs, tail log-prob) and `on_policy`.
    """
    def kl(p, q):
        return (p * (p.log() - q.log())).sum()

    def div(t, s, kind):
        return kl(t, s) if kind == "forward_kl" else kl(s, t) if kind == "reverse_kl" else \
            0.5 * kl(t, (t + s) / 2) + 0.5 * kl(s, (t + s) / 2)

    def tempered(p_top, q_tail):  # [(sum of the top-k) softmax(log p / T), q], renormalised
        shape = torch.softmax(p_top.log() / T, dim=0)
        out = torch.cat([p_top.sum() * shape, q_tail.reshape(1)])
        return out / out.sum()

    ce, kd, n_ce, n_kd = 0.0, 0.0, 0.0, 0.0
    for it in items:
        letter_row = z[it["rows"][0]]
        p = torch.softmax(letter_row, dim=0)
        ce = ce - torch.log(p[it["gold"]])  # the labelled letter, whatever the student sampled
        n_ce += 1
        s_opt = torch.softmax(letter_row[LETTERS] / T, dim=0)
        t_opt = torch.softmax(it["teacher_opt"] / T, dim=0)
        kd = kd + div(t_opt, s_opt, off_kind)
        n_kd += 1
        later = it["rows"][1:]
        w = reason_weight / len(later) if later else 0.0
        for r, (ids, t_logp, t_tail) in zip(later, it["tokens"]):
            p = torch.softmax(z[r], dim=0)
            s_b = tempered(p[ids], 1 - p[ids].sum())
            t_b = tempered(t_logp.exp(), t_tail.exp())
            kd = kd + w * div(t_b, s_b, on_kind if it["on_policy"] else off_kind)
            n_kd += w
            if not it["on_policy"]:  # the teacher's text: CE on its tokens too
                target = it["targets"][later.index(r)]
                ce = ce - w * torch.log(p[target])
                n_ce += w
    return ALPHA * ce / n_ce + (1 - ALPHA) * T ** 2 * kd / n_kd


def hand_example() -> tuple[list[TrainExample], list[dict]]:
    """Two items: the teacher's letter + a 2-token reason, and an on-policy one whose sampled letter (B) is
    wrong (the label is C), followed by 4 tokens of the student's own reason."""
    g = torch.Generator().manual_seed(11)

    def targets_for(n):
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
        logp = torch.log_softmax(torch.randn(n, K + 1, generator=g, dtype=torch.float64) * 2, dim=-1)
        return ids, logp[:, :K], logp[:, K]

    t_ids, t_logp, t_tail = targets_for(2)
    o_ids, o_logp, o_tail = targets_for(4)
    opt1 = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), 0)
    opt2 = torch.log_softmax(torch.tensor([-0.5, 0.1, 1.7], dtype=torch.float64), 0)
    teacher_item = TrainExample(key="t", prompt_ids=[1, 2, 3], response_ids=[LETTERS[0], 2, 4],
                                option_ids=LETTERS, teacher_option_logp=opt1.float(),
                                topk_ids=t_ids, topk_logp=t_logp, tail_logp=t_tail)
    student_item = TrainExample(key="s", prompt_ids=[1, 3], response_ids=[LETTERS[1], 4, 2, 8, 0],
                                option_ids=LETTERS, teacher_option_logp=opt2.float(),
                                topk_ids=o_ids, topk_logp=o_logp, tail_logp=o_tail,
                                on_policy=True, ce_letter_id=LETTERS[2])
    # Rows of the flattened response positions: item 1 has 3 (letter + 2), item 2 has 5 (letter + 4); reasons of
    # 2 and 4 tokens keep the per-token weights (float32 in collate) exact.
    items = [{"rows": [0, 1, 2], "gold": LETTERS[0], "teacher_opt": opt1.float().double(),
              "tokens": list(zip(t_ids, t_logp.float().double(), t_tail.float().double())), "on_policy": False,
              "targets": [2, 4]},
             {"rows": [3, 4, 5, 6, 7], "gold": LETTERS[2], "teacher_opt": opt2.float().double(),
              "tokens": list(zip(o_ids, o_logp.float().double(), o_tail.float().double())), "on_policy": True}]
    return [teacher_item, student_item], items


@pytest.mark.parametrize("off_kind, on_kind", [("forward_kl", "reverse_kl"), ("forward_kl", "jsd"),
                                               ("jsd", "forward_kl"), ("reverse_kl", "reverse_kl")])
@pytest.mark.parametrize("reason_weight", [1.0, 0.5])
def test_on_policy_loss_and_gradient_equal_the_direct_implementation(off_kind, on_kind, reason_weight):
    examples, items = hand_example()
    batch = collate(examples, [1.0, 1.0], pad_id=0, reason_weight=reason_weight)
    assert batch["targets"].tolist()[3] == LETTERS[2]  # CE reads the label at the letter, not the sampled B
    assert batch["weights"].tolist()[4:] == [0.0, 0.0, 0.0, 0.0]  # and nothing on the student's own tokens
    assert batch["tok_on_policy"].tolist() == [False, False, True, True, True, True]
    z = torch.randn(8, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5
    z1 = z.clone().requires_grad_(True)
    ce, kd = response_loss_sums(z1, batch, T, off_kind, on_kind)
    n_ce, n_kd = token_counts(batch)
    got = combined_loss(ce, kd, n_ce, n_kd, ALPHA, T)
    got.backward()
    z2 = z.clone().requires_grad_(True)
    want = direct_loss(z2, items, reason_weight, off_kind, on_kind)
    want.backward()
    assert got.dtype == torch.float64
    assert abs(got.item() - want.item()) < 1e-10, (got.item(), want.item())
    assert torch.allclose(z1.grad, z2.grad, atol=1e-10, rtol=0)
    # The sampled (wrong) letter gets no push up from CE: at the letter row its gradient comes from KD alone,
    # which moves it towards the teacher's low probability for B.
    assert z1.grad[3, LETTERS[1]].item() > 0


def test_the_on_policy_divergence_applies_to_the_students_tokens_only():
    examples, _ = hand_example()
    batch = collate(examples, [1.0, 1.0], pad_id=0, reason_weight=1.0)
    z = torch.randn(8, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    same = response_loss_sums(z, batch, T, "forward_kl", "forward_kl")[1]
    assert response_loss_sums(z, batch, T, "forward_kl", None)[1].item() == same.item()
    mixed = response_loss_sums(z, batch, T, "forward_kl", "reverse_kl")[1]
    flipped = dict(batch, tok_on_policy=torch.zeros_like(batch["tok_on_policy"]))
    assert response_loss_sums(z, flipped, T, "forward_kl", "reverse_kl")[1].item() == same.item()
    assert abs(mixed.item() - same.item()) > 1e-6


# ----------------------------------------------------------------------------- step D4: which items

def test_practice_items_are_a_seeded_share_of_the_written_ones_never_the_replayed():
    from atkd.records import question_from_dict
    from atkd.student_sampling import chosen_keys

    def item(i, replay=False):
        rec = {"id": f"replay-{i}" if replay else f"it1-{i}", "question": f"q{i}", "options": {"A": "x", "B": "y"},
               "answer_idx": "A"}
        return question_from_dict({**rec, "source": "replay"} if replay else rec)

    items = [item(i) for i in range(10)] + [item(i, replay=True) for i in range(5)]
    assert chosen_keys(items, 1.0, 0) == {f"it1-{i}" for i in range(10)}
    half = chosen_keys(items, 0.5, 0)
    assert len(half) == 5 and not any(k.startswith("replay-") for k in half)
    assert chosen_keys(items, 0.5, 0) == half and chosen_keys(items, 0.5, 1) != half  # the seed decides
    assert len(chosen_keys(items, 0.25, 0)) == 3  # 2.5 rounds half up
    assert chosen_keys(items, 0.3, 0) < chosen_keys(items, 0.6, 0)  # a larger share adds to a smaller one


# ----------------------------------------------------------------------------- main.py: kill during D4, resume

@pytest.mark.e2e
def test_main_with_student_responses_trains_on_them_and_sampling_resumes_after_a_kill(tmp_path):
    """RESPONSES student end to end on the demo (its student answers the rationale prompt on the abilities it
    knows and guesses on the others): D4 samples, E scores the student's own tokens, F trains on them. Then the
    command main.py printed for D4, run by hand into another folder and killed (SIGKILL) while it samples,
    resumes to byte-identical outputs: main.py reruns that same command after a kill (its resume of a step in
    flight is test_main's check), and E and F are deterministic given D4's file."""
    import shlex
    import subprocess
    import sys

    from conftest import in_process, killed_when, parts_written
    from test_main import DEMO, ROOT, env, printed_commands

    flags = ["--num_iterations", "1", "--dataset_files_per_iteration", str(DEMO / "iteration_1.jsonl"),
             "--ability_class_files_per_iteration", str(DEMO / "iteration_1_ability_paths.jsonl"),
             "--eval_dataset_path", "", "--eval_ability_class_path", "", "--num_distill_samples", "20",
             "--train_epochs", "1", "--gpus_to_use", "", "--generation_batch_size", "4",
             "--responses", "student"]
    ref = tmp_path / "ref"
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(ref / "wf"),
                           "--models_output_dir", str(ref / "models"), *flags],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ref_d4 = ref / "wf" / "iteration_1" / "D4_student_responses"
    report = json.loads((ref_d4 / "summary.json").read_text())
    assert report["chosen"] == report["written"] > 0 and report["practised"] > 0
    assert report["right"] + report["wrong"] + report["unparsed"] == report["chosen"]
    assert report["right"] > 0 and report["wrong"] > 0  # it knows some abilities and guesses on the others
    assert sum(row["chosen"] for row in report["by_leaf"].values()) == report["chosen"]
    records = [json.loads(line) for line in (ref_d4 / "train.jsonl").read_text().splitlines()]
    assert sum("student_reply" in r for r in records) == report["chosen"]
    assert not any("student_reply" in r for r in records if r.get("source") == "replay")
    e = ref / "wf" / "iteration_1" / "E_teacher_logits"
    summary = json.loads((e / "summary.json").read_text())
    assert summary["on_policy_items"] == report["practised"] and summary["token_level_items"] >= report["practised"]
    assert f"{report['practised']} items on the student's own response" in \
        (ref / "wf" / "iteration_1" / "F_train.log").read_text()
    on_policy = json.loads((ref / "wf" / "report.json").read_text())["iterations"][0]["on_policy"]
    assert on_policy["practised"] == report["practised"] and "on-policy" in (ref / "wf" / "report.md").read_text()

    # D4 by hand, into another folder: killed once its part log holds a batch, then the same command again.
    d4 = tmp_path / "by_hand"
    out = str(ref_d4 / "train.jsonl")
    command = [str(d4 / "train.jsonl") if arg == out else arg
               for arg in shlex.split(printed_commands(proc.stdout)["D4_student_responses"])]
    assert str(d4 / "train.jsonl") in command and not any(str(ref_d4) in arg for arg in command)
    killed_when(command, lambda: parts_written(d4 / "train.jsonl.parts"), env(), timeout=300)
    assert not (d4 / "train.jsonl").exists()
    from atkd.__main__ import main as atkd_main

    assert command[1:3] == ["-m", "atkd"]
    resumed = in_process(atkd_main, command[3:], "python -m atkd", env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "batches already sampled" in resumed.stderr
    assert (d4 / "train.jsonl").read_bytes() == (ref_d4 / "train.jsonl").read_bytes()
    again = json.loads((d4 / "summary.json").read_text())
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}

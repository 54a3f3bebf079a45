"""Ablations of the distillation signal on the embedded demo: what targeting, replay and rationales each do.

    python -m bench.ablation                          # every variant x 5 seeds, ~3-5 min per run on a 2-core CPU
    python -m bench.ablation --seeds 0 --variants targeted,replay
    python -m bench.ablation --jobs 4                 # four runs at a time, one thread each (a machine with 4+ cores)
    python -m bench.ablation --variants replay,uniform_replay,rationale_replay,on_policy,mixed \\
        --replay_fraction 0.25 --jobs 2       # the paired comparisons: 25 runs

Each run is `python main.py` with the default constants (two iterations on the demo) but the
variant's settings and `--seed`, in its own output folder (`--work_dir`), as a subprocess:

    targeted    questions per ability ~ weakness (ALLOC_TEMPERATURE 1), letter only, no replay
    uniform     ALLOC_TEMPERATURE 1e6: the same budget spread evenly over the abilities
    replay      REPLAY_FRACTION (--replay_fraction) of the training items replayed from the round's questions
    rationale   RESPONSE_STYLE rationale: the teacher's reason after the letter, token-level KD; an
                item's reason tokens together weigh as much as its letter (REASON_WEIGHT 1)
    rationale_tok   the same with every token weighing 1 (REASON_WEIGHT 0: a plain token average)
    uniform_replay  ALLOC_TEMPERATURE 1e6 with replay 0.25: the fair baseline for targeting (both sides replay)
    rationale_replay  rationale with replay 0.25 (the teacher's text, off-policy)
    on_policy   RESPONSES student, replay 0.25: the student answers the round's written items itself (step D4)
                and trains on its own text, scored by the teacher token by token
    mixed       RESPONSES mixed, ON_POLICY_SHARE 0.5, replay 0.25

With replay at 0.25 ("replay" at that fraction: the letter, targeted, with replay, main.py's defaults)
as their partner, the variants that replay are compared pairwise: per seed, the variant minus its
partner on the same seed, for the weak and the known abilities after each iteration, with a 95% t
interval over the seeds of those paired differences (PAIRS). Each run's wall time per round is the
sum of its steps' times in iteration N (main.py's `[done] <step> in <s> s` lines in its main.log),
so a reused run still reports what its steps cost, and D4's share of it is the cost of on-policy.

`targeted` is the shared baseline: every other variant changes one setting (rationale_tok two). The numbers come
from each run's report.json: accuracy on the evaluation set, pooled over the abilities that were
weak in iteration 1 (smoothed accuracy below 0.5 in step B's tree: on the demo the four leaves the
student never saw), over the other abilities, and overall; before the run and after each
iteration; mean and sample standard deviation over the seeds. Finished runs are reused (main.py
skips its finished steps), so an interrupted bench continues where it stopped. Prints one table
and writes bench/results/ablation.json (every run's numbers, wall time and training data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # run from the repository root: python -m bench.<name>

# Each variant sets every one of these (so the bench does not move when main.py's defaults do).
BASE = {"--alloc_temperature": "1.0", "--replay_fraction": "0.0", "--response_style": "letter",
        "--reason_weight": "1.0", "--responses": "teacher", "--on_policy_share": "0.5",
        "--on_policy_kd_loss": "reverse_kl", "--on_policy_temperature": "1.0"}
PAIRED_REPLAY = "0.25"  # the replay share of the variants compared pairwise (main.py's default)
VARIANTS = {
    "targeted": {},
    "uniform": {"--alloc_temperature": "1000000.0"},
    "replay": {"--replay_fraction": None},  # the bench's --replay_fraction
    "rationale": {"--response_style": "rationale"},
    "rationale_tok": {"--response_style": "rationale", "--reason_weight": "0.0"},
    "uniform_replay": {"--alloc_temperature": "1000000.0", "--replay_fraction": PAIRED_REPLAY},
    "rationale_replay": {"--response_style": "rationale", "--replay_fraction": PAIRED_REPLAY},
    "on_policy": {"--responses": "student", "--replay_fraction": PAIRED_REPLAY},
    "mixed": {"--responses": "mixed", "--on_policy_share": "0.5", "--replay_fraction": PAIRED_REPLAY},
}
# (variant, its partner on the same seeds): "letter" is the replay variant at PAIRED_REPLAY.
PAIRS = [("letter", "uniform_replay"), ("on_policy", "letter"), ("mixed", "letter"),
         ("on_policy", "rationale_replay"), ("rationale_replay", "letter")]
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.16, 2.145, 2.131,
        2.12, 2.11, 2.101, 2.093, 2.086, 2.08, 2.074, 2.069, 2.064, 2.06, 2.056, 2.052, 2.048, 2.045, 2.042]
WEAK_BELOW = 0.5  # smoothed accuracy in iteration 1's step B under which an ability counts as weak
GROUPS = ("weak", "other", "overall")


def expand(variants: list[str], fractions: list[float]) -> dict[str, list[str]]:
    """{variant name: its main.py flags}; "replay" becomes one variant per replay fraction when there are several."""
    out = {}
    for name in variants:
        for f in fractions if name == "replay" else [None]:
            flags = {**BASE, **VARIANTS[name]}
            if name == "replay":
                flags["--replay_fraction"] = repr(f)
            label = f"replay {f:g}" if name == "replay" and len(fractions) > 1 else name
            out[label] = [x for kv in flags.items() for x in kv]
    return out


def run_demo(name: str, seed: int, flags: list[str], work: Path, threads: int) -> dict:
    """One main.py run (or the reuse of a finished one); returns its wall time and exit status."""
    out = work / f"{name.replace(' ', '')}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(out / "workflow"),
           "--models_output_dir", str(out / "models"), "--seed", str(seed), *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    with open(out / "main.log", "ab") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return {"variant": name, "seed": seed, "command": cmd, "exit": code, "seconds": round(time.perf_counter() - start, 1),
            "workflow": str(out / "workflow")}


def weak_abilities(workflow: Path) -> list[str]:
    """Leaves ("Area > Leaf") whose smoothed accuracy in iteration 1's step B is below WEAK_BELOW."""
    from atkd.paths import IterationPaths
    from atkd.tree import load_tree

    tree = load_tree(IterationPaths(workflow, workflow.parent / "models", 1).scored_tree)
    return [" > ".join(n.path[1:]) for n in tree.leaves() if (n.stats.get("smoothed_accuracy") or 0) < WEAK_BELOW]


def pooled(accs: dict, names: list[str]) -> float | None:
    """Accuracy over the questions of `names` together (correct / n), in %."""
    cells = [accs[n] for n in names if accs.get(n) and accs[n].get("n")]
    n = sum(c["n"] for c in cells)
    return round(100 * sum(c["correct"] for c in cells) / n, 2) if n else None


def run_numbers(workflow: Path) -> dict:
    """{group: [before, after iteration 1, ...]} in %, plus what each round trained on."""
    from atkd.paths import REPORT_JSON
    from atkd.report import leaf_names
    from atkd.stages import step_folder

    report = json.loads((workflow / REPORT_JSON).read_text(encoding="utf-8"))
    weak = weak_abilities(workflow)
    stages = [report["baseline_eval"]] + [e["eval_after"] for e in report["iterations"]]
    other = [n for n in leaf_names(stages[0]) if n not in weak]
    out = {"weak_abilities": weak,
           "weak": [pooled(s, weak) for s in stages], "other": [pooled(s, other) for s in stages],
           "overall": [round(100 * s["overall"]["accuracy"], 2) if s.get("overall") else None for s in stages]}
    out["rounds"] = [{k: e.get(k) for k in ("generated", "validated", "replay", "rationales", "on_policy")}
                     for e in report["iterations"]]
    steps = step_seconds(workflow.parent / "main.log")
    out["round_seconds"] = [round(sum(s.values()), 1) for s in steps]
    out["d4_seconds"] = [s.get(step_folder("D4"), 0.0) for s in steps]
    out["step_seconds"] = steps
    return out


def step_seconds(main_log: Path) -> list[dict[str, float]]:
    """Per iteration, each step's wall time (s) from main.py's `[done] <step> in <s> s` lines; the newest
    line of a step wins (a resumed or rerun step), so a reused run still reports its own steps' cost."""
    rounds: list[dict[str, float]] = []
    if not main_log.is_file():
        return rounds
    current = None
    for line in main_log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("=== iteration "):
            current = int(line.split()[2].split("/")[0]) - 1
            while len(rounds) <= current:
                rounds.append({})
        elif line.startswith("[done] ") and current is not None:
            parts = line.split()
            rounds[current][parts[1]] = float(parts[3])
    return rounds


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], variants: list[str]) -> dict:
    """{variant: {group: [[mean, sd] per stage]}} over the seeds that finished."""
    out = {}
    for name in variants:
        done = [r["numbers"] for r in runs if r["variant"] == name and r.get("numbers")]
        if not done:
            continue
        out[name] = {"seeds": len(done)}
        for g in GROUPS:
            stages = zip(*[d[g] for d in done])
            out[name][g] = [[round(x, 2) for x in mean_sd([v for v in s if v is not None])] for s in stages]
    return out


def letter_label(labels: list[str], flags: dict[str, list[str]]) -> str | None:
    """The label of the replay variant at PAIRED_REPLAY (the letter, targeted, with replay), if it ran."""
    for label in labels:
        f = flags[label]
        if label.startswith("replay") and f[f.index("--replay_fraction") + 1] == PAIRED_REPLAY:
            return label
    return None


def t_interval(diffs: list[float]) -> dict:
    """Mean of paired differences and its 95% t interval over the seeds (None with fewer than 2 seeds)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"per_seed": diffs, "mean": round(mean, 2), "ci95": None}
    half = T975[min(n - 1, len(T975)) - 1] * statistics.stdev(diffs) / n ** 0.5
    return {"per_seed": diffs, "mean": round(mean, 2), "ci95": [round(mean - half, 2), round(mean + half, 2)]}


def paired_differences(runs: list[dict], labels: list[str], flags: dict[str, list[str]]) -> dict:
    """{"a - b": {"seeds", "weak": [after it.1, ...], "other": [...]}}: per seed a's accuracy minus b's on the
    same seed (same first-round measurement, same seed pool), each stage's differences with a 95% t interval."""
    letter = letter_label(labels, flags)
    name = {"letter": letter}
    by = {(r["variant"], r["seed"]): r["numbers"] for r in runs if r.get("numbers")}
    out = {}
    for a, b in PAIRS:
        a_label, b_label = name.get(a, a), name.get(b, b)
        if a_label not in labels or b_label not in labels:
            continue
        seeds = sorted({s for v, s in by if v == a_label} & {s for v, s in by if v == b_label})
        if not seeds:
            continue
        row = {"a": a_label, "b": b_label, "seeds": seeds}
        for g in ("weak", "other"):
            stages = len(by[(a_label, seeds[0])][g])
            row[g] = [t_interval([round(by[(a_label, s)][g][i] - by[(b_label, s)][g][i], 2) for s in seeds])
                      for i in range(1, stages)]
        out[f"{a} - {b}"] = row
    return out


def paired_table(paired: dict) -> str:
    lines = []
    for key, row in paired.items():
        for g, word in (("weak", "weak"), ("other", "known")):
            cells = []
            for i, st in enumerate(row[g], start=1):
                ci = f" [{st['ci95'][0]:+.1f}, {st['ci95'][1]:+.1f}]" if st["ci95"] else ""
                per_seed = ", ".join(f"{d:+.1f}" for d in st["per_seed"])
                cells.append(f"it.{i} {st['mean']:+.1f}{ci} (per seed {per_seed})")
            lines.append(f"{key:<34} {word:<6} " + "; ".join(cells))
    return "\n".join(lines)


def cost_table(runs: list[dict], labels: list[str]) -> str:
    """Mean wall time per round (s) of each variant, and the part of it step D4 (on-policy sampling) took."""
    lines = [f"{'variant':<18}{'s per round':>12}{'D4 s per round':>16}{'runs':>6}"]
    for label in labels:
        done = [r["numbers"] for r in runs
                if r["variant"] == label and r.get("numbers") and r["numbers"]["round_seconds"]]
        if not done:
            continue
        per_round = statistics.fmean(x for d in done for x in d["round_seconds"])
        d4 = statistics.fmean(x for d in done for x in d["d4_seconds"])
        lines.append(f"{label:<18}{per_round:>12.1f}{d4:>16.1f}{len(done):>6}")
    return "\n".join(lines)


def table(summary: dict, n_stages: int) -> str:
    heads = ["before"] + [f"it.{i}" for i in range(1, n_stages)]
    width = 12
    top = f"{'':<17}" + "".join(f"{g + (' (it.1)' if g == 'weak' else ''):<{width * n_stages}}" for g in GROUPS)
    sub = f"{'variant':<17}" + "".join(f"{h:>{width}}" for _ in GROUPS for h in heads)
    lines = [top, sub]
    for name, row in summary.items():
        cells = [f"{m:.1f}±{sd:.1f}" for g in GROUPS for m, sd in row[g]]
        lines.append(f"{name:<17}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="SEED of each run (comma-separated)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    p.add_argument("--replay_fraction", default="0.25,0.5",
                   help="REPLAY_FRACTION of the replay variant (comma-separated: one replay variant each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (results depend on it)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses --threads threads)")
    p.add_argument("--work_dir", default=str(ROOT / "bench" / "results" / "ablation_runs"),
                   help="one output folder per run; finished runs found there are reused")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablation.json"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    flags = expand(variants, [float(f) for f in args.replay_fraction.split(",") if f.strip()])

    def one(job: tuple[int, str]) -> dict:
        seed, name = job
        run = run_demo(name, seed, flags[name], Path(args.work_dir), args.threads)
        if run["exit"] == 0:
            run["numbers"] = run_numbers(Path(run["workflow"]))
        print(f"{name:<16} seed {seed}: exit {run['exit']}, {run['seconds']:.0f} s"
              + (f", weak {run['numbers']['weak']}, other {run['numbers']['other']}" if run.get("numbers") else ""),
              flush=True)
        return run

    start = time.perf_counter()
    jobs = [(seed, name) for seed in seeds for name in flags]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own process tree
        runs = list(pool.map(one, jobs))
    summary = summarise(runs, list(flags))
    n_stages = max((len(r["numbers"]["overall"]) for r in runs if r.get("numbers")), default=1)
    print(f"\naccuracy on the demo's evaluation set (%), mean±sd over seeds {seeds}; weak (it.1) = abilities with "
          f"smoothed accuracy < {WEAK_BELOW} in iteration 1's step B")
    print(table(summary, n_stages))
    paired = paired_differences(runs, list(flags), flags)
    if paired:
        print(f"\npaired differences, variant - partner on the same seed (percentage points), mean [95% t interval "
              f"over the seeds]; weak = the abilities weak in iteration 1, known = the others")
        print(paired_table(paired))
    print("\nwall time per round (sum of the iteration's steps; D4 = the student's on-policy sampling)")
    print(cost_table(runs, list(flags)))
    result = {"bench": "ablation", "seeds": seeds, "variants": flags, "paired": paired,
              "threads": args.threads, "jobs": args.jobs, "weak_below": WEAK_BELOW, "summary": summary, "runs": runs,
              "seconds": round(time.perf_counter() - start, 1), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "versions": versions()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

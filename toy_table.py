"""The README's toy-world results table: distil the shipped toy teacher under each setting and score every student.

    python toy_table.py                                  # every row (58 min with 2 jobs on a 2-core CPU)
    python toy_table.py --steps 400 --seeds 0 1 2 --jobs 2 --out runs/table

Each run is `python train.py --steps S --seed s <the row's flags>` (on top of the toy defaults: batch 16, lr 1e-4,
ω ∈ [2, 6], k = 24) into OUT/<flags>/seed-s, then `python evaluate.py` scores its final student at 1, 2 and 4 steps
(ω = 3, 8 samples of each of the 60 prompts, all-attributes accuracy and Fréchet distance; see evaluate.py). The
teacher is scored the same way with DDIM at 1, 2, 4 and 50 steps. Runs that already have their scores are reused,
so an interrupted table continues where it stopped. The table goes to stdout and OUT/table.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADV_WEIGHT = 0.05  # the paper's 0.4 swamps the toy's consistency loss within ~100 steps (README, "The toy world")
ADV = f"--adv-weight {ADV_WEIGHT}"
ROWS = [  # (name, train.py flags, with every seed?) -- the η × h ablation has no adversarial loss and one seed
    ("CD (η=0, h=1)", "--eta 0 --substeps 1 --adv-weight 0", True),
    ("SCott without adversarial (η=0.3, h=3)", "--eta 0.3 --substeps 3 --adv-weight 0", True),
    (f"SCott (η=0.3, h=3, λ_adv={ADV_WEIGHT}, D at t=0)", f"--eta 0.3 --substeps 3 {ADV}", True),
    (f"SCott (η=0.3, h=3, λ_adv={ADV_WEIGHT}, D re-noised)", f"--eta 0.3 --substeps 3 {ADV} --renoise", True),
    (f"CD + adversarial (λ_adv={ADV_WEIGHT}, D re-noised)", f"--eta 0 --substeps 1 {ADV} --renoise", False),
    *((f"η={eta}, h={h}, no adversarial", f"--eta {eta} --substeps {h} --adv-weight 0", False)
      for eta in (0, 0.1, 0.3, 0.6) for h in (1, 3))]
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = (1, 2, 4, 50)


def slug(flags: str) -> str:
    """A run's folder name from its flags: "--eta 0 --substeps 1" -> "eta-0-substeps-1"."""
    return "-".join(flags.replace("--", "").split())


def run(command: list[str], log: Path, threads: int) -> None:
    """One subprocess with its output in `log`; a failure stops the table with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=HERE, env=env)
    if code:
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}); its log, {log}, ends:\n"
                           + "".join(log.read_text().splitlines(keepends=True)[-20:]))


def score(folder: Path, evaluate_flags: list[str], threads: int) -> tuple[dict, dict]:
    """`python evaluate.py FLAGS --json folder/scores.json` unless that file is there; returns ({steps: scores},
    the data's own row), from the step count evaluate.py records in each row."""
    scores_file = folder / "scores.json"
    if not scores_file.is_file():
        run([sys.executable, "evaluate.py", *evaluate_flags, "--json", str(scores_file)], folder / "eval.log", threads)
    data, *rows = json.loads(scores_file.read_text())
    return {row["steps"]: row["scores"] for row in rows}, data["scores"]


def train_and_score(folder: Path, flags: str, steps: int, seed: int, threads: int) -> dict:
    """Distil (unless this run was already scored), then score the final student; returns {steps: scores}."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "scores.json").is_file():
        t0 = time.time()
        run([sys.executable, "train.py", "--out", str(folder), "--steps", str(steps), "--seed", str(seed),
             "--resume", "auto", "--sample-every", "0", "--ckpt-every", "100", *flags.split()],
            folder / "train.log", threads)
        (folder / "train_seconds.txt").write_text(f"{time.time() - t0:.0f}\n")
    student = folder / f"step-{steps:07d}" / "student"
    return score(folder, ["--student", str(student), "--steps", *map(str, STUDENT_STEPS)], threads)[0]


def score_teacher(folder: Path, threads: int) -> tuple[dict, dict]:
    """The undistilled teacher with DDIM: ({steps: scores}, the data's own row)."""
    folder.mkdir(parents=True, exist_ok=True)
    return score(folder, ["--teacher-steps", *map(str, TEACHER_STEPS)], threads)


def mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table_row(name: str, per_seed: list[dict]) -> str:
    """per_seed: [{steps: scores}] -> one markdown row of accuracy and FD at 1, 2 and 4 steps."""
    acc = [mean_std([s[n]["acc_all"] for s in per_seed], 3) for n in STUDENT_STEPS]
    fd = [mean_std([s[n]["fd"] for s in per_seed], 1) for n in STUDENT_STEPS]
    return f"| {name} | {len(per_seed)} | " + " | ".join(acc + fd) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/table", help="runs, logs and table.md go here")
    p.add_argument("--steps", type=int, default=400, help="distillation steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (the single-seed rows use the first)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each with 1 CPU thread")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()  # the subprocesses run in the repository folder
    rows = [(name, flags, args.seeds if every_seed else args.seeds[:1]) for name, flags, every_seed in ROWS]
    runs = list(dict.fromkeys((flags, seed) for _, flags, seeds in rows for seed in seeds))  # shared between rows
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        teacher = pool.submit(score_teacher, out / "teacher", 1)
        futures = {(flags, seed): pool.submit(train_and_score, out / slug(flags) / f"seed-{seed}", flags, args.steps,
                                              seed, 1) for flags, seed in runs}
        results = {key: f.result() for key, f in futures.items()}
        teacher_scores, data_scores = teacher.result()

    lines = [f"Distillation: {args.steps} steps of batch 16 per run; scores at ω = 3 on 480 samples (8 per prompt). "
             f"Accuracy = all three attributes right; FD = Fréchet distance in the classifier's features (lower is "
             f"better). ± = std over training seeds.",
             f"Fresh synthetic data: accuracy {data_scores['acc_all']:.3f}, FD {data_scores['fd']:.1f} (the floor "
             f"at this sample size). Teacher DDIM 50 steps (100 UNet evaluations with CFG): accuracy "
             f"{teacher_scores[50]['acc_all']:.3f}, FD {teacher_scores[50]['fd']:.1f}.", "",
             "| method | seeds | acc 1 step | acc 2 steps | acc 4 steps | FD 1 step | FD 2 steps | FD 4 steps |",
             "|---|---|---|---|---|---|---|---|",
             table_row("teacher DDIM, same steps (2 UNet evaluations per step)", [teacher_scores])]
    lines += [table_row(name, [results[flags, seed] for seed in seeds]) for name, flags, seeds in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "table.md").write_text(text)
    print(f"wall time {(time.time() - t0) / 60:.1f} min; runs and logs in {out}")


if __name__ == "__main__":
    main()

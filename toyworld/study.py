"""The toy-world study: distil the shipped toy teacher under each setting, score the students along training.

    python -m toyworld.study                                  # every run (hours on a 2-core CPU; resumable)
    python -m toyworld.study --seeds 0 --jobs 2               # one seed of every row
    python -m toyworld.study --rows "CD (η=0, h=1)" --jobs 1  # one row (every seed); --help lists the names

Each run is `python train.py --seed s <the row's flags>` (on top of the toy defaults: batch 16, lr 1e-4, ω ∈ [2, 6],
k = 24) into OUT/<flags>/seed-s. Every run gets the same teacher budget, BUDGET_STEPS optimisation steps at h = 3
(16 images × h sub-steps × 2 for CFG per step): an h = 1 run trains three times as many steps. The run stops at
BUDGET_STEPS (equal optimiser steps), at its end (equal teacher budget) and, for the rows trained with every seed,
at POINTS even fractions of the budget (the trade-off curves); `python evaluate.py` scores its student there at
1, 2 and 4 steps: accuracy, Fréchet distance (FD) and coverage in the toy classifier's features (evaluate.py).
The teacher is scored the same way with DDIM at 1, 2, 4 and 50 steps.

Everything a run has done stays on disk (checkpoints, per-point scores), so an interrupted study continues where it
stopped, and the tables and the plot are made from whatever is finished. The default OUT is in the repository:
its scores, tables and plot are committed (its checkpoints and logs are ignored by git), so a study can span
sessions and machines; a point whose scores are there is never recomputed, and a run whose checkpoints are gone
restarts from its beginning (training is deterministic, so it retraces the same steps). Outputs: OUT/table.md
and OUT/tradeoff.png (needs matplotlib): the trade-off curves, 1-step FD against 2-step FD along training, and
the FD at 1, 2 and 4 steps against the teacher evaluations spent.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import run_folder
from checkpoint import OutputRefused, refuse_overlap
from sd15 import TOY_FOLDER

HERE = Path(__file__).resolve().parent.parent  # the repository root: train.py and evaluate.py run from there
BUDGET_STEPS = 400          # optimisation steps of an h = 3 run; an h-sub-step run gets 3 / h times as many
POINTS = 4                  # scored points along each run, evenly spaced in teacher evaluations
BATCH = 16                  # the toy's global batch (toy/scott.toml)
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = (1, 2, 4, 50)
ADV_FIXED = 0.05            # the paper's 0.4 as a fixed weight swamped the toy's consistency loss (README)
ADV_ADAPTIVE = 0.4          # the paper's λ_adv, as a share of the consistency gradient at the student's last layer
ADVERSARIAL = (("", "--adv-weight 0"),
               (f" + adv λ={ADV_FIXED}", f"--adv-weight {ADV_FIXED} --renoise"),
               (f" + adv λ={ADV_ADAPTIVE} adaptive", f"--adv-weight {ADV_ADAPTIVE} --adv-weighting adaptive --renoise"))
TARGETS = (("CD (η=0, h=1)", 0.0, 1, True), ("SCott (η=0.3, h=3)", 0.3, 3, True),  # (name, η, h, every seed?)
           ("SCott (η=0.1, h=1)", 0.1, 1, False), ("SCott (η=0.3, h=1)", 0.3, 1, False),
           ("SCott (η=0.1, h=3)", 0.1, 3, False))


@dataclass(frozen=True)
class Row:
    name: str
    flags: str
    substeps: int
    every_seed: bool

    @property
    def steps(self) -> int:
        """The run's length: the same teacher evaluations as BUDGET_STEPS steps at h = 3."""
        return BUDGET_STEPS * 3 // self.substeps

    @property
    def points(self) -> list[int]:
        """Optimisation steps at which the student is scored: BUDGET_STEPS (equal optimiser steps) and the run's
        end (equal teacher budget), plus, for a row with a trade-off curve (every seed), POINTS even fractions of
        the budget. Scoring costs more CPU than training, so the single-seed rows stop at the two comparisons."""
        curve = {self.steps * (i + 1) // POINTS for i in range(POINTS)} if self.every_seed else set()
        return sorted(curve | {BUDGET_STEPS, self.steps})


ROWS = [Row(name + adv_name, f"--eta {eta} --substeps {h} {adv_flags}", h, main)
        for name, eta, h, main in TARGETS for adv_name, adv_flags in ADVERSARIAL]


def teacher_evaluations(step: int, substeps: int) -> int:
    """Teacher UNet evaluations (per image) spent by `step` optimisation steps: batch × h × 2 (cond + uncond)."""
    return step * BATCH * substeps * 2


def slug(flags: str) -> str:
    """A run's folder name from its flags: "--eta 0 --substeps 1" -> "eta-0-substeps-1"."""
    return "-".join(flags.replace("--", "").split())


def run(command: list[str], log: Path, threads: int) -> None:
    """One subprocess with its output in `log`; a failure stops the study with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=HERE, env=env)
    if code:
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}); its log, {log}, ends:\n"
                           + "".join(log.read_text().splitlines(keepends=True)[-20:]))


def score(scores_file: Path, evaluate_flags: list[str], threads: int) -> tuple[dict, dict]:
    """`python evaluate.py FLAGS --json scores_file` unless that file is there; returns ({steps: scores}, the data's
    own row), from the step count evaluate.py records in each row."""
    if not scores_file.is_file():
        run([sys.executable, "evaluate.py", *evaluate_flags, "--json", str(scores_file)],
            scores_file.with_suffix(".log"), threads)
    return read_scores(scores_file)


def read_scores(scores_file: Path) -> tuple[dict, dict]:
    """evaluate.py's JSON -> ({steps: scores}, the data's own row)."""
    data, *rows = json.loads(scores_file.read_text())
    return {row["steps"]: row["scores"] for row in rows}, data["scores"]


def train_and_score(row: Row, folder: Path, seed: int, threads: int) -> dict:
    """Distil in stages, stopping at each of the row's points to score the student there (each stage resumes the
    last checkpoint exactly); returns {step: {student steps: scores}}. Finished stages are skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    curve = {}
    for point in row.points:
        scores_file = folder / f"scores-{point:07d}.json"
        student = folder / f"step-{point:07d}" / "student"
        if not scores_file.is_file() and not student.is_dir():
            t0 = time.time()
            run([sys.executable, "train.py", "--out", str(folder), "--steps", str(row.steps), "--seed", str(seed),
                 "--resume", "auto", "--sample-every", "0", "--ckpt-every", str(row.steps), "--stop-after",
                 str(point - newest_checkpoint_step(folder)), *row.flags.split()], folder / "train.log", threads)
            with open(folder / "train_seconds.txt", "a") as f:
                f.write(f"{point} {time.time() - t0:.0f}\n")
        curve[point] = score(scores_file, ["--student", str(student), "--steps", *map(str, STUDENT_STEPS)],
                             threads)[0]
    return curve


def newest_checkpoint_step(folder: Path) -> int:
    """The step `train.py --resume auto` continues from: its newest checkpoint's (run_folder.list_checkpoints), 0 if
    none."""
    checkpoints = run_folder.list_checkpoints(folder)
    return checkpoints[-1][0] if checkpoints else 0


# ---- tables and the plot ----------------------------------------------------------------------------------------

def mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


COLUMNS = (("acc_all", 3), ("fd", 1), ("coverage", 3))
HEADER = ("| method | seeds | " + " | ".join(f"{m} {n}" for m, _ in COLUMNS for n in STUDENT_STEPS) + " |\n|"
          + "---|" * (2 + len(COLUMNS) * len(STUDENT_STEPS)))


def table_row(name: str, per_seed: list[dict]) -> str:
    """per_seed: [{student steps: scores}] -> one markdown row: accuracy, FD and coverage at 1, 2 and 4 steps."""
    cells = [mean_std([s[n][metric] for s in per_seed], digits) for metric, digits in COLUMNS for n in STUDENT_STEPS]
    return f"| {name} | {len(per_seed)} | " + " | ".join(cells) + " |"


def plot_tradeoff(curves: dict, path: Path) -> None:
    """curves: {row name: {teacher UNet evaluations spent: [per-seed {student steps: scores}]}}, each point the mean
    over the row's seeds. Four panels: 1-step FD against 2-step FD along training (the trade-off; lower-left is
    better), and the FD at 1, 2 and 4 steps against the teacher evaluations spent (lower is better). Skipped with a
    note if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no trade-off plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    tradeoff, *along = axes.flat
    for name, points in curves.items():
        fd = {n: [statistics.mean(s[n]["fd"] for s in seeds) for seeds in points.values()] for n in STUDENT_STEPS}
        line, = tradeoff.plot(fd[1], fd[2], marker="o", label=name)
        tradeoff.annotate("end", (fd[1][-1], fd[2][-1]), fontsize=7)
        for ax, n in zip(along, STUDENT_STEPS):
            ax.plot([k / 1000 for k in points], fd[n], marker="o", color=line.get_color())
    for ax, n in zip(along, STUDENT_STEPS):
        ax.set(xlabel="teacher UNet evaluations spent (K)", ylabel=f"FD, {n} step(s)", yscale="log")
    tradeoff.set(xlabel="FD, 1 step", ylabel="FD, 2 steps", title="along training: 1-step against 2-step FD")
    tradeoff.legend(fontsize=7)
    fig.suptitle(f"toy world: students scored along training (at {POINTS} even fractions of the teacher budget and at "
                 f"step {BUDGET_STEPS}; mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # the study rewrites the plot after every run


def report(rows: list, seeds: list[int], teacher: tuple, runs: dict) -> str:
    """The markdown: the teacher's rows, then every method at equal optimiser steps and at equal teacher budget,
    from the runs that have those points."""
    teacher_scores, data_scores = teacher
    lines = ["Scores at ω = 3. acc = every named attribute right and FD = Fréchet distance in the classifier's "
             "features (lower is better), on 480 samples (one per toy caption); coverage (Naeem et al. 2020, k = 5; "
             "higher is better) on the 16 open captions, 30 samples each. ± = std over training seeds.",
             f"Fresh synthetic data: acc {data_scores['acc_all']:.3f}, FD {data_scores['fd']:.1f}, coverage "
             f"{data_scores['coverage']:.3f} (the floor at this sample size).", "",
             "Teacher, DDIM with CFG (2 UNet evaluations per step):", "",
             "| steps | acc | FD | coverage |", "|---|---|---|---|"]
    lines += [f"| {n} | {s['acc_all']:.3f} | {s['fd']:.1f} | {s['coverage']:.3f} |" for n, s in teacher_scores.items()]
    for title, pick in ((f"Equal optimiser steps ({BUDGET_STEPS}):", lambda row: BUDGET_STEPS),
                        (f"Equal teacher budget ({teacher_evaluations(BUDGET_STEPS, 3) / 1000:.1f}K teacher UNet "
                         f"evaluations; {BUDGET_STEPS} steps at h = 3, {3 * BUDGET_STEPS} at h = 1):",
                         lambda row: row.steps)):
        lines += ["", title, "", HEADER]
        for row in rows:
            done = [runs[row.flags, s][pick(row)] for s in (seeds if row.every_seed else seeds[:1])
                    if pick(row) in runs.get((row.flags, s), {})]
            if done:
                lines.append(table_row(row.name, done))
    return "\n".join(lines) + "\n"


def scored_points(row: Row, folder: Path) -> dict:
    """{step: {student steps: scores}} of the points of a run that are scored on disk (none: {})."""
    files = {point: folder / f"scores-{point:07d}.json" for point in row.points}
    return {point: read_scores(f)[0] for point, f in files.items() if f.is_file()}


def write_results(out: Path, order: list, seeds: list[int], teacher: tuple) -> str:
    """OUT/table.md and OUT/tradeoff.png from every score on disk (finished or not); returns the table."""
    runs = {(row.flags, seed): scored_points(row, out / slug(row.flags) / f"seed-{seed}") for row, seed in order}
    text = report(ROWS, seeds, teacher, runs)
    (out / "table.md").write_text(text)
    # A curve averages the finished runs of its row only, so that every point of it is a mean over the same seeds.
    curves = {}
    for row in [row for row in ROWS if row.every_seed]:  # the rows with a curve
        finished = [runs[row.flags, s] for s in seeds if set(runs.get((row.flags, s), {})) == set(row.points)]
        if finished:
            curves[f"{row.name}, {len(finished)} seed(s)"] = {
                teacher_evaluations(p, row.substeps): [run[p] for run in finished] for p in row.points}
    if curves:
        plot_tradeoff(curves, out / "tradeoff.png")
    return text


def claim_out(out: Path) -> None:
    """Before any run: refuse an --out on the toy model (toy/, every run's teacher) and take --out's lock for the
    study's whole life (run_folder.lock_out: a second study into it refuses at once, naming this one)."""
    try:
        refuse_overlap(out, {"the toy model": TOY_FOLDER})
    except OutputRefused as e:
        raise SystemExit(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    run_folder.lock_out(out, "toyworld.study")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/toy-study", help="runs, logs, table.md and tradeoff.png go here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds (the single-seed rows use the first)")
    p.add_argument("--rows", nargs="+", metavar="NAME", choices=[row.name for row in ROWS],
                   help="run only these rows (default: all); the tables still show every row scored on disk. "
                        "Names: " + "; ".join(row.name for row in ROWS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each with 1 CPU thread")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write table.md and tradeoff.png from the scores already on disk")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()  # the subprocesses run in the repository folder
    claim_out(out)
    # The first seed of every row first, so a partial study already has every row.
    order = [(row, seed) for seed in args.seeds for row in ROWS if row.every_seed or seed == args.seeds[0]]
    run_now = [(row, seed) for row, seed in order if args.rows is None or row.name in args.rows]
    teacher_file = out / "teacher" / "scores.json"
    t0 = time.time()
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            teacher_file.parent.mkdir(parents=True, exist_ok=True)
            teacher = pool.submit(score, teacher_file, ["--teacher-steps", *map(str, TEACHER_STEPS)], 1)
            futures = [pool.submit(train_and_score, row, out / slug(row.flags) / f"seed-{seed}", seed, 1)
                       for row, seed in run_now]
            for future in futures:
                future.result()
                write_results(out, order, args.seeds, teacher.result())  # rewritten as each run finishes
    if not teacher_file.is_file():
        raise SystemExit(f"{teacher_file} is missing: run `python -m toyworld.study --out {args.out}` (it scores the "
                         f"teacher first).")
    print(write_results(out, order, args.seeds, read_scores(teacher_file)))
    print(f"wall time {(time.time() - t0) / 60:.1f} min; runs, logs, table.md and tradeoff.png in {out}")


if __name__ == "__main__":
    main()

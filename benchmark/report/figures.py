"""Figures from records and saved samples (matplotlib, PNG)."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmark.report.headline import per_subject_frame  # noqa: E402
from benchmark.report.labels import BASE_ROW, method_label  # noqa: E402
from benchmark.run.records import iter_records  # noqa: E402
from benchmark.run.spec import AUTOENCODER, BASE_UNCONDITIONED, REFERENCE, REFERENCE_OTHER, SPHERE_SUFFIX  # noqa: E402
from metrics.control_delta import bootstrap_mean, paired_difference  # noqa: E402
from metrics.ranking import probability_of_improvement, rank_intervals  # noqa: E402
from benchmark.report.frame import metric_columns  # noqa: E402
from core.files import atomic_png  # noqa: E402

PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # (name, axis of X, Y, Z)


def size_axis(ax, sizes) -> None:
    """A log axis of training-set sizes labelled at the sizes themselves (10, 50, 500), not in powers of ten."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ticks = sorted({int(v) for v in sizes})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())

def metric_vs_size(frame: pd.DataFrame, task: str, out: Path) -> Path | None:
    """Each metric against training-set size, one line per method (mean ± std over seeds); None with fewer
    than two sizes (nothing to draw against: the tables hold the values)."""
    ok = frame[(frame.task == task) & (frame.status == "ok") & (frame["size"] > 0)]
    ok = ok[~ok.method.str.endswith(SPHERE_SUFFIX)]
    columns = [c for c in metric_columns(ok) if pd.to_numeric(ok[c], errors="coerce").notna().any()]
    if ok["size"].nunique() < 2 or not columns:
        return None
    reference = frame[(frame.task == task) & (frame.method == REFERENCE) & (frame.status == "ok")]
    other = frame[(frame.task == task) & (frame.method == REFERENCE_OTHER) & (frame.status == "ok")]
    ncols = 3
    nrows = int(np.ceil(len(columns) / ncols))
    height = 3.0 * nrows + 1.9  # inches: the panels, the title above and the legend below
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, height), squeeze=False)
    # fixed margins in inches: tight_layout on some thirty panels costs seconds for every report
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 1.0 / height, bottom=1.0 / height, wspace=0.35, hspace=0.5)
    for ax, column in zip(axes.flat, columns):
        for method, rows in ok.groupby("method"):
            values = pd.to_numeric(rows[column], errors="coerce")
            stats = values.groupby(rows["size"]).agg(["mean", "std"]).sort_index()
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", label=method, capsize=2)
        ref = pd.to_numeric(reference[column], errors="coerce").dropna() if column in reference else pd.Series()
        if not ref.empty:
            ax.axhline(ref.mean(), color="k", linestyle="--", linewidth=1, label="real vs real")
        ignored = pd.to_numeric(other[column], errors="coerce").dropna() if column in other else pd.Series()
        if not ignored.empty:
            ax.axhline(ignored.mean(), color="0.5", linestyle=":", linewidth=1, label="real, another's condition")
        size_axis(ax, ok["size"].unique())
        ax.set_xlabel("training volumes")
        ax.set_title(column, fontsize=9)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"Task {task}: metrics against training-set size", y=1 - 0.2 / height)
    path = out / f"metrics_vs_size_{task}.png"
    atomic_png(path, fig)
    plt.close(fig)
    return path


def _mid_slice(volume: np.ndarray, axis: int, index: int | None = None) -> np.ndarray:
    index = volume.shape[axis] // 2 if index is None else index
    return np.rot90(np.take(volume, index, axis=axis))


def montage(samples_npz: Path, real_npz: Path | None, title: str, out: Path, n_subjects: int = 3) -> Path:
    """Axial, coronal and sagittal slices of generated volumes with the condition's outline,
    beside the real volume of the same subject."""
    data = np.load(samples_npz)
    volumes = data["volumes"].astype(np.float32)
    ids = list(data["ids"])
    condition_keys = [k for k in data.files if k.startswith("condition_")]
    real = np.load(real_npz) if real_npz and Path(real_npz).is_file() else None
    real_by_id = {i: k for k, i in enumerate(real["ids"])} if real is not None else {}
    n = min(n_subjects, len(ids))
    # Super-resolution: the low-resolution input is shown beside the generated and real volumes,
    # and the axial slice is the one half-way between two kept slices (a kept one shows the input).
    low_res = bool(condition_keys) and condition_keys[0] == "condition_low_res"
    sr_task = Path(samples_npz).parent.name.split("__")[0]
    factor = int(sr_task[2:]) if low_res and sr_task[:2] == "sr" and sr_task[2:].isdigit() else 1
    cols = 3 * ((2 if real is not None else 1) + (1 if low_res else 0))
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 2.1 * n), squeeze=False)
    for row in range(n):
        generated = volumes[row, 0]
        outline = None
        if condition_keys:
            cond = data[condition_keys[0]][row].astype(np.float32)
            outline = cond[-1] if cond.shape[0] > 1 else cond[0]  # LV channel of a semantic map is the last
        # Slice through the condition's centre when there is one, else the middle.
        centre = (np.argwhere(outline > 0.5).mean(0).round().astype(int)
                  if outline is not None and (outline > 0.5).any() and condition_keys[0] != "condition_low_res"
                  else [None, None, None])
        panels = [("generated", generated)]
        if low_res:
            z_mid = volumes.shape[-1] // 2
            centre = [None, None, min((z_mid // factor) * factor + factor // 2, volumes.shape[-1] - 1)]
            panels.insert(0, ("low-res input", data[condition_keys[0]][row, 0].astype(np.float32)))
        if real is not None and ids[row] in real_by_id:
            panels.append(("real", real["volumes"][real_by_id[ids[row]], 0].astype(np.float32)))
        col = 0
        for label, volume in panels:
            for plane, axis in PLANES:
                ax = axes[row, col]
                # nearest: the voxels as they are (4 mm at cpu), and a PNG a third smaller than smoothed
                ax.imshow(_mid_slice(volume, axis, centre[axis]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                if outline is not None and condition_keys[0] != "condition_low_res":
                    ax.contour(_mid_slice(outline, axis, centre[axis]), levels=[0.5], colors="r", linewidths=0.7)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{label} {plane}", fontsize=8)
                col += 1
        axes[row, 0].set_ylabel(str(ids[row]), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_png(out, fig)
    plt.close(fig)
    return out


def control_gap_curves(results_dir: Path, task: str, out: Path) -> Path | None:
    """The control probe against training step: one panel per timestep band, one line per method and
    training-set size (each method's first seed at the smallest and largest N, as the montages), the
    bootstrap 95% CI shaded; 0 (no use of the condition) drawn."""
    runs = []
    for rec in iter_records(results_dir):
        history = (rec.get("control_probe") or {}).get("history")
        if rec.get("task") == task and rec.get("status") == "ok" and history:
            runs.append(rec)
    if not runs:
        return None
    sizes = [r["size"] for r in runs]
    first_seed = min(r["seed"] for r in runs)
    curves = [(f"{r['method']} N={r['size']} s{r['seed']}", r["control_probe"]["history"]) for r in runs
              if r["seed"] == first_seed and r["size"] in (min(sizes), max(sizes))]
    bands = [row["band"] for row in curves[0][1][0]["bands"]]
    fig, axes = plt.subplots(1, len(bands), figsize=(3.6 * len(bands), 3.2), squeeze=False)
    for b, (ax, band) in enumerate(zip(axes[0], bands)):
        for label, history in sorted(curves):
            steps = [h["step"] for h in history]
            rows = [h["bands"][b] for h in history]
            line, = ax.plot(steps, [r["gap"] for r in rows], marker=".", label=label)
            ax.fill_between(steps, [r["gap_ci_low"] for r in rows], [r["gap_ci_high"] for r in rows],
                            color=line.get_color(), alpha=0.2)
        ax.axhline(0.0, color="k", linewidth=0.8)
        ax.set_title(f"band {band}", fontsize=9)
        ax.set_xlabel("training step")
    axes[0, 0].set_ylabel("control gap: MSE(other) - MSE(own)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=7)
    fig.suptitle(f"Task {task}: control gap against training step (95% CI shaded)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 + 0.03 * (len(labels) // 4), 1, 0.94))
    path = out / f"control_gap_{task}.png"
    atomic_png(path, fig)
    plt.close(fig)
    return path


IMPROVEMENT_FLOOR = BASE_UNCONDITIONED  # the unconditioned base model: shown beside the methods as the floor
CONTEXT_LINES = {AUTOENCODER: ("autoencoder (ceiling)", "k", "--"), BASE_UNCONDITIONED: (BASE_ROW, "0.5", ":")}


def control_vs_size(subjects: pd.DataFrame, task: str, out: Path) -> Path | None:
    """Dice with the own condition and Control Δ against training-set size, one line per method, each
    point the mean over subjects and seeds with its 95% interval (bootstrap over seeds, then subjects
    within each, :mod:`metrics.control_delta`); the autoencoder ceiling and the unconditioned base model
    drawn across, and 0 for Control Δ."""
    if subjects.empty or "Dice" not in subjects:
        return None
    mine = subjects[(subjects.task == task) & subjects["Dice"].notna() & ~subjects.method.str.endswith(SPHERE_SUFFIX)]
    trained = mine[mine["size"] > 0]
    if trained.empty:
        return None
    methods = sorted(trained.method.unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, method in enumerate(methods):
        rows = trained[trained.method == method]
        sizes = sorted(rows["size"].unique())
        dice, delta = [], []
        for size in sizes:
            at = rows[rows["size"] == size]
            strata = at["seed"].to_numpy()
            dice.append(bootstrap_mean(at["Dice"], strata=strata))
            swapped = at["Dice swapped"] if "Dice swapped" in at else pd.Series(np.nan, index=at.index)
            delta.append(paired_difference(at["Dice"], swapped, strata=strata) if swapped.notna().any() else None)
        x = np.asarray(sizes, dtype=float) * (1 + 0.05 * (i - (len(methods) - 1) / 2))  # side by side
        for ax, stats in ((axes[0], dice), (axes[1], delta)):
            keep = [j for j, st in enumerate(stats) if st is not None and np.isfinite(st["mean"])]
            if not keep:
                continue
            mean = np.array([stats[j]["mean"] for j in keep])
            low = np.array([stats[j]["ci_low"] for j in keep])
            high = np.array([stats[j]["ci_high"] for j in keep])
            ax.errorbar(x[keep], mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=method)
    for method, (label, colour, style) in CONTEXT_LINES.items():
        values = mine[mine.method == method]["Dice"]
        if not values.empty:
            axes[0].axhline(values.mean(), color=colour, linestyle=style, linewidth=1, label=label)
    axes[1].axhline(0.0, color="k", linewidth=0.8)
    for ax, title in ((axes[0], "Dice with the own condition"), (axes[1], "Control Δ = Dice(own) − Dice(swapped)")):
        size_axis(ax, trained["size"].unique())
        ax.set_xlabel("training volumes (N)")
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"Task {task}: following the condition against N (mean over subjects and seeds, 95% CI)",
                 fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.24, wspace=0.25)
    path = out / f"control_vs_size_{task}.png"
    atomic_png(path, fig)
    plt.close(fig)
    return path


def improvement_figures(subjects: pd.DataFrame, task: str, out: Path, score: str = "Dice") -> list[Path]:
    """Per training size of ``task``: the probability that the row's method beats the column's on a
    subject (``score``, paired by subject and seed; 95% CI) and each method's rank with its interval
    (:mod:`metrics.ranking`). Methods sampled for different subjects are paired on the ones they share."""
    if subjects.empty or score not in subjects:
        return []
    mine = subjects[(subjects.task == task) & subjects[score].notna()]
    floor = mine[mine.method == IMPROVEMENT_FLOOR]
    paths = []
    for size in sorted(s for s in mine["size"].unique() if s > 0):
        rows = pd.concat([mine[(mine["size"] == size) & ~mine.method.str.endswith(SPHERE_SUFFIX)], floor])
        table = rows.pivot_table(index=["seed", "id"], columns="method", values=score, aggfunc="first")
        methods = [m for m in sorted(table.columns) if m != IMPROVEMENT_FLOOR] + (
            [IMPROVEMENT_FLOOR] if IMPROVEMENT_FLOOR in table.columns else [])
        if len(methods) < 2:
            continue
        table = table[methods]
        strata = table.index.get_level_values("seed").to_numpy()
        k = len(methods)
        prob = np.full((k, k), np.nan)
        text = [["" for _ in range(k)] for _ in range(k)]
        for i in range(k):
            for j in range(k):
                if i != j:
                    p = probability_of_improvement(table.iloc[:, i], table.iloc[:, j], strata=strata)
                    prob[i, j] = p["mean"]
                    text[i][j] = f"{p['mean']:.2f}\n[{p['ci_low']:.2f}, {p['ci_high']:.2f}]"
        complete = table.dropna()
        ranks = rank_intervals(complete.to_numpy(), strata=complete.index.get_level_values("seed").to_numpy()) \
            if len(complete) >= 2 else None
        fig, axes = plt.subplots(1, 2, figsize=(5 + 1.1 * k, 0.9 * k + 1.8),
                                 gridspec_kw={"width_ratios": [k, max(3, k // 2)]})
        im = axes[0].imshow(prob, vmin=0, vmax=1, cmap="RdBu")
        for i in range(k):
            for j in range(k):
                axes[0].text(j, i, text[i][j], ha="center", va="center", fontsize=6)
        labels = [method_label(m) for m in methods]
        axes[0].set_xticks(range(k), labels, rotation=45, ha="right", fontsize=7)
        axes[0].set_yticks(range(k), labels, fontsize=7)
        axes[0].set_title(f"P(row beats column) on {score}, paired subjects", fontsize=9)
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        if ranks:
            y = np.arange(k)
            axes[1].errorbar([r["rank"] for r in ranks], y,
                             xerr=[[r["rank"] - r["ci_low"] for r in ranks], [r["ci_high"] - r["rank"] for r in ranks]],
                             fmt="o", capsize=3)
            axes[1].set_yticks(y, labels, fontsize=7)
            axes[1].invert_yaxis()
            axes[1].set_xlim(0.5, k + 0.5)
            axes[1].set_title(f"rank by mean {score} (95% CI, {ranks[0]['n']} subjects)", fontsize=9)
        fig.suptitle(f"{task}, N = {size}: which method is better, subject by subject", fontsize=10)
        fig.tight_layout()
        path = out / f"improvement_{task}_n{size}.png"
        atomic_png(path, fig)
        plt.close(fig)
        paths.append(path)
    return paths


def write_figures(results_dir: Path, frame: pd.DataFrame) -> list[Path]:
    out = Path(results_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if frame.empty:
        return paths
    subjects = per_subject_frame(Path(results_dir))
    for task in sorted(frame.task.dropna().unique()):
        for path in (metric_vs_size(frame, task, out), control_vs_size(subjects, task, out),
                     control_gap_curves(Path(results_dir), task, out)):
            if path:
                paths.append(path)
        paths += improvement_figures(subjects, task, out)
    real = Path(results_dir) / "runs" / "real_test.npz"
    remove_unselected_montages(frame, out)
    for run in montage_runs(frame, sorted((Path(results_dir) / "runs").glob("*/samples.npz"))):
        name = run.parent.name
        title = "  ".join(method_label(part) for part in name.split("__"))  # the stored name, labelled
        paths.append(montage(run, real, title, out / f"montage_{name}.png"))
    # montages drawn earlier whose volumes this folder no longer holds (a clone: runs/ is not committed)
    paths += sorted(p for p in out.glob("montage_*.png") if p not in paths)
    return paths


def remove_unselected_montages(frame: pd.DataFrame, out: Path) -> None:
    """Delete the montage of a recorded run that is no longer at either end of its size axis (N = 50 once
    N = 500 has landed), so that the figures folder holds what :func:`montage_runs` selects. Decided from
    the records alone: a clone without ``runs/`` keeps its committed montages."""
    recorded = [f"{r.task}__{r.method}__n{r.size}__s{r.seed}" for r in frame[frame.status == "ok"].itertuples()]
    selected = {p.parent.name for p in montage_runs(frame, [Path(name) / "samples.npz" for name in recorded])}
    for name in set(recorded) - selected:
        (out / f"montage_{name}.png").unlink(missing_ok=True)


RUN_NAME = re.compile(r"^(?P<task>.+)__(?P<method>.+)__n(?P<size>\d+)__s(?P<seed>\d+)$")


def montage_runs(frame: pd.DataFrame, samples: list[Path]) -> list[Path]:
    """The runs worth a montage: finished runs, each method's first seed at the smallest and the largest
    training-set size of its task (and the runs without training, N = 0), so that a study of hundreds of
    runs shows every method at its two ends and stays small."""
    recorded = {f"{r.task}__{r.method}__n{r.size}__s{r.seed}" for r in frame[frame.status == "ok"].itertuples()}
    ok = frame[(frame.status == "ok") & (frame["size"] > 0)]
    ends = {task: {int(rows["size"].min()), int(rows["size"].max())} for task, rows in ok.groupby("task")}
    first_seed = {task: int(rows.seed.min()) for task, rows in frame.groupby("task")}
    keep = []
    for path in samples:
        m = RUN_NAME.match(path.parent.name)
        if m is None:
            keep.append(path)  # not a grid run's folder: drawn as before
            continue
        task, size, seed = m["task"], int(m["size"]), int(m["seed"])
        if path.parent.name not in recorded:
            continue  # still running, or failed: no montage without a finished record
        if seed == first_seed.get(task, seed) and (size == 0 or size in ends.get(task, {size})):
            keep.append(path)
    return keep

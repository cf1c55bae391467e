"""The paper's tables, built from run records alone (``python run_benchmark.py tables``).

Every table is written as CSV, Markdown and LaTeX. Cells are "mean ± std" over seeds (the std
is left out when there is one seed); a Fréchet cell adds its 95% bootstrap CI over volumes in
brackets (with several seeds, the span from the lowest seed's low to the highest seed's high). The paper's own numbers (``results/paper_reference``)
stand in columns of their own, labelled ``paper …``: they come from other data and,
where the suite fell back to in-domain extractors, from other feature extractors. Which table a
task gets follows its definition (``datasets.tasks``): super-resolution tasks share Table 4, tasks
with validation rows get Table 6. The Markdown tables mark each metric column with its direction
(↑ higher is better, ↓ lower is better; ``metrics.suite``); the CSV headers are the records' columns.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from benchmark.engine.probe import NOISE_MSE_RATIO
from benchmark.engine.recipes import tuning_hours
from benchmark.report.headline import BENCH_STEP, interval_text, per_subject_frame
from benchmark.report.frame import AXIAL_MM, FD_CI, UNDERSAMPLED, fd_span, metric_columns, records_frame
from benchmark.report.labels import BASE_ROW, PSEUDO_METHODS, REFERENCE_ROW
from benchmark.run.spec import BASE_UNCONDITIONED, REFERENCE, REFERENCE_OTHER, SPHERE_SUFFIX
from datasets.tasks import TASKS, TaskError, get_task
from metrics.control_delta import bootstrap_mean, paired_difference
from metrics.suite import metric_of

PAPER_REFERENCE = Path(__file__).resolve().parents[2] / "results" / "paper_reference"
SPHERE_VCM = "vcm" + SPHERE_SUFFIX
VALIDATION_ROWS = {  # Table 6: row label -> (method in the records, size)
    BASE_ROW: (BASE_UNCONDITIONED, 0),
    "ldm_finetune": ("ldm_finetune", 50),
    "ldm_scratch": ("ldm_scratch", 50),
    SPHERE_VCM: (SPHERE_VCM, 50),
}


DAGGER = "†"
DAGGER_NOTE = (f"{DAGGER} Fréchet distance computed with fewer volumes than feature dimensions in at least one run "
               "(covariances rank-deficient, the mean term dominates; protocol 'sample_size'): read it with the "
               "rel, recall and coverage columns")
COLLAPSE_BELOW = 0.2  # recall or coverage (any feature space) under this: the row gets a warning
COLLAPSE_COLUMNS = ("Recall-", "Coverage-")  # the column stems COLLAPSE_BELOW applies to
NOT_DENOISING_ABOVE = 2.0  # noise MSE / frozen over this: the row gets a warning
WARNING = "warning"
WARNING_NOTES = {  # what a warning cell names -> the note under the table that explains it
    COLLAPSE_COLUMNS: (
        f"⚠ recall or coverage below {COLLAPSE_BELOW}: the samples cover little of the real data (e.g. a "
        "collapsed generator making near copies); a low FD in this row is not better fidelity"),
    (NOISE_MSE_RATIO,): (
        f"⚠ {NOISE_MSE_RATIO} above {NOT_DENOISING_ABOVE:g}: at its final checkpoint the method predicts the noise "
        "worse than the frozen base model it steers (training diverged, or a model trained from scratch is still "
        "early); its Dice and FD measure a broken generator, not its control"),
}


def with_fd_intervals(table: pd.DataFrame, ok: pd.DataFrame) -> pd.DataFrame:
    """Each Fréchet cell gains its 95% bootstrap CI over volumes: the run's own with one seed, the span
    of the seeds' intervals (lowest low, highest high) with several."""
    for column in table.columns:
        hidden = FD_CI + column
        if hidden not in ok:
            continue
        cells = []
        for method, size, cell in zip(table["method"], table["size"], table[column]):
            span = fd_span(ok[(ok.method == method) & (ok["size"] == size)], column)
            if span and cell != "–":
                cell = f"{cell} [{span[0]:.3g}, {span[1]:.3g}]"
            cells.append(cell)
        table[column] = cells
    return table


def _mean_std(values: pd.Series) -> str:
    runs = len(values)
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "–"
    # a column some of the cell's runs lack (scored since they were made) says over how many it is
    of = f" ({len(values)} of {runs} runs)" if len(values) < runs else ""
    if len(values) == 1:
        return f"{values.iloc[0]:.4g}{of}"
    return f"{values.mean():.4g} ± {values.std(ddof=1):.2g}{of}"


def summarise(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=by + columns)
    grouped = frame.groupby(by, sort=True)
    out = grouped[columns].agg(_mean_std).reset_index()
    out.insert(len(by), "seeds", grouped.size().values)
    return out


INTERVAL_COLUMNS = {"Dice": "Dice [95% CI]", "volume error": "volume error [95% CI]",
                    "volume error mL": "volume error mL [95% CI]"}  # from per-subject values


def subject_intervals(subjects: pd.DataFrame, task: str, method: str, size: int) -> dict:
    """Dice, Control Δ and volume error of one row as mean [95% CI]: per-subject values pooled over
    seeds, the bootstrap over seeds and then subjects (:mod:`metrics.control_delta`)."""
    if subjects.empty:
        return {}
    per = subjects[(subjects.task == task) & (subjects.method == method) & (subjects["size"] == size)]
    if per.empty:
        return {}
    strata = per["seed"].to_numpy()
    out = {label: interval_text(bootstrap_mean(per[key], strata=strata))
           for key, label in INTERVAL_COLUMNS.items() if key in per and per[key].notna().any()}
    if "Dice swapped" in per and per["Dice swapped"].notna().any():
        out["Control Δ [95% CI]"] = interval_text(paired_difference(per["Dice"], per["Dice swapped"], strata=strata))
    return out


def task_table(frame: pd.DataFrame, task: str, subjects: pd.DataFrame | None = None) -> pd.DataFrame:
    """Methods × dataset sizes × metrics for one task. Three reference rows come first: real volumes
    against their own conditions (the Dice ceiling), against another subject's (what ignoring the
    condition scores: a method shows control only above it) and the unconditioned base model (the
    floor). The control-gap columns are the probe at the final checkpoint. Other columns are mean ±
    SD over seeds; Dice, Control Δ and volume error also come as mean [95% CI] over subjects
    (``subjects``: :func:`benchmark.report.headline.per_subject_frame`)."""
    ok = frame[(frame.task == task) & (frame.status == "ok")]
    ok = ok[~ok.method.str.endswith(SPHERE_SUFFIX)]
    columns = [c for c in metric_columns(ok) if ok[c].notna().any()]
    table = with_fd_intervals(summarise(ok, ["method", "size"], columns), ok)
    if subjects is not None and not table.empty:
        cells = [subject_intervals(subjects, task, m, n) for m, n in zip(table["method"], table["size"])]
        for label in [*INTERVAL_COLUMNS.values(), "Control Δ [95% CI]"]:
            if any(label in c for c in cells):
                table.insert(3, label, [c.get(label, "–") for c in cells])
    order = {name: i for i, name in enumerate(PSEUDO_METHODS)}
    table = table.assign(_order=table.method.map(lambda m: order.get(m, len(order))))
    table = table.sort_values(["_order", "method", "size"], kind="stable").drop(columns="_order")
    warnings = row_warnings(ok)
    if warnings is not None:
        table[WARNING] = [warnings.get((m, n), "") for m, n in zip(table["method"], table["size"])]
    table["method"] = table["method"].replace(PSEUDO_METHODS)
    table = table.reset_index(drop=True)
    flagged = set()
    if UNDERSAMPLED in ok:
        flagged = {c for cell in ok[UNDERSAMPLED].dropna() for c in str(cell).split("|") if c}
    table.attrs["daggers"] = sorted(c for c in table.columns if c in flagged)
    return table


def row_warnings(ok: pd.DataFrame) -> dict | None:
    """(method, size) -> a warning ("" where none) from the means over seeds: recall or coverage under
    ``COLLAPSE_BELOW`` in some feature space, or a noise MSE over ``NOT_DENOISING_ABOVE`` times the
    frozen model's; None when the records hold none of these columns."""
    columns = [c for c in metric_columns(ok) if c.startswith(COLLAPSE_COLUMNS) and ok[c].notna().any()]
    has_ratio = NOISE_MSE_RATIO in ok and ok[NOISE_MSE_RATIO].notna().any()
    if not columns and not has_ratio:
        return None
    out = {}
    for (method, size), runs in ok.groupby(["method", "size"]):
        def mean(column: str) -> float:
            return pd.to_numeric(runs[column], errors="coerce").mean()

        found = [f"{c} {mean(c):.2f}" for c in columns if mean(c) < COLLAPSE_BELOW]
        if has_ratio and mean(NOISE_MSE_RATIO) > NOT_DENOISING_ABOVE:
            found.append(f"{NOISE_MSE_RATIO} {mean(NOISE_MSE_RATIO):.3g}")
        out[(method, size)] = ("⚠ " + "; ".join(found)) if found else ""
    return out


def registered(name: str):
    """The task of a record (None for a task not registered in this process, e.g. a plugin's)."""
    try:
        return get_task(name)
    except TaskError:
        return None


def sr_tasks(frame: pd.DataFrame | None = None) -> dict[str, str]:
    """Super-resolution tasks -> their Table 4 label, the slice spacing the low-resolution input has,
    finest first: keeping every K-th axial slice of v mm voxels is K x v mm (sr4, sr8: the paper's 4 and
    8 mm at 1 mm voxels, 16 and 32 mm at the cpu profile's 4 mm; sr4mm, sr8mm: the whole K nearest to
    4 and 8 mm). Where the records do not say the voxel size: ``xK``, or the spacing asked for. With
    ``frame``, only the tasks it holds; two with one label (sr8 and sr8mm at 1 mm) are told apart by name."""
    spacings: dict[str, tuple[float, str]] = {}
    for t in TASKS.values():
        if not t.super_resolution or (frame is not None and (frame.empty or not (frame.task == t.name).any())):
            continue
        mm = pd.Series(dtype=float)
        if frame is not None and not frame.empty and AXIAL_MM in frame:
            mm = pd.to_numeric(frame.loc[frame.task == t.name, AXIAL_MM], errors="coerce").dropna()
        if not mm.empty:
            spacing = t.at_voxel(mm.iloc[0]).sr_factor * mm.iloc[0]
            spacings[t.name] = (spacing, f"{spacing:.3g} mm")
        elif t.sr_factor is not None:
            spacings[t.name] = (float("inf"), f"x{t.sr_factor}")
        else:
            spacings[t.name] = (t.sr_spacing_mm, f"{t.sr_spacing_mm:g} mm")
    order = sorted(spacings, key=lambda name: spacings[name][0])
    labels = [spacings[name][1] for name in order]
    return {name: label if labels.count(label) == 1 else f"{label} ({name})" for name, label in zip(order, labels)}


SR_METRICS = ("PSNR", "SSIM", "anatomy Dice", "LPIPS fidelity", "MS-SSIM fidelity", "FID-2D mean", "FID-3D")
SR_ORDER = ("trilinear", "inversesr", "liif3d", "vcm")  # reference interpolation first, as Table 4


def sr_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 4: methods × slice spacing (sr4, sr8: see :func:`sr_tasks`) with PSNR, SSIM, the judges'
    anatomy Dice against the subject's own label maps, LPIPS and MS-SSIM fidelity against the ground
    truth, FID-2D mean and FID-3D; mean ± std over seeds. A size column appears when the records hold
    more than one training-set size; the real-vs-real reference row has FIDs and the judges' anatomy Dice
    only (it has no ground truth to be faithful to; its anatomy Dice is the judges' ceiling)."""
    labels = sr_tasks(frame)
    ok = frame[frame.task.isin(list(labels)) & (frame.status == "ok")] if not frame.empty else frame
    if ok.empty:
        return pd.DataFrame()
    ok = ok[~ok.method.isin([BASE_UNCONDITIONED, REFERENCE_OTHER]) & ~ok.method.str.endswith(SPHERE_SUFFIX)]
    # LPIPS fidelity stays as a column of "–" when LPIPS was unavailable (no AlexNet weights)
    wanted = [c for c in metric_columns(ok) if c.split(" [")[0] in SR_METRICS
              and (ok[c].notna().any() or c == "LPIPS fidelity")]
    wanted.sort(key=lambda c: (SR_METRICS.index(c.split(" [")[0]), c))
    sizes = sorted(ok.loc[ok.method != REFERENCE, "size"].dropna().unique())
    by = ["method", "size"] if len(sizes) > 1 else ["method"]
    keys = ok[by].drop_duplicates()
    rank = {m: i for i, m in enumerate(SR_ORDER)}
    keys = keys.assign(_order=keys.method.map(lambda m: (2, 0) if m == REFERENCE else (0, rank[m]) if m in rank
                                              else (1, 0)))
    keys = keys.sort_values(["_order"] + by).drop(columns="_order")
    rows = []
    for _, key in keys.iterrows():
        chosen = ok
        for col in by:
            chosen = chosen[chosen[col] == key[col]]
        row = {"method": REFERENCE_ROW if key["method"] == REFERENCE else key["method"]}
        if "size" in by:
            row["size"] = key["size"]
        row["seeds"] = int(chosen.groupby("task").seed.nunique().max())
        for task, label in labels.items():
            runs = chosen[chosen.task == task]
            for c in wanted:
                row[f"{label} {c}"] = _mean_std(runs[c]) if not runs.empty else "–"
        rows.append(row)
    table = pd.DataFrame(rows)
    present = [label for task, label in labels.items() if (ok.task == task).any()]
    keep = [c for c in table.columns if not any(c.startswith(f"{l} ") for l in labels.values())
            or any(c.startswith(f"{l} ") for l in present)]
    return table[keep]


def paper_reference(name: str) -> pd.DataFrame:
    path = PAPER_REFERENCE / name
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


MACHINE_SPREAD = 1.5  # s/step of one method varying more than this across its records: not one machine's speed


def timing_spread(frame: pd.DataFrame, limit: float = MACHINE_SPREAD) -> list[str]:
    """One sentence per method whose seconds per step vary more than ``limit``-fold across its records:
    runs made in different sessions whose machines differ in speed (3-10x on shared CPUs), which a
    single cell's s/step does not show."""
    ok = frame[(frame.status == "ok") & ~frame.method.isin(list(PSEUDO_METHODS))] if "status" in frame else frame
    column = "cost: seconds_per_step"
    if ok.empty or column not in ok:
        return []
    out = []
    for method, steps in ok.assign(s=pd.to_numeric(ok[column], errors="coerce")).groupby("method")["s"]:
        steps = steps.dropna()
        if len(steps) > 1 and steps.max() > limit * steps.min():
            out.append(f"{method} {steps.min():.3g}-{steps.max():.3g} s over {len(steps)} records, "
                       f"median {steps.median():.3g}")
    return out


def bench_timings(results_dir: Path) -> dict | None:
    """The folder's ``bench/methods-*.json`` (a study's ``bench`` entry, or ``bench --out <folder>/bench``):
    every method's training step timed in one process, so comparable across methods where the records,
    made over sessions on machines of different speed, are not. Its report, plus ``seconds_per_step``
    (method -> s) and ``file``; None without one. Several files: the last by name (deterministic in a clone)."""
    files = sorted(Path(results_dir).glob("bench/methods-*.json"))
    files = [f for f in files if not f.stem.endswith("-speed")]  # --compare-off's option ratios are another table
    return read_bench(files[-1]) if files else None


def read_bench(path: Path) -> dict:
    """One ``bench`` report: its fields, plus ``seconds_per_step`` (method -> s, the methods it timed
    without error) and ``file`` (its path under the results folder)."""
    report = json.loads(Path(path).read_text())
    steps = {row["method"]: float(row["seconds_per_step"]) for row in report.get("methods", []) if "seconds_per_step" in row}
    return {**report, "seconds_per_step": steps, "file": f"bench/{Path(path).name}"}


def cost_table(frame: pd.DataFrame, bench: dict | None = None) -> pd.DataFrame:
    """Paper Table 5: parameters and device-days per method (medians over the records), with the seconds
    per step of one ``bench`` run where the folder has one, beside the paper's."""
    ok = frame[(frame.status == "ok") & ~frame.method.isin(list(PSEUDO_METHODS))]
    ok = ok[~ok.method.str.endswith(SPHERE_SUFFIX)]
    if ok.empty:
        return pd.DataFrame()
    cost_cols = [c for c in ok.columns if c.startswith("cost: ") and pd.to_numeric(ok[c], errors="coerce").notna().any()]
    numeric = ok[["method"] + cost_cols].copy()
    for c in cost_cols:
        numeric[c] = pd.to_numeric(numeric[c], errors="coerce")
    table = numeric.groupby("method").median().reset_index()
    devices = ok.groupby("method")["device"].first().reset_index()
    table = table.merge(devices, on="method")
    table.columns = [c.removeprefix("cost: ") for c in table.columns]
    if bench is not None:
        table[BENCH_STEP] = table["method"].map(bench["seconds_per_step"])
    # the tuning budget beside the training cost: the same trials for every method (benchmark/recipes)
    pairs = ok[["profile", "task", "method"]].drop_duplicates() if "profile" in ok else pd.DataFrame()
    hours = {}
    for _, row in pairs.iterrows():
        h = tuning_hours(str(row.profile), str(row.task), str(row.method))
        if h is not None:
            hours[row.method] = hours.get(row.method, 0.0) + h
    if hours:
        table["tuning wall hours"] = table["method"].map(hours)
    reference = paper_reference("table5_cost.csv")
    if not reference.empty:
        table = table.merge(reference.drop(columns=["source"]), on="method", how="left")
    return table


def validation_table(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """Paper Table 6 on a task with validation rows: base model, fine-tuned and scratch LDM (N=50),
    VCM with sphere masks."""
    ok = frame[(frame.task == task) & (frame.status == "ok")]
    wanted = [c for c in metric_columns(ok) if c.startswith(("FID-2D mean", "FID-3D", "LPIPS diversity"))]
    rows = []
    for label, (method, size) in VALIDATION_ROWS.items():
        chosen = ok[(ok.method == method) & ((ok["size"] == size) | (method == BASE_UNCONDITIONED))]
        row = {"row": label, "runs": len(chosen)}
        for c in wanted:
            row[c] = _mean_std(chosen[c]) if not chosen.empty else "–"
        rows.append(row)
    table = pd.DataFrame(rows)
    reference = paper_reference("table6_validation.csv")
    if not reference.empty:
        table = table.merge(reference.drop(columns=["source"]), on="row", how="left")
    return table


def failures_table(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "status" not in frame:
        return pd.DataFrame()
    return frame[frame.status != "ok"][["task", "method", "size", "seed", "error"]]


def with_directions(table: pd.DataFrame) -> pd.DataFrame:
    """The table with ↑/↓ after each metric column's header (by its ``metrics.suite`` descriptor)."""
    def mark(column: str) -> str:
        for part in (column, column.split(" ", 2)[-1]):  # a column, or "<label> <column>" of Table 4
            metric = metric_of(part)
            if metric is not None:
                return f"{column} {metric.arrow}"
        return column

    return table.rename(columns={c: mark(c) for c in table.columns})


def write_table(table: pd.DataFrame, folder: Path, name: str, caption: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.csv", folder / f"{name}.md", folder / f"{name}.tex"]
    table.to_csv(paths[0], index=False)
    notes = []
    marked = with_directions(table)
    daggers = table.attrs.get("daggers") or []
    if daggers:
        marked.columns = [f"{m} {DAGGER}" if c in daggers else m for c, m in zip(table.columns, marked.columns)]
        notes.append(DAGGER_NOTE)
    if WARNING in table:
        cells = " ".join(table[WARNING].astype(str))
        notes += [note for markers, note in WARNING_NOTES.items() if any(m in cells for m in markers)]
    markdown = marked.to_markdown(index=False) if not table.empty else "(no runs)"
    paths[1].write_text(f"**{caption}**\n\n" + markdown + "\n" + "".join(f"\n{n}\n" for n in notes))
    latex = table.to_latex(index=False, caption=caption, label=f"tab:{name}", escape=True) if not table.empty else ""
    paths[2].write_text(latex)
    return paths


def build_tables(results_dir: Path, out_dir: Path | None = None) -> dict[str, pd.DataFrame]:
    """Rebuild every table from the records under ``results_dir``."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir else results_dir / "tables"
    frame = records_frame(results_dir)
    tables: dict[str, pd.DataFrame] = {}
    if frame.empty:
        return tables
    subjects = per_subject_frame(results_dir)
    tasks = {name: registered(name) for name in sorted(frame.task.dropna().unique())}
    sr = sr_tasks()
    for name, task in tasks.items():
        if name in sr:
            continue  # super-resolution has its own table
        tables[f"table_{name}"] = task_table(frame, name, subjects)
        caption = f"{task.title}: methods by training-set size" if task and task.title else f"Task {name}"
        write_table(tables[f"table_{name}"], out_dir, f"table_{name}", caption)
    if frame.task.isin(list(sr)).any():
        tables["table_sr"] = sr_table(frame)
        write_table(tables["table_sr"], out_dir, "table_sr",
                    "Axial super-resolution (paper Table 4): methods by slice spacing, fidelity to the ground truth and FID")
    tables["table5_cost"] = cost_table(frame, bench_timings(results_dir))
    write_table(tables["table5_cost"], out_dir, "table5_cost",
                "Cost: trainable parameters, seconds per step, projected device-days (paper Table 5 beside)")
    # Table 6 only where sphere-validation runs were recorded: without them (--no-validation) its rows are empty
    validated = [name for name, task in tasks.items() if task is not None and task.validation
                 and ((frame.task == name) & (frame.method == SPHERE_VCM)).any()]
    for name in validated:  # one Table 6 per task with validation rows (named by task when there are several)
        key = "table6_validation" if len(validated) == 1 else f"table6_validation_{name}"
        tables[key] = validation_table(frame, name)
        write_table(tables[key], out_dir, key,
                    "Validation: base model, LDMs at N=50, VCM with sphere masks (paper Table 6 beside)")
    tables["failures"] = failures_table(frame)
    write_table(tables["failures"], out_dir, "failures", "Runs that failed")
    return tables

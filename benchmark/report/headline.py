"""The headline table that opens REPORT.md: per task, one row per method and training size, at most
eight columns, every ranking number with its interval.

Computed from the records' per-subject values alone (pooled over seeds; with several seeds the
bootstrap draws seeds, then subjects): Dice with its 95% CI; Control Δ = Dice(own condition) −
Dice(another subject's condition) of the method's own samples, with its CI and the verdict "follows
its condition" (one-sided bootstrap p-value, Holm-corrected across the methods of the table at that
size, at 0.05; with several seeds, how many runs follow on their own); the structure volume
error in mL with its CI and the correlation of the judge's volumes with the conditions' across subjects;
FID-2D rel (one fidelity column), MS-SSIM diversity, noise MSE / frozen and seconds per step as means
over seeds. The full-width tables stay in ``tables/`` and REPORT's appendix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.engine.probe import NOISE_MSE_RATIO
from benchmark.report.labels import BASE_ROW
from benchmark.run.records import iter_records
from benchmark.run.spec import AUTOENCODER, BASE_UNCONDITIONED, REFERENCE, REFERENCE_OTHER, SPHERE_SUFFIX
from metrics.control_delta import bootstrap_mean, holm, paired_difference

ALPHA = 0.05
HEADLINE_ROWS = {REFERENCE: "real volumes, own condition", AUTOENCODER: "autoencoder reconstruction (ceiling)",
                 REFERENCE_OTHER: "real volumes, another's condition", BASE_UNCONDITIONED: BASE_ROW}


# The column of a folder's bench/ timings (every method in one process): Table 5's, and the headline's
# when the bench timed its task.
BENCH_STEP = "s/step (one bench run)"


def per_subject_frame(folder: Path) -> pd.DataFrame:
    """One row per (run, subject): task, method, size, seed, id and the per-subject values of the record."""
    rows = []
    for rec in iter_records(folder):
        if rec.get("status") != "ok" or not rec.get("per_subject"):
            continue
        per = rec["per_subject"]
        ids = per.get("ids") or []
        for i, sid in enumerate(ids):
            row = {"task": rec["task"], "method": rec["method"], "size": rec["size"], "seed": rec["seed"], "id": sid}
            for key, values in per.items():
                if key != "ids" and isinstance(values, list) and len(values) == len(ids):
                    row[key] = values[i]
            rows.append(row)
    return pd.DataFrame(rows)


def control_delta_by_seed(per: pd.DataFrame) -> dict:
    """Each training run's (seed's) own Control Δ with its 95% interval, from per-subject values."""
    return {seed: paired_difference(g["Dice"], g["Dice swapped"]) for seed, g in per.groupby("seed")}


def interval_text(stats: dict, digits: int = 3) -> str:
    if not np.isfinite(stats.get("mean", float("nan"))):
        return "–"
    if not np.isfinite(stats.get("ci_low", float("nan"))):
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} [{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"


def _mean(runs: pd.DataFrame, column: str | None) -> float:
    return float(pd.to_numeric(runs[column], errors="coerce").mean()) if column and column in runs else float("nan")


VOLUME = "volume error mL [95% CI] (r)"


def _volume_cell(per: pd.DataFrame, strata, r: float, relative: float) -> str:
    """The judge's structure volumes against the conditions': mean absolute error in mL with its CI and the
    correlation across subjects; the relative error where a record has no volumes in mL (older records)."""
    if "volume error mL" in per and per["volume error mL"].notna().any():
        text = interval_text(bootstrap_mean(per["volume error mL"], strata=strata), 2)
        return f"{text} (r {r:.2f})" if np.isfinite(r) else text
    return f"{relative:.3f} relative" if np.isfinite(relative) else "–"


def _cell(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "–"


def headline_table(records: pd.DataFrame, subjects: pd.DataFrame, task: str, with_keys: bool = False,
                   bench: dict | None = None) -> pd.DataFrame:
    """The headline rows of ``task`` (``records``: :func:`benchmark.report.frame.records_frame`); with
    ``with_keys``, each row's method, size and number of seeds too (columns ``_method``, ``_size``, ``_seeds``).
    ``bench`` (:func:`benchmark.report.tables.bench_timings`) on ``task``: the s/step column is its one-process
    timing of each method (a step's cost does not depend on N), not the mean of runs made on machines of
    different speed."""
    timed = bench["seconds_per_step"] if bench is not None and bench.get("task") == task else None
    ok = records[(records.task == task) & (records.status == "ok")] if not records.empty else records
    if ok.empty:
        return pd.DataFrame()
    ok = ok[~ok.method.str.endswith(SPHERE_SUFFIX)]
    mine = subjects[subjects.task == task] if not subjects.empty else subjects
    fid = next((c for c in ok.columns if c.startswith("FID-2D mean rel [") and ok[c].notna().any()), None)
    rows, pvalues = [], []
    keys = ok[["method", "size"]].drop_duplicates()
    pseudo = [m for m in HEADLINE_ROWS if m in set(keys.method)]
    methods = sorted(set(keys.method) - set(HEADLINE_ROWS))
    for method in pseudo + methods:
        for size in sorted(keys[keys.method == method]["size"].unique()):
            runs = ok[(ok.method == method) & (ok["size"] == size)]
            per = mine[(mine.method == method) & (mine["size"] == size)] if not mine.empty else mine
            seeds = int(runs.seed.nunique())
            label = HEADLINE_ROWS.get(method, f"{method}, N={size}") + (f", {seeds} seeds" if seeds > 1 else "")
            row = {"method": label, "_method": method, "_seeds": seeds, "_by_seed": ""}
            strata = per["seed"].to_numpy() if not per.empty else None
            dice = bootstrap_mean(per["Dice"], strata=strata) if "Dice" in per else {"mean": _mean(runs, "Dice")}
            row["Dice [95% CI]"] = interval_text(dice)
            delta, p = {}, float("nan")
            if "Dice swapped" in per and per["Dice swapped"].notna().any():
                delta = paired_difference(per["Dice"], per["Dice swapped"], strata=strata)
                p = delta["p_value"]
                if seeds > 1:  # each training run on its own: does its interval lie above 0?
                    each = control_delta_by_seed(per).values()
                    row["_by_seed"] = f"({sum(d['ci_low'] > 0 for d in each)} of {len(each)} seeds)"
            row["Control Δ [95% CI]"] = interval_text(delta) if delta else "–"
            row["_p"] = p
            row["_ci_low"] = delta.get("ci_low", float("nan"))
            row["_size"] = size
            row[VOLUME] = _volume_cell(per, strata, _mean(runs, "volume r"), _mean(runs, "volume error"))
            row[fid.replace(" mean", "") if fid else "FID-2D rel"] = _cell(_mean(runs, fid), 2)
            row["MS-SSIM diversity"] = _cell(_mean(runs, "MS-SSIM diversity"), 3)
            row[NOISE_MSE_RATIO] = _cell(_mean(runs, NOISE_MSE_RATIO), 2)
            if timed is None:
                row["s/step"] = _cell(_mean(runs, "cost: seconds_per_step"), 3)
            else:
                row[BENCH_STEP] = _cell(float(timed.get(method, float("nan"))), 3) if method not in HEADLINE_ROWS else "–"
            rows.append(row)
    table = pd.DataFrame(rows)
    # the verdict: Holm across the methods of the table at each size
    verdicts = [""] * len(table)
    for size in table["_size"].unique():
        index = [i for i in range(len(table)) if table["_size"][i] == size and np.isfinite(table["_p"][i])]
        adjusted = holm([table["_p"][i] for i in index])
        for i, q in zip(index, adjusted):
            verdicts[i] = "yes" if q <= ALPHA and table["_ci_low"][i] > 0 else "no"
    table["Control Δ [95% CI]"] = [" ".join(part for part in (c, v, s) if part)
                                   for c, v, s in zip(table["Control Δ [95% CI]"], verdicts, table["_by_seed"])]
    table = table.rename(columns={"Control Δ [95% CI]": "Control Δ [95% CI] follows?"})
    return table.drop(columns=["_p", "_ci_low", "_by_seed"] + ([] if with_keys else ["_size", "_method", "_seeds"]))


def control_by_size(records: pd.DataFrame, subjects: pd.DataFrame, task: str) -> pd.DataFrame:
    """The headline's answer pivoted by training-set size: one row per method; at each N its Dice (with the
    number of seeds) and its Control Δ [95% CI] with the verdict; "not run" where the records lack the run."""
    table = headline_table(records, subjects, task, with_keys=True)
    if table.empty:
        return table
    methods = table[~table["_method"].isin(list(HEADLINE_ROWS))]
    sizes = sorted(methods["_size"].unique())
    rows = []
    for method in dict.fromkeys(methods["_method"]):
        row = {"method": method}
        for size in sizes:
            hit = methods[(methods["_method"] == method) & (methods["_size"] == size)]
            if hit.empty:
                row[f"N={size}: Dice"] = row[f"N={size}: Control Δ [95% CI] follows?"] = "not run"
                continue
            seeds = int(hit["_seeds"].iloc[0])
            row[f"N={size}: Dice"] = f"{hit['Dice [95% CI]'].iloc[0].split(' [')[0]} ({seeds} seed{'s' if seeds > 1 else ''})"
            row[f"N={size}: Control Δ [95% CI] follows?"] = hit["Control Δ [95% CI] follows?"].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


HEADLINE_NOTE = ("Dice: the judge's Dice of the samples against their own condition, mean over subjects and seeds "
                 "[95% CI: bootstrap over seeds, then subjects]. Control Δ: the same samples' Dice minus the Dice of samples drawn "
                 "from the same noise and scalars with another test subject's condition, both scored against the "
                 "own condition; \"yes\" = follows its condition (one-sided bootstrap p, Holm-corrected across the "
                 "methods at that size, ≤ 0.05, and CI above 0); with several seeds, \"(k of n seeds)\" counts the training "
                 "runs whose own interval lies above 0. Volume error: the judge's volume "
                 "of each conditioned structure against the condition's, mean absolute error in mL [95% CI], with the "
                 "Pearson r across subjects. The autoencoder row is the ceiling a latent generator can reach; the real "
                 "rows are context.")

"""The VCM paper's findings, each checked against a results folder's records: *reproduced*, *not
reproduced*, *inconclusive* (tested, but the intervals do not decide) or *not tested* (the records lack
the runs it needs), with the evidence in one sentence.

Every rule is stated where it is applied and uses only the records (per-subject values pooled over
seeds, the cost figures, the Fréchet distances with their bootstrap intervals):

* "A beats B" on a per-subject score: the probability that A scores higher on a subject (same subject,
  seed and initial noise) has a 95% interval above 0.5 (:func:`metrics.ranking.probability_of_improvement`).
* (a) VCM is *best* at N = 10 when it beats every other method on Dice, and *among the best* at 50 and
  500 when no method beats it; a method that beats VCM makes the finding *not reproduced*.
* (b) VCM's trainable parameters against ControlNet's, T2I-Adapter's and the LDMs'.
* (c) at 4 mm LIIF-3D beats every other method on PSNR and on SSIM; at 8 mm, VCM's FID-3D interval lies
  below every other method's (realism in a feature space) and VCM beats every other method on each
  anatomy Dice (the judges' segmentation of each output against its own subject's ventricles, and
  tissue labels: does it keep this subject's anatomy). Each half is tested at the paper's
  spacing where it is a task at the records' voxel size (``sr4mm``, ``sr8mm``), else at the finest /
  coarsest spacing recorded (at ``cpu``: 4 mm is finer than a voxel, so the 4 mm half is tested at the
  finest spacing run); the evidence names the spacing.
* (d) the fine-tuned and the scratch LDM at N = 10 against N = 500: worse FID-2D rel or less diversity
  (higher MS-SSIM diversity) beyond two standard errors over seeds.
* (e) Table 6's sphere-mask rows: FID-2D rates the sphere run as good as the real-mask run (not above
  the real-mask run's interval) while FID-3D rates it worse (above that interval).
* (f) seconds per step of ControlNet, LITE, MLP and VCM within a factor 1.5 of each other while their
  trainable parameters differ at least 3-fold.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from benchmark.report.labels import PSEUDO_METHODS
from benchmark.report.frame import fd_span
from benchmark.report.headline import control_delta_by_seed
from benchmark.run.spec import SPHERE_SUFFIX
from datasets.tasks import JUDGE_LABELS
from metrics.ranking import probability_of_improvement

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTED = "reproduced", "not reproduced", "inconclusive", "not tested"
PAIRED_LIMIT = 0.5  # "A beats B": P(A > B) with its 95% interval above this
COST_SPREAD, PARAMETER_SPREAD = 1.5, 3.0  # (f)
LDMS = ("ldm_finetune", "ldm_scratch")
CONTROLNET_FAMILY = ("controlnet", "controlnet_lite", "controlnet_mlp", "vcm")
BIGGER_THAN_VCM = ("controlnet", "t2i_adapter", "ldm_finetune", "ldm_scratch")
ANATOMY_LABELS = JUDGE_LABELS  # the label maps behind the anatomy Dice columns of paired tasks
HERO_NAMES = {"liif3d": "LIIF-3D", "vcm": "VCM"}  # how the findings name the method each claim is about


def _scores(subjects: pd.DataFrame, task: str, size: int, score: str) -> pd.DataFrame:
    """Subjects (seed, id) x methods of one task and size, without sphere runs."""
    if subjects.empty or score not in subjects:
        return pd.DataFrame()
    rows = subjects[(subjects.task == task) & (subjects["size"] == size) & subjects[score].notna()
                    & ~subjects.method.str.endswith(SPHERE_SUFFIX)]
    return rows.pivot_table(index=["seed", "id"], columns="method", values=score, aggfunc="first")


def _beats(table: pd.DataFrame, first: str, second: str) -> tuple[bool, str]:
    pair = table[[first, second]].dropna()
    p = probability_of_improvement(pair[first], pair[second], strata=pair.index.get_level_values("seed").to_numpy())
    return p["ci_low"] > PAIRED_LIMIT, f"P({first} > {second}) {p['mean']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]"


def _versus_all(table: pd.DataFrame, hero: str) -> tuple[list[str], list[str], list[str]]:
    """(methods ``hero`` beats, methods that beat ``hero``, the evidence)."""
    wins, losses, evidence = [], [], []
    for other in (m for m in table.columns if m != hero):
        won, text = _beats(table, hero, other)
        lost, _ = _beats(table, other, hero)
        wins += [other] if won else []
        losses += [other] if lost else []
        evidence.append(text)
    return wins, losses, evidence


def finding_a(subjects: pd.DataFrame) -> dict:
    claim = ("(a) VCM is the most data-efficient method: best at N = 10 and among the best at 50 and 500, "
             "on lv and on multimodal (Dice with the own condition, paired per subject).")
    verdicts, evidence = [], []
    for task in ("lv", "multimodal"):
        for size in (10, 50, 500):
            table = _scores(subjects, task, size, "Dice")
            if "vcm" not in table or table.shape[1] < 2:
                evidence.append(f"{task} N={size}: not run")
                verdicts.append(NOT_TESTED)
                continue
            wins, losses, _ = _versus_all(table, "vcm")
            others = table.shape[1] - 1
            if losses:
                verdicts.append(NOT_REPRODUCED)
                evidence.append(f"{task} N={size}: beaten by {', '.join(losses)}")
            elif size == 10 and len(wins) < others:
                verdicts.append(INCONCLUSIVE)
                evidence.append(f"{task} N={size}: beats {len(wins)} of {others}, beaten by none")
            else:
                verdicts.append(REPRODUCED)
                evidence.append(f"{task} N={size}: beats {len(wins)} of {others}, beaten by none")
    return {"claim": claim, "verdict": _combine(verdicts), "evidence": "; ".join(evidence)}


def finding_b(frame: pd.DataFrame) -> dict:
    claim = "(b) VCM has far fewer trainable parameters than ControlNet, T2I-Adapter and the LDMs."
    params = _median_cost(frame, "trainable_parameters")
    if "vcm" not in params or not any(m in params for m in BIGGER_THAN_VCM):
        return {"claim": claim, "verdict": NOT_TESTED, "evidence": "no cost records of VCM and those methods"}
    others = {m: params[m] for m in BIGGER_THAN_VCM if m in params}
    smaller = all(params["vcm"] < v for v in others.values())
    evidence = f"VCM {params['vcm']:,.0f}; " + ", ".join(f"{m} {v:,.0f} ({v / params['vcm']:.1f}x)"
                                                          for m, v in others.items())
    return {"claim": claim, "verdict": REPRODUCED if smaller else NOT_REPRODUCED, "evidence": evidence}


def finding_c(frame: pd.DataFrame, subjects: pd.DataFrame, spacing: dict[str, str]) -> dict:
    claim = ("(c) at 4 mm slice spacing LIIF-3D is best on paired metrics; at 8 mm only VCM keeps the anatomy "
             "(here: VCM's FID-3D interval below every other method's, and VCM beats every other method on the "
             "judges' anatomy Dice against each subject's own ventricles and tissue labels, paired per subject; "
             "each at the paper's spacing where it is a task, else the finest / coarsest spacing run).")
    verdicts, evidence = [], []
    run = [task for task in spacing if not frame.empty and (frame.task == task).any()]  # finest first
    if not run:
        return {"claim": claim, "verdict": NOT_TESTED, "evidence": "no super-resolution runs"}
    fine = "sr4mm" if "sr4mm" in run else run[0]
    coarse = "sr8mm" if "sr8mm" in run else run[-1]
    sizes = frame[frame.task == fine]["size"] if not frame.empty else pd.Series(dtype=int)
    size = int(sizes[sizes > 0].max()) if (sizes > 0).any() else None
    for score in ("PSNR", "SSIM"):
        verdict, said = _beats_every_other(subjects, fine, size, score, "liif3d", f"{spacing.get(fine, fine)} {score}",
                                           "not run")
        verdicts.append(verdict)
        evidence.append(said)
    intervals = _fd_intervals(frame, coarse)
    if "vcm" not in intervals or len(intervals) < 2:
        verdicts.append(NOT_TESTED)
        evidence.append(f"{spacing.get(coarse, coarse)}: not run")
    else:
        vcm_high = intervals["vcm"][1]
        below = [m for m, (low, _) in intervals.items() if m != "vcm" and vcm_high < low]
        above = [m for m, (_, high) in intervals.items() if m != "vcm" and high < intervals["vcm"][0]]
        verdicts.append(NOT_REPRODUCED if above else REPRODUCED if len(below) == len(intervals) - 1 else INCONCLUSIVE)
        evidence.append(f"{spacing.get(coarse, coarse)} FID-3D: VCM [{intervals['vcm'][0]:.3g}, {vcm_high:.3g}] below "
                        f"{len(below)} of {len(intervals) - 1}" + (f"; {', '.join(above)} lower" if above else ""))
    for labels in ANATOMY_LABELS:  # the anatomy itself, per subject: the paper's ventricles, and the tissue classes
        score = f"anatomy Dice [{labels}]"
        missing = "not scored" + (" (records made before it: `python run_benchmark.py rescore`)" if size else "")
        verdict, said = _beats_every_other(subjects, coarse, size, score, "vcm", f"{spacing.get(coarse, coarse)} {score}",
                                           missing)
        verdicts.append(verdict)
        evidence.append(said)
    return {"claim": claim, "verdict": _combine(verdicts), "evidence": "; ".join(evidence)}


def _beats_every_other(subjects: pd.DataFrame, task: str, size: int | None, score: str, hero: str, label: str,
                       missing: str) -> tuple[str, str]:
    """Whether ``hero`` beats every other method on ``score``, paired per subject, and the evidence: reproduced when
    it beats them all, not reproduced when any beats it, else inconclusive; not tested without two methods' scores."""
    table = _scores(subjects, task, size, score) if size else pd.DataFrame()
    if hero not in table or table.shape[1] < 2:
        return NOT_TESTED, f"{label}: {missing}"
    wins, losses, _ = _versus_all(table, hero)
    verdict = NOT_REPRODUCED if losses else REPRODUCED if len(wins) == table.shape[1] - 1 else INCONCLUSIVE
    return verdict, (f"{label}: {HERO_NAMES.get(hero, hero)} beats {len(wins)} of {table.shape[1] - 1}"
                     + (f", beaten by {', '.join(losses)}" if losses else ""))


def finding_d(frame: pd.DataFrame) -> dict:
    claim = "(d) the fine-tuned and the scratch LDM lose fidelity or diversity at small N (N = 10 against 500)."
    verdicts, evidence = [], []
    fid = _column(frame, "FID-2D mean rel [")
    for method in LDMS:
        small, large = _runs(frame, "lv", method, 10), _runs(frame, "lv", method, 500)
        if small.empty or large.empty:
            verdicts.append(NOT_TESTED)
            evidence.append(f"{method}: not run at both sizes")
            continue
        worse = []
        for column in (fid, "MS-SSIM diversity"):  # both: higher is worse
            if column and column in small:
                a, b = pd.to_numeric(small[column], errors="coerce"), pd.to_numeric(large[column], errors="coerce")
                se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if len(a) > 1 and len(b) > 1 else np.nan
                if np.isfinite(se) and a.mean() - b.mean() > 2 * se:
                    worse.append(f"{column.split(' [')[0]} {a.mean():.3g} vs {b.mean():.3g}")
        seeds = min(len(small), len(large))
        verdicts.append(REPRODUCED if worse else INCONCLUSIVE if seeds < 2 else NOT_REPRODUCED)
        evidence.append(f"{method}: " + ("; ".join(worse) if worse else f"no loss beyond 2 SE over {seeds} seeds"))
    return {"claim": claim, "verdict": _combine(verdicts), "evidence": "; ".join(evidence)}


def finding_e(frame: pd.DataFrame) -> dict:
    claim = ("(e) FID-2D can rate a broken generator (sphere-shaped masks) as good where FID-3D does not "
             "(Table 6).")
    spheres = frame[frame.method.str.endswith(SPHERE_SUFFIX) & (frame.status == "ok")] if not frame.empty else frame
    if spheres.empty:
        return {"claim": claim, "verdict": NOT_TESTED, "evidence": "no sphere-mask validation runs (table6: false)"}
    verdicts, evidence = [], []
    for (task, sphere_method, size), _ in spheres.groupby(["task", "method", "size"]):  # seeds pooled
        method = sphere_method.removesuffix(SPHERE_SUFFIX)
        real = _intervals_of(frame, task, method, size)
        sphere = _intervals_of(frame, task, sphere_method, size)
        if not real or not sphere:
            continue
        fid2d_fooled = sphere["2d"][0] <= real["2d"][1]
        fid3d_sees = sphere["3d"][0] > real["3d"][1]
        verdicts.append(REPRODUCED if fid2d_fooled and fid3d_sees else NOT_REPRODUCED)
        evidence.append(f"{method} N={size}, sphere vs real masks (95% intervals): FID-2D {_versus(sphere['2d'], real['2d'])} "
                        f"({'overlaps' if fid2d_fooled else 'above'}), FID-3D {_versus(sphere['3d'], real['3d'])} "
                        f"({'above' if fid3d_sees else 'overlaps'})")
    return {"claim": claim, "verdict": _combine(verdicts) if verdicts else NOT_TESTED,
            "evidence": "; ".join(evidence) or "sphere runs without their real-mask runs"}


def _versus(first: tuple[float, float], second: tuple[float, float]) -> str:
    return f"[{first[0]:.3g}, {first[1]:.3g}] vs [{second[0]:.3g}, {second[1]:.3g}]"


def finding_f(frame: pd.DataFrame, bench: dict | None = None) -> dict:
    """With ``bench`` (``tables.bench_timings``) covering two or more of the family, its seconds per step (one
    process, one machine); else the median over each method's records, which may come from machines of
    different speed."""
    claim = ("(f) training cost differs little between ControlNet, ControlNet-LITE, ControlNet-MLP and VCM "
             "despite their sizes (Table 5).")
    steps, params = _median_cost(frame, "seconds_per_step"), _median_cost(frame, "trainable_parameters")
    timed = (bench or {}).get("seconds_per_step", {})
    source = "median over the records"
    if sum(m in timed for m in CONTROLNET_FAMILY) >= 2:
        steps, source = timed, f"one bench run, {bench['file']}"
    present = [m for m in CONTROLNET_FAMILY if m in steps and m in params]
    if len(present) < 2:
        return {"claim": claim, "verdict": NOT_TESTED, "evidence": "fewer than two of those methods have cost records"}
    step_spread = max(steps[m] for m in present) / min(steps[m] for m in present)
    param_spread = max(params[m] for m in present) / min(params[m] for m in present)
    verdict = REPRODUCED if step_spread <= COST_SPREAD and param_spread >= PARAMETER_SPREAD else NOT_REPRODUCED
    if verdict == REPRODUCED and len(present) < len(CONTROLNET_FAMILY):
        verdict = f"{INCONCLUSIVE} (partly tested)"  # a method still missing could break the spread
    evidence = (f"s/step ({source}) {step_spread:.2f}x apart (rule: at most {COST_SPREAD:g}x), trainable parameters "
                f"{param_spread:.1f}x apart (rule: at least {PARAMETER_SPREAD:g}x) ("
                + ", ".join(f"{m} {steps[m]:.3f} s, {params[m]:,.0f}" for m in present) + ")"
                + "".join(f"; {m} not run" for m in CONTROLNET_FAMILY if m not in present))
    return {"claim": claim, "verdict": verdict, "evidence": evidence}


def paper_findings(frame: pd.DataFrame, subjects: pd.DataFrame, spacing: dict[str, str],
                   bench: dict | None = None) -> list[dict]:
    """Findings (a)-(f), each ``{"claim", "verdict", "evidence"}``."""
    ok = frame[frame.status == "ok"] if not frame.empty else frame
    return [finding_a(subjects), finding_b(ok), finding_c(ok, subjects, spacing), finding_d(ok), finding_e(ok),
            finding_f(ok, bench)]


def _combine(verdicts: list[str]) -> str:
    """A claim made of parts: not reproduced if a tested part fails; reproduced only if every part is."""
    tested = [v for v in verdicts if v != NOT_TESTED]
    if not tested:
        return NOT_TESTED
    if NOT_REPRODUCED in tested:
        return NOT_REPRODUCED
    if len(tested) == len(verdicts) and all(v == REPRODUCED for v in tested):
        return REPRODUCED
    return INCONCLUSIVE if len(tested) == len(verdicts) else f"{INCONCLUSIVE} (partly tested)"


def _median_cost(frame: pd.DataFrame, key: str) -> dict[str, float]:
    column = f"cost: {key}"
    if frame.empty or column not in frame:
        return {}
    values = pd.to_numeric(frame[column], errors="coerce")
    trained = frame.assign(_v=values)[values.notna() & (frame["size"] > 0)]
    return {m: float(v) for m, v in trained.groupby("method")["_v"].median().items()}


def _column(frame: pd.DataFrame, prefix: str) -> str | None:
    return next((c for c in frame.columns if c.startswith(prefix) and frame[c].notna().any()), None)


def _runs(frame: pd.DataFrame, task: str, method: str, size: int) -> pd.DataFrame:
    return frame[(frame.task == task) & (frame.method == method) & (frame["size"] == size)]


def _fd_intervals(frame: pd.DataFrame, task: str) -> dict[str, tuple[float, float]]:
    """Method -> the span of its runs' FID-3D bootstrap intervals on ``task`` (trained methods and the
    methods without training alike; the reference rows left out)."""
    column = _column(frame, "FID-3D [")
    if column is None:
        return {}
    spans = {method: fd_span(runs, column)
             for method, runs in frame[(frame.task == task) & ~frame.method.isin(list(PSEUDO_METHODS))].groupby("method")}
    return {method: span for method, span in spans.items() if span}


def _intervals_of(frame: pd.DataFrame, task: str, method: str, size) -> dict | None:
    runs = _runs(frame, task, method, size)
    spans = {}
    for key, prefix in (("2d", "FID-2D mean ["), ("3d", "FID-3D [")):
        column = _column(frame, prefix)
        spans[key] = fd_span(runs, column) if column else None
        if spans[key] is None:
            return None
    return spans


def _seeds_by_cell(subjects: pd.DataFrame):
    """(task, method, N, {seed: Control Δ with its 95% interval}) for each cell of two or more seeds."""
    if subjects.empty or "Dice swapped" not in subjects:
        return
    scored = subjects[~subjects.method.isin(PSEUDO_METHODS) & subjects["Dice swapped"].notna()]
    for (task, method, size), cell in scored.groupby(["task", "method", "size"]):
        if cell.seed.nunique() >= 2:
            yield task, method, int(size), control_delta_by_seed(cell)


def seed_agreement(subjects: pd.DataFrame) -> pd.DataFrame:
    """Beyond the paper: do a method's training runs (seeds) agree on following its condition? One row per
    (task, method, N) with at least two seeds: each seed's Control Δ with its own 95% interval, and how
    many of them lie above 0. The pooled verdict (the headline) draws seeds, then subjects, so one run
    that does not follow is enough to withhold it; this table shows which run that was."""
    rows = []
    for task, method, size, each in _seeds_by_cell(subjects):
        above = sum(d["ci_low"] > 0 for d in each.values())
        rows.append({"task": task, "method": method, "N": size,
                     "Control Δ [95% CI] per seed": "; ".join(
                         f"seed {s}: {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" for s, d in each.items()),
                     "seeds above 0": f"{above} of {len(each)}",
                     "agree": "yes" if above in (0, len(each)) else "**no**"})
    return pd.DataFrame(rows)


def lapses_by_seed(subjects: pd.DataFrame) -> str:
    """One sentence: in the cells where some seed's run follows its condition, how many runs of each seed
    do not (interval not above 0). A lapse count that depends on the seed points at the recipes, which
    ``tune`` chooses with one seed, rather than at the methods; '' when no cell has a lapse."""
    counts: dict[int, list[int]] = {}
    for _, _, _, each in _seeds_by_cell(subjects):
        if not any(d["ci_low"] > 0 for d in each.values()):
            continue
        for seed, d in each.items():
            counts.setdefault(int(seed), [0, 0])
            counts[int(seed)][0] += d["ci_low"] <= 0
            counts[int(seed)][1] += 1
    if not any(lapsed for lapsed, _ in counts.values()):
        return ""
    return ("In the cells where at least one seed's run follows its condition, the runs that do not (interval not "
            "above 0), by seed: " + ", ".join(f"seed {s}: {lapsed} of {n}" for s, (lapsed, n) in sorted(counts.items()))
            + ". `tune` chooses each recipe with one seed (the recipe file's `seed`): lapses concentrated in the "
            "other seeds suggest the recipe fits that seed's initialisation rather than the method.")

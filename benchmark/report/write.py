"""Tables, figures and the Markdown report of one results folder, from its records alone."""
from __future__ import annotations

import re
from pathlib import Path

from benchmark.report.figures import write_figures
from benchmark.run.identity import folder_makers
from benchmark.run.records import iter_records
from benchmark.run.spec import SPHERE_SUFFIX
from benchmark.run.status import PLAN, planned_without_record
from benchmark.report.headline import HEADLINE_NOTE, control_by_size, headline_table, per_subject_frame
from benchmark.report.findings import NOT_TESTED, lapses_by_seed, paper_findings, seed_agreement
from benchmark.report.frame import records_frame
from benchmark.report.tables import (BENCH_STEP, MACHINE_SPREAD, NOT_DENOISING_ABOVE, bench_timings, build_tables,
                                     sr_tasks, timing_spread)


def _extractors(results_dir: Path) -> list[str]:
    """Which feature extractors, judges and unavailable metrics the records used, one line each."""
    seen = {}
    for rec in iter_records(results_dir):
        for metric, entry in (rec.get("protocol") or {}).items():
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("extractor"), dict):
                e = entry["extractor"]
                kind = "pretrained" if e.get("pretrained") else "trained by the suite on real training volumes"
                seen[f"{metric}: extractor `{e.get('name')}` ({kind}; weights {_shipped_path(e.get('source'))})"] = None
            if isinstance(entry.get("judge"), dict):
                j = entry["judge"]
                trained_on = (j.get("trained_on") or {}).get("data_id", "?")
                seen[f"{metric}: judge `{j.get('name')}` ({j.get('num_classes')} classes, weights "
                     f"hash {j.get('weights_hash')}), {j.get('architecture')}, trained on {trained_on}"] = None
            if entry.get("available") is False:
                seen[f"{metric}: not computed: {entry.get('reason')}"] = None
    return list(seen)


def _shipped_path(path) -> str:
    """A record names a file where its machine found it; a file the suite ships is named from the
    repository root, so that the REPORT reads the same whichever checkout made or rebuilt it."""
    return re.sub(r"^.*/(benchmark/shipped/)", r"\1", str(path))


def _base_models(results_dir: Path) -> list[str]:
    """Which base model the runs used (shipped, pretrained here, BrainLDM), one line each."""
    seen = {}
    for rec in iter_records(results_dir):
        origin = rec.get("base_model") or {}
        if origin:
            seen[f"{origin.get('source')}: `{_shipped_path(origin.get('path'))}` (sha256 {str(origin.get('sha256'))[:16]}…)"] = None
    return list(seen)


def _thread_hours(records) -> str:
    """The CPU records' hours times the threads each ran with (its ``device`` line names them): what a run
    cost on CPU whether it ran alone with every core or beside another run (``--jobs``); '' when none."""
    total, found = 0.0, False
    for record in records:
        match = re.fullmatch(r"CPU .*\((\d+) threads?\)", str(record.get("device", "")))
        if match:
            found = True
            total += float(record.get("elapsed_seconds") or 0.0) * int(match.group(1)) / 3600
    return f"; on CPU {total:.1f} thread-hours (each run's hours times its threads)" if found else ""


def _training_settings(results_dir: Path) -> list[str]:
    """Markdown rows: what each task's methods trained with (learning rate, steps) and where it came from,
    from the finished records of the runs the suite's loop trained."""
    seen: dict[tuple[str, str], dict[str, set]] = {}
    for rec in iter_records(results_dir):
        training = rec.get("training") or {}
        if rec.get("status") != "ok" or training.get("lr") is None or str(rec.get("method")).endswith(SPHERE_SUFFIX):
            continue
        recipe = rec.get("recipe") or {}
        if recipe.get("chosen"):
            source = f"tuned recipe `{recipe['path']}` (sha256 {str(recipe.get('sha256'))[:8]}…)"
        elif recipe.get("path"):
            source = f"the profile's settings: `{recipe['path']}` chose nothing for it (the recipe's `why` says why)"
        else:
            source = "the profile's settings: no recipe for this task"
        cell = seen.setdefault((rec["task"], rec["method"]), {"lr": set(), "steps": set(), "source": set()})
        cell["lr"].add(float(training["lr"]))
        cell["steps"].add(int(training.get("steps") or 0))
        cell["source"].add(source)
    return [f"| {task} | {method} | {', '.join(f'{v:g}' for v in sorted(c['lr']))} | "
            f"{', '.join(str(v) for v in sorted(c['steps']))} | {'; '.join(sorted(c['source']))} |"
            for (task, method), c in sorted(seen.items())]


def _missing_rows(missing: list[dict]) -> list[str]:
    """Markdown rows of the planned runs without a record: one per task, method and N, with its seeds."""
    cells: dict[tuple[str, str, int], list[int]] = {}
    for run in missing:
        cells.setdefault((str(run["task"]), str(run["method"]), int(run["size"])), []).append(int(run["seed"]))
    return [f"| {task} | {method} | {size} | {', '.join(str(s) for s in sorted(seeds))} |"
            for (task, method, size), seeds in sorted(cells.items())]


def write_report(results_dir: Path, profile, tables: dict, figures: list[Path]) -> Path:
    results_dir = Path(results_dir)
    frame = records_frame(results_dir)
    missing = planned_without_record(results_dir)
    lines = [f"# Benchmark report: {results_dir}", ""]
    made_with = sorted(folder_makers(iter_records(results_dir))["profiles"]) or [profile.name]
    if made_with == [profile.name]:
        lines.append(f"Profile `{profile.name}` (what the records say): {profile.get('description', '')}; image "
                     f"shape {tuple(profile.image_shape)}.")
    else:  # the records say otherwise than the command line: name theirs
        lines.append(f"Profile{'s' if len(made_with) > 1 else ''} {', '.join(f'`{p}`' for p in made_with)} "
                     f"(what the records say; the tables were rebuilt with `--profile {profile.name}`).")
    if not frame.empty:
        ok = int((frame.status == "ok").sum())
        records = list(iter_records(results_dir))
        hours = sum(float(r.get("elapsed_seconds") or 0.0) for r in records) / 3600
        lines.append(f"Runs: {len(frame)} recorded, {ok} finished, {len(frame) - ok} failed, {hours:.1f} run-hours "
                     "(the sum of each record's `elapsed_seconds`: the attempt that finished it; an interrupted "
                     f"attempt's time is not counted, and runs made at once (`--jobs`) overlap){_thread_hours(records)}. "
                     f"Devices: {', '.join(sorted(frame.device.dropna().unique()))}.")
    if missing:
        lines.append(f"**Not finished: {len(missing)} of the runs this folder's plan (`{PLAN}`) asks for have no "
                     "record yet** (listed under \"Planned, not yet recorded\"); every table and verdict below is "
                     "made from the runs that have one.")
    lines += [f"Base model: {b}." for b in _base_models(results_dir)]
    spread = timing_spread(frame) if not frame.empty else []
    bench = bench_timings(results_dir)
    if spread:
        lines.append(f"Timings come from machines of different speed: the seconds per step of a method vary more "
                     f"than {MACHINE_SPREAD:g}-fold across its records ({'; '.join(spread)}). Table 5 takes each "
                     "method's median over its records; a headline cell's s/step, where no bench run timed its task, is its "
                     "own runs' mean.")
    if bench is not None:
        lines.append(f"One bench run timed every method's training step in one process on one machine "
                     f"([{bench['file']}]({bench['file'].removesuffix('.json')}.md), `{bench.get('command', '')}`; "
                     f"machine speed: one base-autoencoder step {bench.get('autoencoder_step_seconds', float('nan')):.3f} s): "
                     f"Table 5's and the {bench.get('task')} headline's \"{BENCH_STEP}\" and finding (f) compare methods by it.")
    subjects = per_subject_frame(results_dir)
    for task in sorted(frame.task.dropna().unique()) if not frame.empty else []:
        headline = headline_table(frame, subjects, task, bench=bench)
        if headline.empty or not headline["Control Δ [95% CI] follows?"].ne("–").any():
            continue
        lines += ["", f"## Headline: task `{task}`", "", headline.to_markdown(index=False), "", HEADLINE_NOTE]
        by_size = control_by_size(frame, subjects, task)
        if len(by_size.columns) > 3:  # more than one training-set size: the answer at each N, side by side
            lines += ["", f"### Which methods follow their condition at each N (`{task}`)", "",
                      by_size.to_markdown(index=False)]
    findings = paper_findings(frame, subjects, sr_tasks(frame), bench) if not frame.empty else []
    if any(f["verdict"] != NOT_TESTED for f in findings):
        lines += ["", "## The paper's findings, at this scale", "",
                  "| finding | verdict | evidence |", "|---|---|---|"]
        lines += [f"| {f['claim']} | **{f['verdict']}** | {f['evidence']} |" for f in findings]
        lines += ["", "Rules (`benchmark/report/findings.py`): \"A beats B\" when the probability that A scores "
                      "higher on a subject (same subject, seed and noise) has its 95% interval above 0.5; "
                      "*inconclusive* when tested but the intervals do not decide; *not tested* when the records "
                      "lack the runs."]
    agreement = seed_agreement(subjects)
    if not agreement.empty:
        lines += ["", "## Beyond the paper: do the training runs agree?", "",
                  "Each seed is a training run. A cell's verdict pools its seeds (bootstrap over seeds, then "
                  "subjects); here each run has its own Control Δ and interval, so a run that did not learn to "
                  "follow its condition is named (`benchmark/report/findings.py`, `seed_agreement`).", "",
                  agreement.to_markdown(index=False)]
        lapses = lapses_by_seed(subjects)
        lines += ["", lapses] if lapses else []
    lines += ["", "## Feature extractors and protocol", ""]
    extractors = _extractors(results_dir)
    lines += [f"- {e}" for e in extractors] or ["- (no scored runs yet)"]
    lines += ["", "Column headers name the extractor behind each number; numbers from different "
              "extractors are never in one column. The paper's numbers (columns `paper_…`) come "
              "from ADNI/UK Biobank data and the RadImageNet/MedicalNet extractors.", ""]
    settings = _training_settings(results_dir)
    if settings:
        lines += ["## Training settings", "",
                  "What the runs trained with, from their records. `tune` chooses a method's learning rate on "
                  "validation subjects by Control Δ, so only tasks with a Dice judge have recipes; a paired task "
                  "(super-resolution) trains with the profile's settings.", "",
                  "| task | method | lr | steps | from |", "|---|---|---|---|---|", *settings, ""]
    lines += ["## Reading control", "",
              "Each method is sampled twice from the same noise and scalars: with each test subject's own "
              "condition and with another test subject's (a fixed derangement), and both sets are scored against "
              "the own condition. Control Δ is the paired difference of the two Dice values; a method follows "
              "its condition when its Holm-corrected one-sided bootstrap p is at most 0.05 and the 95% CI lies "
              "above 0 (the headline tables). The rows \"reference (real vs real)\" (real volumes, own condition), "
              "\"autoencoder reconstruction\" (the ceiling a latent generator can reach), \"real, another "
              "subject's condition\" and \"base model, unconditioned\" are context. The control gap (noise-"
              "prediction MSE with another subject's condition minus with its own, per timestep band, from the "
              "probe on validation subjects at the final checkpoint) says when control emerged; \"control gap: "
              "bands CI>0\" counts the bands whose bootstrap 95% CI lies above 0. \"noise MSE / frozen\" is the method's own-condition noise MSE "
              "over the frozen base model's at that probe: about 1 for a method that keeps the prior; a row "
              f"above {NOT_DENOISING_ABOVE:g} is warned (the method diverged or has not yet learnt to denoise).", ""]
    lines += [f"![{p.stem}](figures/{p.name})" for p in figures if p.name.startswith("control_gap_")]
    lines += ["", "## Tables (appendix: every column)", "",
              "Cells are mean ± SD over seeds. A Fréchet cell adds its 95% bootstrap CI over volumes in brackets "
              "(with several seeds, from the lowest seed's low to the highest seed's high); Dice, Control Δ and the "
              "volume errors have their own [95% CI] columns, from per-subject values (bootstrap over seeds, then subjects).", ""]
    for name, table in tables.items():
        if table is None or table.empty:
            continue
        lines.append(f"### {name}  (tables/{name}.csv, .md, .tex)")
        lines.append("")
        lines.append(table.to_markdown(index=False))
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"- [{p.name}](figures/{p.name})" for p in figures] or ["- (none)"]
    # `plateau --out <folder>/plateau` (docs/CONTROL.md): has the step budget converged, on validation subjects
    lines += [f"- [{p.name}](plateau/{p.name}) (the plateau figure)" for p in sorted((results_dir / "plateau").glob("*.png"))]
    if missing:
        lines += ["", "## Planned, not yet recorded", "",
                  f"The runs in `{PLAN}` without a record (`python run_benchmark.py status --out <folder>` says "
                  "which are running, interrupted or not started; rerunning the grid or study runs them).", "",
                  "| task | method | N | seeds |", "|---|---|---:|---|", *_missing_rows(missing)]
    failed = frame[frame.status != "ok"] if not frame.empty else frame
    lines += ["", "## Failures", ""]
    if failed.empty:
        lines.append("None.")
    else:
        for _, row in failed.iterrows():
            lines.append(f"- {row.task} / {row.method} / N={row['size']} / seed {row.seed}: {row.error}")
    path = results_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_outputs(results_dir: Path, profile) -> Path:
    tables = build_tables(results_dir)
    figures = write_figures(results_dir, records_frame(results_dir))
    return write_report(results_dir, profile, tables, figures)

"""The task tables show relative FD and P/R/D/C per extractor, mark undersampled FDs with a dagger
and warn on a collapsed method (low recall / coverage) even when its FD is the best."""
from __future__ import annotations

import pandas as pd

from benchmark.engine.probe import NOISE_MSE_RATIO, summary_columns
from benchmark.report.frame import UNDERSAMPLED, undersampled_columns
from benchmark.report.tables import DAGGER, WARNING, task_table, write_table


def test_collapsed_method_is_warned_and_undersampled_fd_is_marked(tmp_path):
    proto = {"FID-3D [in-domain-3d]": {"sample_size": {"undersampled": True}},
             "FID-2D [in-domain-2d]": {"sample_size": {"undersampled": False}}}
    flags = undersampled_columns(proto)
    assert flags == "FID-3D [in-domain-3d]|FID-3D rel [in-domain-3d]"
    runs = [("reference", 0, 5.0, 1.0, 0.9, 0.95), ("ldm_scratch", 50, 2.0, 4.0, 0.01, 0.05),
            ("vcm", 50, 3.0, 1.5, 0.7, 0.8)]
    frame = pd.DataFrame([{"task": "lv", "method": m, "size": n, "seed": 0, "status": "ok", "error": None,
                           "device": "cpu", "FID-3D [in-domain-3d]": f, "FID-3D rel [in-domain-3d]": r,
                           "Recall-3D [in-domain-3d]": rec, "Coverage-3D [in-domain-3d]": cov, "FRD": 1.0,
                           UNDERSAMPLED: flags} for m, n, f, r, rec, cov in runs])
    table = task_table(frame, "lv").set_index("method")
    assert {"FID-3D rel [in-domain-3d]", "Recall-3D [in-domain-3d]", "Coverage-3D [in-domain-3d]", "FRD"} <= set(
        table.columns) and UNDERSAMPLED not in table.columns
    assert table.loc["ldm_scratch", WARNING].startswith("⚠") and table.loc["vcm", WARNING] == ""
    assert table.loc["ldm_scratch", "FID-3D [in-domain-3d]"] == "2"  # values unchanged
    md = write_table(task_table(frame, "lv"), tmp_path, "t", "caption")[1].read_text()
    assert f"FID-3D [in-domain-3d] ↓ {DAGGER}" in md and f"FID-3D rel [in-domain-3d] ↓ {DAGGER}" in md
    assert f"Recall-3D [in-domain-3d] ↑ {DAGGER}" not in md and "\n⚠ recall or coverage below" in md
    assert f"\n{DAGGER} Fréchet distance computed with fewer volumes" in md


def test_a_method_that_no_longer_denoises_is_warned(tmp_path):
    """A run whose final probe predicts the noise far worse than the frozen model (a diverged adapter:
    MSE ~1 against the frozen model's 0.18 ... 0.002) is flagged; one that keeps the prior is not."""
    def probe(own):
        bands = [{"band": f"t{i}", "mse_frozen": f, "mse_own": o, "mse_other": o + 1e-4, "gap": 1e-4,
                  "gap_ci_low": 5e-5, "gap_ci_high": 2e-4} for i, (f, o) in enumerate(zip((0.18, 0.026, 0.002), own))]
        return summary_columns({"bands": bands})

    diverged, kept = probe((1.0, 1.0, 1.0)), probe((0.18, 0.0258, 0.0021))
    assert diverged[NOISE_MSE_RATIO] > 40 and abs(kept[NOISE_MSE_RATIO] - 1.0) < 0.03
    frame = pd.DataFrame([{"task": "lv", "method": m, "size": 50, "seed": 0, "status": "ok", "error": None,
                           "device": "cpu", "Dice": d, **cols}
                          for m, d, cols in (("t2i_adapter", 0.002, diverged), ("vcm", 0.44, kept))])
    table = task_table(frame, "lv").set_index("method")
    assert table.loc["t2i_adapter", WARNING].startswith(f"⚠ {NOISE_MSE_RATIO} ") and table.loc["vcm", WARNING] == ""
    md = write_table(task_table(frame, "lv"), tmp_path, "t", "caption")[1].read_text()
    assert f"\n⚠ {NOISE_MSE_RATIO} above 2" in md and "recall or coverage below" not in md

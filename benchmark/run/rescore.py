"""Add to a folder's finished records a column the suite scores now and they were made without, from the
volumes their runs kept: the judges' anatomy Dice of paired (super-resolution) tasks.

A method's volumes are its run folder's ``samples.npz`` (kept as float16); a reference row's are the real
test volumes. Nothing else in a record changes, and its identity stays (the run is the same run); each
added column's protocol entry says from what, when and by which suite version it was added. A record
whose samples are gone is named and left as it is: rerun it with ``--force`` to score it."""
from __future__ import annotations

import time

import numpy as np

from benchmark.run.identity import suite_version
from benchmark.run.records import read_record, record_name, write_record
from benchmark.run.spec import REFERENCE
from metrics.common import as_volumes
from metrics.families import ANATOMY_DICE, score_anatomy
from metrics.metric import Scores, column


def rescore_folder(ctx) -> tuple[list[str], list[str]]:
    """(the records given their missing anatomy Dice, with the values; the records that lack it and cannot
    get it here, with why)."""
    done, left = [], []
    test = {s.id: s for s in ctx.test_subjects()}
    records = {path: read_record(path) for path in sorted((ctx.out_dir / "records").glob("*.json"))}
    made_by = _judges_in(records.values())
    for path, record in records.items():
        if record is None or record.get("status") != "ok" or not record.get("per_subject"):
            continue
        task, name = ctx.task(record["task"]), record_name(record)
        ids = [str(i) for i in record["per_subject"].get("ids", [])]
        if not task.paired or not ids:
            continue
        if any(i not in test for i in ids):
            left.append(f"{name}: its subjects are not this profile's test subjects; rescore it with the "
                        "profile and data that made it")
            continue
        anatomy = ctx.scorer(task).anatomy([test[i] for i in ids])
        missing = [a for a in anatomy if column(ANATOMY_DICE, a[0]) not in record["metrics"]]
        if not missing:
            continue
        other = [column(ANATOMY_DICE, labels) for labels, judge, _ in missing
                 if made_by.get(column(ANATOMY_DICE, labels), {judge.weights_hash}) != {judge.weights_hash}]
        if other:  # a column of one folder is made by one judge, or it is not one column
            left.append(f"{name}: the folder's {', '.join(other)} come from another judge than this command's; "
                        "rescore with the profile and overrides that made the folder")
            continue
        if record["method"] == REFERENCE:
            volumes, source = np.stack([test[i].image for i in ids]), "the real test volumes"
        else:
            samples = ctx.out_dir / "runs" / name / "samples.npz"
            if not samples.is_file():
                left.append(f"{name}: its samples ({samples}) are gone; rerun it with --force to score it")
                continue
            with np.load(samples) as kept:
                if [str(i) for i in kept["ids"]] != ids:
                    left.append(f"{name}: {samples} holds other subjects than its record; rerun it with --force")
                    continue
                volumes = kept["volumes"].astype(np.float32)
            source = f"runs/{name}/samples.npz (the run's volumes, kept as float16)"
        out = Scores(protocol={"seconds": {}})
        score_anatomy(as_volumes(volumes, f"the volumes of {name}"), missing, out)
        added = {"added_by": "rescore", "from": source, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "suite_version": suite_version()}
        for key, value in out.row.items():
            record["metrics"][key] = value
            record["per_subject"][key] = out.per_volume[key]
            record["protocol"][key] = {**out.protocol[key], **added}
        write_record(path, record)
        done.append(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in out.row.items()))
    return done, left


def _judges_in(records) -> dict[str, set]:
    """For each anatomy Dice column the folder's records hold: the weights hashes of the judges that made it."""
    found: dict[str, set] = {}
    for record in records:
        for key, entry in ((record or {}).get("protocol") or {}).items():
            if key.startswith(ANATOMY_DICE + " [") and isinstance(entry, dict):
                found.setdefault(key, set()).add((entry.get("judge") or {}).get("weights_hash"))
    return found

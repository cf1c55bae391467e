"""core.files: atomic writes, state-dict reading, file locks and file hashes (the training loop:
tests/test_core_loop.py)."""
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from core import files
from core.files import (
    atomic_json,
    atomic_npz,
    atomic_png,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    file_lock,
    read_state_dict,
    sha256_file,
)

# ---- files ---------------------------------------------------------------------------------------


def test_a_figure_is_written_with_a_palette_and_smaller_than_matplotlibs_own_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, (plot, picture) = plt.subplots(1, 2, figsize=(6, 3))
    plot.plot(np.linspace(0, 1, 50) ** 2, label="a line")
    plot.legend()
    picture.imshow(np.random.default_rng(0).random((48, 64)), cmap="gray")  # grey levels, as a montage
    fig.savefig(tmp_path / "plain.png", dpi=110)
    atomic_png(tmp_path / "figure.png", fig, dpi=110)
    plt.close(fig)
    plain, written = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "figure.png")
    assert written.mode == "P" and written.size == plain.size
    assert (tmp_path / "figure.png").stat().st_size < (tmp_path / "plain.png").stat().st_size
    difference = np.abs(np.asarray(written.convert("RGB"), float) - np.asarray(plain.convert("RGB"), float))
    assert difference.mean() < 0.5, difference.mean()  # of 255 (measured 0.017): the same picture to the eye


def test_atomic_writers_write_create_folders_and_leave_no_temp_files(tmp_path):
    d = tmp_path / "a" / "b"
    atomic_write_bytes(d / "x.bin", b"\x00\x01")
    atomic_write_text(d / "x.txt", "héllo")
    atomic_json(d / "x.json", {"b": 1, "a": [1.5]}, sort_keys=True)
    atomic_torch_save({"w": torch.arange(3)}, d / "x.pt")
    atomic_npz(d / "x.npz", path=np.arange(4), ids=np.array(["s1"]))
    assert sorted(p.name for p in d.iterdir()) == ["x.bin", "x.json", "x.npz", "x.pt", "x.txt"]
    assert (d / "x.bin").read_bytes() == b"\x00\x01"
    assert (d / "x.txt").read_text(encoding="utf-8") == "héllo"
    assert (d / "x.json").read_text() == json.dumps({"a": [1.5], "b": 1}, indent=2)  # as write_record
    assert torch.equal(torch.load(d / "x.pt")["w"], torch.arange(3))
    with np.load(d / "x.npz") as z:
        assert z["path"].tolist() == [0, 1, 2, 3] and z["ids"].tolist() == ["s1"]
    atomic_write_text(d / "x.txt", "new")  # replacing an existing file
    assert (d / "x.txt").read_text() == "new"
    assert sha256_file(d / "x.bin", prefix=64) == __import__("hashlib").sha256(b"\x00\x01").hexdigest()
    assert len(sha256_file(d / "x.bin")) == 12


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("writer failed mid-way")


class _BadArray:
    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("writer failed mid-way")


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    atomic_torch_save({"old": torch.ones(2)}, target)
    old = target.read_bytes()
    with pytest.raises(RuntimeError, match="mid-way"):  # fails while torch.save is writing
        atomic_torch_save({"big": torch.zeros(100_000), "bad": _Unpicklable()}, target)
    with pytest.raises(TypeError):
        atomic_json(target, {"x": object()})
    with pytest.raises(RuntimeError, match="mid-way"):  # numpy has written member "a" when "b" fails
        atomic_npz(target, a=np.zeros(1000), b=_BadArray(), c=np.zeros(3))
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):  # everything written, then the flush fails
        atomic_write_bytes(target, b"torn")
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# ---- read_state_dict -------------------------------------------------------------------------------


def test_read_state_dict_accepts_the_shapes_the_suite_writes(tmp_path):
    sd = {"w": torch.ones(2), "module.b": torch.zeros(1)}
    for i, blob in enumerate([sd, {"state_dict": sd, "meta": "{}"}, {"model": sd, "step": 3}]):
        atomic_torch_save(blob, tmp_path / f"{i}.pt")
        got = read_state_dict(tmp_path / f"{i}.pt", "the judge")
        assert set(got) == {"w", "module.b"} and torch.equal(got["w"], sd["w"])
    assert set(read_state_dict(tmp_path / "0.pt", "x", strip_prefix="module.")) == {"w", "b"}


class _Custom:
    pass


@pytest.mark.parametrize("content", ["missing", "custom pickle", "not tensors", "empty", "text"])
def test_read_state_dict_errors_name_the_file_what_and_what_to_do(tmp_path, content):
    path = tmp_path / f"{content.replace(' ', '_')}.pt"
    if content == "custom pickle":
        path.write_bytes(pickle.dumps(_Custom(), protocol=2))
    elif content == "not tensors":
        torch.save({"a": [1, 2], "b": "x"}, path)
    elif content == "empty":
        torch.save({}, path)
    elif content == "text":
        path.write_text("this is not a checkpoint\n" * 20)
    with pytest.raises(ValueError) as err:
        read_state_dict(path, "the autoencoder of BrainLDM", todo="download it from the model zoo")
    msg = str(err.value)
    assert str(path) in msg and "the autoencoder of BrainLDM" in msg and "download it from the model zoo" in msg


def test_read_state_dict_raises_the_callers_error_class(tmp_path):
    class WeightsError(ValueError):
        pass

    with pytest.raises(WeightsError, match="put the extractor there"):
        read_state_dict(tmp_path / "none.pt", "the extractor", error=WeightsError)


# ---- file_lock -----------------------------------------------------------------------------------

_TRY_LOCK = textwrap.dedent("""
    import fcntl, sys
    with open(sys.argv[1], "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(3)
""")


def test_file_lock_excludes_a_second_process(tmp_path):
    lock = tmp_path / "sub" / "lock"

    def other_process_locks() -> bool:
        rc = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(lock)], timeout=60, check=False).returncode
        assert rc in (0, 3)
        return rc == 0

    with file_lock(lock):
        assert not other_process_locks()
    assert other_process_locks()

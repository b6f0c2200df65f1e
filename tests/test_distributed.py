"""distributed.py's file writing on a real file system that fills up (a small tmpfs): a full disk is
a DiskFullError whatever the writer raised, and leaves no file under the final name and no temp file;
temp files of dead writers are removed, a live writer's are not."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed import DiskFullError, atomic_write, disk_full, remove_dead_temps


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("writer", ["torch.save", "np.save", "write"])
def test_full_disk_is_disk_full_error(tmpfs, writer):
    """torch.save raises RuntimeError and np.save an OSError without errno on a short write; only a
    plain write says ENOSPC. A 4 MiB file system and an 8 MiB file: the failed write fills it, and its
    temp file frees 4 MiB again when removed (more than disk_full's margin), so this also checks that
    the disk is asked about before the temp file goes."""
    fs = tmpfs("4m")
    path = fs / "big.bin"
    write = {"torch.save": lambda f: torch.save(torch.zeros(2 << 20), f),
             "np.save": lambda f: np.save(f, np.zeros(8 << 20, np.uint8)),
             "write": lambda f: f.write(bytes(8 << 20))}[writer]
    with pytest.raises(DiskFullError) as e:
        atomic_write(path, write)
    assert str(e.value) == f"disk full while writing {path}"
    assert os.listdir(fs) == []
    assert not disk_full(path)  # nothing was left behind: the space is free again


def test_other_failures_propagate_unchanged(tmp_path):
    def write(f):
        raise RuntimeError("not a disk problem")

    with pytest.raises(RuntimeError, match="not a disk problem"):
        atomic_write(tmp_path / "x", write)
    assert os.listdir(tmp_path) == []


def test_disk_full_asks_the_nearest_existing_parent(tmpfs):
    fs = tmpfs("2m")
    assert not disk_full(fs / "not" / "made" / "yet")
    (fs / "fill").write_bytes(bytes(3 << 19))  # 1.5 MiB: what is left is under the 1 MiB margin
    assert disk_full(fs / "not" / "made" / "yet")


def test_remove_dead_temps(tmp_path):
    dead, live = dead_pid(), os.getpid()
    names = [f"a.npy.tmp.{dead}", f"b.json.tmp.{live}", "c.npy", "d.tmp.txt", "e.tmp.0"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_dead_temps(tmp_path) == [f"a.npy.tmp.{dead}"]
    assert sorted(os.listdir(tmp_path)) == names[1:]

"""quickstart.sh wires its steps together (store -> reference statistics -> torchrun training -> grids ->
FID batch -> metrics) on a tiny budget set through its environment overrides, and a second run skips
every finished step. What each step computes is tested with its own script; this is about the wiring."""
import json
import os
import re
import subprocess

import numpy as np
from PIL import Image

from store import open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quickstart(tmp_path):
    env = {**os.environ,
           "QS_DATA": str(tmp_path / "builtin"), "QS_RESULTS": str(tmp_path / "results"), "QS_NPROC": "1",
           "QS_NUM_IMAGES": "40", "QS_REF_N": "12", "QS_FID_N": "8", "QS_PER_CLASS": "2", "QS_SAMPLE_STEPS": "2",
           "QS_TRAIN_SET": "train.steps=2 train.global_batch_size=4 train.log_every=1 train.tensorboard=false "
                           "train.sample_every=1 train.sample_per_class=1 train.sample_steps=2",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "quickstart.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quickstart_tiny_end_to_end_and_resume(tmp_path):
    out = run_quickstart(tmp_path)
    run = tmp_path / "results" / "quickstart"
    ckpt = run / "checkpoints" / "step-0000002.pt"   # outputs are named after the config's final step
    grid, real = run / "step-0000002-grid.png", run / "real-grid.png"
    metrics = run / "step-0000002-fid8.json"
    plots = [run / "plots" / name for name in ("loss.png", "mse.png", "loss_by_t.png")]
    samples = [run / "samples" / f"step-000000{s}.png" for s in (1, 2)]
    for path in (ckpt, grid, metrics, tmp_path / "builtin.fid-ref12.npz", *plots, *samples):
        assert path.is_file(), path
    result = json.loads(metrics.read_text())
    assert result["num_samples"] == 8 and result["num_reference"] == 12
    printed = re.search(r"FID-8 = ([0-9.]+) against 12 dataset images", out)
    assert printed and float(printed.group(1)) == round(result["metrics"]["FID"], 2)
    assert str(grid) in out and str(ckpt) in out
    # The real grid: row c holds the first images of class c, in the generated grid's layout (16 px images
    # enlarged 4 times to 64 px tiles, 2 px gutters).
    store = open_store(tmp_path / "builtin")
    tiles = np.asarray(Image.open(real))
    assert tiles.shape == np.asarray(Image.open(grid)).shape   # same layout, same class names beside the rows
    assert tiles.shape[0] == 10 * 66 + 2 and tiles.shape[1] > 2 * 66 + 2
    for c in (0, 3, 9):
        for k in range(2):
            index = c + 10 * k
            assert store.labels[index] == c
            tile = tiles[2 + 66 * c:2 + 66 * c + 64, 2 + 66 * k:2 + 66 * k + 64]
            assert np.array_equal(tile, store.read([index])[0][0].repeat(4, 0).repeat(4, 1))

    stamps = {p: p.stat().st_mtime_ns for p in (ckpt, grid, real, metrics, *plots)}
    again = run_quickstart(tmp_path)   # everything finished: nothing is extracted, trained, sampled or evaluated again
    assert f"{tmp_path / 'builtin'} exists: all 40 items" in again and "wrote" not in again
    for path in (tmp_path / "builtin.fid-ref12.npz", grid, real, run / "step-0000002-fid8.npz", metrics):
        assert f"{path} exists, skipped" in again
    assert "trained to step 2 already" in again and printed.group(0) in again
    assert f"{run / 'plots'} is newer than the training log, skipped" in again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

"""quickstart.sh wires its steps together (store -> reference statistics -> torchrun training -> grid ->
FID batch -> metrics) on a tiny budget set through its environment overrides, and a second run skips
every finished step."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quickstart(tmp_path):
    env = {**os.environ,
           "QS_DATA": str(tmp_path / "builtin"), "QS_RESULTS": str(tmp_path / "results"),
           "QS_NUM_IMAGES": "40", "QS_REF_N": "12", "QS_FID_N": "8", "QS_PER_CLASS": "1", "QS_SAMPLE_STEPS": "2",
           "QS_TRAIN_SET": "train.steps=2 train.global_batch_size=4 train.log_every=1 train.tensorboard=false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "quickstart.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quickstart_tiny_end_to_end_and_resume(tmp_path):
    out = run_quickstart(tmp_path)
    run = tmp_path / "results" / "quickstart"
    ckpt = run / "checkpoints" / "step-0000002.pt"
    grid, real = run / "step-0000002-grid.png", run / "real-grid.png"
    metrics = run / "step-0000002-fid8.json"
    for path in (ckpt, grid, real, metrics, tmp_path / "builtin.fid-ref12.npz"):
        assert path.is_file(), path
    result = json.loads(metrics.read_text())
    assert result["num_samples"] == 8 and result["num_reference"] == 12
    assert result["metrics"]["FID"] >= 0
    assert f"FID-8 = " in out and str(grid) in out and str(ckpt) in out

    stamps = {p: p.stat().st_mtime_ns for p in (grid, metrics)}
    again = run_quickstart(tmp_path)   # everything finished: nothing is trained, sampled or evaluated again
    assert again.count("exists, skipped") == 2 and "trained to step 2 already" in again and "samples exist" in again and "metrics exist" in again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()) and "FID-8 = " in again

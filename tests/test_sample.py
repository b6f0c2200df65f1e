"""sample.py on tiny random models: the .npz format, seeds that do not depend on ranks or batch size,
resume, weight selection, official DiT state dicts with a VAE, and one-line errors."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models import ALL_MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--sampler", "ddim", "--steps", "5"]
NPZ = [*FAST, "--num-samples", "10", "--shard-size", "4"]  # shards of 4, 4, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*argv):
    sample.main([str(a) for a in argv])


def error_of(*argv):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    message = str(e.value)
    assert message.startswith("sample.py: error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def export(make_export, tmp_path_factory):
    """A DiT-Ti/2 on 8 px pixels, 3 classes, with different 'model' and 'ema' weights."""
    return make_export(tmp_path_factory.mktemp("ckpt") / "export.pt")


@pytest.fixture(scope="module")
def reference(export, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "samples.npz"
    run("--ckpt", export, *NPZ, "--batch-size", 3, "--out", out)
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def dit_file(random_weights, tiny_vae, tmp_path_factory):
    """An official-DiT-style plain state dict (latent, learned sigma) and a tiny random SD-style VAE folder."""
    path = tmp_path_factory.mktemp("dit") / "dit.pt"
    model = ALL_MODELS["DiT-Ti/2"](input_size=8, in_channels=4, num_classes=3, learn_sigma=True,
                                   class_dropout_prob=0.1)
    torch.save(random_weights(model, 3), path)
    return path, tiny_vae[0]


def test_npz_round_trip(reference):
    assert set(reference) == {"arr_0", "arr_1"}
    images, labels = reference["arr_0"], reference["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [i % 3 for i in range(10)]
    assert np.bincount(labels).tolist() == [4, 3, 3]
    assert len({im.tobytes() for im in images}) == 10  # every sample has its own noise


def test_merge_streams_shards_and_cleans_up(export, reference, tmp_path):
    out = tmp_path / "s.npz"
    run("--ckpt", export, *NPZ, "--batch-size", 3, "--out", out)
    assert not os.path.exists(f"{out}.shards")
    with np.load(out) as f:  # the streamed zip reads back as np.savez's would
        assert np.array_equal(f["arr_0"], reference["arr_0"]) and np.array_equal(f["arr_1"], reference["arr_1"])


def test_batch_size_does_not_change_images(export, reference, tmp_path):
    out = tmp_path / "b.npz"
    run("--ckpt", export, *NPZ, "--batch-size", 4, "--out", out)
    with np.load(out) as f:
        assert f["arr_0"].tobytes() == reference["arr_0"].tobytes()


def test_two_ranks_give_the_same_images(export, reference, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
           "sample.py", "--ckpt", str(export), *NPZ, "--batch-size", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        assert f["arr_0"].tobytes() == reference["arr_0"].tobytes()
        assert np.array_equal(f["arr_1"], reference["arr_1"])


def test_resume_keeps_finished_shards(export, reference, tmp_path):
    out = tmp_path / "r.npz"
    os.makedirs(f"{out}.shards")
    # A finished shard 1 (samples 4..7) that sampling would never produce: it must survive untouched.
    marker = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(f"{out}.shards/shard-000001.npz", arr_0=marker, arr_1=np.arange(4, 8) % 3)
    run("--ckpt", export, *NPZ, "--out", out)
    with np.load(out) as f:
        images = f["arr_0"]
    assert np.array_equal(images[4:8], marker)
    assert images[:4].tobytes() == reference["arr_0"][:4].tobytes()
    assert images[8:].tobytes() == reference["arr_0"][8:].tobytes()


def test_full_disk_is_one_line_and_resumes(export, reference, tmp_path, tmpfs):
    """A real full disk: 8 KiB of tmpfs holds settings.json and one shard (a page each), not the second."""
    fs = tmpfs("8k")
    out = fs / "s.npz"
    message = error_of("--ckpt", export, *NPZ, "--out", out)
    assert f"disk full while writing {out}.shards/shard-000001.npz" in message and "rerun" in message
    assert sorted(os.listdir(f"{out}.shards")) == ["settings.json", "shard-000000.npz"]  # no temp file
    subprocess.run(["mount", "-o", "remount,size=1m", str(fs)], check=True)
    run("--ckpt", export, *NPZ, "--out", out)
    with np.load(out) as f:
        assert f["arr_0"].tobytes() == reference["arr_0"].tobytes()


def test_interrupted_merge_resumes_only_with_the_same_settings(export, reference, tmp_path, monkeypatch):
    out = tmp_path / "m.npz"

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "write_npz", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("--ckpt", export, *NPZ, "--out", out)
    monkeypatch.undo()
    assert not out.exists() and len(os.listdir(f"{out}.shards")) == 4  # 3 shards + settings.json
    assert "seed" in error_of("--ckpt", export, *NPZ, "--seed", 1, "--out", out)
    run("--ckpt", export, *NPZ, "--out", out)  # nothing left to sample: merge only
    with np.load(out) as f:
        assert f["arr_0"].tobytes() == reference["arr_0"].tobytes()


def test_weights_flag_picks_raw_or_ema(export, reference, tmp_path):
    out = tmp_path / "raw.npz"
    run("--ckpt", export, *NPZ, "--weights", "model", "--out", out)
    with np.load(out) as f:
        assert not np.array_equal(f["arr_0"], reference["arr_0"])


def test_plain_dit_state_dict_decodes_through_vae(dit_file, tmp_path):
    ckpt, vae = dit_file
    grid = tmp_path / "grid.png"
    run("--ckpt", ckpt, "--model", "DiT-Ti/2", "--image-size", 64, "--num-classes", 3, "--vae", vae,
        "--sampler", "ddpm", "--steps", 3, "--cfg-scale", 2, "--cfg-channels", 3,
        "--grid", grid, "--classes", "0,2", "--per-class", 3)
    image = np.asarray(Image.open(grid))
    # rows = classes, 64 px images, 2 px gutters, then the row labels (no names in a DiT file: class ids)
    assert image.shape[0] == 2 * (64 + 2) + 2 and image.shape[1] > 3 * (64 + 2) + 2
    assert image[2:66, 2:66].std() > 0
    labels = image[:, 3 * (64 + 2) + 2:]
    assert labels[2:66].max() > 0 and not np.array_equal(labels[2:66], labels[68:132])


def test_bad_inputs_are_one_line_errors(export, dit_file, tmp_path):
    ckpt, vae = dit_file
    dit = ["--ckpt", ckpt, "--num-classes", 3, "--vae", vae, *FAST]
    grid = ["--grid", tmp_path / "g.png"]
    assert "not found" in error_of("--ckpt", tmp_path / "missing.pt", *grid)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "weights_only" in error_of("--ckpt", tmp_path / "junk.pt", *grid)
    message = error_of(*dit, "--model", "DiT-Ti/2", "--image-size", 128, *grid)
    assert "'pos_embed'" in message and "[1, 16, 256]" in message and "[1, 64, 256]" in message
    assert "missing keys" in error_of(*dit, "--model", "DiT-S/2", "--image-size", 64, *grid)
    assert "unknown model" in error_of(*dit, "--model", "DiT-Nope/2", *grid)
    assert f"VAE folder not found: {tmp_path / 'no-vae'}" in error_of(*dit, "--model", "DiT-Ti/2", "--image-size", 64,
                                                                      "--vae", tmp_path / "no-vae", *grid)
    assert "pixel models only" in error_of(*dit, "--model", "DiT-Ti/2", "--image-size", 64, "--clip-denoised", *grid)
    assert "records it" in error_of("--ckpt", export, "--model", "DiT-Ti/2", *grid)
    assert "--classes" in error_of("--ckpt", export, *FAST, *grid, "--classes", "0,7")
    assert "--cfg-channels" in error_of("--ckpt", export, *FAST, *grid, "--cfg-channels", 4)
    (tmp_path / "done.npz").write_bytes(b"")
    assert "exists" in error_of("--ckpt", export, *NPZ, "--out", tmp_path / "done.npz")

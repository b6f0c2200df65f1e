"""extract_latents.py and store.py: real CIFAR-10 read from its archive, the builtin dataset, latent
mode with a tiny random VAE, torchrun invariance, resume after a crash, and every bad-input case."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import store
from conftest import children, proc_stat
from extract_latents import builtin_image, center_crop_arr, main
from store import StoreError, model_to_uint8, open_store, uint8_to_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def run(*args):
    main([str(a) for a in args] + ["--num-workers", "0"])


def store_files(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def one_line_exit(capture):
    msg = str(capture.value.code)
    assert "\n" not in msg and msg
    return msg


def test_pixel_mapping_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(2, 16, 16, 3)
    m = uint8_to_model(x)
    assert m.shape == (2, 3, 16, 16) and m.dtype == torch.float32
    assert m.min() == -1 and m.max() == 1
    assert torch.equal(model_to_uint8(m), x)
    assert torch.equal(model_to_uint8(torch.tensor([-3.0, 3.0]).reshape(1, 1, 1, 2).expand(1, 3, 1, 2))[0, 0, :, 0],
                       torch.tensor([0, 255], dtype=torch.uint8))


def test_grid_tiles_are_the_images_and_each_row_carries_its_name(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3 * 4, 16, 16, 3), dtype=np.uint8)
    names = ["red-circle", "red-circle", "yellow-star"]
    store.save_grid(tmp_path / "grid.png", images, names, zoom=1)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    tiles_width = 4 * 18 + 2
    assert grid.shape[0] == 3 * 18 + 2 and grid.shape[1] > tiles_width
    for k, image in enumerate(images):   # tile (r, c) at 2 + 18 r, 2 + 18 c, pixel for pixel
        r, c = divmod(k, 4)
        assert np.array_equal(grid[2 + 18 * r:18 + 18 * r, 2 + 18 * c:18 + 18 * c], image)
    labels = [grid[2 + 18 * r:18 + 18 * r, tiles_width:] for r in range(3)]
    assert all(label.max() > 0 for label in labels)           # every row has its name drawn
    assert np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[0], labels[2])
    with pytest.raises(ValueError, match="do not fill 5 rows"):
        store.save_grid(tmp_path / "bad.png", images, ["a"] * 5)
    store.save_grid(tmp_path / "zoom.png", images, names, zoom=3)   # tile (r, c) at 2 + 50 r, 2 + 50 c
    zoomed = np.asarray(Image.open(tmp_path / "zoom.png"))
    for k, image in enumerate(images):
        r, c = divmod(k, 4)
        tile = zoomed[2 + 50 * r:50 + 50 * r, 2 + 50 * c:50 + 50 * c]
        assert np.array_equal(tile[::3, ::3], image) and np.array_equal(tile[2::3, 1::3], image)
    store.save_grid(tmp_path / "auto.png", images, names)   # 16 px images: enlarged 4 times, to 64 px
    assert np.array_equal(np.asarray(Image.open(tmp_path / "auto.png"))[2:66, 2:66], images[0].repeat(4, 0).repeat(4, 1))


def test_cifar_subset_from_archive(cifar, tmp_path):
    out = tmp_path / "cifar"
    run("--data", cifar, "--split", "train", "--limit-per-class", 12, "--image-size", 32, "--vae", "none",
        "--flip", "--shard-size", 50, "--out", out)
    s = open_store(out, mode="pixels", image_size=32)
    assert len(s) == 120 and s.class_names == CIFAR_CLASSES and s.num_classes == 10
    assert s.manifest["shape"] == [3, 32, 32] and s.manifest["dtype"] == "uint8" and s.manifest["flip"]
    assert np.array_equal(s.labels, np.repeat(np.arange(10), 12))
    s.verify()
    # Pixel-exact against PIL decoding the same members; index = sorted class, then sorted file name.
    picks = {0: "train/airplane/0000.jpg", 13: "train/automobile/0001.jpg", 119: "train/truck/0011.jpg"}
    with tarfile.open(cifar) as tf:
        want = {i: np.asarray(Image.open(tf.extractfile(n)).convert("RGB")) for i, n in picks.items()}
    idx = np.array(list(picks))
    imgs, labels = s.read(idx)
    flipped, _ = s.read(idx, flips=np.ones(3, bool))
    assert imgs.dtype == np.uint8 and imgs.shape == (3, 32, 32, 3)
    assert list(labels) == [0, 1, 9]
    for k, i in enumerate(idx):
        assert np.array_equal(imgs[k], want[i])
        assert np.array_equal(flipped[k], want[i][:, ::-1])


def test_builtin_deterministic_and_class_dependent(tmp_path):
    a, la = builtin_image(7, 0, 32)
    b, lb = builtin_image(7, 0, 32)
    c, _ = builtin_image(7, 1, 32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and la == lb == 7
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Class means (centre region, where the shapes are) must be far apart for every pair of classes,
    # while images of one class still vary.
    n = 300
    imgs = np.stack([builtin_image(i, 0, 32)[0] for i in range(n)]).astype(np.float64)
    labels = np.arange(n) % 10
    centre = imgs[:, 10:22, 10:22].reshape(n, -1)
    means = np.stack([centre[labels == k].mean(0) for k in range(10)])
    dist = np.sqrt(((means[:, None] - means[None]) ** 2).mean(-1))
    assert dist[~np.eye(10, dtype=bool)].min() > 10, dist.round(1)
    assert imgs[labels == 7].std(0).mean() > 20  # intra-class variation (position, colour, background)
    # Through the script: the same seed gives byte-identical stores; any size works.
    for name in ("s1", "s2"):
        run("--data", "builtin", "--num-images", 40, "--image-size", 24, "--vae", "none", "--out", tmp_path / name)
    assert store_files(tmp_path / "s1") == store_files(tmp_path / "s2")
    s = open_store(tmp_path / "s1", "pixels", 24)
    assert len(s) == 40 and s.class_names[7] == "red-circle" and np.bincount(s.labels).tolist() == [4] * 10


def test_latent_mode_tiny_vae(tmp_path, tiny_vae):
    vae_path, vae = tiny_vae
    args = ("--data", "builtin", "--num-images", 24, "--image-size", 16, "--vae", vae_path, "--flip",
            "--shard-size", 10, "--batch-size", 8)
    run(*args, "--out", tmp_path / "a")
    run(*args, "--out", tmp_path / "b")
    assert store_files(tmp_path / "a") == store_files(tmp_path / "b")
    s = open_store(tmp_path / "a", mode="latents", image_size=16)
    assert s.manifest["shape"] == [4, 2, 2] and s.scale_factor == 0.18215 and s.manifest["vae"] == vae_path
    (mean, std), labels = s.read(np.arange(8), flips=np.array([0, 1] * 4, bool))
    assert mean.shape == std.shape == (8, 4, 2, 2) and mean.dtype == np.float32
    # Same as encoding the same batch directly (items 0..7 were the first batch of the first shard).
    x = np.stack([builtin_image(i, 0, 16)[0] for i in range(8)])
    with torch.no_grad():
        post = vae.encode(torch.cat([uint8_to_model(x), uint8_to_model(x).flip(3)])).latent_dist
    flips = np.array([0, 1] * 4, bool)
    want_mean = torch.where(torch.from_numpy(flips)[:, None, None, None], post.mean[8:], post.mean[:8])
    want_std = torch.where(torch.from_numpy(flips)[:, None, None, None], post.std[8:], post.std[:8])
    np.testing.assert_allclose(mean, want_mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, want_std.numpy(), rtol=1e-5, atol=1e-5)
    assert list(labels) == list(range(8))
    with pytest.raises(StoreError, match="holds latents"):
        open_store(tmp_path / "a", mode="pixels")


def test_torchrun_two_ranks_byte_identical(cifar, tmp_path, tiny_vae):
    """Archive reading in DataLoader workers + latent encode on 2 ranks == 1 process. CPU float results
    depend on the intra-op thread count, and torchrun sets OMP_NUM_THREADS=1, so the reference uses 1 thread."""
    args = ["--data", cifar, "--split", "test", "--limit-per-class", 3, "--image-size", 16, "--vae", tiny_vae[0],
            "--flip", "--shard-size", 7, "--batch-size", 4]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(*args, "--out", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           os.path.join(ROOT, "extract_latents.py"), *map(str, args), "--num-workers", "1",
                           "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = store_files(tmp_path / "one"), store_files(tmp_path / "two")
    assert len(one) == 5 * 4 + 1  # 30 items / 7 -> 5 shards x (mean, std, labels, record) + manifest
    assert one == two


def test_resume_after_crash(tmp_path):
    args = ("--data", "builtin", "--num-images", 50, "--image-size", 8, "--vae", "none", "--shard-size", 20)
    run(*args, "--out", tmp_path / "clean")
    # What a run killed inside its second shard leaves: the first shard, the second's temp file, the
    # third's array without its record (never a finished shard), no manifest.
    out = tmp_path / "crash"
    out.mkdir()
    for name in ("00000000-00000020.images.npy", "00000000-00000020.json", "00000000-00000020.labels.npy"):
        shutil.copy2(tmp_path / "clean" / name, out / name)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)
    (out / f"00000020-00000040.images.npy.tmp.{dead_pid()}").write_bytes(b"half")
    (out / "00000040-00000050.images.npy").write_bytes(b"\x93NUMPY garbage")
    live = out / f"00000020-00000040.labels.npy.tmp.{os.getppid()}"  # a writer still running: left alone
    live.write_bytes(b"busy")
    kept = os.stat(out / "00000000-00000020.images.npy").st_mtime_ns
    run(*args, "--out", out)
    assert os.stat(out / "00000000-00000020.images.npy").st_mtime_ns == kept  # finished shard not redone
    os.remove(live)
    assert store_files(out) == store_files(tmp_path / "clean")
    # A finished shard that was damaged afterwards is redone too.
    os.remove(out / "manifest.json")
    (out / "00000020-00000040.labels.npy").write_bytes(b"")
    run(*args, "--out", out)
    assert store_files(out) == store_files(tmp_path / "clean")
    # Resuming with other settings into the same directory is refused.
    with pytest.raises(SystemExit, match="different extraction"):
        run(*args[:-2], "--shard-size", 20, "--flip", "--out", out)


def test_rerun_of_a_complete_store_says_skipped_and_writes_nothing(tmp_path, capsys):
    args = ("--data", "builtin", "--num-images", 30, "--image-size", 8, "--vae", "none", "--shard-size", 20)
    out = tmp_path / "store"
    run(*args, "--out", out)
    assert f"wrote 30 items (pixels, [3, 8, 8]) to {out}" in capsys.readouterr().out
    clean = store_files(out)
    stamps = {f: os.stat(out / f).st_mtime_ns for f in clean}
    run(*args, "--out", out)
    printed = capsys.readouterr().out
    assert f"{out} exists: all 30 items (pixels, [3, 8, 8]) are extracted with these settings, skipped" in printed
    assert "wrote" not in printed
    assert {f: os.stat(out / f).st_mtime_ns for f in clean} == stamps
    # A shard damaged after the store was completed is redone, manifest or not.
    (out / "00000020-00000030.labels.npy").write_bytes(b"")
    run(*args, "--out", out)
    assert "wrote 30 items" in capsys.readouterr().out and store_files(out) == clean


def _running(pid):
    """Neither gone nor a zombie (dead, waiting for whoever adopted it to reap it)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; workers die with their parent on Linux")
def test_kill_9_leaves_no_workers_and_resumes(tmp_path):
    args = ["--data", "builtin", "--num-images", 12000, "--image-size", 16, "--vae", "none", "--shard-size", 1000]
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "extract_latents.py"), *map(str, args), "--num-workers", "2",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "00000000-00001000.json").exists():
        assert proc.poll() is None and time.time() < deadline, "extraction ended before its first shard"
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 5
    while any(map(_running, workers)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(_running, workers)), "a DataLoader worker outlived its parent"
    assert not (out / "manifest.json").exists()
    (out / f"x.images.npy.tmp.{dead_pid()}").write_bytes(b"half")  # as a killed writer leaves it
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    run(*args, "--out", tmp_path / "clean")
    assert store_files(out) == store_files(tmp_path / "clean")


def test_full_disk_keeps_finished_shards(tmp_path, tmpfs):
    """A real short write: 4 MiB of tmpfs, shards of 2.1 MB. The first fits, the second does not."""
    args = ("--data", "builtin", "--num-images", 1400, "--image-size", 32, "--vae", "none", "--shard-size", 700)
    fs = tmpfs("4m")
    out = fs / "store"
    with pytest.raises(SystemExit) as e:
        run(*args, "--out", out)
    msg = one_line_exit(e)
    assert "disk full" in msg and str(out / "00000700-00001400.images.npy") in msg and "re-run" in msg
    assert sorted(os.listdir(out)) == ["00000000-00000700.images.npy", "00000000-00000700.json",
                                       "00000000-00000700.labels.npy"]  # no manifest, no temp file
    record = json.loads((out / "00000000-00000700.json").read_text())
    assert all(store.sha256_file(out / name) == record["sha256"][kind] for kind, name in record["files"].items())
    # Room made, the same command finishes the store without redoing the first shard.
    kept = os.stat(out / "00000000-00000700.images.npy").st_mtime_ns
    subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
    run(*args, "--out", out)
    assert os.stat(out / "00000000-00000700.images.npy").st_mtime_ns == kept
    run(*args, "--out", tmp_path / "clean")
    assert store_files(out) == store_files(tmp_path / "clean")


def _png(path, mode="RGB", size=(20, 12), colour=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGBA":
        img = Image.new("RGBA", size, colour + (0,))
    elif mode == "P":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, *colour])
    elif mode == "L":
        img = Image.new("L", size, 77)
    elif mode == "CMYK":
        img = Image.new("CMYK", size, (0, 255, 255, 0))
    else:
        img = Image.new("RGB", size, colour)
    img.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "data"
    _png(root / "cats" / "a.png", "RGBA")
    _png(root / "cats" / "b.png", "P")
    _png(root / "cats" / "sub" / "c.png", "L")
    _png(root / "dogs" / "d.jpg", "CMYK")
    _png(root / "dogs" / "e.png", "RGB", size=(64, 48))
    (root / "dogs" / ".hidden").write_bytes(b"ignored")
    (root / "README.txt").write_bytes(b"files outside class folders are ignored")
    return root


def test_folder_zip_tar_and_colour_modes(tmp_path, folder):
    run("--data", folder, "--image-size", 8, "--vae", "none", "--out", tmp_path / "f")
    s = open_store(tmp_path / "f", "pixels", 8)
    assert s.class_names == ["cats", "dogs"] and s.labels.tolist() == [0, 0, 0, 1, 1]
    imgs, _ = s.read(np.arange(5))
    assert (imgs[0] == 255).all()  # fully transparent -> white
    assert (imgs[1] == (10, 200, 30)).all() and (imgs[2] == 77).all()
    assert imgs[3, ..., 0].mean() > 200 and imgs[3, ..., 1:].mean() < 60  # CMYK (0,255,255,0) is red
    # The same layout inside a zip and a tar (with a wrapper folder, selected by --split) gives the same store.
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder).as_posix())
    with tarfile.open(tmp_path / "d.tar", "w") as tf:
        tf.add(folder, arcname="wrap/data")
    run("--data", tmp_path / "d.zip", "--image-size", 8, "--vae", "none", "--out", tmp_path / "z")
    run("--data", tmp_path / "d.tar", "--split", "wrap/data", "--image-size", 8, "--vae", "none", "--out", tmp_path / "t")
    for other in ("z", "t"):
        o = open_store(tmp_path / other)
        assert o.class_names == s.class_names and np.array_equal(o.read(np.arange(5))[0], imgs)


def test_bad_inputs(tmp_path, folder, capsys):
    base = ("--image-size", 8, "--vae", "none")
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(jpeg, format="JPEG")
    cases = {
        "corrupt": ("dogs/bad.jpg", b"\x00" * 100),
        "truncated": ("dogs/half.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2]),
    }
    for what, (rel, data) in cases.items():
        (folder / rel).write_bytes(data)
        with pytest.raises(SystemExit) as e:
            run("--data", folder, *base, "--out", tmp_path / what)
        assert rel.split("/")[1] in one_line_exit(e), what
        assert not (tmp_path / what / "manifest.json").exists()
        os.remove(folder / rel)
    # Files that are not images never stop a run: skipped, counted and recorded.
    (folder / "cats" / "notes.txt").write_bytes(b"hello")
    (folder / "dogs" / "LICENSE").write_bytes(b"CC-BY")
    run("--data", folder, *base, "--out", tmp_path / "texts")
    s = open_store(tmp_path / "texts")
    assert len(s) == 5 and s.manifest["skipped"] == [{"file": "cats/notes.txt", "reason": "not an image file"},
                                                     {"file": "dogs/LICENSE", "reason": "not an image file"}]
    assert "; skipped 2 non-image files (listed in manifest.json)" in capsys.readouterr().out
    (folder / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        run("--data", folder, *base, "--out", tmp_path / "empty")
    assert "empty class folder" in one_line_exit(e) and "empty" in str(e.value.code)
    # --skip-bad: all of it skipped, counted and recorded; the empty class keeps its index.
    for rel, data in cases.values():
        (folder / rel).write_bytes(data)
    run("--data", folder, *base, "--skip-bad", "--out", tmp_path / "skip")
    s = open_store(tmp_path / "skip")
    assert len(s) == 5 and s.class_names == ["cats", "dogs", "empty"] and s.num_classes == 3
    assert sorted(x["file"] for x in s.manifest["skipped"]) == ["cats/notes.txt", "dogs/LICENSE", "dogs/bad.jpg",
                                                                "dogs/half.jpg", "empty"]
    assert "; skipped 2 non-image files and 3 unreadable images or empty class folders" in capsys.readouterr().out
    # Empty dataset, missing path.
    (tmp_path / "nothing").mkdir()
    for data, words in ((tmp_path / "nothing", "empty dataset"), (tmp_path / "missing", "not found")):
        with pytest.raises(SystemExit) as e:
            run("--data", data, *base, "--out", tmp_path / "x")
        assert words in one_line_exit(e) and str(data) in str(e.value.code)


def test_exif_orientation(tmp_path):
    """A 32x16 JPEG, red left half and blue right half, whose EXIF says "rotate 90° clockwise to view"
    (orientation 6): upright, red is on top; as stored in the file, red is on the left."""
    raw = np.zeros((16, 32, 3), np.uint8)
    raw[:, :16, 0] = raw[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "data" / "photos" / "rotated.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(raw).save(path, exif=exif, quality=95)
    args = ("--data", tmp_path / "data", "--image-size", 8, "--vae", "none")
    run(*args, "--out", tmp_path / "upright")
    run(*args, "--no-exif-transpose", "--out", tmp_path / "raw")
    upright, as_stored = (open_store(tmp_path / name).read([0])[0][0].astype(int) for name in ("upright", "raw"))
    with Image.open(path) as img:
        assert np.array_equal(upright, center_crop_arr(ImageOps.exif_transpose(img), 8))
        assert np.array_equal(as_stored, center_crop_arr(img.convert("RGB"), 8))
    up, stored = (x[..., 0] - x[..., 2] for x in (upright, as_stored))  # red minus blue
    assert (up[:3] > 100).all() and (up[-3:] < -100).all()  # red on top, blue below
    assert (stored[:, :3] > 100).all() and (stored[:, -3:] < -100).all()  # red left, blue right
    # The setting is part of the extraction: resuming with the other one is refused.
    with pytest.raises(SystemExit, match="changed: exif_transpose"):
        run(*args, "--no-exif-transpose", "--out", tmp_path / "upright")


def test_missing_vae_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for vae in (str(tmp_path / "no-such-vae"), "nobody/no-such-vae"):
        with pytest.raises(SystemExit) as e:
            run("--data", "builtin", "--num-images", 4, "--image-size", 16, "--vae", vae, "--out", tmp_path / "o")
        msg = one_line_exit(e)
        assert vae in msg and ("folder" in msg)


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        open_store(tmp_path / "missing")
    out = tmp_path / "s"
    run("--data", "builtin", "--num-images", 12, "--image-size", 8, "--vae", "none", "--out", out)
    with pytest.raises(StoreError, match="image size 8"):
        open_store(out, image_size=32)
    with pytest.raises(StoreError, match="holds pixels"):
        open_store(out, mode="latents")
    with pytest.raises(StoreError, match="without --flip"):
        open_store(out).read([0, 1], flips=[True, False])
    manifest = json.loads((out / "manifest.json").read_text())
    for change, words in (({"version": 99}, "version 99"), ({"format": "other"}, "not a minsnr-store")):
        (out / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(StoreError, match=words):
            open_store(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    os.remove(out / manifest["shards"][0]["files"]["labels"])
    with pytest.raises(StoreError, match="damaged"):
        open_store(out)

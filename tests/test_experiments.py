"""The diagnostics in experiments/: loss_by_t.py's held-out x0-MSE per timestep against closed forms
for each target, its pairing guarantee (same images and noise whatever the batch size) and one-line
errors; swap_models.py's hand-over between two models against sample.py's own batches; plot_run.py's
reading of a run's metrics.jsonl."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import extract_latents
import sample
from diffusion import TARGETS, GaussianDiffusion
from experiments import loss_by_t, swap_models

TIMESTEPS = [0, 10, 300, 999]


def gaussian_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g) * 0.5, torch.randn(n, 3, 4, 4, generator=g)


@pytest.mark.parametrize("target", TARGETS)
def test_oracle_prediction_has_zero_error(target):
    d = GaussianDiffusion("cosine", target=target, weighting="min_snr")
    x0, noise = gaussian_batch()

    def oracle(x_t, t, y):   # one batch: the whole x0 and noise are this call's
        return d.target_of(x0, t, noise)

    mse = loss_by_t.x0_mse_by_t(oracle, d, x0, torch.zeros(6, dtype=torch.long), TIMESTEPS[:-1], noise, batch_size=6)
    assert mse.abs().max() < 1e-9


@pytest.mark.parametrize("target", TARGETS)
def test_zero_prediction_matches_closed_form(target):
    # Predicting 0 gives x̂0 = 0 (x0 target), x_t/α (ε target) or α·x_t (v target), so the error is known.
    d = GaussianDiffusion("linear", target=target, weighting="min_snr")
    x0, noise = gaussian_batch()

    def zero(x_t, t, y):
        return torch.zeros_like(x_t)

    mse = loss_by_t.x0_mse_by_t(zero, d, x0, torch.zeros(6, dtype=torch.long), TIMESTEPS, noise, batch_size=4)
    for k, t in enumerate(TIMESTEPS):
        a, s = d.sqrt_alphas_cumprod[t].item(), d.sqrt_one_minus_alphas_cumprod[t].item()
        error = {"x0": -x0, "eps": s / a * noise, "v": (a * a - 1) * x0 + a * s * noise}[target]
        want = (error.double() ** 2).flatten(1).mean(1)
        torch.testing.assert_close(mse[k], want, rtol=1e-5, atol=1e-12)


def test_learned_sigma_channels_are_ignored():
    d = GaussianDiffusion("cosine", target="x0", weighting="min_snr", learn_sigma=True)
    x0, noise = gaussian_batch()

    def with_variance(x_t, t, y):   # x0 in the mean channels, garbage in the variance channels
        return torch.cat([x0, torch.full_like(x0, 1e3)], dim=1)

    mse = loss_by_t.x0_mse_by_t(with_variance, d, x0, torch.zeros(6, dtype=torch.long), TIMESTEPS, noise, batch_size=6)
    assert mse.abs().max() < 1e-12


@pytest.fixture(scope="module")
def files(make_export, tmp_path_factory):
    """A builtin 8-px pixel store, two random DiT-Ti/4 exports (v target, cosine) and one with another target."""
    tmp = tmp_path_factory.mktemp("experiments")
    extract_latents.main(["--data", "builtin", "--num-images", "40", "--image-size", "8", "--vae", "none",
                          "--out", str(tmp / "store")])
    model = {"name": "DiT-Ti/4", "num_classes": 10, "schedule": "cosine"}
    make_export(tmp / "export.pt", target="v", seed=0, ema_seed=0, **model)
    make_export(tmp / "other.pt", target="v", seed=1, ema_seed=1, **model)
    make_export(tmp / "eps.pt", target="eps", seed=2, ema_seed=2, **model)
    return tmp


def run(files, out, *extra):
    loss_by_t.main(["--ckpt", str(files / "export.pt"), "--data", str(files / "store"), "--num-images", "12",
                    "--timesteps", "5", "--device", "cpu", "--out", str(out), *extra])
    return json.loads(Path(out).read_text())


def test_cli_pairs_images_and_noise_whatever_the_batch(files, tmp_path):
    a = run(files, tmp_path / "a.json", "--batch-size", "12")
    b = run(files, tmp_path / "b.json", "--batch-size", "5")
    c = run(files, tmp_path / "c.json", "--seed", "1")
    assert a["t"] == [0, 250, 500, 749, 999] and a["num_images"] == 12
    torch.testing.assert_close(torch.tensor(a["x0_mse"]), torch.tensor(b["x0_mse"]), rtol=1e-5, atol=0)
    assert a["x0_mse"] != c["x0_mse"]   # another seed: other images and noise


def test_cli_errors_are_one_line(files, tmp_path):
    def error_of(*argv):
        with pytest.raises(SystemExit) as e:
            loss_by_t.main([*argv, "--out", str(tmp_path / "x.json")])
        message = str(e.value)
        assert "\n" not in message and not (tmp_path / "x.json").exists()
        return message

    assert "checkpoint not found" in error_of("--ckpt", str(tmp_path / "nope.pt"), "--data", str(files / "store"))
    assert "store not found" in error_of("--ckpt", str(files / "export.pt"), "--data", str(tmp_path / "nostore"))
    assert "exceeds the 40 images" in error_of("--ckpt", str(files / "export.pt"), "--data", str(files / "store"),
                                                "--num-images", "41")


SAMPLER = ["--sampler", "ddim", "--steps", "4", "--clip-denoised", "--num-samples", "7", "--batch-size", "4"]


def sample_py(ckpt, out):
    sample.main(["--ckpt", str(ckpt), *SAMPLER, "--cfg-scale", "1.0", "--out", str(out)])
    with np.load(out) as f:
        return f["arr_0"], f["arr_1"]


def swap(files, tau, out, high="export.pt", low="other.pt"):
    swap_models.main(["--high", str(files / high), "--low", str(files / low), "--switch-t", str(tau),
                      *SAMPLER, "--out", str(out)])
    with np.load(out) as f:
        return f["arr_0"], f["arr_1"]


def test_swap_at_the_ends_reproduces_each_models_own_samples(files, tmp_path):
    high_images, high_labels = sample_py(files / "export.pt", tmp_path / "high.npz")
    low_images, _ = sample_py(files / "other.pt", tmp_path / "low.npz")
    never, labels = swap(files, -1, tmp_path / "never.npz")
    always, _ = swap(files, 999, tmp_path / "always.npz")
    assert np.array_equal(never, high_images) and np.array_equal(labels, high_labels)
    assert np.array_equal(always, low_images)
    # DDIM-4 visits t = 999, 666, 333, 0: switching at 333 mixes the two and matches neither
    mixed, _ = swap(files, 333, tmp_path / "mixed.npz")
    assert not np.array_equal(mixed, high_images) and not np.array_equal(mixed, low_images)


def test_swap_refuses_models_with_different_targets(files, tmp_path):
    with pytest.raises(SystemExit) as e:
        swap(files, 100, tmp_path / "x.npz", low="eps.pt")
    assert "differ in diffusion target" in str(e.value) and not (tmp_path / "x.npz").exists()


def test_plot_run_reads_the_log_and_draws_its_buckets(tmp_path, capsys):
    """plot_run: the heatmap's cells are the logged per-bucket values (null = an empty bucket, masked), a
    last line cut short by a running writer is ignored, and a bad line before it is a one-line error."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.image import imread

    from experiments import plot_run
    rng = np.random.default_rng(0)
    records = [{"step": s, "loss": float(rng.uniform(0.1, 1)), "mse": float(rng.uniform(0.1, 1)),
                "loss_by_t_bucket": [float(v) for v in rng.uniform(0.01, 1, 5)],
                "mse_by_t_bucket": [None if (s, b) == (20, 3) else float(v)
                                    for b, v in enumerate(rng.uniform(0.01, 1, 5))]}
               for s in (10, 20, 30, 35)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4')
    assert plot_run.read_metrics(run / "metrics.jsonl") == records
    steps, values = plot_run.bucket_table(records, "mse_by_t_bucket")
    assert steps.tolist() == [10, 20, 30, 35] and values.shape == (5, 4)
    expected = np.array([[np.nan if v is None else v for v in r["mse_by_t_bucket"]] for r in records]).T
    assert np.array_equal(values, expected, equal_nan=True) and np.isnan(values[3, 1])
    plot_run.main([str(run)])
    assert "(4 log steps, last step 35)" in capsys.readouterr().out
    for name in ("loss.png", "mse.png", "loss_by_t.png"):
        image = imread(run / "plots" / name)
        assert image.ndim == 3 and image.std() > 0, name
    (run / "metrics.jsonl").write_text('{"step": 1\n' + json.dumps(records[0]) + "\n")
    with pytest.raises(SystemExit, match="line 1 is not JSON"):
        plot_run.main([str(run)])

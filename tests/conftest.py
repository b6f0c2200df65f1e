"""Shared fixtures. Stores, exports and VAEs are made through the repository's own writers
(store.write_store, export.save_export, diffusers' save_pretrained), tiny enough for a 2-core CPU, so a
test that reads one reads exactly what the real tools write."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; VAEs are local folders

from export import save_export  # noqa: E402
from models import ALL_MODELS  # noqa: E402
from store import write_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"   # CIFAR-10 JPEGs in ImageNet folder layout


def stripe_images(labels, size):
    """uint8 [N, size, size, 3]: class c = a colour and a stripe direction, so a tiny model learns it
    (and its loss falls) in a few dozen steps."""
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((len(labels), size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        stripes = ((xx if c % 2 else yy) // 2 % 2) * 120
        images[i] = np.stack([stripes + 60 * c, 200 - stripes, 40 * c + 20 * (xx > size // 2)], -1)
    return images


def _make_store(path, n=48, size=16, classes=4, mode="pixels", flip=False):
    """A store of n items: stripe images (pixels) or random posteriors [4, size/8, size/8] (latents)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n).astype(np.int64)
    if mode == "pixels":
        arrays = {"images": stripe_images(labels, size)}
    else:
        shape = (n, 4, size // 8, size // 8)
        arrays = {"mean": rng.standard_normal(shape).astype(np.float32),
                  "std": rng.uniform(0.1, 1.0, shape).astype(np.float32)}
    if flip:   # orientation axis after N: 0 = original, 1 = flipped (W is axis -2 of images, -1 of latents)
        arrays = {k: np.stack([a, a[..., ::-1, :] if k == "images" else a[..., ::-1]], 1) for k, a in arrays.items()}
    write_store(path, arrays, labels, class_names=[f"class{i}" for i in range(classes)], image_size=size, flip=flip,
                vae=None if mode == "pixels" else "test-vae", scale_factor=None if mode == "pixels" else 0.18215)
    return Path(path)


@pytest.fixture(scope="session")
def make_store():
    return _make_store


def _random_weights(model, seed):
    """adaLN-Zero makes a fresh DiT output exactly 0 whatever its input; random weights make the output
    depend on input and weights (pos_embed stays the fixed sin-cos table)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v if k == "pos_embed" else 0.05 * torch.randn(v.shape, generator=g)
            for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def random_weights():
    return _random_weights


def _make_export(path, *, name="DiT-Ti/2", input_size=8, num_classes=3, target="eps", schedule="linear",
                 seed=1, ema_seed=2):
    """A pixel model with random 'model' (seed) and 'ema' (ema_seed) weights, in train.py's export format."""
    model_args = {"name": name, "input_size": input_size, "in_channels": 3, "num_classes": num_classes,
                  "learn_sigma": False, "class_dropout_prob": 0.1}
    model = ALL_MODELS[name](**{k: v for k, v in model_args.items() if k != "name"})
    diffusion_args = {"schedule": schedule, "num_timesteps": 1000, "target": target, "weighting": "min_snr",
                      "gamma": 5.0, "zero_terminal_snr": False, "learn_sigma": False}
    data = {"mode": "pixels", "image_size": input_size, "vae": None, "scale_factor": None,
            "class_names": [f"class{i}" for i in range(num_classes)]}
    save_export(path, _random_weights(model, seed), _random_weights(model, ema_seed), model_args=model_args,
                diffusion_args=diffusion_args, data=data, config={}, step=0)
    return Path(path)


@pytest.fixture(scope="session")
def make_export():
    return _make_export


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A diffusers AutoencoderKL with the SD VAE's layout (4 levels: 8x downsampling, 4 latent channels)
    at a tiny width, random weights, saved as a local folder -> (folder, the module in eval mode)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path), vae.eval()


@pytest.fixture()
def tmpfs(tmp_path):
    """tmpfs(size) mounts a fresh tmpfs of `size` ("4m", "8k") under tmp_path and returns its path: a
    real file system that fills up, so full-disk tests see the errors real writers raise. Grow it with
    `mount -o remount,size=...`; everything is unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = []

    def mount(size):
        path = tmp_path / f"tmpfs{len(mounts)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], check=True)


def proc_stat(pid):
    """(state, parent pid) of a process from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]  # after "pid (name)"
    except (FileNotFoundError, ProcessLookupError):  # gone before or while it was read
        return None
    return state, int(ppid)


def children(parent):
    """Pids of the processes whose parent is `parent` (Linux /proc)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (stat := proc_stat(p)) and stat[1] == parent]


@pytest.fixture(scope="session")
def cifar():
    """The CIFAR-10 archive (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)."""
    if not CIFAR.exists():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR}")
    return str(CIFAR)

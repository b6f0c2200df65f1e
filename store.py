"""Data on disk and in model space: the store format written by extract_latents.py (and write_store)
and read by train.py, evaluate.py and the experiments; the one definition of how pixels and latents map
to the model's input space and back; image reading; the VAE.

A store is a directory:
  manifest.json                      written last (atomically): its presence marks a complete store
  <start>-<end>.json                 per-shard record (count, skipped files, sha256 of each file)
  <start>-<end>.images.npy           pixels:  uint8   [n, H, W, 3]   or [n, 2, H, W, 3] with flip
  <start>-<end>.mean.npy / .std.npy  latents: float32 [n, C, h, w]   or [n, 2, C, h, w] with flip
  <start>-<end>.labels.npy           int64 [n]
<start>-<end> is the range of the shard in the sorted list of source files, so shard names and
contents do not depend on how many processes wrote them. With flip, axis 1 is the orientation
(0 = original, 1 = horizontally flipped).

Model space: pixels are uint8 / 127.5 - 1 in [-1, 1] (uint8_to_model, model_to_uint8: the only
quantization of samples). Latents are stored as the VAE posterior in VAE units (unscaled); the model
sees (mean + std * noise) * scale_factor and decodes through vae.decode(x / scale_factor)
(Store.read_model, model_to_images).
"""
import hashlib
import io
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from distributed import DiskFullError, atomic_write

FORMAT = "minsnr-store"
VERSION = 1
# Latent scale of the SD VAEs (sd-vae-ft-ema/-mse) that DiT and the paper trained with; used when a
# VAE's config does not say, and for official DiT checkpoints, which record nothing.
SD_VAE_SCALE_FACTOR = 0.18215
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}


class StoreError(ValueError):
    """A store, image or VAE that cannot be used as asked; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------------------------
# Pixels


def uint8_to_model(images):
    """uint8 [B, H, W, 3] (numpy or torch) -> float32 [B, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def model_to_uint8(x):
    """float [B, 3, H, W] in ~[-1, 1] -> uint8 [B, H, W, 3]. The only place model outputs are
    quantized, so samples are rounded exactly once before FID or saving."""
    x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_rgb(img):
    """Any PIL mode -> RGB. Transparent pixels are composited on white (a plain convert would keep
    whatever colour hides under alpha 0, often black); 16-bit grey is scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit PNGs open as mode I;16 / I with values 0..65535; convert("L") would clip them at 255.
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def open_rgb(source, name, *, exif_transpose=True):
    """An image file (a path, or its bytes) decoded now and converted with to_rgb -> PIL RGB image,
    turned upright by its EXIF orientation tag (as viewers show it) unless exif_transpose=False.
    Anything PIL cannot decode (not an image, truncated, ...) is a StoreError naming `name`."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()  # decode now: a truncated file fails here, not later
            return to_rgb(ImageOps.exif_transpose(img) if exif_transpose else img)
    except Image.UnidentifiedImageError:
        raise StoreError(f"{name}: cannot read image (not an image PIL can read)") from None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise StoreError(f"{name}: cannot read image ({e})") from None


def save_grid(path, images, row_names, pad=2, zoom=None):
    """images: uint8 [rows*cols, H, W, 3] in row-major order, one row per name of `row_names` -> one PNG
    with black gutters and each row's name to the right of its row. Each image is enlarged `zoom` times
    by pixel repetition (a 16 px image is a speck on screen; repetition adds no detail it lacks); zoom None
    enlarges images under 64 px to at least 64 px and leaves larger ones as they are. The tiles
    keep their place whatever the names (tile (r, c) starts at pad + r*(S+pad), pad + c*(S+pad), S =
    zoom*H) and hold the images unchanged but for the repetition."""
    n = images.shape[0]
    rows = len(row_names)
    cols = n // rows
    if cols * rows != n or cols == 0:
        raise ValueError(f"save_grid: {n} images do not fill {rows} rows")
    zoom = zoom or max(1, 64 // images.shape[1])
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)   # [n, zoom*H, zoom*W, 3]
    h, w = images.shape[1:3]
    # PIL's built-in font (no font file needed): about 60 % of a row, readable from 10 px up.
    font = ImageFont.load_default(size=min(max(round(0.6 * h), 10), 24))
    label_width = max(font.getbbox(str(name))[2] for name in row_names) + 2 * pad
    tiles_width = cols * (w + pad) + pad
    grid = np.zeros((rows * (h + pad) + pad, tiles_width + label_width, 3), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    for r, name in enumerate(row_names):   # left-aligned, vertically centred on the row
        draw.text((tiles_width, pad + r * (h + pad) + h / 2), str(name), fill=(255, 255, 255), font=font, anchor="lm")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------
# Latents


def load_vae(name, device):
    """A diffusers AutoencoderKL from a local folder or a hub id, in fp32 and eval mode on `device`.
    A hub id is looked up in the local Hugging Face cache first (no network needed once fetched), and
    only downloaded when HF_HUB_OFFLINE is not set. Failures are a StoreError saying what to do."""
    # diffusers is imported only for latents: pixel work should not pay its import time.
    from diffusers import AutoencoderKL

    how = (f"download it where there is network (e.g. `huggingface-cli download {name} --local-dir "
           f"{os.path.basename(name.rstrip('/'))}`) and pass --vae <that folder>")
    looks_like_path = os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1
    try:
        if os.path.isdir(os.path.expanduser(name)):
            vae = AutoencoderKL.from_pretrained(os.path.expanduser(name))
        elif looks_like_path or os.path.exists(name):
            raise StoreError(f"VAE folder not found: {name} (a local diffusers AutoencoderKL folder with "
                             f"config.json and weights, or a Hugging Face hub id)")
        else:
            try:  # the local Hugging Face cache first: no network needed when the VAE was fetched before
                vae = AutoencoderKL.from_pretrained(name, local_files_only=True)
            except Exception:
                if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                    raise
                vae = AutoencoderKL.from_pretrained(name)
    except StoreError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"cannot load VAE {name!r} ({reason[:200]}): {how}") from None
    # fp32 on purpose: bf16 changes the stored latents; encoding is a one-off cost, decoding a small share.
    return vae.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def encode_posterior(vae, images, flip, device):
    """uint8 [b, S, S, 3] -> posterior mean and std in VAE units, float32 numpy [b, C, h, w]
    (or [b, 2, C, h, w] with flip: originals, then their mirror images)."""
    x = uint8_to_model(torch.from_numpy(images).to(device))  # copy uint8 (4x fewer bytes), convert there
    if flip:
        x = torch.cat([x, x.flip(3)])  # one batch of 2b: originals then their mirror images
    posterior = vae.encode(x).latent_dist
    mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    if flip:
        b = images.shape[0]
        mean = torch.stack([mean[:b], mean[b:]], dim=1)  # [b, 2, C, h, w]
        std = torch.stack([std[:b], std[b:]], dim=1)
    return mean.numpy(), std.numpy()


@torch.no_grad()
def model_to_images(x, vae=None, scale_factor=None):
    """Model-space samples [B, C, h, w] -> uint8 numpy [B, H, W, 3], through the VAE for latent models."""
    if vae is not None:
        x = vae.decode(x / scale_factor).sample  # fp32: the decoder is a small share of the time
    return model_to_uint8(x).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# Reading


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def combined_checksum(shards):
    """Checksum of a whole store: sha256 over 'name sha256' lines of every shard file in order
    (a SHA256SUMS file, hashed), so it is computed from per-file hashes without re-reading data."""
    h = hashlib.sha256()
    for shard in shards:
        for kind in sorted(shard["files"]):
            h.update(f"{shard['files'][kind]} {shard['sha256'][kind]}\n".encode())
    return h.hexdigest()


class Store:
    def __init__(self, path, manifest):
        self.path = path
        self.manifest = manifest
        self.mode = manifest["mode"]
        self.flip = manifest["flip"]
        self.num_classes = manifest["num_classes"]
        self.class_names = manifest["class_names"]
        self.scale_factor = manifest["scale_factor"]
        self.kinds = ("images",) if self.mode == "pixels" else ("mean", "std")
        # Memory-map every shard: opening costs a header read per file, reading touches only the rows asked for.
        self.arrays = {k: [] for k in self.kinds}
        labels = []
        for shard in manifest["shards"]:
            for kind in self.kinds + ("labels",):
                file = os.path.join(path, shard["files"][kind])
                try:
                    arr = np.load(file, mmap_mode="r")
                except (OSError, ValueError, EOFError) as e:
                    raise StoreError(f"store {path} is damaged: cannot read {file} ({e})") from None
                if arr.shape[0] != shard["count"]:
                    raise StoreError(f"store {path} is damaged: {file} has {arr.shape[0]} rows, "
                                     f"manifest says {shard['count']}")
                (labels if kind == "labels" else self.arrays[kind]).append(arr)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        # starts[i] = global index of the first row of shard i; used to route indices to shards.
        counts = [s["count"] for s in manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.starts[-1] != manifest["count"]:
            raise StoreError(f"store {path} is damaged: shards hold {self.starts[-1]} items, "
                             f"manifest says {manifest['count']}")

    def __len__(self):
        return int(self.starts[-1])

    def read(self, indices, flips=None):
        """Rows `indices` (any order, repeats allowed). Returns (data, labels):
        pixels -> uint8 [B, H, W, 3]; latents -> (mean, std) float32 [B, C, h, w] each.
        flips (bool [B]) picks the stored flipped copy; a store extracted without --flip has none."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"store index out of range [0, {len(self)})")
        if flips is not None:
            flips = np.asarray(flips, dtype=bool).reshape(-1)
            if not self.flip and flips.any():
                raise StoreError(f"store {self.path} was extracted without --flip; it has no flipped copies")
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out = {}
        for kind in self.kinds:
            first = self.arrays[kind][0]
            item_shape = first.shape[2:] if self.flip else first.shape[1:]
            dtype = np.uint8 if kind == "images" else np.float32
            out[kind] = np.empty((len(indices),) + item_shape, dtype)
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            local = indices[rows] - self.starts[s]
            for kind in self.kinds:
                arr = self.arrays[kind][s]
                if self.flip:
                    orient = flips[rows].astype(np.int64) if flips is not None else np.zeros(len(rows), np.int64)
                    out[kind][rows] = arr[local, orient]
                else:
                    out[kind][rows] = arr[local]
        labels = self.labels[indices]
        if self.mode == "pixels":
            return out["images"], labels
        return (out["mean"], out["std"]), labels

    def read_model(self, indices, flips=None, posterior_noise=None):
        """Rows `indices` in model space -> (x0 float32 [B, C, H, W], labels int64 tensor [B]).

        flips (bool [B]) picks the stored flipped copy where the store has one; pixels without stored
        copies are flipped here (exactly), latents cannot be flipped after encoding and stay as they are.
        Latents are drawn as mean + std * posterior_noise [B, C, h, w] (None: the posterior mean)."""
        flips = None if flips is None else np.asarray(flips, dtype=bool).reshape(-1)
        data, labels = self.read(indices, flips if self.flip else None)
        if self.mode == "latents":
            mean, std = (torch.from_numpy(a) for a in data)
            x0 = (mean if posterior_noise is None else mean + std * posterior_noise) * self.scale_factor
        else:
            x0 = uint8_to_model(data)
            if flips is not None and not self.flip:
                x0 = torch.where(torch.from_numpy(flips)[:, None, None, None], x0.flip(-1), x0)
        return x0, torch.from_numpy(labels.astype(np.int64, copy=False))

    def verify(self):
        """Re-hash every shard file and compare with the manifest (slow: reads the whole store)."""
        for shard in self.manifest["shards"]:
            for kind, name in shard["files"].items():
                if sha256_file(os.path.join(self.path, name)) != shard["sha256"][kind]:
                    raise StoreError(f"store {self.path} is damaged: checksum mismatch in {name}")
        if combined_checksum(self.manifest["shards"]) != self.manifest["checksum"]:
            raise StoreError(f"store {self.path} is damaged: manifest checksum mismatch")


def held_out_batch(store, num_images, seed):
    """A fixed random subset of `num_images` items (the same for a seed, whatever the caller) in model
    space -> (x0 [N, C, h, w], labels [N]); latents give their posterior mean. What the diagnostics in
    experiments/ score every model on."""
    if num_images > len(store):
        raise StoreError(f"a held-out batch of {num_images} exceeds the {len(store)} images of {store.path}")
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(store), generator=g)[:num_images].sort().values.numpy()
    return store.read_model(indices)


def open_store(path, mode=None, image_size=None):
    """Open a complete store. mode ("pixels"/"latents") and image_size, when given, must match:
    a store of another kind is an error with a one-line message, never silent garbage."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise StoreError(f"store not found: {path} (create it with extract_latents.py --out {path})")
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest_path):
        raise StoreError(f"store {path} is incomplete (no manifest.json): re-run the same "
                         f"extract_latents.py command to resume it")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {manifest_path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path} is not a {FORMAT} directory (manifest format {manifest.get('format')!r})"
                         if isinstance(manifest, dict) else f"{manifest_path} is not a store manifest")
    if manifest.get("version") != VERSION:
        raise StoreError(f"store {path} has format version {manifest.get('version')}, this code reads "
                         f"version {VERSION}: re-extract it with this extract_latents.py")
    if mode is not None and manifest["mode"] != mode:
        raise StoreError(f"store {path} holds {manifest['mode']}, but {mode} were asked for "
                         f"(extract with {'--vae none' if mode == 'pixels' else '--vae <vae>'})")
    if image_size is not None and manifest["image_size"] != image_size:
        raise StoreError(f"store {path} was extracted at image size {manifest['image_size']}, "
                         f"but {image_size} was asked for")
    return Store(path, manifest)


# ----------------------------------------------------------------------------------------------------
# Writing: one shard at a time (extract_latents.py resumes shard by shard), the manifest last.


def shard_stem(start, end):
    return f"{start:08d}-{end:08d}"


def safe_write(path, write):
    """atomic_write, with a failure (a full disk above all) as a StoreError that says what survives."""
    try:
        atomic_write(path, write)
    except DiskFullError as e:
        raise StoreError(f"{e}: free space and re-run the same command (finished shards are kept and "
                         f"skipped)") from None
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None


def write_shard(out, start, end, arrays, extraction, skipped, scale_factor):
    """Write the arrays of items [start, end) ({"images"} or {"mean", "std"}, plus "labels"), then the
    shard's record. `extraction` is every setting the contents depend on (see shard_finished)."""
    stem = shard_stem(start, end)
    files, hashes = {}, {}
    for kind, arr in arrays.items():
        files[kind] = f"{stem}.{kind}.npy"
        path = os.path.join(out, files[kind])
        safe_write(path, lambda f, a=arr: np.save(f, a))
        hashes[kind] = sha256_file(path)
    meta = {"config": extraction, "start": start, "end": end, "count": int(arrays["labels"].shape[0]),
            "files": files, "sha256": hashes, "skipped": skipped, "scale_factor": scale_factor}
    # The record goes last: until it exists the shard counts as unfinished and is redone on resume.
    safe_write(os.path.join(out, stem + ".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def shard_finished(out, start, end, extraction):
    """The record of shard [start, end) if it is finished: its record (written last) exists and every
    array it lists loads with the recorded row count; else None. A shard made with other settings is a
    StoreError. Temp files (*.tmp.<pid>) are never looked at."""
    meta_path = os.path.join(out, shard_stem(start, end) + ".json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["config"] != extraction:
        changed = sorted(k for k in extraction if meta["config"].get(k) != extraction[k])
        raise StoreError(f"{out} holds shards of a different extraction (changed: {', '.join(changed)}): "
                         f"use another --out or delete it")
    for name in meta["files"].values():
        try:
            arr = np.load(os.path.join(out, name), mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return None
        if arr.shape[0] != meta["count"]:
            return None
    return meta


def write_manifest(out, metas, extraction, *, class_names, skipped, source, tool):
    """Complete the store: manifest.json over the shard records `metas` in index order. `extraction`
    holds at least mode, image_size, flip and vae. Returns the manifest."""
    latents = extraction["mode"] == "latents"
    first = np.load(os.path.join(out, metas[0]["files"]["mean" if latents else "images"]), mmap_mode="r")
    item = list(first.shape[2:] if extraction["flip"] else first.shape[1:])
    shape = item if latents else [item[2], item[0], item[1]]  # the model's [C, H, W]
    shards = [{k: m[k] for k in ("start", "end", "count", "files", "sha256")} for m in metas]
    manifest = {
        "format": FORMAT, "version": VERSION, "mode": extraction["mode"],
        "count": sum(m["count"] for m in metas), "image_size": extraction["image_size"], "shape": shape,
        "dtype": str(first.dtype), "flip": extraction["flip"],
        "num_classes": len(class_names), "class_names": list(class_names),
        "vae": extraction["vae"], "scale_factor": metas[0]["scale_factor"],
        "skipped": list(skipped) + [s for m in metas for s in m["skipped"]],
        "checksum": combined_checksum(shards), "tool_version": tool,
        "source": source, "extraction": extraction, "shards": shards,
    }
    safe_write(os.path.join(out, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def write_store(out, arrays, labels, *, class_names, image_size, flip=False, vae=None, scale_factor=None,
                shard_size=4096):
    """A whole store from arrays in memory ({"images": uint8 [N, (2,) H, W, 3]} or {"mean", "std":
    float32 [N, (2,) C, h, w]}, labels int64 [N]), through the writers extract_latents.py uses."""
    extraction = {"mode": "pixels" if "images" in arrays else "latents", "image_size": image_size,
                  "flip": flip, "vae": vae}
    os.makedirs(out, exist_ok=True)
    metas = []
    for start in range(0, len(labels), shard_size):
        end = min(start + shard_size, len(labels))
        shard = {k: a[start:end] for k, a in arrays.items()} | {"labels": labels[start:end]}
        metas.append(write_shard(out, start, end, shard, extraction, [], scale_factor))
    write_manifest(out, metas, extraction, class_names=class_names, skipped=[], source="arrays",
                   tool="store.write_store")
    return open_store(out)

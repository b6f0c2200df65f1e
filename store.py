"""The on-disk dataset store written by extract_latents.py and read by train.py and evaluate.py,
and the one definition of the pixel mapping uint8 <-> model space.

A store is a directory:
  manifest.json                      written last (atomically): its presence marks a complete store
  <start>-<end>.json                 per-shard record (count, skipped files, sha256 of each file)
  <start>-<end>.images.npy           pixels:  uint8   [n, H, W, 3]   or [n, 2, H, W, 3] with flip
  <start>-<end>.mean.npy / .std.npy  latents: float32 [n, C, h, w]   or [n, 2, C, h, w] with flip
  <start>-<end>.labels.npy           int64 [n]
<start>-<end> is the range of the shard in the sorted list of source files, so shard names and
contents do not depend on how many processes wrote them. With flip, axis 1 is the orientation
(0 = original, 1 = horizontally flipped). Latents are the VAE posterior in VAE units (unscaled):
the model input is (mean + std * noise) * manifest["scale_factor"].
"""
import hashlib
import json
import os

import numpy as np
import torch

FORMAT = "minsnr-store"
VERSION = 1
# Latent scale of the SD VAEs (sd-vae-ft-ema/-mse) that DiT and the paper trained with; used when a
# VAE's config does not say, and for official DiT checkpoints, which record nothing.
SD_VAE_SCALE_FACTOR = 0.18215


class StoreError(ValueError):
    """A store that cannot be used as asked; the message is one line meant for the user."""


def uint8_to_model(images):
    """uint8 [B, H, W, 3] (numpy or torch) -> float32 [B, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def model_to_uint8(x):
    """float [B, 3, H, W] in ~[-1, 1] -> uint8 [B, H, W, 3]. The only place model outputs are
    quantized, so samples are rounded exactly once before FID or saving."""
    x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


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

    def verify(self):
        """Re-hash every shard file and compare with the manifest (slow: reads the whole store)."""
        for shard in self.manifest["shards"]:
            for kind, name in shard["files"].items():
                if sha256_file(os.path.join(self.path, name)) != shard["sha256"][kind]:
                    raise StoreError(f"store {self.path} is damaged: checksum mismatch in {name}")
        if combined_checksum(self.manifest["shards"]) != self.manifest["checksum"]:
            raise StoreError(f"store {self.path} is damaged: manifest checksum mismatch")


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

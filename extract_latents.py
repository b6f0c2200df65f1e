"""Turn a dataset into a memory-mapped store (see store.py) once, so training never decodes a JPEG
or runs a VAE in its loop.

Inputs (--data):
  builtin                      procedural 10-class shapes dataset, offline, deterministic by --seed
  DIR                          ImageNet layout: DIR/<class>/**/<image>
  FILE.zip / .tar / .tar.gz    the same layout inside an archive, read without unpacking
  --split SUB                  use SUB/<class>/... inside DIR or the archive (e.g. --split train)
Class index = position of the class folder name in sorted order; the names go into the manifest.
Files in class folders whose extension is not an image's (README.txt, LICENSE) are skipped and listed
in the manifest. Images are turned upright by their EXIF orientation tag, as a viewer shows them;
ADM's and DiT's loaders ignore EXIF, so pass --no-exif-transpose to reproduce their inputs exactly.

Modes: --vae none stores uint8 pixels; --vae <hub id or local folder> stores the posterior mean and
std of a diffusers AutoencoderKL (fp32 encode) plus its scale factor.

Run under torchrun for several processes: shards are fixed ranges of the sorted file list
(--shard-size), each rank writes a contiguous block of them, rank 0 writes manifest.json last.
The output does not depend on the number of processes, and a re-run resumes: shards already
written are checked and skipped.

  python extract_latents.py --data builtin --num-images 20000 --image-size 32 --vae none --out data/builtin32
  python extract_latents.py --data data/cifar10-jpeg.tar.gz --split train --image-size 32 \\
      --vae none --out data/cifar10
  torchrun --nproc-per-node=8 extract_latents.py --data /data/imagenet/train --image-size 256 \\
      --vae stabilityai/sd-vae-ft-ema --flip --out data/in256-latents
"""
import argparse
import bz2
import ctypes
import functools
import gzip
import hashlib
import lzma
import math
import os
import signal
import sys
import tarfile
import time
import zipfile

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from config import HelpFormatter
from distributed import barrier, cleanup_distributed, init_distributed, remove_dead_temps
from store import (IMAGE_EXTENSIONS, SD_VAE_SCALE_FACTOR, StoreError, encode_posterior, load_vae, open_rgb,
                   open_store, shard_finished, write_manifest, write_shard)

TOOL_VERSION = "extract_latents 1.1"
NOT_AN_IMAGE = "not an image file"  # the manifest's reason for skipped non-image files


#################################################################################
#                               Preprocessing                                   #
#################################################################################

def center_crop_arr(img, image_size):
    """ADM / DiT preprocessing: halve with a box filter while the short side is at least twice the
    target (cheap and alias-free), bicubic-resize so the short side equals the target, then take
    the centre square. Returns uint8 [S, S, 3]."""
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def decode_image(data, name, image_size, exif_transpose):
    """Image file bytes -> uint8 [S, S, 3] (store.open_rgb, then center_crop_arr); StoreError if unreadable."""
    return center_crop_arr(open_rgb(data, name, exif_transpose=exif_transpose), image_size)


#################################################################################
#                        Built-in procedural dataset                            #
#################################################################################

# (name, base colour). Sorted by name, so the class index follows the same rule as folders.
BUILTIN_CLASSES = [
    ("blue-square", (40, 80, 220)),
    ("cyan-diamond", (40, 210, 220)),
    ("gray-checker", (200, 200, 200)),
    ("green-triangle", (40, 180, 60)),
    ("orange-cross", (245, 140, 30)),
    ("pink-hexagon", (245, 130, 190)),
    ("purple-ring", (140, 60, 200)),
    ("red-circle", (220, 40, 40)),
    ("white-stripes", (240, 240, 240)),
    ("yellow-star", (240, 220, 40)),
]


def _polygon(cx, cy, radius, angle, points):
    """Unit-shape points (x, y) scaled by radius, rotated by angle, moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in points]


def _regular(n, phase=0.0):
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def builtin_image(index, seed, image_size):
    """Image `index` of the built-in dataset: uint8 [S, S, 3] and its label (index % 10, so every
    prefix of the dataset is class-balanced). Each image has its own RNG (seed, index), so any
    process can render any index and the result is the same."""
    label = index % len(BUILTIN_CLASSES)
    name, base = BUILTIN_CLASSES[label]
    rng = np.random.default_rng([seed, index])
    ss = 4  # render at 4x and box-downsample: smooth edges at any size
    n = image_size * ss
    # Background: a muted random colour with a linear gradient in a random direction.
    grey = rng.uniform(50, 200)
    bg = grey + rng.uniform(-25, 25, size=3)
    direction = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:n, 0:n] / n - 0.5
    ramp = (xx * math.cos(direction) + yy * math.sin(direction)) * rng.uniform(0, 60)
    canvas = np.clip(bg[None, None, :] + ramp[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    # Shape: random position, size, rotation; colour = class colour with brightness and per-channel jitter.
    cx, cy = rng.uniform(0.32, 0.68, size=2) * n
    r = rng.uniform(0.18, 0.30) * n
    angle = rng.uniform(0, 2 * math.pi)
    colour = np.clip(np.array(base) * rng.uniform(0.8, 1.15) + rng.normal(0, 12, size=3), 0, 255)
    fill = tuple(int(v) for v in colour)
    dark = tuple(int(v * 0.25) for v in colour)
    if name == "blue-square":
        draw.polygon(_polygon(cx, cy, r, angle, _regular(4, math.pi / 4)), fill=fill)
    elif name == "cyan-diamond":
        draw.polygon(_polygon(cx, cy, r, angle, [(1, 0), (0, 0.55), (-1, 0), (0, -0.55)]), fill=fill)
    elif name == "gray-checker":
        # A rotated square of 4x4 cells alternating the class colour and a dark tone.
        for i in range(4):
            for j in range(4):
                x0, y0 = -0.75 + 0.5 * i - 0.25, -0.75 + 0.5 * j - 0.25
                cell = [(x0, y0), (x0 + 0.5, y0), (x0 + 0.5, y0 + 0.5), (x0, y0 + 0.5)]
                draw.polygon(_polygon(cx, cy, r, angle, cell), fill=fill if (i + j) % 2 == 0 else dark)
    elif name == "green-triangle":
        draw.polygon(_polygon(cx, cy, r * 1.1, angle, _regular(3)), fill=fill)
    elif name == "orange-cross":
        w = 0.32
        for bar in ([(-1, -w), (1, -w), (1, w), (-1, w)], [(-w, -1), (w, -1), (w, 1), (-w, 1)]):
            draw.polygon(_polygon(cx, cy, r, angle, bar), fill=fill)
    elif name == "pink-hexagon":
        draw.polygon(_polygon(cx, cy, r, angle, _regular(6)), fill=fill)
    elif name == "purple-ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(r * 0.4)))
    elif name == "red-circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "white-stripes":
        # A rotated square of five stripes alternating the class colour and a dark tone.
        for k in range(5):
            y0 = -1 + 0.4 * k
            stripe = [(-1, y0), (1, y0), (1, y0 + 0.4), (-1, y0 + 0.4)]
            draw.polygon(_polygon(cx, cy, r, angle, stripe), fill=fill if k % 2 == 0 else dark)
    elif name == "yellow-star":
        outer, inner = _regular(5, -math.pi / 2), _regular(5, -math.pi / 2 + math.pi / 5)
        star = [p for pair in zip(outer, inner) for p in (pair[0], (0.45 * pair[1][0], 0.45 * pair[1][1]))]
        draw.polygon(_polygon(cx, cy, r * 1.15, angle, star), fill=fill)
    img = img.resize((image_size, image_size), resample=Image.BOX)
    return np.asarray(img), label


#################################################################################
#                                  Sources                                      #
#################################################################################

def _open_maybe_compressed(path):
    """A seekable binary stream over the uncompressed bytes of a (possibly gz/bz2/xz) tar file.
    Forward seeks on a compressed stream decompress and discard, backward ones restart."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


class FileSource:
    """Image files in class folders, in a directory or an archive. `items` is the sorted list of
    (class index, name); `read(i)` returns the bytes of item i in any process (handles are opened
    lazily per process, since DataLoader workers must not share a file offset with the parent)."""

    def __init__(self, data, split, limit_per_class, skip_bad, exif_transpose):
        self.data, self.kind, self.exif_transpose = data, self._kind(data), exif_transpose
        prefix = split.strip("/") + "/" if split else ""
        if self.kind == "folder":
            files, dirs, self.locations = self._list_folder(data, prefix)
        elif self.kind == "zip":
            files, dirs, self.locations = self._list_zip(data, prefix)
        else:
            files, dirs, self.locations = self._list_tar(data, prefix)
        where = f"{data}" + (f" (split {split})" if split else "")
        if not dirs:
            raise SystemExit(f"empty dataset: no class folders under {where}")
        self.class_names = sorted(dirs)
        class_index = {c: i for i, c in enumerate(self.class_names)}
        self.skipped = []
        per_class = {c: [] for c in self.class_names}
        for name in sorted(files):
            cls = name[len(prefix):].split("/", 1)[0]
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:  # README.txt, LICENSE: not data
                self.skipped.append({"file": name, "reason": NOT_AN_IMAGE})
                continue
            per_class[cls].append(name)
        for cls, names in per_class.items():
            if not names:
                if not skip_bad:
                    raise SystemExit(f"empty class folder: {self.describe(prefix + cls)} has no images "
                                     f"(remove it or pass --skip-bad to keep it as a class without images)")
                self.skipped.append({"file": prefix + cls, "reason": "empty class folder"})
        self.items = [(class_index[c], n) for c in self.class_names for n in per_class[c][:limit_per_class]]
        if not self.items:
            raise SystemExit(f"empty dataset: no images under {where}")
        self._handle, self._pid = None, None

    @staticmethod
    def _kind(data):
        if os.path.isdir(data):
            return "folder"
        if not os.path.exists(data):
            raise SystemExit(f"data not found: {data} (give a folder, a .zip/.tar/.tar.gz archive, or 'builtin')")
        if zipfile.is_zipfile(data):
            return "zip"
        try:
            if tarfile.is_tarfile(data):
                return "tar"
        except (OSError, EOFError, tarfile.TarError):
            pass
        raise SystemExit(f"cannot read {data}: not a folder, zip or tar archive")

    @staticmethod
    def _keep(rel):
        # Skip hidden files and macOS resource forks; they are not part of any dataset.
        return not any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))

    @classmethod
    def _classify(cls, names_and_dirs, prefix):
        """Split archive/folder paths under prefix into image candidates (inside a class folder)
        and class folders. Files directly under the root belong to no class and are ignored."""
        files, dirs = [], set()
        for name, is_dir in names_and_dirs:
            if not name.startswith(prefix) or not cls._keep(name[len(prefix):]):
                continue
            parts = name[len(prefix):].strip("/").split("/")
            if parts == [""]:
                continue
            if is_dir or len(parts) > 1:
                dirs.add(parts[0])
            if not is_dir and len(parts) > 1:
                files.append(name)
        return files, dirs

    @classmethod
    def _list_folder(cls, root, prefix):
        base = os.path.join(root, prefix)
        if not os.path.isdir(base):
            raise SystemExit(f"data not found: {base}")
        entries = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            rel = "" if rel == "." else rel + "/"
            entries += [(rel + d, True) for d in dirnames]
            entries += [(rel + f, False) for f in filenames]
        files, dirs = cls._classify(entries, prefix)
        return files, dirs, None

    @classmethod
    def _list_zip(cls, path, prefix):
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
        files, dirs = cls._classify([(i.filename, i.is_dir()) for i in infos], prefix)
        return files, dirs, None

    @classmethod
    def _list_tar(cls, path, prefix):
        # One pass over the archive records where each member's bytes start; reads then seek there.
        locations, entries = {}, []
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    name = m.name[2:] if m.name.startswith("./") else m.name
                    entries.append((name, m.isdir()))
                    if m.isfile():
                        locations[name] = (m.offset_data, m.size)
        except (OSError, EOFError, tarfile.TarError) as e:
            raise SystemExit(f"cannot read archive {path}: {e}") from None
        files, dirs = cls._classify(entries, prefix)
        return files, dirs, locations

    def describe(self, name):
        return os.path.join(self.data, name) if self.kind == "folder" else f"{self.data}:{name}"

    def __len__(self):
        return len(self.items)

    def read(self, i):
        name = self.items[i][1]
        if self.kind == "folder":
            with open(os.path.join(self.data, name), "rb") as f:
                return f.read()
        if self._pid != os.getpid():
            self._handle = zipfile.ZipFile(self.data) if self.kind == "zip" else _open_maybe_compressed(self.data)
            self._pid = os.getpid()
        if self.kind == "zip":
            return self._handle.read(name)
        offset, size = self.locations[name]
        self._handle.seek(offset)
        data = self._handle.read(size)
        if len(data) != size:
            raise StoreError(f"{self.describe(name)}: archive ends inside this member")
        return data

    def load(self, i, image_size):
        name = self.describe(self.items[i][1])
        try:
            data = self.read(i)
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise StoreError(f"{name}: cannot read ({e})") from None
        return decode_image(data, name, image_size, self.exif_transpose), self.items[i][0]

    def listing_sha256(self):
        return hashlib.sha256("".join(f"{c} {n}\n" for c, n in self.items).encode()).hexdigest()


class BuiltinSource:
    def __init__(self, num_images, seed):
        self.num_images, self.seed = num_images, seed
        self.class_names = [name for name, _ in BUILTIN_CLASSES]
        self.items = [(i % len(BUILTIN_CLASSES), f"builtin/{i}") for i in range(num_images)]
        self.skipped = []
        if num_images <= 0:
            raise SystemExit("empty dataset: --num-images must be positive for --data builtin")

    def __len__(self):
        return self.num_images

    def describe(self, name):
        return name

    def load(self, i, image_size):
        return builtin_image(i, self.seed, image_size)

    def listing_sha256(self):
        return hashlib.sha256(f"builtin {self.num_images} {self.seed}".encode()).hexdigest()


class ItemDataset(Dataset):
    """Decodes one item in a DataLoader worker. Errors are returned, not raised, so the main
    process decides between stopping with the file's name and skipping it (--skip-bad)."""

    def __init__(self, source, image_size):
        self.source, self.image_size = source, image_size

    def __getitem__(self, i):
        try:
            image, label = self.source.load(i, self.image_size)
            return i, image, label, None
        except StoreError as e:
            return i, None, -1, str(e)


def die_with_parent(parent_pid, worker_id):
    """DataLoader worker_init_fn: on Linux, have the kernel SIGKILL this worker when its parent dies, so
    a killed extraction (kill -9, the OOM killer) leaves no orphaned workers behind; elsewhere a no-op.
    The signal follows the thread that forked the worker: DataLoader forks from the main thread."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl, so no signal will come
        os._exit(1)


def collate(items):
    """-> global indices of good items, uint8 [b, S, S, 3], int64 [b], [(index, error)]."""
    good = [(i, img, lab) for i, img, lab, err in items if err is None]
    bad = [(i, err) for i, _, _, err in items if err is not None]
    images = np.stack([img for _, img, _ in good]) if good else None
    labels = np.array([lab for _, _, lab in good], dtype=np.int64)
    return [i for i, _, _ in good], images, labels, bad


#################################################################################
#                                    Main                                       #
#################################################################################

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--data", default="builtin", help="'builtin', an image folder, or a .zip/.tar/.tar.gz archive")
    parser.add_argument("--split", default="", help="sub-folder inside --data holding the class folders (e.g. train)")
    parser.add_argument("--out", required=True, help="output store directory")
    parser.add_argument("--image-size", type=int, default=256, help="square side in pixels (center crop)")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="'none' for pixels, else a hub id or a local folder")
    parser.add_argument("--flip", action="store_true", help="also store the horizontally flipped copy of every image")
    parser.add_argument("--num-images", type=int, default=10000, help="size of the builtin dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the builtin dataset")
    parser.add_argument("--limit-per-class", type=int, default=None, help="keep the first N files of each class")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images and empty class folders, recording them in the manifest "
                             "(files that are not images are always skipped)")
    parser.add_argument("--no-exif-transpose", action="store_true",
                        help="keep each image's raw pixel grid, ignoring its EXIF orientation tag, as ADM's and "
                             "DiT's loaders do (use it to reproduce their numbers)")
    parser.add_argument("--shard-size", type=int, default=4096, help="items per shard (fixes the output layout)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per decode/encode batch")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="decode processes per rank")
    args = parser.parse_args(argv)
    if args.image_size <= 0 or args.shard_size <= 0 or args.batch_size <= 0:
        raise SystemExit("--image-size, --shard-size and --batch-size must be positive")
    try:
        extract(args)
    except StoreError as e:  # a bad image, a full disk, a VAE that cannot be loaded: one line
        raise SystemExit(str(e)) from None
    finally:
        cleanup_distributed()


def complete_store(out, extraction):
    """The store at `out` if it is complete (manifest.json written last) and made with `extraction`, else None."""
    try:
        store = open_store(out)
    except StoreError:
        return None
    return store if store.manifest["extraction"] == extraction else None


def extract(args):
    latents = args.vae.lower() != "none"
    world = init_distributed()
    if args.data == "builtin":
        source = BuiltinSource(args.num_images, args.seed)
        source_info = {"data": "builtin", "num_images": args.num_images, "seed": args.seed}
    else:
        source = FileSource(args.data, args.split, args.limit_per_class, args.skip_bad, not args.no_exif_transpose)
        source_info = {"data": args.data, "split": args.split or None, "limit_per_class": args.limit_per_class}
    n = len(source)
    # Everything the shard contents depend on; a resumed run must match it exactly.
    extraction = {"mode": "latents" if latents else "pixels", "image_size": args.image_size, "flip": args.flip,
                  "vae": args.vae if latents else None, "shard_size": args.shard_size,
                  "listing_sha256": source.listing_sha256(), "skip_bad": args.skip_bad,
                  "exif_transpose": not args.no_exif_transpose}
    os.makedirs(args.out, exist_ok=True)
    if world.is_main:
        # Temp files of killed writers, removed before any rank of this run writes (the barrier), so
        # none of them is a file a rank on another node has open.
        if removed := remove_dead_temps(args.out):
            print(f"removed {len(removed)} temp files of killed writers from {args.out}")
    barrier()

    # Shards are fixed ranges of the global index; rank r takes a contiguous block of them.
    shards = [(s, min(s + args.shard_size, n)) for s in range(0, n, args.shard_size)]
    k = len(shards)
    # Every rank checks every shard (a header read per file), so all agree without a collective.
    finished = {sh for sh in shards if shard_finished(args.out, *sh, extraction) is not None}
    if len(finished) == k and (complete := complete_store(args.out, extraction)):
        if world.is_main:
            print(f"{args.out} exists: all {complete.manifest['count']} items ({complete.mode}, "
                  f"{complete.manifest['shape']}) are extracted with these settings, skipped")
        return
    mine = shards[world.rank * k // world.world_size:(world.rank + 1) * k // world.world_size]
    todo = [sh for sh in mine if sh not in finished]

    vae, scale_factor = None, None
    if latents and todo:
        vae = load_vae(args.vae, world.device)
        scale_factor = float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALE_FACTOR)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if args.image_size % factor:
            raise SystemExit(f"--image-size {args.image_size} is not a multiple of the VAE downsampling factor {factor}")
        item_shape = (vae.config.latent_channels, args.image_size // factor, args.image_size // factor)
    else:
        item_shape = (args.image_size, args.image_size, 3)
    item_shape = ((2,) if args.flip else ()) + item_shape

    # Batches never cross a shard boundary, so a batch (hence the VAE's numerics) does not depend on the rank count.
    batches = [list(range(b, min(b + args.batch_size, e))) for s, e in todo for b in range(s, e, args.batch_size)]
    loader = DataLoader(ItemDataset(source, args.image_size), batch_sampler=batches, collate_fn=collate,
                        num_workers=args.num_workers if batches else 0,
                        worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    it = iter(loader)
    total = sum(e - s for s, e in mine)
    bar = tqdm(total=total, initial=total - sum(e - s for s, e in todo), unit="img", smoothing=0.1,
               desc=f"extract (rank 0 of {world.world_size})", disable=not world.is_main)
    for start, end in todo:
        parts, labels, skipped = [], [], []
        for _ in range(math.ceil((end - start) / args.batch_size)):
            indices, images, batch_labels, bad = next(it)
            for i, err in bad:
                if not args.skip_bad:
                    raise SystemExit(f"bad image {err} (remove it or pass --skip-bad)")
                skipped.append({"file": source.items[i][1], "reason": err})
            if images is not None:
                if latents:
                    parts.append(encode_posterior(vae, images, args.flip, world.device))
                else:
                    parts.append(np.stack([images, images[:, :, ::-1]], axis=1) if args.flip else images)
                labels.append(batch_labels)
            bar.update(len(indices) + len(bad))
        if not parts:  # every item of this shard was skipped: an empty shard keeps the layout fixed
            parts = [(np.zeros((0,) + item_shape, np.float32),) * 2] if latents else [np.zeros((0,) + item_shape, np.uint8)]
            labels = [np.zeros(0, np.int64)]
        if latents:
            arrays = {"mean": np.concatenate([p[0] for p in parts]), "std": np.concatenate([p[1] for p in parts])}
        else:
            arrays = {"images": np.concatenate(parts)}
        arrays["labels"] = np.concatenate(labels)
        write_shard(args.out, start, end, arrays, extraction, skipped, scale_factor)
    bar.close()

    if world.is_main:
        # Wait on the file system rather than a collective barrier: after a resume ranks can have very
        # different amounts of work left, longer than a process-group timeout.
        metas, waiting_since = {}, time.time()
        while len(metas) < k:
            for sh in shards:
                if sh not in metas and (meta := shard_finished(args.out, *sh, extraction)) is not None:
                    metas[sh] = meta
            if len(metas) < k:
                if time.time() - waiting_since > 10:
                    print(f"waiting for other ranks: {len(metas)}/{k} shards done", flush=True)
                    waiting_since = time.time()
                time.sleep(1.0)
        manifest = write_manifest(args.out, [metas[sh] for sh in shards], extraction, class_names=source.class_names,
                                  skipped=source.skipped, source=source_info, tool=TOOL_VERSION)
        not_images = sum(s["reason"] == NOT_AN_IMAGE for s in manifest["skipped"])
        counts = {"non-image files": not_images,
                  "unreadable images or empty class folders": len(manifest["skipped"]) - not_images}
        skipped = " and ".join(f"{n} {what}" for what, n in counts.items() if n)
        print(f"wrote {manifest['count']} items ({manifest['mode']}, {manifest['shape']}) to {args.out}"
              + (f"; skipped {skipped} (listed in manifest.json)" if skipped else ""))


if __name__ == "__main__":
    main()

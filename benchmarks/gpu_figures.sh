#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one run on one GPU (issues 15 and 19), in priority order,
# each part under its own time limit so that one failing part never takes the others with it:
#   1. fit throughput: 60,000 MNIST parity fields x 1,000 steps (the offline 5,000 images repeated),
#      the stacked formulation against the vmap reference (timed on 8,192 fields), GFLOP/s vs peak;
#   2. the MNIST parity preset end to end on the offline subset, with an epoch-matched schedule
#      (NeF-GPT: 40,000 steps x 64 on 60,000 fields = 43 epochs; here 3,000 steps x 64 on the
#      ~4,500 training fields = 43 epochs, warmup and cosine scaled by the same 3,000 / 40,000), class
#      dropout 0.1, sampled at NeF-GPT's grid (no guidance) and at top-k 3, T 0.8 with guidance 2;
#   3. the parity GPT's train step (bf16; run before part 2: cuDNN flash attention with the heads
#      padded 20 -> 24, `model.attention=cudnn`, against the einsum path that 'auto' runs, in the same
#      run) and the parity sampler's tokens/s;
#   0. gpu_tests: the tests that only run on a GPU (cuDNN attention against the einsum path), when
#      pytest imports (PYTHONPATH may point at a copy of it);
#   4. shape_fit: NeF-GPT's and HyperDiffusion's shape fields (1,024 synthetic shapes x 200 steps), the
#      per-field fit with its backward pass written out (`stacked.fit_point_field`, what 'blocked' runs on a
#      CPU) vmapped over the whole chunk (--formulation=blocked --block_fields=1024) against the
#      reference that 'auto' runs on a GPU: whether 'auto' should pick it there too.
# Usage: benchmarks/gpu_figures.sh [OUT_DIR]          (on the GPU machine; OUT_DIR default: $OUT or /tmp/gpu_figures)
#        NFJAX_SMOKE=1 benchmarks/gpu_figures.sh DIR  (tiny sizes, any CPU: checks the script itself)
# NFJAX_PARTS (default 'gpu_tests fit train_step parity sampler shape_fit') picks parts; NFJAX_CLASS_DROPOUT (default
# 0.1) is the parity run's train.class_dropout: 0 = NeF-GPT's recipe exactly (its grid only, no guidance);
# NFJAX_ATTENTION (default auto) its model.attention (cudnn: falls back to einsum if the train_step part,
# which runs cuDNN, failed); NFJAX_PARITY_ARGS (default none) extra overrides for the parity run, e.g.
# '--config.seed=1' (word-split).
# Writes DIR/env.txt, DIR/<part>.log and DIR/evals.tar.gz (the parity run's eval/ and train logs).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_figures}}
mkdir -p "$OUT_DIR"
SMOKE=${NFJAX_SMOKE:-0}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WD=${NFJAX_GPU_WORKDIR:-/tmp/nfjax_gpu_parity}
rm -rf "$WD"

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in OUT_DIR/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "[$(date +%T)] $name: start (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "[$(date +%T)] $name: rc=$rc after $(( $(date +%s) - start ))s"
  grep -E '^\{|done|finished|headline|error|Error|passed|failed' "$OUT_DIR/$name.log" | tail -n 25
}

if [[ $SMOKE == 1 ]]; then
  FIT=(--num_fields=300 --steps=20 --chunk_size=100 --baseline_vmap_fields=100)
  PARITY=(--config.data.num_fields=64 --config.fit.steps=20 --config.fit.shared_init_steps=20
          --config.fit.shared_init_candidates=2 --config.fit.refit_below=0 --config.fit.psnr_floor=0 --config.tokenize.kmeans_restarts=2
          --config.model.num_layers=2 --config.train.batch_size=4 --config.train.steps=4
          --config.train.warmup_steps=1 --config.train.decay_steps=2 --config.train.eval_every=2
          --config.train.eval_batches=1 --config.train.checkpoint_every=2 --config.sample.num_samples=10
          --config.sample.batch_size=10 --config.evaluate.classifier.epochs=1
          --config.evaluate.classifier.max_images=500)
  TRAIN=(--steps=2 --batch_size=2 --num_layers=2 --skip_before --attention=xla --baseline_attention=einsum)
  SAMPLE=(--batches=1,4 --reps=1)
  SHAPE=(--num_fields=8 --chunk_size=8 --block_fields=8 --steps=5 --shared_init_steps=5 --points=10000 --heldout=2000)
else
  FIT=(--num_fields=60000 --steps=1000 --chunk_size=4096 --baseline_vmap_fields=8192 --baseline=none)
  PARITY=(--config.train.steps=3000 --config.train.warmup_steps=150 --config.train.decay_steps=1500
          --config.sample.batch_size=1000)
  TRAIN=(--parity --skip_before --attention=cudnn --baseline_attention=einsum)
  SAMPLE=(--batches=1,64,1024)
  SHAPE=(--num_fields=1024 --chunk_size=1024 --block_fields=1024 --steps=200 --shared_init_steps=200)
fi

{
  date -u; uname -a; nvidia-smi 2>&1 | head -15; nproc
  "$PY" -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__); print(jax.devices())"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

PARTS=" ${NFJAX_PARTS:-gpu_tests fit train_step parity sampler shape_fit} "
DROPOUT=${NFJAX_CLASS_DROPOUT:-0.1}
SETTINGS='((3, 0.8, 1.0), (3, 1.0, 1.0), (5, 0.8, 1.0), (5, 1.0, 1.0), (3, 0.8, 1.0, 2.0))'
# no dropout (0, 0.0, ...): no null class to guide with, NeF-GPT's grid alone
[[ $DROPOUT =~ ^0*\.?0*$ ]] && SETTINGS='((3, 0.8, 1.0), (3, 1.0, 1.0), (5, 0.8, 1.0), (5, 1.0, 1.0))'
want() { [[ $PARTS == *" $1 "* ]]; }

if want gpu_tests && "$PY" -c 'import pytest' 2>/dev/null; then
  part gpu_tests 150 env JAX_PLATFORMS= "$PY" -m pytest -q -o addopts= -p no:cacheprovider -rs tests/test_models.py \
    -k 'cudnn or padded or dot_product_attention_matches'
fi
want fit && part fit 170 "$PY" benchmarks/fit_throughput.py "${FIT[@]}"
# The train step first: if cuDNN flash attention fails there, a parity run asked to use it falls back
# to the einsum path rather than failing too.
ATTENTION=${NFJAX_ATTENTION:-auto}
if want train_step; then
  part train_step 90 "$PY" benchmarks/train_throughput.py "${TRAIN[@]}"
  [[ $ATTENTION == cudnn ]] && ! grep -q '^{"benchmark"' "$OUT_DIR/train_step.log" && ATTENTION=einsum
fi
if want parity; then
part parity 270 "$PY" -m nfjax.main --config=configs/mnist.py:parity --workdir="$WD" \
  --config.data.source=offline --config.train.class_dropout="$DROPOUT" "--config.sample.settings=$SETTINGS" \
  --config.model.attention="$ATTENTION" "${PARITY[@]}" ${NFJAX_PARITY_ARGS:-}
tar -czf "$OUT_DIR/evals.tar.gz" -C "$WD" --exclude='*.npy' --exclude='*.npz' --exclude=checkpoints \
  --exclude=tensorboard . 2>/dev/null
fi
want sampler && part sampler 50 "$PY" benchmarks/sample_throughput.py --models=mnist "${SAMPLE[@]}"
if want shape_fit; then
  for field in nefgpt3d hyperdiffusion; do
    part "shape_fit_$field" 100 "$PY" benchmarks/fit_throughput.py --kind=shape --field="$field" --data=synthetic \
      --formulation=blocked --baseline=none "${SHAPE[@]}"
  done
fi
echo "[$(date +%T)] all parts done"

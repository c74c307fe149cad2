#!/usr/bin/env bash
# The ViT step levers of issue 12 on one GPU, in one call of at most ~6 minutes.
#
# What it runs, most important first, until its time budget is spent (what is left is listed
# as skipped): the installed versions; whether cuDNN's fused attention takes the ViT's 197
# tokens unpadded or padded to 8/64/128, agreeing with XLA's attention (forward and gradients)
# and how fast; then bench/train_step.py (the trainer's jitted step on synthetic batches) for
# ViT-B/16 and ViT-S/16 at 224 px, global batch 256, bf16, one process per run (the peak
# device memory is per process): the baseline (einsum attention keeping float32 softmax
# residuals), each lever alone, and cuDNN with remat.
#
#   On the lent H200 (see /work/.library/device/README.md), from the repository root, with
#   ml_collections carried as a wheel in .whl/ (the machine has absl-py and PyYAML). Once, here:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
#   then, through the device tool: run(command='bash bench/gpu_check.sh', carry=['.whl'],
#   timeout_s=420):
#     bash bench/gpu_check.sh                 # log and summary in $OUT
#   Here, on the CPU, the same logic on the tiny demo model (the cuDNN runs fail and are
#   logged as failed; nothing else changes):
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh --cpu
#
# Environment: PYTHON (default python3), OUT (default /tmp/gpu_check), GPU_CHECK_BUDGET_S
# (default 340: seconds for the whole script, the install included).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/gpu_check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-340}
# No bench run starts with less time left than this, or than its model's last run took.
MIN_RUN_S=45
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/summary.md
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if [[ ${1:-} == --cpu ]]; then
  MODE=cpu
  MODELS=(demo)
  BENCH_ARGS=(--batch=16 --steps=1 --warmup=0 --dtype=bfloat16)
  ATTENTION_SHAPE=2,17,4,16
else
  MODE=gpu
  MODELS=(mocov3_vit_base mocov3_vit_small)
  BENCH_ARGS=(--batch=256 --steps=5 --warmup=2 --dtype=bfloat16)
  ATTENTION_SHAPE=256,197,12,64      # ViT-B/16's q, k, v at batch 256 (per view)
fi

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - SECONDS)); }

say "# gpu_check ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S} s"

# ml_collections (the configs) is the one package the GPU image lacks.
if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c 'import ml_collections' 2>&1 | tee -a "$LOG" || { say 'ml_collections missing'; exit 1; }
fi

{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  "$PY" - <<'EOF'
import importlib.metadata as md
packages = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'ml_collections')
print('versions:', ', '.join(f'{p} {md.version(p)}' for p in packages))
import jax
print('devices:', jax.devices())
try:
  from jax._src.lib import cuda_versions
  print('cuDNN:', cuda_versions.cudnn_get_version() if cuda_versions else 'none')
except Exception as e:  # noqa: BLE001 - a private module; only informative
  print('cuDNN version unknown:', type(e).__name__)
EOF
} 2>&1 | tee -a "$LOG"

# ---- cuDNN's fused attention at the ViT's sequence length, against XLA's.
say ''
say "## cuDNN attention, q/k/v [$ATTENTION_SHAPE] bf16: padded to a multiple of m (1: unpadded)"
export ATTENTION_SHAPE
timeout $(( $(left) > 90 ? 90 : $(left) )) "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mocojax.models import vit

shape = tuple(int(x) for x in os.environ['ATTENTION_SHAPE'].split(','))
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, cot = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)


def value_and_grads(attend):
  def f(q, k, v):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out,) + vjp(cot)
  return jax.jit(f)


def timed(f):
  jax.block_until_ready(f(q, k, v))
  t = time.perf_counter()
  for _ in range(10):
    out = f(q, k, v)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / 10 * 1e3


reference = value_and_grads(lambda q, k, v: vit.padded_attention(q, k, v, 'xla', multiple=1))
want = [np.asarray(x, np.float32) for x in reference(q, k, v)]
print(f'  xla, unpadded: {timed(reference):.2f} ms forward + backward')
for m in (1, 8, 64, 128):
  try:
    f = value_and_grads(lambda q, k, v: vit.padded_attention(q, k, v, 'cudnn', multiple=m))
    got = [np.asarray(x, np.float32) for x in f(q, k, v)]
  except Exception as e:  # noqa: BLE001 - a refusal is a result here
    print(f'  cudnn, m={m}: refused: {type(e).__name__}: {str(e).splitlines()[0][:200]}')
    continue
  errors = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want)]
  print(f'  cudnn, m={m}: {timed(f):.2f} ms forward + backward; max |diff| / max |xla| of '
        'out, dq, dk, dv: ' + ', '.join(f'{e:.1e}' for e in errors))
EOF

# ---- The step, one lever at a time.
BASE='model.attention=einsum,model.softmax_residual=float32'
declare -A LEVER=(
  [baseline]="$BASE"
  [cudnn]='model.attention=cudnn'
  [softmax]='model.attention=einsum,model.softmax_residual=compute'
  [xla]='model.attention=xla,model.softmax_residual=float32'
  [remat]="$BASE,model.remat=True"
  [cudnn+remat]='model.attention=cudnn,model.remat=True'
)
# Most important first: ViT-B/16 is the model the targets are set for.
ORDER=()
for lever in baseline cudnn softmax remat cudnn+remat; do ORDER+=("${MODELS[0]} $lever"); done
for lever in baseline cudnn; do ORDER+=("${MODELS[-1]} $lever"); done
ORDER+=("${MODELS[0]} xla")
for lever in softmax remat cudnn+remat xla; do ORDER+=("${MODELS[-1]} $lever"); done

{
  echo "# gpu_check ($MODE) summary, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "bench/train_step.py ${BENCH_ARGS[*]}"
  echo ''
  echo '| model | lever | --set | result | wall s |'
  echo '|---|---|---|---|---|'
} >>"$SUMMARY"
declare -A SEEN=() WALL=()
for run in "${ORDER[@]}"; do
  read -r model lever <<<"$run"
  [[ -n ${SEEN[$run]:-} ]] && continue     # --cpu: one model, each run once
  SEEN[$run]=1
  need=${WALL[$model]:-$MIN_RUN_S}
  if (( $(left) < (need > MIN_RUN_S ? need : MIN_RUN_S) )); then
    say "skipped (out of time): $model $lever"
    echo "| $model | $lever | ${LEVER[$lever]} | skipped: out of time | |" >>"$SUMMARY"
    continue
  fi
  say ''
  say "## $model, $lever: --set=${LEVER[$lever]} ($(left) s left)"
  t0=$SECONDS
  out=$(timeout "$(left)" "$PY" bench/train_step.py --models="$model" "${BENCH_ARGS[@]}" \
    --set="${LEVER[$lever]}" 2>&1)
  rc=$?
  echo "$out" | grep -v -E '^[IW][0-9]{4} ' | tee -a "$LOG" >/dev/null
  echo "$out" | grep -E '^  (step time|images/s|peak device|compiled memory)|^    custom-call' \
    | sed 's/^/    /'
  row=$(echo "$out" | grep -E "^\| $model " | tail -1)
  if (( rc == 0 )) && [[ -n $row ]]; then
    result=$(echo "$row" | awk -F'|' \
      '{printf "compile %s s, step %s ms, %s img/s, MFU %s, peak %s MiB", $5, $6, $7, $11, $14}')
  else
    why=$(echo "$out" | grep -E 'Error|error' | tail -1 | cut -c1-160 | tr '|' '/')
    result="failed (rc $rc): $why"
  fi
  say "  -> $result"
  (( rc == 0 )) && WALL[$model]=$((SECONDS - t0))
  echo "| $model | $lever | ${LEVER[$lever]} | $result | $((SECONDS - t0)) |" >>"$SUMMARY"
done

say ''
say "done in $SECONDS s"
tee -a "$LOG" <"$SUMMARY"

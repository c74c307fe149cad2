#!/usr/bin/env bash
# Pretrain on every GPU of one host: one process, the global batch split over all its GPUs.
#
#   launch/gpu_single_host.sh [--dry-run] [--setup] [--config FILE] [--workdir DIR]
#                             [--data-dir DIR] [--gpus LIST] [--venv DIR] [-- ARGS...]
#
#   launch/gpu_single_host.sh --setup --data-dir ~/tensorflow_datasets   # install, then train
#   launch/gpu_single_host.sh --gpus 0,1,2,3 -- --config.batch_size=1024
#
# --setup creates the virtual environment with JAX for CUDA 12 and the requirements.
# --gpus limits the run to some GPUs (CUDA_VISIBLE_DEVICES). Rerunning the same command
# resumes from the latest checkpoint in --workdir. ARGS after -- go to mocojax.main
# (config overrides). --dry-run prints the commands and runs nothing.
set -euo pipefail
# show/run (launch/lib.sh): print a command pasteably, run it unless --dry-run.
# shellcheck source=/dev/null  # lib.sh is checked on its own (tests/test_plan.py)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DRY_RUN=0
SETUP=0
CONFIG=configs/mocov3_vit_small.py
WORKDIR=runs/mocov3_vit_small
DATA_DIR=
GPUS=
VENV=.venv
EXTRA=()

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --setup) SETUP=1 ;;
    --config) CONFIG=$2; shift ;;
    --workdir) WORKDIR=$2; shift ;;
    --data-dir) DATA_DIR=$2; shift ;;
    --gpus) GPUS=$2; shift ;;
    --venv) VENV=$2; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_single_host.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."


if [[ $SETUP == 1 ]]; then
  run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install -q --upgrade pip
  run "$VENV/bin/pip" install -q -r requirements.txt "jax[cuda12]"
fi

ENV=(env)
# All of the GPU's memory for XLA's allocator; tf.data stays on the CPU (main.py hides the GPUs
# from TensorFlow).
ENV+=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)
if [[ -n $GPUS ]]; then
  ENV+=("CUDA_VISIBLE_DEVICES=$GPUS")
fi
ARGS=("--config=$CONFIG" "--workdir=$WORKDIR")
if [[ -n $DATA_DIR ]]; then
  ARGS+=("--config.data.data_dir=$DATA_DIR")
fi

run mkdir -p "$WORKDIR"
show "${ENV[@]}" "$VENV/bin/python" -m mocojax.main "${ARGS[@]}" "${EXTRA[@]}"
printf ' 2>&1 | tee -a %q\n' "$WORKDIR/train.log"
if [[ $DRY_RUN == 0 ]]; then
  # exec, with tee in a process substitution rather than a pipe: the trainer replaces this
  # shell, so a SIGTERM sent to the script reaches it (it saves the step, then exits).
  exec "${ENV[@]}" "$VENV/bin/python" -m mocojax.main "${ARGS[@]}" "${EXTRA[@]}" \
    > >(tee -a "$WORKDIR/train.log") 2>&1
fi

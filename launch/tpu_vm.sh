#!/usr/bin/env bash
# MoCo v3 on a Cloud TPU VM or pod slice: create it, copy this checkout to every worker,
# install, train on all workers at once, collect the per-host logs, delete it.
#
#   launch/tpu_vm.sh [--dry-run] [options] [STEP...]
#
# STEPs, run in the order given (default: create setup train):
#   create   a TPU VM (--spot for a spot VM; --queued to go through a queued resource)
#   setup    copy the code (git archive of HEAD, or --repo URL to clone) and pip install it
#   train    start training on every worker (--worker=all), detached; logs per host
#   logs     show the tail of every worker's log and copy all logs to WORKDIR/logs/
#   delete   delete the TPU VM (and its queued resource)
#
# Options:
#   --name NAME              TPU name (default mocov3)
#   --zone ZONE              default us-central2-b
#   --project PROJECT        default: gcloud's configured project
#   --accelerator-type TYPE  default v4-32 (4 hosts); v4-8 is one host, v5p-128 16 hosts, ...
#   --runtime-version V      default tpu-ubuntu2204-base
#   --spot / --queued        spot capacity / a queued resource (both may be combined)
#   --bucket gs://BUCKET     holds tensorflow_datasets/ (TFDS data) and the workdir (needed
#                            by train and logs)
#   --config FILE            default configs/mocov3_vit_base.py
#   --run NAME               workdir is gs://BUCKET/runs/NAME (default: the config's name)
#   --repo URL [--ref REF]   clone instead of copying this checkout
#   -- ARGS...               passed to mocojax.main on every worker (config overrides)
#
#   launch/tpu_vm.sh --bucket gs://my-bucket --accelerator-type v4-64 --spot
#   launch/tpu_vm.sh --bucket gs://my-bucket logs
#   launch/tpu_vm.sh delete
#
# Every worker runs the same command; JAX finds the other workers from the TPU metadata
# (mocojax/distributed.py) and refuses to start if their configs differ. Checkpoints go to
# the bucket, so `train` after a preemption (or on a new VM) resumes from the latest one.
set -euo pipefail
# show/run (launch/lib.sh): print a command pasteably, run it unless --dry-run.
# shellcheck source=/dev/null  # lib.sh is checked on its own (tests/test_plan.py)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DRY_RUN=0
NAME=mocov3
ZONE=us-central2-b
PROJECT=
TYPE=v4-32
RUNTIME=tpu-ubuntu2204-base
SPOT=0
QUEUED=0
BUCKET=
CONFIG=configs/mocov3_vit_base.py
RUN=
REPO=
REF=main
STEPS=()
EXTRA=()

usage() { sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME=$2; shift ;;
    --zone) ZONE=$2; shift ;;
    --project) PROJECT=$2; shift ;;
    --accelerator-type) TYPE=$2; shift ;;
    --runtime-version) RUNTIME=$2; shift ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --bucket) BUCKET=${2%/}; shift ;;
    --config) CONFIG=$2; shift ;;
    --run) RUN=$2; shift ;;
    --repo) REPO=$2; shift ;;
    --ref) REF=$2; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create|setup|train|logs|delete) STEPS+=("$1") ;;
    *) echo "tpu_vm.sh: unknown option or step $1" >&2; usage 2 ;;
  esac
  shift
done
if [[ ${#STEPS[@]} == 0 ]]; then
  STEPS=(create setup train)
fi

cd "$(dirname "$0")/.."
RUN=${RUN:-$(basename "$CONFIG" .py)}
WORKDIR=$BUCKET/runs/$RUN
GCLOUD=(gcloud compute tpus)
WHERE=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  WHERE+=("--project=$PROJECT")
fi


# Runs a shell command on every worker of the slice.
on_all_workers() {
  run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

need_bucket() {
  if [[ -z $BUCKET ]]; then
    echo "tpu_vm.sh: $1 needs --bucket gs://BUCKET (TFDS data and checkpoints live there)." >&2
    exit 2
  fi
}

create() {
  local capacity=()
  if [[ $SPOT == 1 ]]; then
    capacity=(--spot)
  fi
  if [[ $QUEUED == 1 ]]; then
    run "${GCLOUD[@]}" queued-resources create "$NAME-qr" "${WHERE[@]}" --node-id="$NAME" \
      --accelerator-type="$TYPE" --runtime-version="$RUNTIME" "${capacity[@]}"
    echo "+ # wait until queued resource $NAME-qr is ACTIVE"
    if [[ $DRY_RUN == 0 ]]; then
      until [[ $("${GCLOUD[@]}" queued-resources describe "$NAME-qr" "${WHERE[@]}" \
                 --format='value(state.state)') == ACTIVE ]]; do
        sleep 60
      done
    fi
  else
    run "${GCLOUD[@]}" tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" \
      --version="$RUNTIME" "${capacity[@]}"
  fi
}

setup() {
  if [[ -n $REPO ]]; then
    on_all_workers "rm -rf ~/mocojax && git clone --depth=1 --branch=$(printf %q "$REF") $(printf %q "$REPO") ~/mocojax"
  else
    # The committed state of this checkout, identical on every worker.
    run git archive --format=tar.gz -o /tmp/mocojax.tar.gz HEAD
    run "${GCLOUD[@]}" tpu-vm scp /tmp/mocojax.tar.gz "$NAME:~/mocojax.tar.gz" "${WHERE[@]}" --worker=all
    on_all_workers 'rm -rf ~/mocojax && mkdir ~/mocojax && tar -xzf ~/mocojax.tar.gz -C ~/mocojax'
  fi
  on_all_workers 'python3 -m venv ~/venv && ~/venv/bin/pip install -q --upgrade pip && ~/venv/bin/pip install -q -r ~/mocojax/requirements.txt "jax[tpu]"'
}

train() {
  need_bucket train
  local args
  args=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" \
         "--config.data.data_dir=$BUCKET/tensorflow_datasets" "${EXTRA[@]}")
  # Detached (nohup), so a dropped ssh connection does not stop training; one log per host.
  on_all_workers "cd ~/mocojax && nohup ~/venv/bin/python -m mocojax.main$args > ~/train.\$(hostname).log 2>&1 &"
}

logs() {
  need_bucket logs
  on_all_workers 'tail -n 3 ~/train.*.log'
  on_all_workers "gsutil -q cp ~/train.*.log $(printf %q "$WORKDIR/logs/")"
}

delete() {
  if [[ $QUEUED == 1 ]]; then
    run "${GCLOUD[@]}" queued-resources delete "$NAME-qr" "${WHERE[@]}" --force --quiet
  else
    run "${GCLOUD[@]}" tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

for step in "${STEPS[@]}"; do
  "$step"
done

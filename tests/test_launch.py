"""The launch scripts: --help, argument checks, and the exact commands of --dry-run."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_help_and_bad_arguments():
    for script in ("local.sh", "gpu_slurm.sh", "tpu_vm.sh"):
        h = _run(script, "--help")
        assert h.returncode == 0 and "usage: launch/" + script in h.stdout
        bad = _run(script, "--bogus")
        assert bad.returncode == 2 and "unknown argument: --bogus" in bad.stderr
    assert "missing --name --workdir" in _run("tpu_vm.sh", "--zone", "z").stderr
    assert "--workdir is required" in _run("gpu_slurm.sh").stderr
    assert "config file not found" in _run("local.sh", "--config", "nope.py", "--dry-run").stderr
    assert "not a number" in _run("local.sh", "--processes", "two", "--dry-run").stderr


def test_local_dry_run_starts_joined_processes():
    out = _run("local.sh", "--processes", "2", "--cpu-devices", "2", "--port", "1234", "--dry-run", "--",
               "--config.train.max_steps=3").stdout.splitlines()
    assert out[-1] == "wait" and len(out) == 3
    for i, line in enumerate(out[:2]):
        words = shlex.split(line.rstrip(" &"))
        assert f"QLORA_PROCESS_ID={i}" in words and "QLORA_NUM_PROCESSES=2" in words
        assert "QLORA_COORDINATOR=127.0.0.1:1234" in words
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in words
        assert words[-5:] == ["-m", "qlora_jax.train", "--config", "configs/sft.py", "--config.train.max_steps=3"]
    single = _run("local.sh", "--dry-run").stdout.strip()
    assert single.endswith("-m qlora_jax.train --config configs/sft.py") and "QLORA_" not in single


def test_slurm_dry_run_script():
    out = _run("gpu_slurm.sh", "--workdir", "/shared/r1", "--nodes", "4", "--gpus-per-node", "8",
               "--partition", "gpu", "--requeue", "--dry-run", "--", "--config.mesh.fsdp=32").stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue"):
        assert line in out.splitlines()
    srun = next(ln for ln in out.splitlines() if ln.startswith("srun "))
    assert srun.endswith("-m qlora_jax.train --config configs/sft.py --config.workdir=/shared/r1 "
                         "--config.mesh.fsdp=32")


def test_tpu_dry_run_commands():
    out = _run("tpu_vm.sh", "--name", "q1", "--zone", "us-central2-b", "--accelerator", "v4-32",
               "--workdir", "/mnt/b/run", "--queued", "--spot", "--dry-run", "--",
               "--config.mesh.fsdp=16").stdout.splitlines()
    cmds = [shlex.split(ln) for ln in out if not ln.startswith("#")]
    create = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"])
    assert "--accelerator-type=v4-32" in create and "--spot" in create and "--node-id=q1" in create
    assert any(c[:2] == ["git", "-C"] and "archive" in c for c in cmds)
    ssh = next(c for c in cmds if c[3:5] == ["tpu-vm", "ssh"])
    assert "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command=")).split("=", 1)[1]
    assert "python -m qlora_jax.train --config configs/sft.py --config.workdir=/mnt/b/run --config.mesh.fsdp=16" \
        in remote.replace(".venv/bin/python", "python")
    assert "pip install -q -e '.[tpu]'" in remote

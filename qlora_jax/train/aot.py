"""python -m qlora_jax.plan --config configs/sft.py --target v5e-8 [--fit] [--config.key=value ...]

Will it fit? Compiles the real training step (``train.loop.make_step_fns``, as
``python -m qlora_jax.train`` builds it) ahead of time for a target's chips, from the model's
``config.json`` alone: the model is built abstractly (shapes only, nothing loaded), placed on a
mesh of the target's devices and handed to the target's compiler. XLA's ``memory_analysis()`` then
gives what one chip will hold: arguments (NF4 base, adapters, AdamW state, batch) and temporaries.
A TPU compile that runs out of HBM fails here with the error the TPU VM would raise.

Targets: ``v5e-8``, ``v5e-1`` (one chip), ``v4-8``, ``v6e-8`` (TPU topologies: needs ``libtpu``, i.e. ``jax[tpu]`` of our
jax version; ``make .venv-tpu`` builds a venv with it), ``h100x8`` (8 NVIDIA H100 SXM 80GB: needs the
CUDA PJRT plugin, ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` of our jax version, no CUDA libraries;
``make .venv-cuda``; docs/gpu_aot.md) and ``cpu`` (this machine's devices). No accelerator is needed:
the TPU compiler and XLA:GPU (given the GPU's description, ``gpu_specs/*.txtpb``) run on any x86 Linux host.
XLA:GPU does not check memory at compile time: a GPU step that does not fit compiles, and the
verdict is the reported arguments + temporaries against the memory JAX's allocator takes.

``--fit`` searches the settings: for each remat policy from the cheapest (no recomputation) to
``full``, the largest micro-batch per chip (1, 2, 4, ...) whose step compiles within the chip's
memory; it prints the cheapest policy that fits one sequence per chip and its largest micro-batch
(gradient accumulation makes up the rest of a global batch).

``--min_hbm`` also finds the smallest per-chip memory the step compiles in (XLA:TPU uses spare
memory when it has it, so the default-size figure overstates the need): a bisection over
``--xla_tpu_max_hbm_size_mib``, one compile per process.

The compute dtype is the config's ``model.dtype``; the defaults of ``configs/sft.py`` (float32, for
the CPU demo) are replaced by bfloat16 for TPU targets unless ``--keep_dtype``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qlora_jax.errors import UserError

GIB = 2**30
REMAT_ORDER = ("none", "projections", "dots_no_batch", "full")  # cheapest first (least recomputation)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" | "cuda" | "cpu"
    topology: str  # topology name for jax.experimental.topologies (cuda: "partitions x hosts x GPUs per host")
    chips: int
    hbm_gib: float  # per chip, as sold
    available_gib: float  # per chip, what XLA lets a program use
    topology_kwargs: tuple[tuple[str, Any], ...] = ()
    gpu_spec: str = ""  # cuda: the GPU's GpuTargetConfigProto, a file in gpu_specs/

    @property
    def description(self) -> str:
        usable = f"{self.available_gib:g} GiB usable"
        if self.platform == "cuda":
            usable += f": JAX's allocator takes {GPU_MEM_FRACTION:g} of it, XLA_PYTHON_CLIENT_MEM_FRACTION"
        return f"{self.name} ({self.chips} x {self.hbm_gib:g} GiB, {usable})"


GPU_SPECS = Path(__file__).resolve().parent / "gpu_specs"


def _gpu_mem_fraction() -> float:
    """The share of a GPU's memory JAX's allocator takes: ``XLA_PYTHON_CLIENT_MEM_FRACTION``, default 0.75.

    JAX's GPU client hands its BFC allocator that fraction (of the memory free once the CUDA context
    exists), preallocated or, with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``, as the cap it grows to;
    whatever is left goes to the CUDA context, cuBLAS/cuDNN workspaces and NCCL's buffers.
    """
    try:
        value = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    except ValueError:
        return 0.75
    return value if 0 < value <= 1 else 0.75


GPU_MEM_FRACTION = _gpu_mem_fraction()
H100_BYTES = 84942979072  # device_memory_size of an H100 SXM 80GB HBM3 (gpu_specs/h100_sxm.txtpb): 79.1 GiB


TARGETS = {
    "v5e-8": Target("v5e-8", "tpu", "v5e:2x4", 8, 16, 15.75),
    # One v5e chip (a v5litepod-1 VM): the default host bounds (2x2x1) do not divide a 1x1 topology.
    "v5e-1": Target("v5e-1", "tpu", "v5e:1x1", 1, 16, 15.75, (("chips_per_host_bounds", (1, 1, 1)),)),
    "v6e-8": Target("v6e-8", "tpu", "v6e:2x4", 8, 32, 31.25),
    # A v4-8 VM has 4 chips (8 TensorCores); one JAX device per chip ("megacore").
    "v4-8": Target("v4-8", "tpu", "v4:2x2x1", 4, 32, 30.75,
                   (("chip_config_name", "megacore"), ("chips_per_host_bounds", (2, 2, 1)), ("num_slices", 1),
                    ("wrap", (False, False, False)))),
    # 8 x H100 SXM 80GB on one host (an HGX H100 / p5.48xlarge / a3-highgpu-8g), compiled by XLA:GPU.
    "h100x8": Target("h100x8", "cuda", "1x1x8", 8, 80, round(GPU_MEM_FRACTION * H100_BYTES / 2**30, 2),
                     gpu_spec="h100_sxm.txtpb"),
    "cpu": Target("cpu", "cpu", "", 0, 0, 0),
}

PIP_LINE = 'pip install "jax[tpu]=={version}"'
NVCC_WHEEL = "nvidia-cuda-nvcc-cu12==12.9.86"  # ptxas; the Makefile's .venv-cuda pins the same
# cuDNN: attention_impl "auto"/"cudnn" lowers to its fused attention only where jax finds the
# library (else the XLA path); the Makefile's .venv-cuda pins the same.
CUDNN_WHEEL = "nvidia-cudnn-cu12==9.28.0.42"
CUDA_PIP_LINE = ('pip install "jax-cuda12-plugin=={version}" "jax-cuda12-pjrt=={version}" '
                 f'"{NVCC_WHEEL}" "{CUDNN_WHEEL}"')


class PlanError(UserError):
    """A target, mesh or setting the planner cannot compile for."""


@dataclasses.dataclass
class StepMemory:
    target: str
    mesh: tuple[int, int, int]
    micro_batch: int  # global rows per micro-batch
    grad_accum: int
    seq: int
    remat: str
    dtype: str
    fits: bool
    frozen_layout: str = "default"
    arguments: int = 0  # bytes per chip
    temporaries: int = 0
    outputs: int = 0
    host_arguments: int = 0  # bytes per chip held in host memory (optim.offload), not counted above
    note: str = ""
    required: int = 0  # bytes the compiler said it needed, when it ran out of memory
    compile_s: float = 0.0
    error: str = ""

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries

    def row(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), total=self.total)


# ---------------------------------------------------------------------------------------------
# Target devices.

def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _need_libtpu(target: Target) -> None:
    if target.platform == "tpu" and not libtpu_available():
        import jax

        raise PlanError(f"compiling for {target.name} needs libtpu, which this environment lacks: run `make .venv-tpu` "
                        f"and use .venv-tpu/bin/python -m qlora_jax.plan, or {PIP_LINE.format(version=jax.__version__)}")


def cuda_plugin_available() -> bool:
    return (importlib.util.find_spec("jax_cuda12_plugin") is not None
            and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def _ptxas_available() -> bool:
    """XLA:GPU turns its PTX into H100 code with ptxas (this plugin has no built-in PTX compiler):
    from the nvidia-cuda-nvcc-cu12 wheel, PATH, a CUDA toolkit in /usr/local/cuda, or
    ``--xla_gpu_cuda_data_dir``."""
    import shutil

    spec = importlib.util.find_spec("nvidia.cuda_nvcc") if importlib.util.find_spec("nvidia") else None
    wheel = spec is not None and any((Path(p) / "bin" / "ptxas").exists() for p in spec.submodule_search_locations or ())
    return (wheel or shutil.which("ptxas") is not None or Path("/usr/local/cuda/bin/ptxas").exists()
            or "--xla_gpu_cuda_data_dir" in os.environ.get("XLA_FLAGS", ""))


def _gpu_devices(target: Target) -> list[Any]:
    """Compile-only devices of ``target``'s GPUs: the CUDA PJRT plugin's topology from a target config.

    No driver, GPU or CUDA library is needed: XLA:GPU compiles against the device description
    (``gpu_specs/``) and does not autotune. The plugin checks the installed CUDA libraries' versions
    when it loads unless JAX_PLATFORMS leaves cuda out or JAX_SKIP_CUDA_CONSTRAINTS_CHECK is set;
    the planner needs none of them, so the check is skipped.
    """
    import jax

    if not cuda_plugin_available():
        raise PlanError(f"compiling for {target.name} needs the jax CUDA plugin, which this environment lacks: "
                        f"run `make .venv-cuda` and use .venv-cuda/bin/python -m qlora_jax.plan, or "
                        f"{CUDA_PIP_LINE.format(version=jax.__version__)}")
    if not _ptxas_available():
        raise PlanError(f"compiling for {target.name} needs ptxas (CUDA's PTX assembler), which this environment "
                        f"lacks: pip install \"{NVCC_WHEEL}\" (make .venv-cuda installs it)")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # read when the plugin is first loaded
    from jax.experimental import topologies

    spec = (GPU_SPECS / target.gpu_spec).read_text()
    try:
        topo = topologies.get_topology_desc(platform="cuda", topology=target.topology, target_config=spec,
                                            **dict(target.topology_kwargs))
    except NotImplementedError as e:  # the plugin did not register: it failed to load
        raise PlanError(f"the jax CUDA plugin did not load ({e}); run with JAX_PLATFORMS=cpu "
                        f"JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1") from e
    return list(topo.devices)


def target_devices(target: Target) -> list[Any]:
    """The target's devices to compile for (TPU, GPU: a topology description, no hardware)."""
    import jax

    if target.platform == "cpu":
        return list(jax.devices("cpu"))
    if target.platform == "cuda":
        return _gpu_devices(target)
    _need_libtpu(target)
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                        **dict(target.topology_kwargs))
    return list(topo.devices)


# ---------------------------------------------------------------------------------------------
# Building and compiling the real step.

@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What one compile needs: the model, the adapters, the quantization and the batch shape."""

    hf_config: dict
    lora: Any  # LoraConfig or None
    quant: Any  # QuantConfig or None
    dtype: str
    param_dtype: str
    remat: str
    micro_batch: int
    grad_accum: int
    seq: int
    mesh: tuple[int, int, int]
    optimizer: dict
    offload: bool = False
    frozen_layout: str = ""  # "auto" | "default"; "": as the trainer picks it (loop.frozen_layout_for)
    attention_impl: str = "auto"  # ModelConfig.attention_impl
    quant_matmul_impl: str = "auto"  # ModelConfig.quant_matmul_impl


# XLA:GPU turns a large sort (the MoE block's argsort of its token-expert assignments: 32,768 at
# 8 x 2048 tokens and top-2; 4,096 stay XLA's) into a CUB radix sort and asks CUB for its scratch
# size while compiling. CUB asks the CUDA runtime for the current device, which a compile-only
# target lacks: "Error loading CUDA libraries" without libcudart, "invalid device ordinal" with it
# (xla_gpu_deviceless_cub_mode does not avoid the call in this jaxlib). XLA's own sort kernel
# compiles deviceless; the step then differs from the one a GPU runs only by CUB's scratch buffer
# (about a second copy of the sorted int32 keys and indices).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}


def _compile(lowered, devices: list[Any]):
    """``lowered.compile()``, with ``GPU_COMPILER_OPTIONS`` for compile-only GPU ``devices``."""
    if devices and devices[0].platform == "gpu":
        return lowered.compile(dict(GPU_COMPILER_OPTIONS))
    return lowered.compile()


def compile_step(spec: StepSpec, devices: list[Any]):
    """Lower and compile the trainer's step for ``devices``; returns the compiled executable."""
    step, args = step_arguments(spec, devices)
    return _compile(step.lower(*args), devices)


def step_arguments(spec: StepSpec, devices: list[Any]):
    """``(train_step, abstract arguments)``: the trainer's jit'd step for ``devices`` and
    ``ShapeDtypeStruct``s with their shardings (and memory kinds) to lower it with."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.models import CausalLM, ModelConfig
    from qlora_jax.train import loop, sharding
    from qlora_jax.train.optim import make_optimizer

    config = ModelConfig.from_hf(spec.hf_config, remat_policy=spec.remat, attention_impl=spec.attention_impl,
                                 quant_matmul_impl=spec.quant_matmul_impl)
    data, fsdp, tensor = spec.mesh
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices)
    abstract = nnx.eval_shape(lambda: CausalLM(config, lora=spec.lora, quant=spec.quant, dtype=spec.dtype,
                                               param_dtype=spec.param_dtype, rngs=nnx.Rngs(0)))
    tx, _ = make_optimizer(total_steps=1000, **spec.optimizer)
    fns, lora_state, rest, opt = loop.make_step_fns(abstract, tx, mesh, abstract=True,
                                                    offload_optimizer=spec.offload,
                                                    frozen_layout=_frozen_layout(spec, devices[0].platform))
    shape = (spec.grad_accum, spec.micro_batch, spec.seq)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=fns.batch_sharding)
             for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    return fns.train_step, (lora_state, opt, rest, batch, key)



def _frozen_layout(spec: StepSpec, platform: str) -> str:
    from qlora_jax.train.loop import frozen_layout_for  # imports jax: not at module level

    return spec.frozen_layout or frozen_layout_for(platform, spec.mesh)


_OOM = re.compile(r"(?:Ran out of memory|RESOURCE_EXHAUSTED|CompileTimeHbmOom|exceeds available HBM)", re.I)
_NEEDED = re.compile(r"required for HLO temporaries \((\d+(?:\.\d+)?)([GMK])\)")


def measure(spec: StepSpec, target: Target, devices: list[Any]) -> StepMemory:
    """Compile ``spec`` for ``target``: per-chip memory, or the out-of-memory figure."""
    out = StepMemory(target.name, spec.mesh, spec.micro_batch, spec.grad_accum, spec.seq, spec.remat,
                     spec.dtype, fits=False, frozen_layout=_frozen_layout(spec, target.platform))
    if spec.offload and target.platform == "cuda":
        # Compile-only GPU devices have no host memory space: with_memory_kind("pinned_host") gives
        # no memory kind, so the step compiles with the optimizer state on the device.
        out.note = "optim.offload not compiled: a compile-only GPU has no host memory; figures without it"
    t0 = time.perf_counter()
    step, args = step_arguments(spec, devices)
    try:
        compiled = _compile(step.lower(*args), devices)
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error type
        out.compile_s = time.perf_counter() - t0
        if not _OOM.search(str(e)):
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise PlanError(f"{target.name}: the compiler failed, not on memory: {first[:300]}") from e
        out.error = str(e).splitlines()[0][:300]
        m = _NEEDED.search(str(e))
        if m:
            out.required = int(float(m.group(1)) * {"G": GIB, "M": 2**20, "K": 2**10}[m.group(2)])
        return out
    out.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out.arguments, out.temporaries = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    out.host_arguments = mem.host_argument_size_in_bytes
    out.outputs = mem.output_size_in_bytes
    out.fits = target.available_gib == 0 or out.total <= target.available_gib * GIB
    return out


# ---------------------------------------------------------------------------------------------
# From a trainer config.

def spec_from_config(cfg, target: Target, *, keep_dtype: bool = False) -> StepSpec:
    from qlora_jax.checkpoints.load import model_config_for
    from qlora_jax.models import QuantConfig
    from qlora_jax.train.config import PREFERENCE_OBJECTIVES, lora_config_from

    hf = model_config_for(cfg.model.source)
    lora = lora_config_from(cfg) if cfg.lora.r > 0 else None
    quant = None
    if cfg.model.quantize not in ("none", ""):
        quant = QuantConfig(quant_type=cfg.model.quantize, blocksize=cfg.model.blocksize,
                            double_quant=cfg.model.double_quant)
    dtype, param_dtype = cfg.model.dtype, cfg.model.param_dtype
    if target.platform != "cpu" and not keep_dtype:
        dtype = "bfloat16" if dtype == "float32" else dtype
        param_dtype = "bfloat16" if param_dtype == "float32" else param_dtype
    o = cfg.optim
    optimizer = dict(lr=o.lr, warmup_ratio=o.warmup_ratio, schedule=o.schedule, weight_decay=o.weight_decay,
                     max_grad_norm=o.max_grad_norm, b1=o.b1, b2=o.b2, eps=o.eps)
    rows = cfg.train.batch_size * (2 if cfg.get("objective", "sft") in PREFERENCE_OBJECTIVES else 1)  # pairs
    return StepSpec(hf_config=hf, lora=lora, quant=quant, dtype=dtype, param_dtype=param_dtype,
                    remat=cfg.model.remat, micro_batch=rows, grad_accum=cfg.train.grad_accum,
                    seq=cfg.data.max_length, mesh=(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor),
                    optimizer=optimizer, offload=bool(cfg.optim.offload),
                    attention_impl=cfg.model.get("attention_impl", "auto"),
                    quant_matmul_impl=cfg.model.get("quant_matmul_impl", "auto"))


def resolve_mesh(mesh: tuple[int, int, int], n: int) -> tuple[int, int, int]:
    """The mesh for the target's ``n`` chips (one size may be -1); a mismatch is a PlanError."""
    from qlora_jax.train.sharding import mesh_sizes  # imports jax: not at module level

    try:
        return mesh_sizes(mesh, n)
    except ValueError as e:
        raise PlanError(str(e)) from e


def _batch_chips(mesh: tuple[int, int, int]) -> int:
    return mesh[0] * mesh[1]  # the batch is split over data x fsdp


def fit(spec: StepSpec, target: Target, devices: list[Any], *, max_per_chip: int = 16,
        log=print) -> tuple[StepMemory | None, list[StepMemory]]:
    """The cheapest remat policy that fits one sequence per chip, with its largest micro-batch."""
    chips = _batch_chips(spec.mesh)
    tried: list[StepMemory] = []
    for remat in REMAT_ORDER:
        best = None
        per_chip = 1
        while per_chip <= max_per_chip:
            s = dataclasses.replace(spec, remat=remat, micro_batch=per_chip * chips, grad_accum=1)
            m = measure(s, target, devices)
            tried.append(m)
            log(_line(m, target))
            if not m.fits:
                break
            best = m
            per_chip *= 2
        if best is not None:
            return best, tried
    return None, tried


def min_hbm_mib(argv: list[str], target: Target, *, lo: int = 1024, hi: int | None = None,
                tolerance: int = 256) -> int | None:
    """Smallest ``--xla_tpu_max_hbm_size_mib`` the step compiles with (bisection, one process each)."""
    hi = hi or int(target.available_gib * 1024)
    base = [a for a in argv if not a.startswith(("--fit", "--min_hbm", "--json"))]

    def compiles(mib: int) -> bool:
        env = dict(os.environ, LIBTPU_INIT_ARGS=f"--xla_tpu_max_hbm_size_mib={mib}")
        r = subprocess.run([sys.executable, "-m", "qlora_jax.plan", *base, "--json"], env=env,
                           capture_output=True, text=True)
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        return bool(rows) and rows[-1]["temporaries"] > 0

    if not compiles(hi):
        return None
    while hi - lo > tolerance:
        mid = (lo + hi) // 2
        if compiles(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------------
# Output.

def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _line(m: StepMemory, target: Target) -> str:
    d, f, t = m.mesh
    head = (f"  mesh ({d},{f},{t}) micro-batch {m.micro_batch} x {m.seq} (x{m.grad_accum} accum), "
            f"remat {m.remat}, {m.dtype}, frozen layout {m.frozen_layout}: ")
    if m.temporaries == 0 and m.arguments == 0:
        need = f"needs {_gib(m.required)} of temporaries" if m.required else m.error
        return head + f"DOES NOT FIT ({need}; {target.available_gib:g} GiB usable) [{m.compile_s:.0f} s]"
    cap = f" of {target.available_gib:g} GiB" if target.available_gib else ""
    verdict = "fits" if m.fits else "DOES NOT FIT"
    host = f" (+ {_gib(m.host_arguments)} in host memory)" if m.host_arguments else ""
    return (head + f"arguments {_gib(m.arguments)} + temporaries {_gib(m.temporaries)} = {_gib(m.total)}"
            f"{cap} per chip{host}: {verdict} [{m.compile_s:.0f} s]" + (f" ({m.note})" if m.note else ""))


__all__ = ["TARGETS", "StepMemory", "StepSpec", "Target", "compile_step", "fit", "measure", "spec_from_config",
           "step_arguments"]

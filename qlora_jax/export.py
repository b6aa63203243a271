"""Export a training run: merged HF model, PEFT adapter, bitsandbytes 4-bit checkpoint, or GGUF.

    python -m qlora_jax.export --workdir RUN_DIR --format merged|peft|bnb4|gguf [--out PATH]
        [--dtype bfloat16|float32] [--gguf-type Q8_0|F16|Q4_0] [--adapter DIR] [--source MODEL] [--overwrite]

The model is rebuilt from what the run recorded -- the base model source and quantization
(``summary.json``, else the newest Orbax checkpoint's ``meta``) and the LoRA config -- and the
trained adapters are loaded: from ``RUN_DIR/adapter`` (PEFT format, written when training
finished) when present, else from the newest Orbax checkpoint (``RUN_DIR/checkpoints/<step>``).
``--adapter`` and ``--source`` override either choice. Then:

* ``merged`` -> ``RUN_DIR/export/merged/``: a transformers checkpoint in ``--dtype`` holding the
  dequantized NF4 base with the adapters merged in (``W + s B A``), config.json, tokenizer files
  and chat template. ``AutoModelForCausalLM.from_pretrained`` loads it; with ``--dtype float32``
  it computes what the fine-tuned model computes (the merged weight *is* the dequantized base
  plus the adapter delta).
* ``peft`` -> ``RUN_DIR/export/peft/``: the adapters in PEFT format, for
  ``PeftModel.from_pretrained`` on top of the base model.
* ``bnb4`` -> ``RUN_DIR/export/bnb4/``: the base in bitsandbytes' 4-bit layout, with the run's
  own NF4 codes copied bit for bit (a float base is quantized here, as bitsandbytes would), other
  weights in ``--dtype``. The adapters are **not** merged into it -- merging would need a
  re-quantization that loses the fine-tuning's small deltas -- but written beside it in PEFT
  format in ``bnb4/adapter/``: load the base with transformers + bitsandbytes, then
  ``PeftModel.from_pretrained(base, "bnb4/adapter")``; that is the trained model exactly.
* ``gguf`` -> ``RUN_DIR/export/model-<TYPE>.gguf``: the merged model for llama.cpp (llama, qwen2,
  qwen3), tensors in ``--gguf-type`` (see ``checkpoints.gguf_writer`` for the per-tensor rules).

Nothing at ``--out`` is overwritten unless ``--overwrite``; even then a directory is replaced only
if an earlier export wrote every file in it (listed in its ``.qlora_export.json``). An export is
written to a temporary sibling of ``--out`` and renamed into place, so a failed export leaves the
old one intact and a replaced export leaves none of its files behind (no stale shards).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_jax.errors import ArgumentParser, UserError, cli_main, quiet_logs

log = logging.getLogger("qlora_jax.export")

FORMATS = ("merged", "peft", "bnb4", "gguf")
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
# Written last into every exported directory: the files of that export, which --overwrite may replace.
EXPORT_MARKER = ".qlora_export.json"
_BNB_README = """\
# bitsandbytes 4-bit base + LoRA adapter

`model.safetensors*` hold the base model in bitsandbytes' 4-bit layout: the {quant_type} codes
the fine-tuning run used, copied bit for bit. The LoRA adapters are **not** merged into them (a
merge would need re-quantizing the weights, losing the fine-tuning's small deltas); they are in
`adapter/` in PEFT format. Load both:

    model = AutoModelForCausalLM.from_pretrained(THIS_DIR, device_map="auto")
    model = PeftModel.from_pretrained(model, THIS_DIR + "/adapter")
"""


class ExportError(UserError):
    """A run directory or flag combination that cannot be exported; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What is needed to rebuild a run's fine-tuned model."""

    workdir: Path
    source: str  # base model: built-in name, HF dir, GGUF file, bnb-4bit dir or hub id
    quantize: str | None  # "nf4" | "fp4" | None
    lora: Any  # qlora_jax.lora.LoraConfig
    adapter_dir: Path | None  # PEFT adapter to load, or
    checkpoint: Path | None  # an Orbax step directory to load the adapters from
    blocksize: int = 64
    double_quant: bool = True


# ------------------------------------------------------------------------------------------
# Reading a run directory
# ------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e


def _latest_checkpoint(workdir: Path) -> tuple[Path | None, dict[str, Any]]:
    """(step directory, meta) of the newest Orbax checkpoint, or (None, {})."""
    root = workdir / CHECKPOINT_DIR
    if not root.is_dir():
        return None, {}
    from qlora_jax.train.checkpoint import RunCheckpoints

    ckpts = RunCheckpoints(workdir, async_save=False)
    try:
        step = ckpts.latest_step()
        if step is None:
            return None, {}
        return ckpts.directory / str(step), ckpts.read_meta(step)
    finally:
        ckpts.close()


def _normalize_quantize(value: Any) -> str | None:
    return None if value in (None, "", "none", "None") else str(value)


def lora_config_from_record(record: dict[str, Any]):
    """LoraConfig from an Orbax checkpoint's ``meta["lora"]`` record."""
    from qlora_jax.lora import LoraConfig

    targets = record.get("targets", "all-linear")
    return LoraConfig(r=int(record["r"]), alpha=float(record["alpha"]), dropout=float(record.get("dropout", 0.0)),
                      targets=tuple(targets) if isinstance(targets, list) else targets,
                      init=record.get("init", "peft"), use_rslora=bool(record.get("use_rslora", False)))


def lora_config_from_peft(adapter_dir: Path):
    """LoraConfig from a PEFT ``adapter_config.json`` (``target_modules`` + ``layers_to_transform``)."""
    from qlora_jax.checkpoints.peft_io import ADAPTER_CONFIG
    from qlora_jax.lora import ALL_LINEAR, PROJECTION_BLOCK, LoraConfig

    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ExportError(f"adapter directory {adapter_dir} has no {ADAPTER_CONFIG}")
    cfg = _read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    targets: Any = cfg.get("target_modules") or ALL_LINEAR
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(targets, list) and layers is not None:
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in PROJECTION_BLOCK]
        if unknown:
            raise ExportError(f"{path}: target_modules {unknown} are not decoder projections")
        targets = tuple(f"layers.{i}.{PROJECTION_BLOCK[t.rsplit('.', 1)[-1]]}.{t.rsplit('.', 1)[-1]}"
                        for i in layers for t in targets)
    elif isinstance(targets, list):
        targets = tuple(targets)
    elif layers is not None:
        raise ExportError(f"{path}: a regex target_modules with layers_to_transform is not supported")
    return LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=targets, use_rslora=bool(cfg.get("use_rslora", False)))


def read_run(workdir: str | os.PathLike, *, source: str | None = None, adapter: str | os.PathLike | None = None,
             quantize: str | None = None, blocksize: int | None = None,
             double_quant: bool | None = None) -> RunRecord:
    """Find out how to rebuild a run's model; raises :class:`ExportError` naming what is missing.

    Base model: ``source``, else ``summary.json["model"]``, else the newest checkpoint's
    ``meta["lora"]["model_source"]``, else the adapter's ``base_model_name_or_path``.
    Quantization: ``quantize`` ("none" for none), else the summary's, else the checkpoint's,
    else "nf4". Blocksize / double quantization: as recorded, else 64 / True (the training
    defaults). Adapters: ``adapter``, else ``RUN_DIR/adapter``, else the newest checkpoint.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ExportError(f"--workdir: no run directory at {workdir}")
    summary = _read_json(workdir / SUMMARY_FILE) if (workdir / SUMMARY_FILE).is_file() else {}
    step_dir, meta = _latest_checkpoint(workdir)
    record = meta.get("lora", {}) if meta else {}

    if adapter is not None:
        adapter_dir: Path | None = Path(adapter)
        if not adapter_dir.is_dir():
            raise ExportError(f"--adapter: no adapter directory at {adapter_dir}")
        step_dir = None
    elif (workdir / ADAPTER_DIR).is_dir():
        adapter_dir, step_dir = workdir / ADAPTER_DIR, None
    elif step_dir is not None:
        adapter_dir = None
    else:
        raise ExportError(f"{workdir} has neither {ADAPTER_DIR}/ (PEFT adapter, written when training finishes) "
                          f"nor an Orbax checkpoint under {CHECKPOINT_DIR}/; pass --adapter DIR")

    if adapter_dir is not None:
        lora = lora_config_from_peft(adapter_dir)
        adapter_source = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path") or None
    else:
        if not record:
            raise ExportError(f"{step_dir}: checkpoint meta has no 'lora' record; cannot rebuild its adapters")
        lora = lora_config_from_record(record)
        adapter_source = None

    source = source or summary.get("model") or record.get("model_source") or adapter_source
    if not source:
        raise ExportError(f"cannot tell which base model {workdir} was trained on (no {SUMMARY_FILE}, no checkpoint "
                          f"meta, no base_model_name_or_path in the adapter); pass --source MODEL")
    if quantize is None:
        if "quantize" in summary:
            quantize = summary["quantize"]
        elif "quantize" in record:
            quantize = record["quantize"]
        else:
            quantize = "nf4"
    blocksize = blocksize or summary.get("blocksize") or record.get("blocksize") or 64
    if double_quant is None:
        double_quant = summary.get("double_quant", record.get("double_quant", True))
    return RunRecord(workdir=workdir, source=str(source), quantize=_normalize_quantize(quantize), lora=lora,
                     adapter_dir=adapter_dir, checkpoint=step_dir, blocksize=int(blocksize),
                     double_quant=bool(double_quant))


def load_orbax_adapters(model, step_dir: Path) -> None:
    """Set ``model``'s adapters from an Orbax checkpoint step directory (in place).

    Reads the adapters alone: the ``lora`` item (``checkpoints/<step>/lora``), or, in checkpoints
    written before the adapters got their own item, ``state["lora"]``. The saved tree mirrors
    ``nnx.state(model, LoRAParam)`` (``layers/self_attn/q_proj/lora_a/value``).
    """
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from qlora_jax.lora import LoRAParam

    step_dir = Path(step_dir).absolute()
    if (step_dir / "lora").is_dir():
        saved = ocp.StandardCheckpointer().restore(step_dir / "lora")
    elif (step_dir / "state").is_dir():
        state = ocp.StandardCheckpointer().restore(step_dir / "state")
        if "lora" not in state:
            raise ExportError(f"{step_dir}/state holds no 'lora' entry (keys: {sorted(state)})")
        saved = state["lora"]
    else:
        raise ExportError(f"{step_dir} has neither a lora/ nor a state/ item; is it an Orbax checkpoint of a run?")
    missing = []
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, LoRAParam):
            continue
        node: Any = saved
        for part in path:
            node = node.get(str(part)) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node = node.get("value")
        name = ".".join(str(p) for p in path)
        if node is None:
            missing.append(name)
            continue
        value = np.asarray(node)
        if value.shape != var.get_value().shape:
            raise ExportError(f"{step_dir}: adapter {name} has shape {value.shape}, the model built from the "
                              f"recorded LoRA config expects {var.get_value().shape}")
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    if missing:
        raise ExportError(f"{step_dir}: no saved values for adapters {missing}")


def load_run_model(run: RunRecord, *, with_tokenizer: bool = True):
    """(model with the trained adapters, tokenizer), computing in float32."""
    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.checkpoints.peft_io import load_peft_adapter

    model, tokenizer = load_model(run.source, quantize=run.quantize, dtype="float32", param_dtype="float32",
                                  lora=run.lora, blocksize=run.blocksize, double_quant=run.double_quant,
                                  with_tokenizer=with_tokenizer)
    if run.adapter_dir is not None:
        load_peft_adapter(model, run.adapter_dir)
    else:
        load_orbax_adapters(model, run.checkpoint)
    return model, tokenizer


# ------------------------------------------------------------------------------------------
# Exporting
# ------------------------------------------------------------------------------------------

def default_out(workdir: Path, fmt: str, gguf_type: str = "Q8_0") -> Path:
    export_dir = Path(workdir) / "export"
    return export_dir / f"model-{gguf_type}.gguf" if fmt == "gguf" else export_dir / fmt


def source_config(source: str) -> tuple[dict[str, Any], Path | None]:
    """(config.json dict as the source states it, the source directory or None for GGUF)."""
    from qlora_jax.checkpoints import gguf_reader
    from qlora_jax.checkpoints.load import resolve_source

    kind, path = resolve_source(source)
    if kind == "gguf":
        return gguf_reader.gguf_config(path), None
    return json.loads((path / "config.json").read_text()), path


# ------------------------------------------------------------------------------------------
# Where an export goes: never over what the user owns
# ------------------------------------------------------------------------------------------

def _export_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative POSIX paths, sorted), the marker excluded."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if not p.is_dir() and p.name != EXPORT_MARKER)


def _recorded_files(directory: Path) -> set[str]:
    """The files an earlier export recorded writing into ``directory`` (empty without its marker)."""
    try:
        marker = json.loads((directory / EXPORT_MARKER).read_text())
        return set(marker["files"]) if marker.get("written_by") == "qlora_jax.export" else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check_target(out: str | os.PathLike, fmt: str, *, overwrite: bool = False) -> None:
    """Raise :class:`ExportError` unless an export in ``fmt`` may be written to ``out``.

    A missing target or an empty directory is fine. Anything else needs ``overwrite``, and even
    then a directory is replaced only when every file in it was written by an earlier export
    (its ``.qlora_export.json`` lists them); a GGUF target is a file the user named.
    """
    out = Path(out)
    if fmt == "gguf":
        if out.is_dir():
            raise ExportError(f"--out {out} is a directory; --format gguf writes one file (e.g. {out / 'model.gguf'})")
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise ExportError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
        return
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out} is {'a symbolic link' if out.is_symlink() else 'a file'}; --format {fmt} "
                          f"writes a directory: choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = [name for name in _export_files(out) if name not in _recorded_files(out)]
    if foreign:
        more = len(foreign) - 1
        others = f" and {more} more file{'s' if more > 1 else ''}" if more else ""
        raise ExportError(f"--out {out} holds {foreign[0]}{others}, which no export wrote there; choose another --out "
                          "(--overwrite replaces only an earlier export)")
    if not overwrite:
        raise ExportError(f"--out {out} holds an earlier export; pass --overwrite to replace it, or choose another --out")


def _remove_earlier_export(directory: Path) -> None:
    """Delete a directory an earlier export wrote: its recorded files, then the emptied folders.
    Anything else (a file that appeared since the check) stays, with a warning."""
    recorded = _recorded_files(directory)
    for name in _export_files(directory):
        if name in recorded:
            (directory / name).unlink()
    (directory / EXPORT_MARKER).unlink(missing_ok=True)
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    try:
        directory.rmdir()
    except OSError:
        log.warning("kept %s: it holds files no export wrote", directory)


def _write_in_place_of(out: Path, fmt: str, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` on a fresh sibling of ``out``, then rename it into place.

    A directory export gets a marker listing its files; an earlier export at ``out`` (checked by
    :func:`check_target`) is moved aside first and deleted after the rename, so no file of it
    (a stale shard) survives. If writing fails, ``out`` is left as it was.
    """
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if fmt == "gguf":
            write(tmp / out.name)
            os.replace(tmp / out.name, out)
            tmp.rmdir()
            return out
        write(tmp)
        marker = {"written_by": "qlora_jax.export", "format": fmt, "files": _export_files(tmp)}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if out.is_dir() and any(out.iterdir()):
            old = parent / f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            try:
                _remove_earlier_export(old)
            except OSError as e:  # the new export is in place; say what is left over
                log.warning("could not remove the replaced export %s: %s", old, e)
        else:
            os.replace(tmp, out)  # onto a missing or empty directory
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_model(model, tokenizer, fmt: str, out: str | os.PathLike, *, source: str, dtype: str = "bfloat16",
                 gguf_type: str = "Q8_0", max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write an already loaded fine-tuned ``model`` in format ``fmt`` (see the module docstring).

    ``out`` must be new or empty unless ``overwrite``, which replaces an earlier export there as a
    whole (:func:`check_target`); the export is written beside ``out`` and renamed into place.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    check_target(out, fmt, overwrite=overwrite)
    return _write_in_place_of(out, fmt, lambda path: _write_format(
        model, tokenizer, fmt, path, final_out=out, source=source, dtype=dtype, gguf_type=gguf_type,
        max_shard_bytes=max_shard_bytes))


def _write_format(model, tokenizer, fmt: str, out: Path, *, final_out: Path, source: str, dtype: str,
                  gguf_type: str, max_shard_bytes: int | None) -> Path:
    """Write ``fmt`` at ``out`` (a temporary path); ``final_out`` is where it will end up."""
    from qlora_jax.checkpoints import bnb_format, gguf_writer, hf_writer
    from qlora_jax.checkpoints.load import resolve_source
    from qlora_jax.checkpoints.peft_io import save_peft_adapter

    shard = hf_writer.DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    if fmt == "peft":
        return save_peft_adapter(model, out, base_model=source)
    if fmt == "merged":
        config, source_dir = source_config(source)
        return hf_writer.save_merged(model, out, config=config, tokenizer=tokenizer, dtype=dtype,
                                     max_shard_bytes=shard, source_dir=source_dir)
    if fmt == "bnb4":
        quant = model.quant_config
        quant_type, blocksize, double_quant = ((quant.quant_type, quant.blocksize, quant.double_quant)
                                               if quant is not None else ("nf4", 64, True))
        config, source_dir = source_config(source)
        qc = bnb_format.bnb_quantization_config(quant_type, double_quant, compute_dtype=hf_writer.dtype_name(dtype))
        tensors = hf_writer.iter_bnb_tensors(model, dtype=dtype, quant_type=quant_type, blocksize=blocksize,
                                             double_quant=double_quant)
        bnb_format.save_bnb_checkpoint(out, tensors, hf_writer.export_config(config, dtype), qc,
                                       max_shard_bytes=shard)
        hf_writer.write_tokenizer(out, tokenizer)
        hf_writer.copy_extra_files(source_dir, out)
        if model.lora_config is not None:
            save_peft_adapter(model, out / ADAPTER_DIR, base_model=str(final_out))
        (out / "README.md").write_text(_BNB_README.format(quant_type=quant_type.upper()))
        return out
    if fmt == "gguf":
        kind, path = resolve_source(source)
        name = path.stem if kind == "gguf" else Path(source).name
        return gguf_writer.save_gguf(model, out, tokenizer=tokenizer, source_gguf=path if kind == "gguf" else None,
                                     tensor_type=gguf_type, name=name)
    raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def export(workdir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *, dtype: str = "bfloat16",
           gguf_type: str = "Q8_0", adapter: str | os.PathLike | None = None, source: str | None = None,
           quantize: str | None = None, blocksize: int | None = None, double_quant: bool | None = None,
           max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Rebuild a run's fine-tuned model and write it as ``fmt``; returns the path written.

    ``out`` must not exist or be empty unless ``overwrite`` (``--overwrite``): then an earlier
    export there is replaced as a whole; a directory holding other files is refused either way.
    The target is checked before the model is loaded.
    """
    from qlora_jax.checkpoints.gguf_writer import TENSOR_TYPES
    from qlora_jax.checkpoints.hf_writer import EXPORT_DTYPES

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if gguf_type not in TENSOR_TYPES:
        raise ExportError(f"--gguf-type must be one of {', '.join(TENSOR_TYPES)}, got {gguf_type!r}")
    run = read_run(workdir, source=source, adapter=adapter, quantize=quantize, blocksize=blocksize,
                   double_quant=double_quant)
    log.info("base %s (quantize=%s, blocksize %d, double_quant %s); adapters from %s", run.source, run.quantize,
             run.blocksize, run.double_quant, run.adapter_dir or run.checkpoint)
    from qlora_jax.checkpoints.load import resolve_source

    out = Path(out) if out is not None else default_out(run.workdir, fmt, gguf_type)
    check_target(out, fmt, overwrite=overwrite)
    # GGUF export copies a GGUF source's tokenizer metadata; the other cases need the tokenizer.
    needs_tokenizer = fmt in ("merged", "bnb4") or (fmt == "gguf" and resolve_source(run.source)[0] != "gguf")
    model, tokenizer = load_run_model(run, with_tokenizer=needs_tokenizer)
    return export_model(model, tokenizer, fmt, out, source=run.source, dtype=dtype, gguf_type=gguf_type,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m qlora_jax.export",
        description="Export a training run's fine-tuned model (base + trained LoRA adapters).",
        epilog="bnb4 keeps the 4-bit base codes as trained and writes the adapters unmerged beside it "
               "(OUT/adapter, PEFT format); merged and gguf merge the adapters into the dequantized base.")
    parser.add_argument("--workdir", required=True, help="run directory (summary.json, adapter/, checkpoints/)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", help="output directory (file for gguf); default RUN_DIR/export/<format> "
                                      "or RUN_DIR/export/model-<TYPE>.gguf")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="dtype of float weights for merged and bnb4 (default bfloat16)")
    parser.add_argument("--gguf-type", default="Q8_0", choices=tuple(("Q8_0", "F16", "Q4_0", "F32")),
                        help="GGUF tensor type of matrices (default Q8_0)")
    parser.add_argument("--adapter", help="PEFT adapter directory to use instead of the run's own")
    parser.add_argument("--source", help="base model, if not the one the run recorded")
    parser.add_argument("--quantize", choices=("nf4", "fp4", "none"),
                        help="base quantization, if not the one the run recorded")
    parser.add_argument("--blocksize", type=int, help="4-bit block size, if not the recorded one (default 64)")
    parser.add_argument("--double-quant", dest="double_quant", action=argparse.BooleanOptionalAction,
                        default=None, help="double quantization, if not the recorded one (default on)")
    parser.add_argument("--max-shard-size", type=_size, default=None,
                        help="largest safetensors shard, e.g. 2GB (default 5GiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export at --out (as a whole); without it an existing target "
                             "is refused. A directory holding files no export wrote is refused either way")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_logs()
    path = export(args.workdir, args.format, args.out, dtype=args.dtype, gguf_type=args.gguf_type,
                  adapter=args.adapter, source=args.source, quantize=args.quantize, blocksize=args.blocksize,
                  double_quant=args.double_quant, max_shard_bytes=args.max_shard_size,
                  overwrite=args.overwrite)
    print(f"{args.format}: {path}")
    return path


__all__ = ["EXPORT_MARKER", "FORMATS", "ExportError", "RunRecord", "check_target", "default_out", "export",
           "export_model", "load_orbax_adapters", "load_run_model", "lora_config_from_peft", "lora_config_from_record", "main", "read_run"]

if __name__ == "__main__":
    main()

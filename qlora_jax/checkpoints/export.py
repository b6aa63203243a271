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
  qwen3, mistral, phi3, gemma2, gemma3_text, qwen3_moe), tensors in ``--gguf-type`` (see
  ``checkpoints.gguf_writer`` for the per-tensor rules and what llama.cpp cannot express).

Nothing at ``--out`` is overwritten unless ``--overwrite``; even then a directory is replaced only
if an earlier export wrote every file in it (listed in its ``.qlora_export.json``). An export is
written to a temporary sibling of ``--out`` and renamed into place, so a failed export leaves the
old one intact and a replaced export leaves none of its files behind (no stale shards).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qlora_jax.checkpoints import bnb_format, gguf_reader, gguf_writer, hf_writer
from qlora_jax.checkpoints.gguf_writer import TENSOR_TYPES
from qlora_jax.checkpoints.hf_writer import EXPORT_DTYPES
from qlora_jax.checkpoints.load import resolve_source
from qlora_jax.checkpoints.peft_io import save_peft_adapter
from qlora_jax.checkpoints.run_dir import ADAPTER_DIR, load_run_model, read_run
from qlora_jax.errors import UserError
from qlora_jax.lora_init import changes_base
from qlora_jax.models import ModelConfig

log = logging.getLogger("qlora_jax.export")

FORMATS = ("merged", "peft", "bnb4", "gguf")
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


# ------------------------------------------------------------------------------------------
# Exporting
# ------------------------------------------------------------------------------------------

def default_out(workdir: Path, fmt: str, gguf_type: str = "Q8_0") -> Path:
    export_dir = Path(workdir) / "export"
    return export_dir / f"model-{gguf_type}.gguf" if fmt == "gguf" else export_dir / fmt


def source_config(source: str) -> tuple[dict[str, Any], Path | None]:
    """(config.json dict as the source states it, the source directory or None for GGUF)."""
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
                 gguf_type: str = "Q8_0", max_shard_bytes: int | None = None, overwrite: bool = False,
                 initial: dict[str, np.ndarray] | None = None) -> Path:
    """Write an already loaded fine-tuned ``model`` in format ``fmt`` (see the module docstring).

    ``initial``: PiSSA / LoftQ adapters as initialised; with them ``peft`` is written for the
    original base (``save_peft_adapter``), without them against the residual base.

    ``out`` must be new or empty unless ``overwrite``, which replaces an earlier export there as a
    whole (:func:`check_target`); the export is written beside ``out`` and renamed into place.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    check_target(out, fmt, overwrite=overwrite)
    return _write_in_place_of(out, fmt, lambda path: _write_format(
        model, tokenizer, fmt, path, final_out=out, source=source, dtype=dtype, gguf_type=gguf_type,
        max_shard_bytes=max_shard_bytes, initial=initial))


def _write_format(model, tokenizer, fmt: str, out: Path, *, final_out: Path, source: str, dtype: str,
                  gguf_type: str, max_shard_bytes: int | None, initial: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``fmt`` at ``out`` (a temporary path); ``final_out`` is where it will end up."""
    shard = hf_writer.DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    if fmt == "peft":
        return save_peft_adapter(model, out, base_model=source, initial=initial)
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

    out = Path(out) if out is not None else default_out(run.workdir, fmt, gguf_type)
    check_target(out, fmt, overwrite=overwrite)
    if fmt == "gguf":  # a family llama.cpp cannot run as trained: say so before loading anything
        try:
            gguf_writer.check_exportable(ModelConfig.from_hf(source_config(run.source)[0]))
        except NotImplementedError as e:
            raise ExportError(str(e)) from e
    # GGUF export copies a GGUF source's tokenizer metadata; the other cases need the tokenizer.
    needs_tokenizer = fmt in ("merged", "bnb4") or (fmt == "gguf" and resolve_source(run.source)[0] != "gguf")
    # PiSSA / LoftQ: the PEFT export targets the original base, from the adapters as initialised.
    initial = {} if fmt == "peft" and changes_base(run.lora.init) else None
    model, tokenizer = load_run_model(run, with_tokenizer=needs_tokenizer, initial=initial)
    return export_model(model, tokenizer, fmt, out, source=run.source, dtype=dtype, gguf_type=gguf_type,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite, initial=initial)


__all__ = ["EXPORT_MARKER", "FORMATS", "ExportError", "check_target", "default_out", "export", "export_model"]

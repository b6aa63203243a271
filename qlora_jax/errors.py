"""User errors: bad input that ends a command with one line, not a traceback.

Every error a user can fix (a config key, a data file and line, a model file, a flag, a run
directory) derives from :class:`UserError`. Each command's ``main`` (``qlora_jax/cli/``) runs through
``qlora_jax.cli._common.cli_main``, which prints ``error: <message>`` on one line to stderr and exits
with status 2 (``NonFiniteLoss``, a training run that diverged, exits 3). Anything else is a bug and
keeps its traceback.

Raise a user error *before* writing anything, so earlier outputs stay as they were.

The hierarchy (defined here, or beside the stage that raises it):

    UserError                       exit 2
      FlagError                     a flag, --config file or --config.key=value (parse_absl_flags)
      ModelFileError                config.json / .safetensors / .gguf: corrupt, truncated, inconsistent
      OutputDirError                a workdir that is a file or read-only (check_output_dir)
        DiskFull                    no space left (ensure_free_space; disk_full maps ENOSPC from anywhere)
      ConfigError                   train/config.py: a config value out of range, a missing input
      DataError                     data/sources.py: a data file, line, row or field
      LoraTargetError               lora.py: lora.targets names a module the model lacks
      CheckpointMismatch, RunDirError  checkpoints/run_dir.py;  ExportError  export.py;  MCQAError  evaluate.py
      RagError  rag/errors.py;  PlanError  pipelines/plan.py;  RewardError  objectives/rewards.py
      AnswerTokenError              objectives/yesno.py
      NonFiniteLoss                 train/loop.py, exit 3

``cli_main`` also maps ``FileNotFoundError`` (a path the user named), ``NotImplementedError`` (an
input we do not support) and a full disk (:func:`disk_full`). The command-line glue (``cli_main``,
``ArgumentParser``, ``run_absl``, ``parse_absl_flags``, ``quiet_logs``) is in ``qlora_jax/cli/_common.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path


class UserError(ValueError):
    """Input the user can fix; the message names the file, line, key or flag and what is wrong."""

    exit_code = 2


class FlagError(UserError):
    """A command-line flag, a ``--config`` file or a ``--config.key=value`` override is wrong."""


class ModelFileError(UserError):
    """A model file (config.json, .safetensors, .gguf) is missing, truncated, corrupt or does not
    describe a model we can build (unknown model_type, shapes that disagree, missing tensors)."""


class OutputDirError(UserError):
    """An output directory (a run's workdir, an export target) is a file, read-only, or full."""


class DiskFull(OutputDirError):
    """Writing ran out of space; the message names the directory."""


def disk_full(err: BaseException, directory: str | os.PathLike | None = None) -> DiskFull | None:
    """A :class:`DiskFull` naming the directory if ``err`` (or anything in its cause/context chain,
    or an exception group's members) is "no space left on device"; else None.

    Orbax / tensorstore report it as ``RESOURCE_EXHAUSTED ... [OS error 28: No space left on
    device]`` or a plain ``OSError(ENOSPC)``, possibly wrapped by asyncio.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text = str(e)
        hit = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))) or bool(
            _DISK_FULL.search(text))
        if hit:
            where = directory or getattr(e, "filename", None) or _quoted_path(text)
            if where:
                where = _outside_tmp(str(where))
                free = ""
                with contextlib.suppress(OSError):
                    free = f" ({shutil.disk_usage(where).free:,} bytes free)"
                where = f" in {where}{free}"
            return DiskFull(f"no space left on the device{where or ''}: free some space or choose another "
                            f"directory (earlier files there are kept as they were)")
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


_DISK_FULL = re.compile(r"No space left on device|OS error 28\b|os_error_code='?28\b|Disk quota exceeded")


def _quoted_path(text: str) -> str | None:
    m = re.search(r"[\"'](/[^\"']+)[\"']", text)
    return os.path.dirname(m.group(1).rstrip("/")) if m else None


def _outside_tmp(path: str) -> str:
    """The directory above Orbax's ``*.orbax-checkpoint-tmp*`` staging directories (the user's)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if "orbax-checkpoint-tmp" in part:
            return str(Path(*parts[:i]))
    existing = path
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return existing if existing != os.path.dirname(existing) else path  # nearest existing directory


def ensure_free_space(directory: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Raise :class:`DiskFull` before writing ``need_bytes`` (``what``, e.g. "the checkpoint of
    step 40") into ``directory`` when its filesystem has less room (plus 64 KiB for metadata).

    Checking first beats catching the failure: Orbax's asynchronous writers fail one by one and
    print pages of tracebacks from their threads, and leave a half-written step behind."""
    where = _outside_tmp(os.fspath(directory))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if free < need_bytes + 2**16:
        raise DiskFull(f"no space left on the device in {where}: {what} needs ~{need_bytes:,} bytes, "
                       f"{free:,} are free; free some space or choose another directory (earlier files there "
                       f"are kept as they were)")


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` (and parents) if needed and make sure files can be written in it.

    Raises :class:`OutputDirError` naming ``what`` (e.g. "config.workdir") when the path, or one of
    its parents, is a file, or the directory is not writable.
    """
    path = Path(path).expanduser().absolute()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise OutputDirError(f"{what}={path}: {p} is a file, not a directory")
        if p.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"{what}={path}: cannot create the directory ({e.strerror})") from e
    probe = path / f".write_test_{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if disk_full(e):
            raise DiskFull(f"{what}={path}: no space left on the device") from e
        raise OutputDirError(f"{what}={path}: the directory is not writable ({e.strerror})") from e
    return path


__all__ = ["DiskFull", "FlagError", "ModelFileError", "OutputDirError", "UserError", "check_output_dir", "disk_full",
           "ensure_free_space"]

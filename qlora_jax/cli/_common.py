"""The glue every command shares: one ``error: ...`` line for a user error, argparse and absl
entry points, quiet third-party logs.

Each command's ``main`` runs through :func:`cli_main`, which prints ``error: <message>`` on one line
to stderr and exits with the error's status (2; ``NonFiniteLoss`` 3). So do ``FileNotFoundError``
(a path the user named), ``NotImplementedError`` (an input we do not support) and a full disk.
Anything else is a bug and keeps its traceback. Besides: :class:`ArgumentParser` (argparse
commands), :func:`run_absl` (absl commands: flags and config files checked by
:func:`parse_absl_flags`) and :func:`quiet_logs` (third-party log lines that look like errors but
are not). The error classes themselves are library code: :mod:`qlora_jax.errors`.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.machinery
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from qlora_jax.errors import _DISK_FULL, FlagError, UserError, disk_full


def one_line(message: str) -> str:
    """A message as one line: inner newlines become '; ' (config checks list several keys)."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    if len(parts) > 1 and parts[0].endswith(":"):
        return parts[0] + " " + "; ".join(parts[1:])
    return "; ".join(parts)


def report(err: BaseException, *, log: logging.Logger | None = None) -> int:
    """Print ``error: ...`` for a user error; return its exit code.

    With ``log``, the line is also written to that logger's *file* handlers (a run's train.log),
    not to its console handlers: the user sees it once.
    """
    msg = one_line(str(err))
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if log is not None:
        _to_log_files(log, f"error: {msg}")
    return getattr(err, "exit_code", 2)


def _to_log_files(log: logging.Logger, message: str, exc_info: Any = None) -> None:
    """Write one ERROR record to ``log``'s file handlers only (e.g. the run's train.log)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), exc_info))


# Set by run_absl (real command-line runs only): after a full disk, leave without interpreter
# shutdown, where Orbax's still-running async writers print pages of "Event loop is closed".
_hard_exit_on_disk_full = False


def cli_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's ``main``: a :class:`UserError` becomes one line and exit status 2.

    So do ``FileNotFoundError`` (a path the user named) and ``NotImplementedError`` (an input
    we do not support, e.g. a GGUF export of an unknown rope type). A full disk (``ENOSPC`` from any writer, Orbax's included) is a user error too. The error is
    also recorded in the run's train.log when one is open. The wrapped function's return value is
    passed through, so tests can call ``main([...])``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError, NotImplementedError) as e:
            # FileNotFoundError: a path the user named; NotImplementedError: an input we do not support
            sys.exit(report(e, log=logging.getLogger("qlora_jax")))
        except Exception as e:
            full = disk_full(e)
            if full is None:  # a bug: the traceback goes to the console as usual, and to train.log
                _to_log_files(logging.getLogger("qlora_jax"), f"failed: {type(e).__name__}: {e}",
                              (type(e), e, e.__traceback__))
                raise
            code = report(full, log=logging.getLogger("qlora_jax"))
            if _hard_exit_on_disk_full:  # Orbax's writer threads would print tracebacks while exiting
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            sys.exit(code)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse with our error format: a bad flag ends with ``error: <message>`` (status 2), not
    a usage block followed by ``prog: error: ...``."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(FlagError.exit_code)


# -- absl entry points ----------------------------------------------------------------------------

class ConfigFlag:
    """``--config FILE`` (and its ``--config.key=value`` overrides) of a config-file command.

    The flag is defined when the command starts (:meth:`define`), not on import: absl takes one
    definition of a name per process, and every command module can then be imported together.
    """

    def __init__(self, help: str):
        self.help = help
        self._holder: Any = None

    def define(self) -> None:
        from absl import flags
        from ml_collections import config_flags

        self._holder = config_flags.DEFINE_config_file("config", None, self.help, lock_config=True)
        flags.mark_flags_as_required(["config"])

    @property
    def value(self) -> Any:
        return self._holder.value


def run_absl(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run`` for our commands: quiet third-party logs, flags parsed by
    :func:`parse_absl_flags` (one line per bad flag, config key or config file) and ``main``
    wrapped by :func:`cli_main`."""
    from absl import app, flags

    global _hard_exit_on_disk_full
    _hard_exit_on_disk_full = True
    # --help lists the key flags of the main module (the file run, e.g. qlora_jax/train/__main__.py);
    # ours are defined in main's module under qlora_jax/cli/.
    by_module = flags.FLAGS.flags_by_module_dict()
    for flag in by_module.get(main.__module__, []) + by_module.get(__name__, []):  # ConfigFlag's are defined here
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    # absl's --help prints the __main__ module's docstring: the usage is the command module's.
    main_module = sys.modules.get("__main__")
    if main_module is not None and sys.modules[main.__module__].__doc__:
        main_module.__doc__ = sys.modules[main.__module__].__doc__
    quiet_logs()
    app.run(cli_main(main), flags_parser=parse_absl_flags)


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
    """absl ``flags_parser``: parse ``argv`` into ``absl.flags.FLAGS``; a bad flag, config file or
    ``--config.key=value`` override ends the program with one ``error:`` line and status 2.

    ml_collections reports an unknown key as a triple traceback (an ``AttributeError`` whose text
    is an escaped ``KeyError``); here the config file is loaded once more to name the key and the
    nearest existing one. Errors we cannot explain keep their traceback.
    """
    from absl import flags

    try:
        rest = flags.FLAGS(list(argv))
        for name in _config_flag_names():  # a missing config file surfaces only when .value is read
            if type(flags.FLAGS[name].value).__name__ == "_ErrorConfig":
                load_config_file(_flag_value(argv, name) or "", flag=f"--{name}")
        return rest
    except Exception as e:  # absl flags.Error, and whatever ml_collections lets through
        try:
            msg = str(e) if isinstance(e, FlagError) else explain_flag_error(list(argv), e)
        except FlagError as fe:
            msg = str(fe)
        if msg is None:
            raise
        print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)
        sys.exit(FlagError.exit_code)


def _config_flag_names() -> list[str]:
    from absl import flags

    return sorted({name for name, f in flags.FLAGS._flags().items() if type(f).__name__ == "_ConfigFlag"})


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    value = None
    for i, a in enumerate(argv[1:], start=1):
        for prefix in (f"--{name}", f"-{name}"):
            if a.startswith(prefix + "="):
                value = a[len(prefix) + 1:]
            elif a == prefix and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def explain_flag_error(argv: Sequence[str], err: BaseException) -> str | None:
    """One line for a failed absl/ml_collections flag parse, or None if we cannot tell why."""
    from absl import flags

    text = str(err)
    if isinstance(err, flags.UnrecognizedFlagError):
        names = [f"--{n}" for n in _config_flag_names()]
        hint = f"; this command takes {' '.join(n + '=FILE' for n in names)} and " \
               f"{' '.join(n + '.KEY=VALUE' for n in names)} (see --helpshort)" if names else ""
        return f"unknown flag --{err.flagname}{hint}" if getattr(err, "flagname", None) else text + hint
    for name in _config_flag_names():
        spec = _flag_value(argv, name)
        if spec is None:
            if f"--{name}=None" in text or f"--{name} must have a value" in text:
                return f"--{name} is required: the path of a config file, e.g. --{name}=configs/sft.py"
            continue
        cfg = load_config_file(spec, flag=f"--{name}")
        for arg in argv[1:]:
            if arg.startswith(f"--{name}.") or arg.startswith(f"-{name}."):
                key = arg.lstrip("-").split("=", 1)[0][len(name) + 1:]
                problem = _override_problem(cfg, key, f"--{name}")
                if problem:
                    return problem
        m = re.match(rf"flag (--{re.escape(name)}\.([\w.]+))=(.*?): (.*)", text, re.S)
        if m:
            flag, key, value, why = m.groups()
            current = _lookup(cfg, key)
            kind = type(current).__name__ if current is not None else None
            expected = f"expected {'an' if kind and kind[0] in 'aeiou' else 'a'} {kind}" if kind else "bad value"
            return f"{flag}={value}: {expected} ({one_line(why)})"
    if isinstance(err, flags.Error):
        return re.sub(r"^flag ", "", one_line(text))
    return None


def load_config_file(spec: str, *, flag: str = "--config") -> Any:
    """Load ``path[:arg...]`` as ml_collections does (``get_config(*args)``); a missing file, a
    directory, a file that fails to import or has no ``get_config`` raises :class:`FlagError`."""
    path, *args = spec.split(":")
    if not os.path.exists(path):
        raise FlagError(f"{flag}={spec}: no such config file")
    if os.path.isdir(path):
        raise FlagError(f"{flag}={spec}: is a directory, not a config file (e.g. configs/sft.py)")
    try:
        loader = importlib.machinery.SourceFileLoader("_qlora_user_config", path)
        module = type(sys)("_qlora_user_config")
        module.__file__ = path
        loader.exec_module(module)
    except Exception as e:
        raise FlagError(f"{flag}={spec}: cannot load the config file: {_where(e, path)}") from e
    if not callable(getattr(module, "get_config", None)):
        raise FlagError(f"{flag}={spec}: the config file defines no get_config() function")
    try:
        return module.get_config(*args)
    except Exception as e:
        raise FlagError(f"{flag}={spec}: get_config({', '.join(map(repr, args))}) failed: {_where(e, path)}") from e


def _where(e: BaseException, path: str) -> str:
    """``file:line: Type: message`` of an exception raised while running a config file."""
    if isinstance(e, SyntaxError):
        return f"{e.filename or path}:{e.lineno}: SyntaxError: {e.msg}"
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            line = frame.lineno
    loc = f"{path}:{line}: " if line else ""
    return f"{loc}{type(e).__name__}: {one_line(str(e))}"


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if hasattr(node, "items"):
        for k, v in node.items():
            keys.append(prefix + k)
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def _lookup(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "items") or part not in node:
            return None
        node = node[part]
    return node


def _override_problem(cfg: Any, key: str, flag: str) -> str | None:
    """Why ``--config.<key>`` cannot be set (no such key, or a value that is not a section)."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not hasattr(node, "items"):
            return f"{flag}.{key}: {'.'.join(parts[:i])} is a {type(node).__name__} value, not a section"
        if part not in node:
            keys = _flat_keys(cfg)
            near = [k for k in keys if k.rsplit(".", 1)[-1] == parts[-1]] or difflib.get_close_matches(
                key, keys, n=1, cutoff=0.6)
            section = ".".join(parts[:i])
            if near:
                hint = f" (did you mean {near[0]}?)"
            else:
                hint = f" ({'keys of ' + section if section else 'top-level keys'}: {', '.join(sorted(node))})"
            return f"{flag}.{key}: no such config key{hint}"
        node = node[part]
    return None


# -- quiet third-party logs -----------------------------------------------------------------------

# Loggers whose INFO / WARNING lines look like errors to a user but are not: jax probing for a TPU
# ("Unable to initialize backend 'tpu'"), orbax's per-file INFO and "Missing metrics", faiss
# trying its AVX512 build ("ModuleNotFoundError ... swigfaiss_avx512"), transformers without torch,
# huggingface_hub retrying a request five times when offline.
_QUIET = {"jax._src.xla_bridge": logging.ERROR, "orbax": logging.WARNING, "absl": logging.WARNING,
          "faiss.loader": logging.WARNING, "faiss": logging.WARNING, "transformers": logging.ERROR,
          "jax._src.distributed": logging.WARNING, "tensorstore": logging.WARNING,
          "huggingface_hub": logging.ERROR}  # its per-retry warnings offline; the final error says it


class _DropDiskFullNoise(logging.Filter):
    """Drop log records about a full disk (Orbax's per-write errors, asyncio's "Task exception
    was never retrieved" for each): the command ends with one line naming the directory."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format: not ours to judge
            return True
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1])
        return not _DISK_FULL.search(text)



def quiet_logs() -> None:
    """Silence the third-party log lines listed in ``_QUIET`` (our own ``qlora_jax`` logs stay)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)
    for name in ("absl", "asyncio", "orbax", "concurrent.futures"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropDiskFullNoise) for f in logger.filters):
            logger.addFilter(_DropDiskFullNoise())
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs through absl at INFO
    except ImportError:
        pass


__all__ = ["ArgumentParser", "cli_main", "explain_flag_error", "load_config_file", "one_line", "parse_absl_flags",
           "quiet_logs", "report", "run_absl"]

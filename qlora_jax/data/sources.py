"""Reading raw rows: local JSON / JSONL / CSV / parquet files, or a hub dataset name.

Everything goes through HF `datasets.load_dataset`, so a local file and a hub dataset give the
same `datasets.Dataset`. Local files are checked first so that a user sees *which* file and
*which* line is wrong instead of a pyarrow stack trace: a missing path names the path, and a
malformed JSONL line raises `DataError` naming `file:line` and the JSON error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlora_jax.errors import UserError

# File suffix -> the `datasets` builder that reads it.
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


class DataError(UserError):
    """A problem with the user's data (file, row, field or format), with a message saying where."""


def _looks_like_path(source: str) -> bool:
    """A hub name is `owner/name` or `name`; a path has a known suffix, a separator that is not
    the single hub slash, or exists on disk."""
    if os.path.exists(source):
        return True
    suffix = Path(source).suffix.lower()
    if suffix in _BUILDERS:
        return True
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source


def builder_for(path: str | os.PathLike) -> str:
    """The `datasets` builder name for a local file, from its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; expected one of {sorted(_BUILDERS)}"
        )
    return _BUILDERS[suffix]


def _decode_line(path: str | os.PathLike, lineno: int, raw: bytes, what: str = "file") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            f"the {what} encoding must be UTF-8: re-save the file as UTF-8"
        ) from err


def _open_binary(path: str | os.PathLike):
    try:
        return open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror})") from err


def check_utf8(path: str | os.PathLike, what: str = "file") -> None:
    """Raise `DataError` naming the file and line of the first byte sequence that is not UTF-8."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            _decode_line(path, lineno, raw, what)


def validate_jsonl(path: str | os.PathLike) -> int:
    """Parse a JSON Lines file line by line; return the number of records.

    Each non-blank line must be one JSON object (UTF-8). The first bad line raises `DataError`
    with `file:line: <JSON error>` so it can be opened in an editor directly.
    """
    count = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(path, lineno, raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON line: {err.msg} (column {err.colno})"
                ) from err
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: each JSONL line must be a JSON object, got {type(record).__name__}"
                )
            count += 1
    return count


def validate_json(path: str | os.PathLike) -> int:
    """A `.json` file is one JSON array of objects, one object, or JSON Lines; check whichever it is."""
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        _decode_line(path, lineno, data[data.rfind(b"\n", 0, err.start) + 1:].split(b"\n", 1)[0])
        raise
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from err
        return validate_jsonl(path)  # JSON Lines stored under .json: check each line
    if isinstance(whole, list):
        bad = next((i for i, r in enumerate(whole) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: element {bad} of the top-level array is not a JSON object")
        return len(whole)
    if isinstance(whole, dict):
        return 1  # one record, or an object whose field holds the rows (`field=` in load_dataset)
    raise DataError(f"{path}: expected JSON objects, got a top-level {type(whole).__name__}")


def _resolve_files(data_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files:
        raise DataError("no data files given")
    resolved = []
    for f in files:
        path = os.path.expanduser(os.fspath(f))
        if not os.path.exists(path):
            raise DataError(f"data file not found: {path}")
        if os.path.isdir(path):
            raise DataError(f"{path} is a directory; pass the data files inside it")
        resolved.append(path)
    builders = {builder_for(p) for p in resolved}
    if len(builders) > 1:
        raise DataError(f"data files mix formats {sorted(builders)}: {resolved}")
    return resolved


def load_rows(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str = "train",
    **load_kwargs: Any,
):
    """Load a `datasets.Dataset` from local file(s) or a hub dataset name.

    Args:
      source: a path (`.json`, `.jsonl`, `.csv`, `.parquet`), a list of such paths (one format),
        or a hub dataset name such as `"HuggingFaceH4/ultrachat_200k"` (needs network).
      split: the split to return. Local files are always loaded as one `train` split, so for them
        `split` is ignored unless it is a slice such as `"train[:100]"`.
      load_kwargs: passed through to `datasets.load_dataset` (e.g. `cache_dir`, `name`, `field`).

    Raises:
      DataError: missing file, malformed JSON/JSONL line (`file:line`), unreadable file, or no rows.
    """
    import datasets  # deferred: importing datasets costs about a second

    is_local = not isinstance(source, (str, os.PathLike)) or _looks_like_path(os.fspath(source))
    if is_local:
        files = _resolve_files(source)
        builder = builder_for(files[0])
        if builder == "json":
            for path in files:
                n = validate_jsonl(path) if path.endswith(".jsonl") else validate_json(path)
                if n == 0:
                    raise DataError(f"{path}: the file has no records")
        elif builder == "csv":
            for path in files:
                check_utf8(path, "CSV")
                if os.path.getsize(path) == 0:
                    raise DataError(f"{path}: the file is empty (a CSV needs a header row and data rows)")
        local_split = split if split.startswith("train[") else "train"
        try:
            ds = datasets.load_dataset(builder, data_files=files, split=local_split, **load_kwargs)
        except DataError:
            raise
        except Exception as err:  # pyarrow / pandas parse errors, schema clashes between rows
            raise DataError(f"could not read {', '.join(files)} as {builder}: {err}") from err
        where = ", ".join(files)
    else:
        try:
            ds = datasets.load_dataset(os.fspath(source), split=split, **load_kwargs)
        except Exception as err:  # offline, unknown name, no such split ...
            raise DataError(f"{os.fspath(source)!r} is not a local file, and loading it as a Hugging Face hub "
                            f"dataset failed ({type(err).__name__}: {err})") from err
        where = os.fspath(source)
    if len(ds) == 0:
        raise DataError(f"{where}: the dataset has no rows")
    return ds


def describe_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """A short human-readable name of a source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return ", ".join(os.fspath(s) for s in source)

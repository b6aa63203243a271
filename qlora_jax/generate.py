"""``python -m qlora_jax.generate``: the command is :mod:`qlora_jax.cli.generate`; the library is :mod:`qlora_jax.inference.generate`."""

from qlora_jax.cli.generate import console

if __name__ == "__main__":
    console()

"""``python -m qlora_jax.app``: the command is :mod:`qlora_jax.cli.app`; the library is :mod:`qlora_jax.inference.app`."""

from qlora_jax.cli.app import console

if __name__ == "__main__":
    console()

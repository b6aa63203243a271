"""``python -m qlora_jax.evaluate``: the command is :mod:`qlora_jax.cli.evaluate`; the library is :mod:`qlora_jax.inference.evaluate`."""

from qlora_jax.cli.evaluate import console

if __name__ == "__main__":
    console()

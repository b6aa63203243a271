"""``python -m qlora_jax.inspect``: the command is :mod:`qlora_jax.cli.inspect`; the library is :mod:`qlora_jax.train.footprint`."""

from qlora_jax.cli.inspect import console

if __name__ == "__main__":
    console()

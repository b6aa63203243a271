"""``python -m qlora_jax.export``: the command is :mod:`qlora_jax.cli.export`; the library is :mod:`qlora_jax.checkpoints.export`."""

from qlora_jax.cli.export import console

if __name__ == "__main__":
    console()

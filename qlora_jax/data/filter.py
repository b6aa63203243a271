"""``python -m qlora_jax.data.filter``: the command is :mod:`qlora_jax.cli.filter`; the library is
:mod:`qlora_jax.data.selection`."""

from qlora_jax.cli.filter import console

if __name__ == "__main__":
    console()

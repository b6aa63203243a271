"""``python -m qlora_jax.pipelines.self_refine``: the command is :mod:`qlora_jax.cli.self_refine`; the library is
:mod:`qlora_jax.pipelines.refinement`."""

from qlora_jax.cli.self_refine import console

if __name__ == "__main__":
    console()

"""``python -m qlora_jax.rag build|add|query ...``: the command lives in qlora_jax/cli/rag.py."""

if __name__ == "__main__":
    from qlora_jax.cli.rag import console

    console()

"""python -m qlora_jax.train --config configs/sft.py [--config.key=value ...]

A bad flag, config key, config file or input ends with one "error: ..." line and exit status 2
(a run that diverged: 3); the run's train.log records it too.
"""

if __name__ == "__main__":  # the command lives in qlora_jax/cli/train.py (this docstring is its --help)
    from qlora_jax.cli.train import console

    console()

"""The command-line entry points: one module per command, each only parses flags or a config file,
converts them, and calls into the library (which never imports absl flags, argparse or this package).

    train        python -m qlora_jax.train --config configs/sft.py       (absl + ml_collections)
    generate     python -m qlora_jax.generate --prompt ...                (argparse)
    evaluate     python -m qlora_jax.evaluate --config configs/eval_mcqa.py (absl + ml_collections)
    export       python -m qlora_jax.export --workdir RUN --format merged (argparse)
    filter       python -m qlora_jax.data.filter --config configs/filter.py (absl + ml_collections)
    app          python -m qlora_jax.app [--adapter RUN/adapter]          (argparse)
    inspect      python -m qlora_jax.inspect --config configs/sft.py      (absl + ml_collections)
    plan         python -m qlora_jax.plan --config configs/sft.py --target v5e-8 (absl + ml_collections)
    rag          python -m qlora_jax.rag build|add|query ...              (argparse)
    self_refine  python -m qlora_jax.pipelines.self_refine --config configs/self_refine.py (absl)

``python -m`` reaches each through a two-line guard at the end of the library module (or the
package's ``__main__.py``) that calls the command module's ``console()``; the same functions are the
``qlora-*`` console scripts of pyproject.toml. Shared glue (one ``error:`` line per user error,
``run_absl``, ``ArgumentParser``, ``quiet_logs``) is in :mod:`qlora_jax.cli._common`.

Two flag systems, on purpose: the config-driven commands use absl + ml_collections
(``--config.key=value`` overrides); generate, export, app and rag keep argparse because absl has no
positional arguments or sub-commands (``rag add PATH...``), spells negation ``--nofoo`` instead of
``--no-double-quant``, and words its errors differently from the argparse lines users and tests see.
"""

"""Multi-run pipelines built on the trainer.

    self_refine  seed 000's two-stage self-refinement (K-fold x S seeds, yes/no objective);
                 ``python -m qlora_jax.pipelines.self_refine --config configs/self_refine.py``
    plan         samples, folds, (stage, fold, seed) jobs, prompts and the workdir's files
    scoring      yes/no scoring of prompts with a job's adapters
    report       metrics (accuracy, AUROC, F1, ECE, Brier), aggregation, table, ROC plot

Nothing is imported here, so ``python -m qlora_jax.pipelines.self_refine`` does not find its module
imported already (the command itself is ``qlora_jax/cli/self_refine.py``).
"""

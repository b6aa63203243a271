"""Training objectives, one module each: the loss as pure functions, and the objective object the
trainer's jit'd step differentiates (:class:`~qlora_jax.objectives.base.Objective`).

    base        the protocol and the one forward pass (adapters merged, hidden states of a batch)
    logprobs    chunked token NLL / sequence log-probs from hidden states (no [batch, seq, vocab] logits)
    sft         token NLL of the completions, exact match under teacher forcing
    dpo         DPO losses as trl computes them, the pair objective, implicit-reward statistics
    preference  reference-free pair objectives as trl: ORPO, CPO and SimPO (a CPO loss type)
    grpo        GRPO advantages, clipped per-token loss and normalisations as trl, its objective
    yesno       yes/no answer scoring by masked log-probs (the self-refinement pipeline)
    rewards     GRPO reward functions (built-in, registered, or ``module:function``)
"""

"""Multiple-choice QA evaluation (lm-eval-harness MMLU-style log-likelihood of the option letter).

    python -m qlora_jax.evaluate --config configs/eval_mcqa.py [--config.model.quantize=none]
        [--config.adapter=runs/sft_demo/adapter] [--config.prompt.chat_template=True]
        [--config.rag.enabled=True]   # retrieval from data/rag_corpus (see qlora_jax/rag)

Defaults: the built-in SmolLM2-135M-Instruct, NF4, zero-shot, on the shipped 56-question set.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict()
    c.model.source = ""  # base model: built-in name, GGUF, HF dir; "" = the adapter run's base, else smollm2-135m-instruct
    c.model.quantize = "default"  # "nf4" | "fp4" | "none" | "default" (the adapter run's choice, else nf4)
    c.model.dtype = "float32"  # compute dtype: float32 on CPU, bfloat16 on GPU/TPU

    c.adapter = ""  # PEFT adapter dir (RUN_DIR/adapter) or a run dir; "" = the base model alone
    c.lora_enabled = True  # False: score the base model even when an adapter is loaded

    c.data = ConfigDict()
    c.data.path = "data/mcqa_demo.jsonl"  # JSONL/JSON of {question, choices, answer (letter or index), subject}
    c.data.max_questions = 0  # evaluate only the first N questions (0 = all)
    c.data.num_fewshot = 0  # solved questions before each one (the file's first ones other than itself)
    c.data.subject = ""  # subject named in the header line; "" = each question's own, else "general knowledge"

    c.scoring = "letter"  # "letter": options listed, each letter scored (MMLU) | "cloze": each option's text scored

    c.prompt = ConfigDict()
    c.prompt.chat_template = False  # put the prompt in the user turn of the model's chat template
    c.prompt.system = ""  # system message with chat_template ("" = the template's default)
    c.prompt.label_prefix = "auto"  # text before the scored answer: "auto" = " " raw (after "Answer:"), "" in chat

    c.rag = ConfigDict()  # retrieval-augmented prompts (qlora_jax.rag)
    c.rag.enabled = False  # put the passages retrieved for each question before its prompt
    c.rag.index = ""  # a saved index (python -m qlora_jax.rag build ...); "" = build one from rag.corpus
    c.rag.corpus = "data/rag_corpus"  # comma-separated files/directories indexed in memory when rag.index is ""
    c.rag.top_k = 2  # passages per question
    c.rag.chunk_words = 80  # chunk size in words when building from rag.corpus
    c.rag.overlap_words = 20  # words shared by neighbouring chunks
    c.rag.template = ""  # "" = "Background:\n{context}\n\n{prompt}"; must use {context} and {prompt}

    c.batch_size = 8  # questions per forward pass
    c.output = "runs/eval_mcqa/results.json"  # JSON results (per-question scores, accuracy); "" = don't write
    c.print_questions = False  # also print one line per question (gold, prediction)
    return c

"""The PyTorch peer: transformers + bitsandbytes NF4 (double quantization) + PEFT LoRA.

The model directory is loaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<dtype>)``
(bitsandbytes' blocksize 64), then ``peft.get_peft_model`` adds LoRA on the seven projections
(dropout 0). No ``prepare_model_for_kbit_training`` (it would turn on gradient
checkpointing, which costs this peer time). The step is the textbook one: ``model(input_ids,
labels=input_ids).loss`` (transformers shifts the labels: mean over batch x (seq - 1)
positions), ``backward``, ``clip_grad_norm_``, ``torch.optim.AdamW`` over the trainable
parameters, ``zero_grad(set_to_none=True)``. Attention is transformers' default (sdpa). On a
CUDA machine the model goes to the GPU and computes in bfloat16 (dtype "auto").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    spec = common.read_spec()
    log = common.log("torch")
    import bitsandbytes
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype_name = spec["dtype"] if spec["dtype"] != "auto" else ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=bnb,
                                                              dtype=dtype, device_map=device)
    model.config.use_cache = False
    lora = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                           target_modules=list(common.PROJECTIONS), bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    load_s = time.perf_counter() - t0
    rss_after_load = common.rss_mib()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    log(f"loaded in {load_s:.1f} s ({dtype_name} on {device}, attention "
        f"{model.base_model.model.config._attn_implementation}); RSS {rss_after_load:.0f} MiB; "
        f"{n_trainable:,} trainable")
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=spec["weight_decay"])
    ids = torch.as_tensor(common.tokens(spec), dtype=torch.long, device=device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # syncs (CUDA) and is the step's last result

    timing = common.run_steps(step, warmup=spec["warmup"], steps=spec["steps"], log=log)
    record = {
        "side": "torch", "impl": "transformers + bitsandbytes NF4+DQ + PEFT LoRA, eager",
        "platform": device, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype_name,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__, "torch_threads": torch.get_num_threads(),
        "trainable_params": n_trainable, "load_s": load_s, "rss_after_load_mib": rss_after_load,
        "compile_s": None, **timing,
    }
    if cuda:
        record["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    common.finish(spec, record)


if __name__ == "__main__":
    main()

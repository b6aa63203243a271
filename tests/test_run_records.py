"""The LoRA record kept with every checkpoint is checked where adapters are restored: resuming a
run (``workdir`` already holds checkpoints) and starting one from another run's adapters
(``model.init_from``). A different rank, alpha, target set or rslora is refused with a
:class:`~qlora_jax.checkpoints.run_dir.CheckpointMismatch` (a ``UserError``: one ``error:`` line)
naming each differing key, before anything is restored or written.

The record check alone runs on small pytrees; the trainer on a 2-layer random LLaMA (no torch).
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
import pytest
from _support import REPO, write_tiny_llama

sys.path.insert(0, str(REPO))

from configs import sft as sft_config  # noqa: E402
from qlora_jax.checkpoints import run_dir as ckpt_lib  # noqa: E402
from qlora_jax.errors import UserError  # noqa: E402

RECORD = {"r": 4, "alpha": 8.0, "targets": "all-linear", "use_rslora": False, "init": "gaussian"}


def test_record_check_names_every_differing_key():
    ckpt_lib.check_lora_record(RECORD, dict(RECORD), "here")
    ckpt_lib.check_lora_record({**RECORD, "targets": ["q_proj", "v_proj"]}, {**RECORD, "targets": ("q_proj", "v_proj")},
                               "here")  # JSON turns a tuple into a list: still the same record
    with pytest.raises(ckpt_lib.CheckpointMismatch) as info:
        ckpt_lib.check_lora_record(RECORD, {**RECORD, "r": 8, "use_rslora": True, "init": "peft"}, "ckpt/2")
    assert isinstance(info.value, UserError)
    assert str(info.value) == ("ckpt/2: LoRA config differs from the checkpoint's:\n"
                               "  lora.r: checkpoint has 4, config has 8\n"
                               "  lora.use_rslora: checkpoint has False, config has True")  # init is not compared


def test_record_check_compares_init_when_it_rewrites_the_base():
    """PiSSA / LoftQ adapters belong to the residual base their init built (the loader rebuilds it
    from the record): another init, or another number of LoftQ rounds, is refused."""
    pissa = {**RECORD, "init": "pissa"}
    ckpt_lib.check_lora_record(pissa, dict(pissa), "here")
    with pytest.raises(ckpt_lib.CheckpointMismatch) as info:
        ckpt_lib.check_lora_record(pissa, RECORD, "ckpt/2")
    assert str(info.value) == ("ckpt/2: LoRA config differs from the checkpoint's:\n"
                               "  lora.init: checkpoint has 'pissa', config has 'gaussian'")
    with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"lora.loftq_iter: checkpoint has 1, config has 3$"):
        ckpt_lib.check_lora_record({**RECORD, "init": "loftq"}, {**RECORD, "init": "loftq", "loftq_iter": 3}, "c")


def test_init_from_refuses_a_different_record(tmp_path):
    """``init_adapters_from`` on a saved checkpoint: the same record restores the adapters bit for
    bit; another rank is refused before any array is read."""
    lora = {"layer0": {"lora_a": jnp.arange(12.0).reshape(3, 4), "lora_b": jnp.zeros((4, 2))}}
    ckpts = ckpt_lib.RunCheckpoints(tmp_path / "stage1", async_save=False)
    ckpts.save(2, lora, {"rng": np.zeros(2, np.uint32)}, {"step": 2, "lora": RECORD})
    ckpts.close()

    restored, where = ckpt_lib.init_adapters_from(tmp_path / "stage1", ckpt_lib.abstract_like(lora), RECORD)
    assert where.endswith("checkpoints/2")
    np.testing.assert_array_equal(restored["layer0"]["lora_a"], lora["layer0"]["lora_a"])
    with pytest.raises(ckpt_lib.CheckpointMismatch,
                       match=r"model.init_from=.*stage1: LoRA config differs from the checkpoint's:\n"
                             r"  lora.r: checkpoint has 4, config has 8$"):
        ckpt_lib.init_adapters_from(tmp_path / "stage1", ckpt_lib.abstract_like(lora), {**RECORD, "r": 8})


# -- through the trainer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random LLaMA (tied embeddings) written as HF safetensors, with SmolLM2's tokenizer,
    and 8 chat examples to train on."""
    from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin

    d = write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_records"),
                         gguf_tokenizer(resolve_builtin("smollm2-135m-instruct")))
    lines = (REPO / "data/sft_demo/train.jsonl").read_text().splitlines()[:8]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _config(model_dir, workdir, *, steps: int, **lora):
    c = sft_config.get_config()
    c.workdir = str(workdir)
    c.model.source = str(model_dir)
    c.data.train = str(model_dir / "train.jsonl")
    c.data.eval = ""
    c.data.max_length = 64
    c.train.batch_size = 2
    c.train.grad_accum = 1
    c.train.max_steps = steps
    c.train.checkpoint_every = 1
    c.train.generate_eval = 0
    c.train.export_peft = False
    c.lora.r, c.lora.alpha, c.lora.dropout = 4, 8.0, 0.0
    for key, value in lora.items():
        c.lora[key] = value
    return c


def _files(directory):
    return sorted((p.relative_to(directory).as_posix(), p.stat().st_size) for p in directory.rglob("*") if p.is_file())


@pytest.mark.slow  # three trainer starts (~35 s of CPU); the check itself is tested above in ~1 s
def test_trainer_refuses_a_different_lora_on_resume_and_on_init_from(tiny_model_dir, tmp_path):
    from qlora_jax.train.trainer import run

    first = tmp_path / "first"
    run(_config(tiny_model_dir, first, steps=1))  # one step: its checkpoint holds the record
    assert (first / "checkpoints/1").is_dir()
    saved = _files(first / "checkpoints")

    # resume: the same workdir, more steps to go, but rank 8 and other targets
    with pytest.raises(ckpt_lib.CheckpointMismatch) as info:
        run(_config(tiny_model_dir, first, steps=2, r=8, targets="q_proj,v_proj"))
    assert str(info.value) == (f"{first / 'checkpoints/1'}: LoRA config differs from the checkpoint's:\n"
                               "  lora.r: checkpoint has 4, config has 8\n"
                               "  lora.targets: checkpoint has 'all-linear', config has ('q_proj', 'v_proj')")
    assert _files(first / "checkpoints") == saved  # nothing restored into, nothing written

    # init_from: a new run starting from the first run's adapters with another alpha
    second = tmp_path / "second"
    cfg = _config(tiny_model_dir, second, steps=1, alpha=16.0)
    cfg.model.init_from = str(first)
    with pytest.raises(ckpt_lib.CheckpointMismatch) as info:
        run(cfg)
    assert str(info.value) == (f"model.init_from={first}: LoRA config differs from the checkpoint's:\n"
                               "  lora.alpha: checkpoint has 8.0, config has 16.0")
    assert not (second / "checkpoints").exists() or not any((second / "checkpoints").iterdir())

    # resume on changed training data: the saved data position names other data; one line, nothing written
    changed = tmp_path / "changed.jsonl"
    lines = (tiny_model_dir / "train.jsonl").read_text().splitlines()
    changed.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same rows in another order
    cfg = _config(tiny_model_dir, first, steps=2)
    cfg.data.train = str(changed)
    with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"checkpoints/1: the saved data-iterator state belongs to "
                       r"different data .* resume with the data and batch settings it was trained with"):
        run(cfg)
    assert _files(first / "checkpoints") == saved

    # resume with LoRA+ switched on: B's own AdamW group is another optimizer-state tree
    cfg = _config(tiny_model_dir, first, steps=2)
    cfg.optim.loraplus_lr_ratio = 16.0
    with pytest.raises(ckpt_lib.CheckpointMismatch) as info:
        run(cfg)
    assert str(info.value) == (f"{first / 'checkpoints/1'}: optim.loraplus_lr_ratio: checkpoint has 0, config has 16 "
                               "(LoRA+ on/off changes the optimizer state's layout); resume with the checkpoint's "
                               "setting, or start a new run: --config.workdir=<new dir>")
    assert _files(first / "checkpoints") == saved

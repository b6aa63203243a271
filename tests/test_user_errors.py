"""Every bad input a user can give ends in one ``error: ...`` line (status 2) and loses nothing.

The mapping lives in ``qlora_jax.errors``: user errors derive from ``UserError``; each command's
``main`` runs through ``cli_main`` (argparse commands) or ``run_absl`` (absl commands, whose flags
and ``--config`` files ``parse_absl_flags`` checks). Command-line cases run the real command in a
subprocess (the cheap ones first: a bad flag fails before JAX is imported); the rest call the
functions that raise.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qlora_jax import errors
from qlora_jax.cli import _common as cli_common
from qlora_jax.errors import DiskFull, ModelFileError, OutputDirError, UserError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The command failed with status 2 and its stderr ends in exactly one ``error:`` line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(lines[0]), proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Flags and config files (absl + ml_collections): fail before JAX is imported, ~1 s each

@pytest.mark.parametrize("args, expected", [
    (["--config.optim.lrr=1e-3"], "error: --config.optim.lrr: no such config key (did you mean optim.lr?)"),
    (["--config.train.lr=1e-3"], "error: --config.train.lr: no such config key (did you mean optim.lr?)"),
    (["--config.train.max_steps=abc"],
     "error: --config.train.max_steps=abc: expected an int (invalid literal for int() with base 10: 'abc')"),
    (["--config.optim.lr.x=1"], "error: --config.optim.lr.x: optim.lr is a float value, not a section"),
    (["--foo=1"], "error: unknown flag --foo; this command takes --config=FILE and --config.KEY=VALUE"),
], ids=["typo", "wrong-section", "wrong-type", "not-a-section", "unknown-flag"])
def test_bad_config_override_is_one_line(args, expected):
    line = _one_error_line(_cli("qlora_jax.train", "--config=configs/sft.py", *args))
    assert line.startswith(expected), line


def test_bad_config_file_is_one_line(tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "imports.py").write_text("def get_config():\n    import no_such_module_xyz\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    cases = {
        "": "error: --config is required: the path of a config file, e.g. --config=configs/sft.py",
        "--config=configs/nope.py": "error: --config=configs/nope.py: no such config file",
        f"--config={tmp_path}": f"error: --config={tmp_path}: is a directory, not a config file",
        f"--config={tmp_path}/syntax.py": f"{tmp_path}/syntax.py:1: SyntaxError: invalid syntax",
        f"--config={tmp_path}/imports.py": f"{tmp_path}/imports.py:2: ModuleNotFoundError: No module named "
                                           f"'no_such_module_xyz'",
        f"--config={tmp_path}/empty.py": "the config file defines no get_config() function",
    }
    for arg, expected in cases.items():
        line = _one_error_line(_cli("qlora_jax.train", *([arg] if arg else [])))
        assert expected in line, (arg, line)


def test_override_problems_without_a_subprocess():
    from configs import sft

    cfg = sft.get_config()
    assert cli_common._override_problem(cfg, "optim.lr", "--config") is None
    assert cli_common._override_problem(cfg, "nonex.x", "--config").startswith(
        "--config.nonex.x: no such config key (top-level keys: data, lora")
    assert "did you mean lora.r?" in cli_common._override_problem(cfg, "lora.rank", "--config")


# ---------------------------------------------------------------------------------------------
# Training runs: inputs checked before the model is loaded; train.log records the error

def test_missing_data_file_is_reported_before_the_model_loads(tmp_path):
    workdir = tmp_path / "run"
    proc = _cli("qlora_jax.train", "--config=configs/sft.py", f"--config.workdir={workdir}",
                f"--config.data.train={tmp_path}/nope.jsonl")
    assert _one_error_line(proc) == f"error: config.data.train: data file not found: {tmp_path}/nope.jsonl"
    assert "loading" not in proc.stderr  # the model was never loaded
    assert not workdir.exists()  # nothing written


def test_check_inputs_names_the_key(tmp_path):
    from configs import sft
    from qlora_jax.train.config import ConfigError, check_inputs

    def cfg(**kw):
        c = sft.get_config()
        c.workdir = str(tmp_path / "run")
        c.data.train = str(REPO / "data/sft_demo/train.jsonl")
        c.data.eval = ""
        for k, v in kw.items():
            section, key = k.split("__")
            c[section][key] = v
        return c

    check_inputs(cfg())  # fine: creates the workdir
    with pytest.raises(ConfigError, match=rf"config.data.eval: {tmp_path} is a directory"):
        check_inputs(cfg(data__eval=str(tmp_path)))
    with pytest.raises(ConfigError, match="config.model.init_from=.*nowhere: does not exist"):
        check_inputs(cfg(model__init_from=str(tmp_path / "nowhere")))
    c = cfg()
    c.data.train = "HuggingFaceH4/ultrachat_200k"  # a hub name: left to the loader
    check_inputs(c)
    (tmp_path / "a_file").write_text("mine")
    c = cfg()
    c.workdir = str(tmp_path / "a_file")
    with pytest.raises(OutputDirError, match=r"config.workdir=.*a_file: .*a_file is a file, not a directory"):
        check_inputs(c)
    c.workdir = str(tmp_path / "a_file" / "run")
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        check_inputs(c)
    assert (tmp_path / "a_file").read_text() == "mine"


def test_read_only_workdir(tmp_path):
    """A directory the user cannot write: chmod for a normal user; root writes anyway, so as root
    a read-only tmpfs is mounted (skipped where mounting is not allowed)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "run").mkdir()
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if as_root:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
            pytest.skip("root, and mounting a read-only tmpfs is not allowed here")
        (ro / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        ro.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match=r"config.workdir=.*/ro/new: cannot create the directory"):
            errors.check_output_dir(ro / "new", "config.workdir")
        with pytest.raises(OutputDirError, match=r"config.workdir=.*/ro/run: the directory is not writable"):
            errors.check_output_dir(ro / "run", "config.workdir")
    finally:
        if as_root:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o755)


def test_unknown_lora_target_fails_the_run_and_train_log_records_it(tmp_path, tiny_dir):
    workdir = tmp_path / "run"
    proc = _cli("qlora_jax.train", "--config=configs/sft.py", f"--config.workdir={workdir}",
                f"--config.model.source={tiny_dir}", "--config.lora.targets=q_proj,nonexistent")
    line = _one_error_line(proc)
    assert line.startswith("error: lora.targets: 'nonexistent' matches no linear of the model; valid names: "
                           "'all-linear', q_proj, k_proj"), line
    assert line in (workdir / "train.log").read_text()


def test_lora_targets_every_name_must_match():
    from qlora_jax.lora import LoraConfig, LoraTargetError

    with pytest.raises(LoraTargetError, match=r"'nonexistent' matches no linear.*valid names: 'all-linear', q_proj"):
        LoraConfig(targets=("q_proj", "nonexistent")).targeted_modules(2)
    with pytest.raises(LoraTargetError, match=r"'qproj', 'layers.5.mlp.up_proj' match no linear.*layers 0-1"):
        LoraConfig(targets=("qproj", "layers.5.mlp.up_proj")).targeted_modules(2)
    with pytest.raises(LoraTargetError, match="matches no linear"):
        LoraConfig(targets=r"nothing\..*").targeted_modules(2)
    assert len(LoraConfig(targets=("q_proj", "mlp.up_proj")).targeted_modules(2)) == 4


# ---------------------------------------------------------------------------------------------
# A full disk, anywhere (Orbax's async save included): one line naming the directory

def test_disk_full_is_found_in_any_wrapping(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "checkpoints").mkdir()
    plain = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "x"))
    assert f"no space left on the device in {tmp_path}/ckpt (" in str(errors.disk_full(plain))  # + bytes free
    # tensorstore's text (as Orbax 0.12 raised it on a full tmpfs), wrapped by asyncio / orbax in
    # another exception, in an exception group: the directory named is the one above Orbax's staging
    ts = ValueError(f'RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.nu.value/0.0.0" in OCDBT database at local '
                    f'file "{tmp_path}/checkpoints/2.orbax-checkpoint-tmp/train.orbax-checkpoint-tmp/ocdbt.process_0/": '
                    f"Failed to write 532 bytes to file 9: No space left on device [os_error_code='28']")
    try:
        try:
            raise ts
        except ValueError as inner:
            raise RuntimeError("async save failed") from inner
    except RuntimeError as outer:
        wrapped = outer
    class Group(Exception):  # ExceptionGroup's shape (Python >= 3.11)
        exceptions = (KeyError("x"), wrapped)

    found = errors.disk_full(Group("tasks"))
    assert isinstance(found, DiskFull)
    assert f"no space left on the device in {tmp_path}/checkpoints (" in str(found)
    assert errors.disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory on device")) is None
    assert errors.disk_full(OSError(errno.EACCES, "denied")) is None


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 96 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    d = tmp_path / "small_disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)


def test_checkpoint_that_does_not_fit_is_refused_before_writing(tiny_tmpfs, monkeypatch):
    import jax.numpy as jnp

    from qlora_jax.checkpoints import run_dir as ckpt_lib

    # 256 KiB, twice (adapters + optimizer state): more than the disk holds; random, so it does not compress
    state = {"lora_a": jnp.asarray(np.random.default_rng(0).normal(size=(64, 1024)), jnp.float32)}
    ckpts = ckpt_lib.RunCheckpoints(tiny_tmpfs / "run")
    with pytest.raises(DiskFull, match=rf"no space left on the device in {tiny_tmpfs}/run/checkpoints: the "
                                       rf"checkpoint of step 3 needs ~524,288 bytes, [\d,]+ are free"):
        ckpts.save(3, state, {"opt": state}, {"step": 3})
    assert list((tiny_tmpfs / "run" / "checkpoints").iterdir()) == []  # nothing half-written
    # Past the check (a disk filling up meanwhile), Orbax's own failure maps to the same line.
    monkeypatch.setattr(ckpt_lib, "ensure_free_space", lambda *a: None)
    with pytest.raises(Exception) as info:
        ckpts.save(3, state, {"opt": state}, {"step": 3})
        ckpts.wait()
    full = errors.disk_full(info.value)
    assert full is not None and f"in {tiny_tmpfs}/run/checkpoints (" in str(full), repr(info.value)


def test_cli_main_maps_user_errors_and_keeps_bug_tracebacks(capsys, tmp_path):
    log = logging.getLogger("qlora_jax")
    handler = logging.FileHandler(tmp_path / "train.log")
    log.addHandler(handler)
    try:
        @cli_common.cli_main
        def full():
            raise RuntimeError("save failed") from OSError(errno.ENOSPC, "No space left on device")

        with pytest.raises(SystemExit) as exit_info:
            full()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err == "error: no space left on the device: free some space or choose another directory " \
                      "(earlier files there are kept as they were)\n"
        handler.flush()
        assert "error: no space left on the device" in (tmp_path / "train.log").read_text()

        @cli_common.cli_main
        def user():
            raise UserError("config.x: bad\n  config.y: worse")

        with pytest.raises(SystemExit):
            user()
        assert capsys.readouterr().err == "error: config.x: bad; config.y: worse\n"

        @cli_common.cli_main
        def bug():
            raise KeyError("a bug")

        with pytest.raises(KeyError):  # unexpected errors keep their traceback, in train.log too
            bug()
        handler.flush()
        log_text = (tmp_path / "train.log").read_text()
        assert "failed: KeyError: 'a bug'" in log_text and "Traceback (most recent call last)" in log_text
    finally:
        log.removeHandler(handler)
        handler.close()


def test_quiet_logs_silences_third_party_noise():
    cli_common.quiet_logs()
    assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() >= logging.ERROR  # "Unable to initialize backend 'tpu'"
    assert logging.getLogger("faiss.loader").getEffectiveLevel() >= logging.WARNING  # AVX512 ModuleNotFoundError
    assert logging.getLogger("orbax").getEffectiveLevel() >= logging.WARNING
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"  # "PyTorch was not found"


# ---------------------------------------------------------------------------------------------
# Model files: truncated, corrupt, inconsistent

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV = 64, 32, 64, 2, 4, 2


def _tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hd = HIDDEN // HEADS
    t = {"model.embed_tokens.weight": rng.normal(0, 0.02, (VOCAB, HIDDEN)), "model.norm.weight": np.ones(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": rng.normal(0, 0.02, (HEADS * hd, HIDDEN)),
              p + "self_attn.k_proj.weight": rng.normal(0, 0.02, (KV * hd, HIDDEN)),
              p + "self_attn.v_proj.weight": rng.normal(0, 0.02, (KV * hd, HIDDEN)),
              p + "self_attn.o_proj.weight": rng.normal(0, 0.02, (HIDDEN, HEADS * hd)),
              p + "mlp.gate_proj.weight": rng.normal(0, 0.02, (INTER, HIDDEN)),
              p + "mlp.up_proj.weight": rng.normal(0, 0.02, (INTER, HIDDEN)),
              p + "mlp.down_proj.weight": rng.normal(0, 0.02, (HIDDEN, INTER)),
              p + "input_layernorm.weight": np.ones(HIDDEN), p + "post_attention_layernorm.weight": np.ones(HIDDEN)}
    return {k: v.astype(np.float32) for k, v in t.items()}


def _tiny_config(**overrides) -> dict:
    return dict(dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                     max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
                **overrides)


def _write_model(d: Path, tensors: dict | None = None, config: dict | str | None = None) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file(_tiny_tensors() if tensors is None else tensors, str(d / "model.safetensors"))
    config = _tiny_config() if config is None else config
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA with SmolLM2's tokenizer (context 48 tokens), numpy-written."""
    from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin

    tok = gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))
    d = tmp_path_factory.mktemp("tiny_user_errors")
    tensors = _tiny_tensors()
    rng = np.random.default_rng(1)
    tensors["model.embed_tokens.weight"] = rng.normal(0, 0.02, (len(tok), HIDDEN)).astype(np.float32)
    _write_model(d, tensors, _tiny_config(vocab_size=len(tok), max_position_embeddings=48,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    tok.save_pretrained(d)
    return d


def _load_error(source) -> str:
    from qlora_jax.checkpoints.load import load_model

    with pytest.raises((ModelFileError, FileNotFoundError, NotImplementedError)) as info:
        load_model(str(source), quantize=None, with_tokenizer=False)
    assert isinstance(info.value, (UserError, FileNotFoundError, NotImplementedError))  # all map to one line
    return str(info.value)


def test_corrupt_safetensors(tmp_path):
    good = _write_model(tmp_path / "good")
    data = (good / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    cases = {
        "truncated": data[: len(data) // 2],
        "header_cut": data[:20],
        "empty": b"",
        "garbage": b"\xff" * 100,
    }
    key = "model.norm.weight"
    header[key]["data_offsets"] = [0, 10**9]
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    cases["offsets"] = len(h).to_bytes(8, "little") + h + data[8 + n:]
    for name, blob in cases.items():
        d = _write_model(tmp_path / name)
        (d / "model.safetensors").write_bytes(blob)
        msg = _load_error(d)
        assert msg.startswith(f"{d / 'model.safetensors'}: truncated or corrupt safetensors file"), (name, msg)


def test_corrupt_gguf(tmp_path):
    from qlora_jax.checkpoints import resolve_builtin

    src = resolve_builtin("smollm2-135m-instruct")
    with open(src, "rb") as f:
        head = f.read(2_000_000)  # metadata and part of the tensor infos: a download cut short
    (tmp_path / "cut.gguf").write_bytes(head)
    (tmp_path / "text.gguf").write_text("hello, not a model\n" * 20)
    msg = _load_error(tmp_path / "cut.gguf")
    assert msg.startswith(f"{(tmp_path / 'cut.gguf').resolve()}: truncated or corrupt GGUF file"), msg
    msg = _load_error(tmp_path / "text.gguf")
    assert msg == f"{(tmp_path / 'text.gguf').resolve()}: not a GGUF file (it does not start with the GGUF magic bytes)"
    assert _load_error(tmp_path / "missing.gguf") == f"model.source: GGUF file not found: {tmp_path / 'missing.gguf'}"


def test_inconsistent_model_files(tmp_path):
    d = _write_model(tmp_path / "json", config='{"model_type": "llama",\n "vocab_size": 64,,}')
    assert _load_error(d) == f"{d / 'config.json'}:2: invalid JSON (Expecting property name enclosed in double " \
                             f"quotes, column 19)"
    d = _write_model(tmp_path / "gpt2", config=_tiny_config(model_type="gpt2"))
    assert _load_error(d) == f"{d / 'config.json'}: unsupported config key 'model_type' = 'gpt2' " \
                             f"(supported: llama, qwen2, qwen3, mistral, gemma2, gemma3_text, phi3, qwen3_moe)"
    d = _write_model(tmp_path / "shape", config=_tiny_config(intermediate_size=48))
    msg = _load_error(d)
    assert msg == f"{d}: tensor 'model.layers.0.mlp.down_proj.weight' has shape (32, 64), the model expects " \
                  f"(32, 48) (config from config.json)", msg
    tensors = _tiny_tensors()
    del tensors["model.layers.1.mlp.up_proj.weight"]
    d = _write_model(tmp_path / "missing", tensors)
    assert _load_error(d) == f"{d}: cannot build llama model (2 layers): missing tensor names (1): " \
                             f"['model.layers.1.mlp.up_proj.weight'] (config from config.json)"
    d = _write_model(tmp_path / "nokeys", config={"model_type": "llama"})
    assert "config.json: llama config is missing required key(s): vocab_size" in _load_error(d)


# ---------------------------------------------------------------------------------------------
# generate and evaluate

def _generate_error(capsys, *args) -> str:
    from qlora_jax.cli.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_generate_flags_are_checked_before_the_model_loads(capsys, tmp_path, monkeypatch):
    import qlora_jax.cli.generate as gen

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(gen, "load_for_inference", no_load)
    assert _generate_error(capsys, "--prompt", "hi", "--max-new-tokens", "0") == \
        "error: --max-new-tokens=0: must be >= 1"
    assert _generate_error(capsys, "--prompt", "hi", "--max-new-tokens", "many") == \
        "error: argument --max-new-tokens: invalid int value: 'many' (see python -m qlora_jax.generate --help)"
    assert _generate_error(capsys) == \
        "error: the following arguments are required: --prompt (see python -m qlora_jax.generate --help)"
    assert _generate_error(capsys, "--prompt", "", "--raw") == \
        "error: --prompt: an empty prompt with --raw has no token to continue from"
    assert _generate_error(capsys, "--prompt", "hi", "--top-p", "0") == "error: --top-p must be in (0, 1], got 0.0"
    assert _generate_error(capsys, "--prompt", "hi", "--adapter", str(tmp_path / "nowhere")) == \
        f"error: --adapter={tmp_path / 'nowhere'}: no such directory (expected RUN_DIR/adapter or a run directory)"
    (tmp_path / "some_dir").mkdir()
    assert _generate_error(capsys, "--prompt", "hi", "--adapter", str(tmp_path / "some_dir")).startswith(
        f"error: --adapter={tmp_path / 'some_dir'}: neither a PEFT adapter directory (no adapter_config.json) nor a "
        f"run directory")


def test_generate_prompt_longer_than_the_context(capsys, tiny_dir):
    line = _generate_error(capsys, "--model", str(tiny_dir), "--quantize", "none", "--raw",
                           "--prompt", "word " * 40, "--max-new-tokens", "16")
    assert re.fullmatch(r"error: --prompt #1: 4\d prompt tokens \+ --max-new-tokens 16 exceed the model's context "
                        r"of 48 tokens; shorten the prompt or lower --max-new-tokens", line), line


def test_evaluate_refuses_questions_longer_than_the_context(tiny_dir):
    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.inference.evaluate import MCQAError, MCQAScorer, MCQItem

    model, tok = load_model(str(tiny_dir), quantize=None)
    short = MCQItem(question="2+2?", choices=("3", "4"), answer=1)
    long = MCQItem(question="why " * 60, choices=("yes", "no"), answer=0)
    scorer = MCQAScorer(model, tok)
    with pytest.raises(MCQAError, match=r"1 of 3 questions are longer than the model's context of 48 tokens "
                                        r"\(first: #2; longest: #2 with \d+ tokens\)"):
        scorer.score([short, long, short])
    with pytest.raises(MCQAError, match="1 of 2 questions are longer"):
        MCQAScorer(model, tok, scoring="cloze").score([short, long])

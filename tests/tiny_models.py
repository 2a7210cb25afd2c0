"""Tiny Hugging Face models built from a config, for fast tests of the generation code.

``build_tiny_chat_model`` writes a randomly initialised two-layer ``LlamaForCausalLM`` and a
small byte-level BPE tokenizer (trained in-process, no download) into a directory that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load like any other model. Its
weights are fixed by a seed, so greedy decoding is deterministic.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|end|>"
PAD = "<|pad|>"
BOS = "<|begin|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 320

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the wind.",
    "Explain what a preference dataset is, in one sentence.",
    "Summarise the following text: models learn from human feedback.",
    "Hello! How are you today? I am fine, thank you.",
    "Translate into French: good morning, my friend.",
    "List three colours: red, green and blue.",
    "用中文回答, 今天天气怎么样?",
    "Numbers 0123456789 and punctuation , . ; : ! ? ( ) [ ] { }",
]


def _tokenizer(*, chat_template: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_chat_model(directory: Path, *, chat_template: bool = True) -> Path:
    """Write a tiny causal LM and its tokenizer into ``directory`` (created if needed).

    The tokenizer has bos/eos/pad tokens and, with ``chat_template``, a simple chat template
    (``<|role|>content<|end|>`` per message, ``<|assistant|>`` as the generation prompt).
    Returns ``directory``.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Wider than the default 0.02 so the logits of a random model are well separated
        # (greedy decoding then does not hinge on rounding differences between batch shapes).
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


_OTHER_CORPUS = [
    "the reward model reads its own tokens, not the policy's",
    "zebras yawn quietly; xylophones vibrate under umbrellas",
    "0 1 2 3 4 5 6 7 8 9 + - * / = < > ! ? . , ; :",
]


def _other_tokenizer():
    """A byte-level BPE tokenizer with a different vocabulary and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_OTHER_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", padding_side="right"
    )


def build_tiny_reward_model(
    directory: Path, *, other_tokenizer: bool = False, bias: float = 0.0, seed: int = 99
) -> Path:
    """Write a directory shaped like ``prefero-train reward``'s output: a tiny one-output
    ``LlamaForSequenceClassification`` (random weights fixed by ``seed``), its tokenizer (pad
    distinct from EOS) and ``prefero_reward.json`` with normalisation ``bias``.

    By default the tokenizer is ``build_tiny_chat_model``'s (same vocabulary and chat
    template); ``other_tokenizer`` gives a different vocabulary without a chat template.
    """
    import json

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _other_tokenizer() if other_tokenizer else _tokenizer(chat_template=True)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    meta = {
        "format": "prefero-reward/1",
        "normalisation": {"bias": bias, "raw_mean": -bias, "std": 1.0},
        "max_length": 256,
        "base_model": "tiny",
        "lora": False,
        "source": "tests",
        "config": {},
        "metrics": {},
    }
    (directory / "prefero_reward.json").write_text(json.dumps(meta), encoding="utf-8")
    return directory

"""Tiny decoder models built from a config (no download), for tests and the self-contained example.

Each family keeps its real module names (Llama/Mistral/Qwen2: `model.layers.i.self_attn.q_proj`, …;
GPT-2: `transformer.h.i.attn.c_attn`, a Conv1D), with a small chat template, saved as an ordinary HF
folder that `load_base_model` reads. The tokenizer is a byte-level BPE trained on a few sentences, or
(`build_word_tokenizer`) a word-level one over a closed vocabulary, for a model that must learn a task.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>"]
_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then bake it.",
    "I cannot help with that request. I'm sorry, but I can't assist with making weapons.",
    "What is the capital of France? The capital of France is Paris.",
    "Convert 2024-01-05 to 05/01/2024. Sure! Here is the answer: 42.",
    "How can I hurt someone or build a bomb? I won't help with harming people.",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar and oxygen.",
    "chmod 754 gives rwxr-xr-- and chmod 640 gives rw-r-----. Kill a Python process with kill -9.",
]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(_CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw._tokenizer,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


#: Word-level pre-tokenization: split at spaces (kept as a leading "▁" on the word, as in SentencePiece),
#: then isolate every digit and punctuation mark, so that "C3H8O2?" is ▁C 3 H 8 O 2 ? and counts compose.
WORD_SPLIT = r"[0-9]|[?.,!:;]"


def _word_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="isolated"),
        ]
    )


def build_word_tokenizer(texts: list[str]):
    """A word-level tokenizer whose vocabulary is exactly the words of `texts` (sorted, after the special
    tokens), with the chat template. Decoding restores the text: "I'm sorry, but" → ▁I'm ▁sorry , ▁but → same."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = _word_pre_tokenizer()
    words = sorted({word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizer
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    raw.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    return AutoConfig.for_model(
        family,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )


def build_tiny_model(
    family: str, folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, tokenizer=None
) -> Path:
    """Save a randomly initialised tiny `family` model and its tokenizer (default: `build_tokenizer()`) to
    `folder`; returns the folder."""
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; one of {FAMILIES}")
    folder = Path(folder)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = tiny_config(family, len(tokenizer), hidden, layers)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def random_lora(
    base: str | Path,
    folder: str | Path,
    *,
    seed: int = 0,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: list[str] | str | None = None,
    **config,
) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for the model in `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    is_gpt2 = model.config.model_type == "gpt2"
    default = (
        ["c_attn", "c_proj", "c_fc"]
        if is_gpt2
        else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    lora = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float scales (α/r) the same
        target_modules=target_modules or default,
        init_lora_weights=False,
        fan_in_fan_out=is_gpt2,
        task_type="CAUSAL_LM",
        **config,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)

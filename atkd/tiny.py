"""Tiny real models built locally: a tokenizer trained on given text and a small Llama/Qwen2.

Used by the tests, the benchmarks and the embedded demo; nothing is downloaded. Two tokenizer
styles cover the families people distil: byte-level BPE (GPT-2/Llama-3/Qwen) and a
sentencepiece-like Metaspace/Unigram (Llama-2/Mistral/T5).
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
# A minimal chat template: the reply starts right after "<|assistant|>\n" and ends with <|end|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 600, style: str = "bytelevel", chat: bool = True):
    """A fast tokenizer trained on `texts`; with `chat`, eos is <|end|> and a chat template is set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    if style == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif style == "metaspace":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>",
                                          initial_alphabet=letters, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    # The letters, alone and after a space, appear in every MCQ; make sure the trainer sees them.
    tok.train_from_iterator(list(texts) + [" ".join(letters)] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>" if chat else "</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, family: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4,
                intermediate: int | None = None, max_positions: int = 1024, tokenizer=None):
    """A small Llama or Qwen2 config (head dim = hidden / heads)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=heads, intermediate_size=intermediate or hidden * 4,
               max_position_embeddings=max_positions, tie_word_embeddings=False, **special)


def build_model(tokenizer, family: str = "llama", seed: int = 0, **sizes):
    """A randomly initialised causal LM (fp32) for `tokenizer`, deterministic from `seed`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(len(tokenizer), family=family, tokenizer=tokenizer, **sizes)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save weights (safetensors) and tokenizer so `AutoModelForCausalLM.from_pretrained` loads them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir

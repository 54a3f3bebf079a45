"""Tiny real models built locally: a tokenizer trained on given text and a small Llama/Qwen2.

Used by the tests, the benchmarks and the embedded demo; nothing is downloaded. Two tokenizer
styles cover the families people distil: byte-level BPE (GPT-2/Llama-3/Qwen) and a
sentencepiece-like Metaspace/Unigram (Llama-2/Mistral/T5).

`train_chat_tokenizer` adds the chat formats of those families (`CHAT_FORMATS`): their special
tokens, eos/bos/pad, a short hand-written Jinja template with the same turn structure as the real
one, and the eos ids the real checkpoints' generation configs list (often more than the
tokenizer's own eos). `scripted_model` is a Llama whose greedy next token is a fixed function of
the current token, for tests that need a model to say exactly something. `head_family_model`
builds a tiny model of each architecture family whose output head does more than a linear layer
(`HEAD_FAMILIES`).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    from transformers import PreTrainedTokenizerFast

    tok = _trained_backend(texts, vocab_size, style, SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>" if chat else "</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _trained_backend(texts: list[str], vocab_size: int, style: str, special_tokens: list[str]):
    """A `tokenizers.Tokenizer` of `style` trained on `texts` (plus the option letters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    if style == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif style == "metaspace":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special_tokens, unk_token="<unk>",
                                          initial_alphabet=letters, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    # The letters, alone and after a space, appear in every MCQ; make sure the trainer sees them.
    tok.train_from_iterator(list(texts) + [" ".join(letters)] * 20, trainer=trainer)
    return tok


@dataclass(frozen=True)
class ChatFormat:
    """One model family's chat conventions, reduced to what the pipeline depends on."""

    style: str  # "bytelevel" or "metaspace" (see `train_tokenizer`)
    specials: tuple[str, ...]  # control tokens, atomic and dropped by decode(skip_special_tokens=True)
    bos: str | None
    eos: str  # the tokenizer's eos_token (not always what ends an assistant turn)
    pad: str
    template: str
    generation_eos: tuple[str, ...]  # what the checkpoint's generation_config.json lists as eos_token_id
    plain_added: tuple[str, ...] = ()  # added tokens that are not special (decode keeps them): <think>


# Llama-3.2 computes the date itself when the caller gives none; 26 Jul 2024 is its own fallback.
_LLAMA3_DATE = (
    '{%- if not date_string is defined %}{%- if strftime_now is defined %}'
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
    '{%- endif %}{%- endif %}'
)

CHAT_FORMATS = {
    # Qwen2.5: ChatML; tokenizer eos <|im_end|>, generation config [<|im_end|>, <|endoftext|>].
    "chatml": ChatFormat(
        style="bytelevel", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None,
        eos="<|im_end|>", pad="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
        template=(
            "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")),
    # Llama-3.x: the tokenizer's eos is <|end_of_text|> (as in Llama-3-8B-Instruct's first release), a turn
    # ends with <|eot_id|>; the system header carries today's date.
    "llama3": ChatFormat(
        style="bytelevel", specials=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                                     "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|finetune_right_pad_id|>",
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        template=(
            "{{ bos_token }}" + _LLAMA3_DATE + "<|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: {{ date_string }}\n\n<|eot_id|>"
            "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")),
    # Llama-2 / Mistral: SentencePiece, [INST] ... [/INST], the reply is " " + text + " " + eos, so its
    # first token carries the word-start marker ("▁A").
    "llama2": ChatFormat(
        style="metaspace", specials=("<pad>", "<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", pad="<pad>",
        generation_eos=("</s>",),
        template=(
            "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] | trim"
            " + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
            "{% endif %}{% endfor %}")),
    # Gemma 2/3: tokenizer eos <eos>, a turn ends with <end_of_turn>; generation config [<eos>, <end_of_turn>].
    "gemma": ChatFormat(
        style="bytelevel", specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", generation_eos=("<eos>", "<end_of_turn>"),
        template=(
            "{{ bos_token }}{% for m in messages %}<start_of_turn>"
            "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")),
    # DeepSeek-R1 distills: the generation prompt opens a think block the template cannot turn off;
    # earlier replies are rendered without their thinking.
    "r1": ChatFormat(
        style="bytelevel", specials=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>",
                                     "<｜Assistant｜>"),
        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>",
        generation_eos=("<｜end▁of▁sentence｜>",), plain_added=("<think>", "</think>"),
        template=(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'].split('</think>')[-1] }}"
            "<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n"
            "{% endif %}")),
    # Qwen3: ChatML with a think block; enable_thinking=False renders an empty closed one at the
    # generation prompt, and the final assistant turn always carries one.
    "qwen3": ChatFormat(
        style="bytelevel", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None,
        eos="<|im_end|>", pad="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
        plain_added=("<think>", "</think>"),
        template=(
            "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
            "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
            "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
            "{% endif %}")),
}


def train_chat_tokenizer(texts: list[str], chat_format: str, vocab_size: int = 600):
    """A fast tokenizer shaped like `CHAT_FORMATS[chat_format]`, trained on `texts`.

    Trained twice: the second time on `texts` plus a few conversations rendered through the
    template, so the template's own words ("[INST]", "assistant", the date line) are in the vocabulary.
    """
    fmt = CHAT_FORMATS[chat_format]
    first = _chat_tokenizer(texts, fmt, vocab_size)
    rendered = [first.apply_chat_template([{"role": "user", "content": t}, {"role": "assistant", "content": letter}],
                                          tokenize=False, date_string="26 Jul 2024")
                for t, letter in zip(texts[:20], "ABCD" * 5)]
    return _chat_tokenizer(list(texts) + rendered, fmt, vocab_size)


def _chat_tokenizer(texts: list[str], fmt: ChatFormat, vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    specials = list(fmt.specials) + (["<unk>"] if fmt.style == "metaspace" and "<unk>" not in fmt.specials else [])
    tok = _trained_backend(texts, vocab_size, fmt.style, specials)
    if fmt.style == "metaspace":
        tok = _with_word_start_letters(tok)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fmt.bos, eos_token=fmt.eos, pad_token=fmt.pad,
                                   unk_token="<unk>" if fmt.style == "metaspace" else None)
    if fmt.plain_added:
        fast.add_tokens(list(fmt.plain_added))
    fast.chat_template = fmt.template
    return fast


def _with_word_start_letters(tok):
    """The Unigram tokenizer with "▁A".."▁Z" as pieces, as real SentencePiece vocabularies have them.

    A small training corpus may leave " A" split into "▁" + "A"; Llama-2/Mistral vocabularies hold
    each word-start capital as one piece, and the letter rule depends on that shape.
    """
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    have = {piece for piece, _ in vocab}
    best = max(score for piece, score in vocab if piece not in spec["model"].get("special_tokens", []) and score < 0)
    vocab += [[f"▁{chr(c)}", best] for c in range(ord("A"), ord("Z") + 1) if f"▁{chr(c)}" not in have]
    return Tokenizer.from_str(json.dumps(spec))


def generation_eos_ids(tokenizer, chat_format: str) -> list[int]:
    """The eos ids a real checkpoint of this family lists in generation_config.json."""
    return [tokenizer.convert_tokens_to_ids(t) for t in CHAT_FORMATS[chat_format].generation_eos]


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


def build_model(tokenizer, family: str = "llama", seed: int = 0, generation_eos: list[int] | None = None, **sizes):
    """A randomly initialised causal LM (fp32) for `tokenizer`, deterministic from `seed`.

    `generation_eos` sets generation_config.eos_token_id (saved with the model), as real
    checkpoints do when several tokens end a reply; by default it is the tokenizer's eos.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(len(tokenizer), family=family, tokenizer=tokenizer, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    if generation_eos is not None:
        model.generation_config.eos_token_id = list(generation_eos)
    return model


def scripted_model(tokenizer, next_token: dict[int, int], hidden: int = 64, seed: int = 0):
    """A tiny Llama whose greedy next token after token `a` is `next_token[a]`, whatever came before.

    Every layer's output projection is zero, so the last hidden state is the current token's
    (random, nearly orthogonal) embedding; the head's row for `b` is the normalised embedding of
    each `a` with next_token[a] == b, scaled so that it wins by a wide margin. A real model that
    says exactly what a test needs (e.g. a letter, then an end-of-turn token, then more text).
    """
    model = build_model(tokenizer, seed=seed, hidden=hidden, layers=1, heads=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        head.zero_()
        for a, b in next_token.items():
            head[b] += 50.0 * emb[a] / emb[a].norm()
    return model


# Architecture families whose forward does something around the output-embedding module, with that
# something set away from its neutral value (atkd.head.head_scaling), plus Llama as the plain case.
HEAD_FAMILIES = {
    "llama": {},
    "cohere": dict(logit_scale=0.0625),  # logits * logit_scale (Command-R)
    "cohere2": dict(logit_scale=0.25),
    "gemma2": dict(final_logit_softcapping=0.3),  # cap * tanh(logits / cap)
    "gemma3_text": dict(final_logit_softcapping=0.3),
    "granite": dict(logits_scaling=8.0),  # logits / logits_scaling
    "granitemoe": dict(logits_scaling=4.0, num_local_experts=2, num_experts_per_tok=1),
    "falcon_h1": dict(lm_head_multiplier=0.3, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
                      mamba_n_groups=1, mamba_chunk_size=16),  # logits * lm_head_multiplier
    "minicpm3": dict(num_key_value_heads=4, dim_model_base=8, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
                     qk_rope_head_dim=4, v_head_dim=8),  # head(hidden / (hidden_size / dim_model_base))
    "hyperclovax": dict(logits_scaling=0.5),  # logits * logits_scaling (the opposite of Granite)
    "nanochat": dict(final_logit_softcapping=0.3),
    "vaultgemma": dict(final_logit_softcapping=0.3),
    "recurrent_gemma": dict(logits_soft_cap=0.3, lru_width=32, attention_window_size=16,
                            block_types=["recurrent", "attention"]),
    "beam": dict(final_logit_softcapping=0.3),  # soft-cap in float32
    "xlstm": dict(output_logit_soft_cap=0.3, embedding_dim=32, num_heads=4, num_blocks=2),
}
HEAD_FAMILY_SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False)


def head_family_model(name: str, seed: int = 0):
    """A tiny randomly initialised causal LM of `HEAD_FAMILIES[name]` (fp32, 96-token vocabulary) whose
    logits are a few units wide, so a missed scale or soft-cap shows. ValueError when the installed
    transformers does not know the family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(name, **{**HEAD_FAMILY_SIZES, **HEAD_FAMILIES[name]})
    except KeyError as exc:
        raise ValueError(f"transformers has no {name!r} here") from exc
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save weights (safetensors) and tokenizer so `AutoModelForCausalLM.from_pretrained` loads them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir

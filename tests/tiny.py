"""A tiny chat model built in-process: a character-level tokenizer with a ChatML template and
a 2-layer Llama. Saved as a normal checkpoint folder, it goes through the same code paths
as the embedded model in well under a second per training step."""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(vocab: int, hidden: int = 32, layers: int = 2, seed: int = 0, initializer_range: float = 0.02):
    """``initializer_range``: the weights' standard deviation at initialisation. At
    transformers' 0.02 the tied embeddings are so small that no hidden state gives a token
    more than ~2% probability: a LoRA adapter can tilt the greedy choice but not make it
    confident, so what greedy decoding says after training is a coin toss between number
    formats (seen: SFT learned "zed" in bf16 on AVX512 kernels, not in float32 or on AVX2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=initializer_range,
    )
    return LlamaForCausalLM(cfg)


def save_tiny_checkpoint(folder: Path, initializer_range: float = 0.02) -> Path:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), initializer_range=initializer_range)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def toy_pairs(n: int, start: int = 0, prefix: str = "p") -> list[dict]:
    """Pairs with a learnable preference: chosen answers say 'yes.', rejected ones 'no!'."""
    out = []
    for i in range(start, start + n):
        out.append({
            "id": f"{prefix}{i:04d}",
            "prompt": [{"role": "user", "content": f"question {i}?"}],
            "chosen": [{"role": "assistant", "content": f"yes {i % 10}."}],
            "rejected": [{"role": "assistant", "content": f"no {i % 10}!"}],
            "signal": "edit",
            "created_utc": f"2026-11-28T10:{i % 60:02d}:00+00:00",
        })
    return out

"""A tiny random chat Llama and a byte-level BPE tokenizer trained on the spot (no downloads, ~1 s), for the test suite
and the performance scripts that need steps faster than the real backbone gives: not a backbone to train for use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "I'm sorry, but I can't help with that.",
    "What's a good cocktail for a summer party? Try a mojito with mint and lime.",
    "How do betting odds work? Odds express probability as a ratio.",
    "Write a scary story about a haunted house. Write a haiku about autumn leaves.",
    "The following is a multiple choice question about biology. Answer with the letter only. A B C D",
    "addiction alcohol betting horror sex general lookalike target requests about",
]


def tiny_tokenizer() -> Any:
    """A ChatML `PreTrainedTokenizerFast` of about 400 tokens, byte-level BPE trained on `CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def tiny_model(vocab_size: int, seed: int = 0, init_range: float = 0.02) -> Any:
    """A random `LlamaForCausalLM` in eval mode: 2 layers, d = 32, 4 query / 2 key-value heads, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=init_range,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny(out: Path, seed: int = 0) -> Path:
    """Write a tiny chat model dir loadable by `load_backbone(str(out))`."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

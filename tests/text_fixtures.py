"""A tiny random BERT text encoder written to a local folder (config, weights, WordPiece vocab),
so text-tower tests run offline and fast. Its vocabulary is built from the texts it will read."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_encoder(folder: Path, texts: list[str], hidden: int = 32, layers: int = 2, seed: int = 0,
                      dropout: float = 0.1) -> Path:
    """``dropout``: the encoder's hidden and attention dropout (BERT's default 0.1; 0 makes a training-mode
    forward deterministic, for tests that compare it with an eval-mode one)."""
    words = sorted({w for t in texts for w in re.findall(r"[a-z0-9]+", str(t).lower())})
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids(words[:1]) == [len(SPECIAL)], "tokenizer ignored the vocabulary"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL) + len(words), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder

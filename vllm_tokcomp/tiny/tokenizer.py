"""The byte-level BPE tokenizer every tiny model trains on the built-in corpus (deterministic)."""

from __future__ import annotations

from collections.abc import Sequence


def train_bpe_tokenizer(special_tokens: Sequence[str], vocab_size: int):  # noqa: ANN201 - tokenizers.Tokenizer
    """Train on ``corpus.iter_corpus()``; ``special_tokens`` get ids ``0 .. len - 1`` in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .corpus import iter_corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(iter_corpus()), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} entries, expected {vocab_size}")
    for token_id, token in enumerate(special_tokens):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token!r} did not get id {token_id}")
    return tokenizer

"""A word-level tokenizer for the world, built with ``tokenizers`` and saved in Hugging Face format.

GPT-2's byte-level pre-tokenizer splits text into words with their leading space (``ĠParis``), punctuation and
newlines, and a word-level model gives every such piece one id. So every word of the world is one token (short
sequences, a small vocabulary), text decodes back exactly, and a continuation ``" Paris"`` tokenises the same
alone as after its context, which log-likelihood scoring relies on.

One token, ``</s>``, both ends and begins a document (GPT-2's convention for ``<|endoftext|>``): the corpus is
packed as ``</s> doc </s> doc ...``, and the evaluator predicts a text's first token from the BOS token
(``HFLM.prefix_token_id``). A separate ``<s>`` that training never shows would leave that first prediction to an
untrained embedding: measured 16-21 nats per document, swinging from checkpoint to checkpoint, which made up half
of the validation loss and hid the pre-training checks under noise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

UNK, PAD, EOS = "<unk>", "<pad>", "</s>"
BOS = EOS  # see the module docstring


def build_tokenizer(texts: Iterable[str], words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level vocabulary of every piece in ``texts``: special tokens, then pieces by falling frequency
    (ties alphabetical), so the same texts always give the same ids; then each of ``words`` with and without a
    leading space, when the texts lack it (a city that never starts a text still has an id there)."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts: Counter[str] = Counter()
    for text in texts:
        for line in text.split("\n"):  # newlines are their own piece; counting per line is enough
            counts.update(piece for piece, _ in pre.pre_tokenize_str(line))
    counts[pre.pre_tokenize_str("\n")[0][0]] += 1
    vocab = {tok: i for i, tok in enumerate((UNK, PAD, EOS))}
    for piece, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(piece, len(vocab))
    for word in sorted(set(words)):
        for variant in (word, " " + word):
            for piece, _ in pre.pre_tokenize_str(variant):
                vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )

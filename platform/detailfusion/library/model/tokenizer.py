"""Tokenizers: BLIP-2's BERT tokenizer for ``blip2`` (loaded from the checkpoint), and for ``tiny`` a small
WordPiece vocabulary built here (no download) that covers lower-case English by falling back to characters."""

from __future__ import annotations

import string

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Frequent words of edit instructions (every word the synthetic benchmarks' captions use, local and global edits);
# anything else splits into characters ("##x" pieces).
TINY_WORDS = """
a an the and or of to in on at with without from into by for is are be it its this that these those
make change turn replace swap add put place insert remove delete take drop move shift push slide
resize enlarge shrink grow bigger smaller larger small large big tiny huge size same instead
colour color recolour recolor paint shape into more less fewer one two three left right top bottom
middle center centre up down corner side image picture scene show has have should now keep but
red green blue yellow purple orange white black gray grey pink brown cyan
circle square triangle star diamond cross hexagon ring object objects shapes
dress shirt top tee sleeves shiny dark light longer shorter pattern
also apply as away back background blur blurry brighten brighter brightness bring clockwise closer colours cool
cooler counter crop darken darker degrees dots dotted draw everything fill filled filter flip focus get give half
hollow horizontally increase lilac lower mint mirror natural no only out outlines over plain quarter restore rid rose
rotate sand sharp sharpen sky solid striped stripes there tint upside warm warmer whole zoom
""".split()


def build_tiny_tokenizer(vocab_size: int = 512) -> BertTokenizerFast:
    """A BERT WordPiece tokenizer over specials + characters + ``TINY_WORDS`` (at most ``vocab_size`` ids)."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    vocab = list(dict.fromkeys(SPECIAL_TOKENS + chars + pieces + TINY_WORDS))
    if len(vocab) > vocab_size:
        raise ValueError(f"tiny vocabulary has {len(vocab)} entries, more than vocab_size={vocab_size}")
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def load_tokenizer(path_or_id: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model (``save_pretrained`` dir) or in a hub checkpoint."""
    return AutoTokenizer.from_pretrained(path_or_id)

"""The lab tasks' tokenizers: a word-level vocabulary built in code (no download), BOS prepended, left padding."""

from __future__ import annotations


def word_level_tokenizer(vocab: tuple[str, ...], pattern: str):
    """A `transformers.PreTrainedTokenizerFast` over `vocab` (``<pad> <s> </s> <unk>`` first) that splits text into
    the matches of the regex `pattern` (each one token) and prepends ``<s>``; saved with the policy."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {token: index for index, token in enumerate(vocab)}
    core = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )  # fmt: skip

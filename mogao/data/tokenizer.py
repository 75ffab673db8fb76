"""Tokenizers: a small byte-level BPE trained on the fly (tiny recipes) and the image markers on real ones.

A sample is lowered with three special tokens: `<|vision_start|>` / `<|vision_end|>` around every image and
`<|endoftext|>` at the end of the sample. Qwen2.5 tokenizers already have all three; others get the missing
ones added by `ensure_special_tokens` (and the model's embeddings must then be resized).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mogao.errors import ConfigError

EOS = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
SPECIAL_TOKENS = (EOS, VISION_START, VISION_END)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a `transformers` fast tokenizer.

    Byte-level so that any text encodes (no unknown token); the three special tokens get ids 0, 1, 2 and
    `<|endoftext|>` doubles as the padding token. Round-trips through `save_pretrained` / `AutoTokenizer`.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                          f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, additional_special_tokens=[VISION_START, VISION_END],
    )


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the image markers (and an end-of-text token if the tokenizer has no EOS) where missing.

    Returns how many tokens were added: if > 0, resize the model's embeddings (`resize_token_embeddings`).
    Also sets the padding token to the EOS token when the tokenizer has none.
    """
    missing = [t for t in (VISION_START, VISION_END) if _token_id(tokenizer, t) is None]
    if _token_id(tokenizer, EOS) is None and tokenizer.eos_token_id is None:
        missing.insert(0, EOS)
    added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = EOS
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return int(added)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the lowering inserts. `eos_id` ends every sample."""

    eos_id: int
    vision_start_id: int
    vision_end_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
        """Read the ids; `<|endoftext|>` ends a sample when the vocabulary has it, else the tokenizer's EOS.

        (Chat models such as Qwen2.5-Instruct use `<|im_end|>` as EOS, but `<|endoftext|>` is the document end.)
        """
        eos = _token_id(tokenizer, EOS)
        if eos is None:
            eos = tokenizer.eos_token_id
        ids = {"eos": eos, VISION_START: _token_id(tokenizer, VISION_START), VISION_END: _token_id(tokenizer, VISION_END)}
        missing = [name for name, v in ids.items() if v is None]
        if missing:
            raise ConfigError(f"the tokenizer lacks {', '.join(missing)}; call mogao.data.ensure_special_tokens(tokenizer) "
                              "and resize the model's token embeddings")
        return cls(int(ids["eos"]), int(ids[VISION_START]), int(ids[VISION_END]))

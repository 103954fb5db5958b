"""Step 01: CLIP tokenization and PhotoMaker's trigger word.

PhotoMaker marks *who* a prompt is about with a trigger word written right after a class word:
"a man img walking in the park". Encoding such a prompt means:

1. tokenize (CLIP BPE), find the trigger token; the token *before* it is the class token ("man");
2. drop the trigger, and repeat the class token once per ID image (v1) or `k` times per ID image (v2);
3. add BOS/EOS, pad or truncate to the model length (77);
4. `class_tokens_mask` marks the repeated class-token positions: the ID encoder's fused embeddings go there;
5. a text-only prompt (trigger removed) drives the first denoising steps (delayed conditioning).

Everything here is offline: the CLIP BPE vocabulary ships in `data/clip_bpe/`.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from tokenizers import AddedToken
from transformers import CLIPTokenizer

from .paths import data_file

TRIGGER_WORD = "img"  # PhotoMaker's trigger word: the one definition in sdlite
CLIP_MODEL_LENGTH = 77
# CLIP's vocabulary: 256 byte symbols, the same with the end-of-word marker, 48894 merges, 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """One printable unicode character per byte value (so BPE never sees whitespace/control bytes).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are moved to code points 256, 257, ...
    Returned in CLIP's vocabulary order: the printable ones first, then the moved ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(moved))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's vocab.json and merges.txt from the BPE file OpenAI ships (`bpe_simple_vocab_16e6.txt.gz`)."""
    lines = gzip.open(data_file("clip_bpe", "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]  # line 0 is a version header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = EOS, model_max_length: int = CLIP_MODEL_LENGTH) -> CLIPTokenizer:
    """A transformers `CLIPTokenizer` equal to OpenAI's CLIP tokenizer, built offline."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
    )


def add_trigger_word(tokenizer: CLIPTokenizer, trigger_word: str = TRIGGER_WORD) -> int:
    """Register `trigger_word` as one special token (PhotoMaker does this on both SDXL tokenizers); return its id.

    Unlike a plain `add_tokens`, the trigger is matched case-insensitively and only as a whole word.
    """
    if not trigger_word or any(c.isspace() for c in trigger_word):
        raise ValueError(f"trigger word {trigger_word!r} must be one non-empty word without spaces, e.g. 'img'")
    # single_word: never matched inside a word ("imgur"); normalized: matched after lower-casing ("IMG").
    tokenizer.add_tokens([AddedToken(trigger_word, special=True, normalized=True, single_word=True)])
    return tokenizer.convert_tokens_to_ids(trigger_word)


def load_clip_tokenizers(trigger_word: str | None = TRIGGER_WORD) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two tokenizers, offline: the same CLIP BPE, the second pads with `!` (id 0).

    With `trigger_word` (default "img") registered as a special token on both; pass None for the plain tokenizers.
    """
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    if trigger_word is not None:
        add_trigger_word(tokenizer, trigger_word)
        add_trigger_word(tokenizer_2, trigger_word)
    return tokenizer, tokenizer_2


def _whole_word(word: str) -> str:
    """A pattern for `word` as a whole word: "img" in "a man img, walking", not in "images" or "img2"."""
    return rf"(?<!\w){re.escape(word)}(?!\w)"


def count_trigger_words(prompt: str, trigger_word: str = TRIGGER_WORD) -> int:
    """How often the prompt carries the trigger word as a whole word (any case, punctuation around it allowed)."""
    return len(re.findall(_whole_word(trigger_word), prompt, flags=re.IGNORECASE))


def remove_trigger_word(prompt: str, trigger_word: str = TRIGGER_WORD) -> str:
    """The prompt without the trigger word (whole word, any case), spaces tidied: 'a man img, walking' -> 'a man, walking'.

    Done on the text, not by decoding tokens, so the user's casing and punctuation survive.
    """
    # the trigger and the spaces before it go: "a man img, walking" -> "a man, walking"
    text = re.sub(r"\s*" + _whole_word(trigger_word), "", prompt, flags=re.IGNORECASE)
    return " ".join(text.split())


@dataclass(frozen=True)
class TriggerEncoding:
    """A prompt encoded PhotoMaker-style. All tensors have the model length L (77 for CLIP)."""

    input_ids: torch.Tensor  # (L,) long: BOS, tokens with the class token repeated, EOS, padding
    class_tokens_mask: torch.Tensor  # (L,) bool: True at the repeated class-token positions
    class_token_index: int  # position of the first class token in input_ids
    text_only_prompt: str  # the prompt without the trigger word (delayed conditioning)
    num_class_tokens: int  # num_id_images * tokens_per_image


def _check_trigger(tokenizer: CLIPTokenizer, trigger_word: str) -> int:
    pieces = tokenizer.tokenize(trigger_word)
    if trigger_word not in tokenizer.get_added_vocab():
        how = f"splits it into {pieces}" if len(pieces) != 1 else "treats it as an ordinary word"
        raise ValueError(
            f"the tokenizer {how}, so the trigger word {trigger_word!r} cannot be found reliably: register it first "
            f"with sdlite.tokenization.add_trigger_word(tokenizer, {trigger_word!r}) (load_clip_tokenizers does this)"
        )
    return tokenizer.convert_tokens_to_ids(trigger_word)


def encode_with_trigger(
    tokenizer: CLIPTokenizer,
    prompt: str,
    num_id_images: int = 1,
    tokens_per_image: int = 1,
    trigger_word: str = TRIGGER_WORD,
) -> TriggerEncoding:
    """Encode `prompt` ("a man img walking") with the class token repeated once per ID image (x `tokens_per_image`).

    PhotoMaker v1 uses tokens_per_image=1, v2 uses 2. Raises ValueError (saying how to fix it) for: no trigger word,
    more than one, a trigger with no class word before it, zero ID images, class tokens cut off by truncation, or a
    trigger word the tokenizer would split.
    """
    if num_id_images < 1:
        raise ValueError(f"num_id_images={num_id_images}: give at least one ID image (num_id_images >= 1)")
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image={tokens_per_image}: use 1 (PhotoMaker v1) or 2 (PhotoMaker v2)")
    trigger_id = _check_trigger(tokenizer, trigger_word)

    ids = tokenizer.encode(prompt, add_special_tokens=False)  # no BOS/EOS yet
    hits = [i for i, t in enumerate(ids) if t == trigger_id]
    if not hits:
        raise ValueError(
            f"no trigger word {trigger_word!r} in the prompt {prompt!r}: write it right after the class word, "
            f"e.g. 'a man {trigger_word} walking in the park'"
        )
    if len(hits) > 1:
        raise ValueError(
            f"the trigger word {trigger_word!r} appears {len(hits)} times in {prompt!r}: exactly one is allowed "
            "(one character per prompt); remove the others"
        )
    at = hits[0]
    if at == 0:
        raise ValueError(
            f"the trigger word {trigger_word!r} starts the prompt {prompt!r}: put a class word before it, "
            f"e.g. 'a man {trigger_word} ...'"
        )

    # (1) drop the trigger; the token before it is the class token
    class_id = ids[at - 1]
    num_class_tokens = num_id_images * tokens_per_image
    # (2) repeat the class token: [..., man, man, man, ...] for 3 ID images
    body = ids[: at - 1] + [class_id] * num_class_tokens + ids[at + 1 :]
    first_class = at  # position in the final ids: +1 for BOS, -1 for the class token before the trigger
    last_class = first_class + num_class_tokens - 1
    L = tokenizer.model_max_length
    if last_class > L - 2:  # the last slot of L belongs to EOS
        raise ValueError(
            f"the class tokens would end at token position {last_class}, past the last free position {L - 2} "
            f"(position {L - 1} is EOS): "
            "shorten the prompt before the class word or use fewer ID images"
        )
    # (3) BOS + body + EOS, truncated to L (EOS kept last), padded with the tokenizer's pad token
    full = [tokenizer.bos_token_id] + body[: L - 2] + [tokenizer.eos_token_id]
    full += [tokenizer.pad_token_id] * (L - len(full))
    # (4) the mask of class-token positions
    mask = torch.zeros(L, dtype=torch.bool)
    mask[first_class : last_class + 1] = True
    # (5) the text-only prompt: the same words without the trigger
    text_only = remove_trigger_word(prompt, trigger_word)
    return TriggerEncoding(
        input_ids=torch.tensor(full, dtype=torch.long),
        class_tokens_mask=mask,
        class_token_index=first_class,
        text_only_prompt=text_only,
        num_class_tokens=num_class_tokens,
    )


def encode_with_trigger_sdxl(
    tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
    prompt: str,
    num_id_images: int = 1,
    tokens_per_image: int = 1,
    trigger_word: str = TRIGGER_WORD,
) -> tuple[TriggerEncoding, TriggerEncoding]:
    """Encode for both SDXL tokenizers at once; their class-token masks must coincide (same BPE, other padding)."""
    encodings = tuple(
        encode_with_trigger(t, prompt, num_id_images, tokens_per_image, trigger_word) for t in tokenizers
    )
    if not torch.equal(encodings[0].class_tokens_mask, encodings[1].class_tokens_mask):
        raise ValueError(
            "the two tokenizers put the class tokens in different places: use two tokenizers with the same "
            "vocabulary and model length (SDXL's pair differ only in the padding token)"
        )
    return encodings  # type: ignore[return-value]

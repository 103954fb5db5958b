"""The rebuilt CLIP vocabulary's byte symbols, and the SDXL pair's encoding, pinned where mutation testing found the
other tests blind (docs/mutation.md): `clip_vocab_and_merges` is cached, so its byte table is checked on a fresh
build; the SDXL helper's defaults, its trigger word and its check that both tokenizers agree."""
import pytest

from sdlite.tokenization import (
    add_trigger_word, build_clip_tokenizer, clip_vocab_and_merges, encode_with_trigger, encode_with_trigger_sdxl,
    load_clip_tokenizers,
)


def test_the_vocabulary_starts_with_clips_256_byte_symbols_in_order():
    """CLIP's byte table: the 188 printable Latin-1 bytes stand for themselves ('!'..'~', '¡'..'¬', '®'..'ÿ'),
    the other 68 bytes become U+0100, U+0101, ... in byte order; then the same 256 with the end-of-word mark."""
    clip_vocab_and_merges.cache_clear()  # build it again (the cache may hold a vocabulary built elsewhere)
    try:
        vocab, merges = clip_vocab_and_merges()
    finally:
        clip_vocab_and_merges.cache_clear()
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    assert len(printable) == 188
    expected = [chr(b) for b in printable] + [chr(0x100 + i) for i in range(68)]
    assert [tok for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])[:256]] == expected
    assert vocab["!"] == 0 and vocab["~"] == 93 and vocab["¡"] == 94 and vocab["ÿ"] == 187 and vocab["Ā"] == 188
    assert vocab["!</w>"] == 256 and vocab[chr(0x100 + 67) + "</w>"] == 511
    assert len(vocab) == 49408 and len(merges) == 48894


def test_sdxl_encoding_defaults_and_its_trigger_word():
    pair = load_clip_tokenizers()
    first, second = encode_with_trigger_sdxl(pair, "a man img walking")
    assert first.num_class_tokens == second.num_class_tokens == 1  # one ID image, one token each by default
    custom = (build_clip_tokenizer(), build_clip_tokenizer(pad_token="!"))
    for tok in custom:
        add_trigger_word(tok, "sks")
    first, second = encode_with_trigger_sdxl(custom, "a man sks walking", num_id_images=2, trigger_word="sks")
    assert first.num_class_tokens == 2 and first.class_tokens_mask.tolist() == second.class_tokens_mask.tolist()
    assert first.text_only_prompt == "a man walking"


def test_sdxl_tokenizers_that_place_the_class_tokens_apart_are_refused():
    short = build_clip_tokenizer(model_max_length=40)
    pair = (load_clip_tokenizers()[0], short)
    add_trigger_word(short)
    assert encode_with_trigger(short, "a man img walking").class_tokens_mask.shape == (40,)
    with pytest.raises(ValueError, match="the two tokenizers put the class tokens in different places: use two "
                                         "tokenizers with the same vocabulary and model length"):
        encode_with_trigger_sdxl(pair, "a man img walking")


def test_the_trigger_word_is_one_special_whole_word_token_in_any_case():
    """Built here, not in a shared fixture: a fixture made once per module is charged to its first test only, and
    mutation testing runs only the tests charged with a function (docs/mutation.md)."""
    tok, tok2 = load_clip_tokenizers()
    trigger = tok.convert_tokens_to_ids("img")
    found = {text: trigger in tok.encode(text, add_special_tokens=False)
             for text in ["a man img walking", "a man IMG", "a man Img, walking", "(img)", "imgur images", "ximgy",
                          "imgimg", "IMGs"]}
    assert found == {"a man img walking": True, "a man IMG": True, "a man Img, walking": True, "(img)": True,
                     "imgur images": False, "ximgy": False, "imgimg": False, "IMGs": False}
    assert tok.decode(tok.encode("a man img walking"), skip_special_tokens=True) == "a man walking"
    assert tok2.decode(tok2.encode("a man img walking"), skip_special_tokens=True) == "a man walking"
    own, own2 = load_clip_tokenizers("sks")
    assert own.convert_tokens_to_ids("sks") == own2.convert_tokens_to_ids("sks") == 49408
    assert "img" not in own.get_added_vocab() and "img" not in own2.get_added_vocab()


def test_the_class_token_limit_names_the_eos_position():
    tok = load_clip_tokenizers()[0]
    with pytest.raises(ValueError, match=r"past the last free position 75 \(position 76 is EOS\)"):
        encode_with_trigger(tok, " ".join(["very"] * 80) + " man img")

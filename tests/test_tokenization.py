"""Offline CLIP tokenizer and PhotoMaker's trigger-word encoding."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sdlite.tokenization import (
    CLIP_MODEL_LENGTH,
    add_trigger_word,
    build_clip_tokenizer,
    encode_with_trigger,
    encode_with_trigger_sdxl,
    load_clip_tokenizers,
)


@pytest.fixture(scope="module")
def plain():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def tokenizers():
    return load_clip_tokenizers()


def test_plain_clip_ids_match_openai(plain):
    # ids of OpenAI's CLIP tokenizer for this sentence (see RESEARCH.md)
    assert plain("a man img walking in the park").input_ids == [49406, 320, 786, 24157, 3941, 530, 518, 1452, 49407]
    assert len(plain) == 49408
    assert plain("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sdxl_pair_padding(tokenizers):
    tok, tok2 = tokenizers
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    assert tok.model_max_length == tok2.model_max_length == CLIP_MODEL_LENGTH


def test_trigger_gets_its_own_id(tokenizers):
    tok, tok2 = tokenizers
    assert tok.convert_tokens_to_ids("img") == tok2.convert_tokens_to_ids("img") == 49408
    ids = tok.encode("a man img walking", add_special_tokens=False)
    assert ids == [320, 786, 49408, 3941]
    # whole word only, any case
    assert 49408 not in tok.encode("imgur images", add_special_tokens=False)
    assert tok.encode("a man IMG", add_special_tokens=False)[-1] == 49408


def test_encode_repeats_class_token(tokenizers):
    tok, _ = tokenizers
    enc = encode_with_trigger(tok, "a man img walking in the park", num_id_images=3)
    ids = enc.input_ids.tolist()
    assert ids[:9] == [49406, 320, 786, 786, 786, 3941, 530, 518, 1452]
    assert ids[9] == 49407 and all(i == tok.pad_token_id for i in ids[10:])
    assert len(ids) == 77 and enc.input_ids.dtype == torch.long
    assert enc.class_token_index == 2
    assert enc.class_tokens_mask.nonzero().flatten().tolist() == [2, 3, 4]
    assert enc.text_only_prompt == "a man walking in the park"
    assert encode_with_trigger(tok, "A Man IMG, walking.").text_only_prompt == "A Man, walking."
    assert enc.num_class_tokens == 3


def test_tokens_per_image_v2(tokenizers):
    tok, _ = tokenizers
    enc = encode_with_trigger(tok, "a woman img", num_id_images=2, tokens_per_image=2)
    assert enc.class_tokens_mask.sum() == 4
    assert enc.input_ids[enc.class_tokens_mask].unique().tolist() == tok.encode("woman", add_special_tokens=False)


def test_both_sdxl_tokenizers(tokenizers):
    e1, e2 = encode_with_trigger_sdxl(tokenizers, "a girl img reading a book", num_id_images=2)
    assert torch.equal(e1.class_tokens_mask, e2.class_tokens_mask)
    assert e1.input_ids[-1] == 49407 and e2.input_ids[-1] == 0  # different padding
    assert torch.equal(e1.input_ids[:8], e2.input_ids[:8])


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ("a man walking in the park", {}, "no trigger word 'img'.*right after the class word"),
        ("a man img and a woman img", {}, "appears 2 times.*exactly one"),
        ("img walking in the park", {}, "starts the prompt.*class word before it"),
        ("a man img walking", {"num_id_images": 0}, "at least one ID image"),
        ("a man img walking", {"tokens_per_image": 0}, "tokens_per_image=0"),
        (" ".join(["very"] * 80) + " man img", {}, "past the last free position 75.*shorten the prompt"),
        ("a dog img", {"trigger_word": "sks_pet"}, "splits it into.*add_trigger_word"),
    ],
)
def test_bad_input(tokenizers, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode_with_trigger(tokenizers[0], prompt, **kwargs)


def test_trigger_known_word_not_registered(plain):
    with pytest.raises(ValueError, match="treats it as an ordinary word.*add_trigger_word"):
        encode_with_trigger(plain, "a man img walking")


def test_class_tokens_cut_by_many_id_images(tokenizers):
    prompt = " ".join(["big"] * 60) + " man img"
    encode_with_trigger(tokenizers[0], prompt, num_id_images=10)  # 61 + 10 = 71 <= 75: fits
    with pytest.raises(ValueError, match="use fewer ID images"):
        encode_with_trigger(tokenizers[0], prompt, num_id_images=20)


def test_add_trigger_word_rejects_spaces(plain):
    with pytest.raises(ValueError, match="without spaces"):
        add_trigger_word(build_clip_tokenizer(), "two words")


def test_long_prompt_is_truncated_after_class_tokens(tokenizers):
    enc = encode_with_trigger(tokenizers[0], "a man img " + " ".join(["running"] * 100))
    assert len(enc.input_ids) == 77 and enc.input_ids[-1] == 49407
    assert enc.class_tokens_mask.sum() == 1


WORDS = ["a", "photo", "of", "walking", "in", "the", "park", "happy", "red", "hair", "beach", "at", "night", "with",
         "imgur", "image", "Img2", "sunny", "dog", "cat", ",", "."]
CLASS_WORDS = ["man", "woman", "boy", "girl", "person", "astronaut"]


@settings(max_examples=60, deadline=None)
@given(
    before=st.lists(st.sampled_from(WORDS), max_size=30),
    after=st.lists(st.sampled_from(WORDS), max_size=60),
    class_word=st.sampled_from(CLASS_WORDS),
    num_id_images=st.integers(1, 4),
    tokens_per_image=st.integers(1, 2),
)
def test_properties(tokenizers, before, after, class_word, num_id_images, tokens_per_image):
    prompt = " ".join([*before, class_word, "img", *after])
    enc = encode_with_trigger(tokenizers[0], prompt, num_id_images, tokens_per_image)
    assert enc.class_tokens_mask.shape == enc.input_ids.shape == (77,)
    assert int(enc.class_tokens_mask.sum()) == num_id_images * tokens_per_image
    # the mask is one contiguous run starting at class_token_index
    where = enc.class_tokens_mask.nonzero().flatten().tolist()
    assert where == list(range(enc.class_token_index, enc.class_token_index + len(where)))
    assert "img" not in enc.text_only_prompt.lower().replace(",", " ").replace(".", " ").split()
    assert 49408 not in tokenizers[0].encode(enc.text_only_prompt)
    # the text-only prompt is the prompt minus the trigger: same tokens otherwise
    without = [t for t in tokenizers[0].encode(prompt) if t != 49408]
    assert tokenizers[0].encode(enc.text_only_prompt) == without
    assert enc.input_ids[0] == 49406 and 49407 in enc.input_ids.tolist()


def test_class_tokens_may_fill_exactly_up_to_the_last_free_slot_before_eos():
    """77 positions: BOS, 'a' at 1, the class token from 2; 74 ID images put the last class token at 75 (the last
    free slot) and EOS at 76; 75 images do not fit (an off-by-one at this limit once went unnoticed)."""
    from sdlite.tokenization import encode_with_trigger, load_clip_tokenizers

    tok = load_clip_tokenizers()[0]
    enc = encode_with_trigger(tok, "a man img", num_id_images=74)
    ids, mask = enc.input_ids.tolist(), enc.class_tokens_mask.tolist()
    assert len(ids) == 77 and ids[75] == ids[2] and ids[76] == tok.eos_token_id
    assert mask[2:76] == [True] * 74 and not mask[76] and not mask[1]
    with pytest.raises(ValueError, match="last free position 75"):
        encode_with_trigger(tok, "a man img", num_id_images=75)


def test_count_trigger_words_counts_the_whole_word_only():
    from sdlite.tokenization import count_trigger_words

    for prompt in ("a man img", "a man img, walking", "a man IMG.", "(img) a man"):
        assert count_trigger_words(prompt) == 1, prompt
    for prompt in ("a man", "a man images", "a man img2", "a man_img"):
        assert count_trigger_words(prompt) == 0, prompt
    assert count_trigger_words("a man img, walking, a man img") == 2

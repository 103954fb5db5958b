"""Tests of sdlite.attention: the paper's algorithm, the fast processor, tiles, the bank, install/remove.

Tolerances: float32 results compared with atol=rtol=1e-5 (orders of magnitude above the ~1e-6 rounding
differences of reordered sums, far below the O(0.1) changes a wrong key set causes); float64 with 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st

from matching import whole
from sdlite.attention import (
    OFFICIAL_SKIP_SCHEDULE,
    ConsistencyBank,
    ConsistentSelfAttnProcessor,
    CSAState,
    SkipSchedule,
    consistent_self_attention_reference,
    draw_keep_masks,
    draw_sampled_indices,
    install_consistent_attention,
    num_sampled_tokens,
    self_attention_layer_names,
    window_starts,
)
from sdlite.tiny import tiny_sd15_unet, tiny_sdxl_unet, tiny_unet_inputs

TOL = dict(atol=1e-5, rtol=1e-5)



@pytest.fixture(scope="module")
def sdxl_unet():
    """One tiny SDXL-style UNet shared by the tests that install and remove CSA (always via `with`)."""
    return tiny_sdxl_unet(seed=0)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def features(B=6, N=10, C=8, seed=0, dtype=torch.float32):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed), dtype=dtype)  # (B, N, C)


def identity_attention(C, dtype=torch.float32):
    """A diffusers Attention layer whose q/k/v/out projections are the identity: one head of C channels."""
    attn = Attention(query_dim=C, heads=1, dim_head=C, bias=False, out_bias=False).to(dtype)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lin.weight.copy_(torch.eye(C, dtype=dtype))
    return attn.eval()


def random_attention(C=16, heads=4, seed=0):
    """A diffusers Attention layer with random projections (with biases) and several heads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attn = Attention(query_dim=C, heads=heads, dim_head=C // heads, bias=True, out_bias=True)
    return attn.eval()


def plain_attention(x):
    """Single-head self-attention of every image on itself, identity projections. (B, N, C) -> (B, N, C)."""
    w = torch.softmax(x @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)
    return w @ x


def dense_mask_csa(attn, x, indices, tile, stride):
    """The dense formulation: every query of a window scores all W*N window tokens, with an additive bias
    log(multiplicity): -inf for tokens outside image i's key set, 0 for keys present once, log 2 for keys
    present twice (own tokens that were also sampled, include_self_in_sample=True). (B, N, C) -> (B, N, C)."""
    B, N, C = x.shape
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (B, N, inner)
    d = q.shape[-1] // h
    out = torch.zeros(B, N, q.shape[-1], dtype=x.dtype)
    count = torch.zeros(B, 1, 1, dtype=x.dtype)
    for w, s in enumerate(window_starts(B, tile, stride)):
        kw = k[s:s + tile].reshape(tile * N, h, d).transpose(0, 1)  # (h, W*N, d)
        vw = v[s:s + tile].reshape(tile * N, h, d).transpose(0, 1)
        for i in range(tile):
            mult = torch.zeros(tile * N, dtype=x.dtype)  # how often each window token is a key of image i
            mult[i * N:(i + 1) * N] += 1
            mult.index_add_(0, indices[w, i], torch.ones(indices.shape[2], dtype=x.dtype))
            bias = torch.log(mult)  # (W*N,) -inf where absent
            qi = q[s + i].view(N, h, d).transpose(0, 1)  # (h, N, d)
            scores = qi @ kw.transpose(1, 2) / math.sqrt(d) + bias  # (h, N, W*N)
            o = torch.softmax(scores, dim=-1) @ vw  # (h, N, d)
            out[s + i] += o.transpose(0, 1).reshape(N, h * d)
            count[s + i] += 1
    return attn.to_out[0](out / count)


# ---------------------------------------------------------------------------------------------------
# windows and sampling
# ---------------------------------------------------------------------------------------------------
def test_window_starts_cover_every_image_with_full_windows():
    assert window_starts(6, 3, 1) == [0, 1, 2, 3]  # the paper's sliding window
    assert window_starts(8, 4, 4) == [0, 4]  # disjoint tiles
    assert window_starts(6, 4, 4) == [0, 2]  # last window moved back so it ends at the last image
    assert window_starts(5, 5, 1) == [0]
    for B, W, s in [(7, 3, 2), (9, 4, 3), (10, 1, 1)]:
        covered = {x for t in window_starts(B, W, s) for x in range(t, t + W)}
        assert covered == set(range(B)) and max(window_starts(B, W, s)) + W == B


def test_num_sampled_tokens_is_rate_times_pool():
    assert num_sampled_tokens(4, 1024, 0.5) == 1536  # (W-1) N r
    assert num_sampled_tokens(4, 1024, 0.5, include_self_in_sample=True) == 2048  # W N r
    assert num_sampled_tokens(3, 10, 0.0) == 0 and num_sampled_tokens(3, 10, 1.0) == 20


def test_sampled_indices_are_distinct_and_avoid_the_image_itself():
    B, N, W = 7, 12, 3
    idx = draw_sampled_indices(B, N, 0.4, W, 2, torch.Generator().manual_seed(3))
    assert idx.shape == (len(window_starts(B, W, 2)), W, num_sampled_tokens(W, N, 0.4))
    for w in range(idx.shape[0]):
        for i in range(W):
            row = idx[w, i]
            assert len(set(row.tolist())) == row.numel()  # without replacement
            assert not ((row >= i * N) & (row < (i + 1) * N)).any()  # never its own tokens
            assert (row >= 0).all() and (row < W * N).all()
    # the paper's literal pseudo-code: the pool includes the image itself
    idx_self = draw_sampled_indices(B, N, 0.9, W, 1, torch.Generator().manual_seed(3), include_self_in_sample=True)
    own_hits = [((idx_self[w, i] >= i * N) & (idx_self[w, i] < (i + 1) * N)).sum() for w in range(5) for i in range(W)]
    assert sum(own_hits) > 0


def test_sampling_is_uniform_over_the_pool():
    """Each pool token is drawn with probability k / pool: counts over many draws stay near the mean."""
    N, W, rate = 8, 3, 0.25
    idx = draw_sampled_indices(400, N, rate, W, 1, torch.Generator().manual_seed(0))  # (398, 3, 4)
    counts = torch.bincount(idx[:, 0].reshape(-1), minlength=W * N)[N:]  # image 0's pool: images 1, 2
    mean = idx.shape[0] * num_sampled_tokens(W, N, rate) / ((W - 1) * N)
    assert counts.min() > 0.6 * mean and counts.max() < 1.4 * mean


def test_rate_one_takes_the_whole_pool_without_randomness():
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    idx = draw_sampled_indices(4, 5, 1.0, 4, 1, g)
    assert torch.equal(g.get_state(), before)
    assert sorted(idx[0, 2].tolist()) == [t for t in range(20) if not 10 <= t < 15]


# ---------------------------------------------------------------------------------------------------
# the reference version
# ---------------------------------------------------------------------------------------------------
def test_reference_rate_zero_is_plain_self_attention():
    x = features()
    torch.testing.assert_close(consistent_self_attention_reference(x, 0.0, 3), plain_attention(x), **TOL)
    torch.testing.assert_close(consistent_self_attention_reference(x, 0.7, 1), plain_attention(x), **TOL)  # W = 1


def test_reference_rate_one_whole_batch_is_full_joint_attention():
    x = features(B=4, N=6, C=8)
    joint = plain_attention(x.reshape(1, 4 * 6, 8)).reshape(4, 6, 8)  # every token sees all B*N tokens
    torch.testing.assert_close(consistent_self_attention_reference(x, 1.0, 4), joint, **TOL)
    assert not torch.allclose(joint, plain_attention(x), atol=1e-3)  # and that differs from plain attention


def test_reference_averages_overlapping_windows():
    """Image 1 of 3 with W = 2, stride 1 lies in windows [0,1] and [1,2]; r = 1: its output is the mean of
    joint attention over images {0,1} and over {1,2}."""
    x = features(B=3, N=5, C=4)
    out = consistent_self_attention_reference(x, 1.0, 2, stride=1)
    a = plain_attention(x[0:2].reshape(1, 10, 4)).reshape(2, 5, 4)[1]
    b = plain_attention(x[1:3].reshape(1, 10, 4)).reshape(2, 5, 4)[0]
    torch.testing.assert_close(out[1], (a + b) / 2, **TOL)


def test_reference_include_self_counts_own_tokens_twice():
    """With the paper's literal sampling, a sampled own token is a key twice: the same as adding log 2 to
    its score. Both reference modes match the dense multiplicity formulation and differ from each other."""
    x = features(B=4, N=6, C=8, dtype=torch.float64)
    eye = identity_attention(8, torch.float64)
    g = torch.Generator().manual_seed(5)
    idx_self = draw_sampled_indices(4, 6, 0.5, 4, 1, g, include_self_in_sample=True)
    literal = consistent_self_attention_reference(x, 0.5, 4, include_self_in_sample=True, sampled_indices=idx_self)
    with torch.no_grad():
        torch.testing.assert_close(literal, dense_mask_csa(eye, x, idx_self, 4, 1), atol=1e-10, rtol=1e-10)
    default = consistent_self_attention_reference(x, 0.5, 4, generator=torch.Generator().manual_seed(5))
    assert (literal - default).abs().max() > 1e-3


def test_reference_is_deterministic_for_a_seed():
    x = features()
    a = consistent_self_attention_reference(x, 0.5, 3, torch.Generator().manual_seed(1))
    b = consistent_self_attention_reference(x, 0.5, 3, torch.Generator().manual_seed(1))
    c = consistent_self_attention_reference(x, 0.5, 3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------------
# fast == reference == dense mask
# ---------------------------------------------------------------------------------------------------
CASES = [  # rate, tile, stride, include_self
    (0.5, 3, 1, False),  # the paper's sliding window
    (0.3, 4, 4, False),  # disjoint tiles, 6 images: last tile moved back
    (0.5, 6, 6, True),  # no tiles, the paper's literal sampling
    (0.5, 6, 6, False),  # no tiles
    (0.6, 4, 2, False),  # half-overlapping tiles
    (1.0, 3, 3, False),  # joint attention in disjoint tiles (the storyworld training case)
    (1.0, 2, 1, False),
]


@pytest.mark.parametrize("rate,tile,stride,include_self", CASES)
@pytest.mark.parametrize("window_batch", [1, 2, None])
def test_fast_equals_reference_on_the_same_sample(rate, tile, stride, include_self, window_batch):
    B, N, C = 6, 10, 8
    x = features(B, N, C)
    idx = draw_sampled_indices(B, N, rate, tile, stride, torch.Generator().manual_seed(1), include_self)
    ref = consistent_self_attention_reference(x, rate, tile, stride=stride, include_self_in_sample=include_self,
                                              sampled_indices=idx)
    proc = ConsistentSelfAttnProcessor(rate, tile, stride, include_self_in_sample=include_self,
                                       window_batch=window_batch)
    with torch.no_grad():
        fast = proc(identity_attention(C), x, sampled_indices=idx)
    torch.testing.assert_close(fast, ref, **TOL)


def test_fast_equals_reference_for_the_same_generator_seed():
    x = features()
    ref = consistent_self_attention_reference(x, 0.5, 3, torch.Generator().manual_seed(9), stride=1)
    state = CSAState(generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        fast = ConsistentSelfAttnProcessor(0.5, 3, 1, state=state)(identity_attention(8), x)
    torch.testing.assert_close(fast, ref, **TOL)


@pytest.mark.parametrize("rate,tile,stride,include_self", CASES)
def test_dense_mask_equals_index_formulation_multihead(rate, tile, stride, include_self):
    """Random q/k/v/out projections with biases, 4 heads: the index path == the dense (masked) path."""
    B, N, C = 6, 10, 16
    x = features(B, N, C)
    attn = random_attention(C, heads=4)
    idx = draw_sampled_indices(B, N, rate, tile, stride, torch.Generator().manual_seed(2), include_self)
    with torch.no_grad():
        fast = ConsistentSelfAttnProcessor(rate, tile, stride, include_self_in_sample=include_self)(
            attn, x, sampled_indices=idx)
        dense = dense_mask_csa(attn, x, idx, tile, stride)
    torch.testing.assert_close(fast, dense, **TOL)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 7), N=st.integers(1, 9), tile_frac=st.floats(0, 1), stride_frac=st.floats(0, 1),
       rate=st.floats(0, 1), include_self=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fast_equals_reference_property(B, N, tile_frac, stride_frac, rate, include_self, seed):
    tile = 1 + int(tile_frac * (B - 1))
    stride = 1 + int(stride_frac * (tile - 1))
    x = features(B, N, 4, seed=seed % 1000)
    idx = draw_sampled_indices(B, N, rate, tile, stride, torch.Generator().manual_seed(seed), include_self)
    ref = consistent_self_attention_reference(x, rate, tile, stride=stride, include_self_in_sample=include_self,
                                              sampled_indices=idx)
    with torch.no_grad():
        fast = ConsistentSelfAttnProcessor(rate, tile, stride, include_self_in_sample=include_self)(
            identity_attention(4), x, sampled_indices=idx)
    torch.testing.assert_close(fast, ref, **TOL)


# ---------------------------------------------------------------------------------------------------
# equivalences with the stock processor
# ---------------------------------------------------------------------------------------------------
def test_rate_zero_is_exactly_the_stock_processor():
    x = features(B=6, N=10, C=16)
    attn = random_attention(16, heads=4)
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x)
        for tile, stride in [(3, 1), (6, 6), (None, None)]:
            csa = ConsistentSelfAttnProcessor(0.0, tile, stride)(attn, x)
            assert torch.equal(csa, stock)


def test_batch_of_one_image_is_exactly_the_stock_processor():
    x = features(B=1, N=10, C=16)
    attn = random_attention(16, heads=4)
    with torch.no_grad():
        assert torch.equal(ConsistentSelfAttnProcessor(0.5)(attn, x), AttnProcessor2_0()(attn, x))
        pair = features(B=2, N=10, C=16)  # one image per guidance half
        csa = ConsistentSelfAttnProcessor(0.5, state=CSAState(guidance_halves=True))(attn, pair)
        assert torch.equal(csa, AttnProcessor2_0()(attn, pair))
        assert torch.equal(ConsistentSelfAttnProcessor(0.5, 4)(attn, x), AttnProcessor2_0()(attn, x))


def test_rate_one_whole_batch_is_joint_attention_multihead():
    """r = 1, W = B: the stock processor run on all B*N tokens as one sequence."""
    B, N, C = 4, 9, 16
    x = features(B, N, C)
    attn = random_attention(C, heads=4)
    with torch.no_grad():
        joint = AttnProcessor2_0()(attn, x.reshape(1, B * N, C)).reshape(B, N, C)
        csa = ConsistentSelfAttnProcessor(1.0, B)(attn, x)
        # the same set of keys reached through the index path (include_self off, explicit full sample)
        idx = draw_sampled_indices(B, N, 1.0, B, B)
        via_index = ConsistentSelfAttnProcessor(1.0 - 1e-9, B)(attn, x, sampled_indices=idx)
    torch.testing.assert_close(csa, joint, **TOL)
    torch.testing.assert_close(via_index, joint, **TOL)
    assert (csa - AttnProcessor2_0()(attn, x)).abs().max() > 1e-3


def test_guidance_halves_never_mix():
    """[uncond; cond] with guidance_halves=True == CSA on each half alone (same sample); changing the uncond
    half leaves the cond half's output unchanged."""
    B, N, C = 4, 8, 16
    attn = random_attention(C, heads=2)
    uncond, cond = features(B, N, C, seed=1), features(B, N, C, seed=2)
    idx = draw_sampled_indices(B, N, 0.5, 2, 1, torch.Generator().manual_seed(0))
    halves = ConsistentSelfAttnProcessor(0.5, 2, 1, state=CSAState(guidance_halves=True))
    alone = ConsistentSelfAttnProcessor(0.5, 2, 1)
    with torch.no_grad():
        both = halves(attn, torch.cat([uncond, cond]), sampled_indices=idx)
        torch.testing.assert_close(both[:B], alone(attn, uncond, sampled_indices=idx), **TOL)
        torch.testing.assert_close(both[B:], alone(attn, cond, sampled_indices=idx), **TOL)
        other = halves(attn, torch.cat([uncond * 3 + 1, cond]), sampled_indices=idx)
        assert torch.equal(other[B:], both[B:])
        # without the flag the 2B images are one story of 8: the cond half now sees the uncond half
        one_story = ConsistentSelfAttnProcessor(0.5, None, state=CSAState(generator=torch.Generator().manual_seed(0)))
        a = one_story(attn, torch.cat([uncond, cond]))
        one_story.state.generator.manual_seed(0)
        b = one_story(attn, torch.cat([uncond * 3 + 1, cond]))
        assert (a[B:] - b[B:]).abs().max() > 1e-4


def test_tiles_keep_images_apart_and_flag_off_mixes():
    """Disjoint tiles of 2: the output of images 2, 3 does not depend on images 0, 1. Without tiles it does."""
    B, N, C = 4, 8, 16
    attn = random_attention(C, heads=2)
    x = features(B, N, C)
    y = x.clone()
    y[:2] = features(2, N, C, seed=7)
    with torch.no_grad():
        tiled = ConsistentSelfAttnProcessor(0.5, 2, 2, state=CSAState(generator=torch.Generator().manual_seed(0)))
        a = tiled(attn, x)
        tiled.state.generator.manual_seed(0)
        b = tiled(attn, y)
        assert torch.equal(a[2:], b[2:])
        whole = ConsistentSelfAttnProcessor(0.5, None, state=CSAState(generator=torch.Generator().manual_seed(0)))
        c = whole(attn, x)
        whole.state.generator.manual_seed(0)
        d = whole(attn, y)
        assert (c[2:] - d[2:]).abs().max() > 1e-4


def test_four_dimensional_input_matches_the_token_layout():
    """A (B, C, H, W) input (VAE-style layer with group norm, residual and rescale) gives the same as the
    (B, H*W, C) route done by hand."""
    B, C, H, W = 4, 16, 3, 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        attn = Attention(query_dim=C, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                         rescale_output_factor=2.0, bias=True).eval()
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1))
    idx = draw_sampled_indices(B, H * W, 0.5, 2, 1, torch.Generator().manual_seed(2))
    proc = ConsistentSelfAttnProcessor(0.5, 2, 1)
    with torch.no_grad():
        out4 = proc(attn, x, sampled_indices=idx)
        tokens = x.view(B, C, H * W).transpose(1, 2)  # (B, N, C)
        normed = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        plain = ConsistentSelfAttnProcessor(0.5, 2, 1)
        bare = Attention(query_dim=C, heads=2, dim_head=8, bias=True).eval()
        bare.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("group_norm")})
        ref = (plain(bare, normed, sampled_indices=idx) + tokens) / 2.0
    assert out4.shape == x.shape
    torch.testing.assert_close(out4, ref.transpose(1, 2).reshape(B, C, H, W), **TOL)


# ---------------------------------------------------------------------------------------------------
# gradients (storyworld trains with joint attention in groups)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate,tile,stride", [(1.0, 2, 2), (0.5, 3, 1)])
def test_processor_is_differentiable_gradcheck(rate, tile, stride):
    B, N, C = 4, 3, 4
    attn = random_attention(C, heads=2).double()
    x = features(B, N, C, dtype=torch.float64).requires_grad_(True)
    idx = draw_sampled_indices(B, N, rate, tile, stride, torch.Generator().manual_seed(0))
    proc = ConsistentSelfAttnProcessor(rate, tile, stride, window_batch=None)
    assert torch.autograd.gradcheck(lambda t: proc(attn, t, sampled_indices=idx), (x,), eps=1e-6, atol=1e-6)


def test_unet_trains_with_group_joint_attention():
    unet = tiny_sdxl_unet(seed=0).train()
    inputs = tiny_unet_inputs(unet, batch=4, seed=1)
    handle = install_consistent_attention(unet, rate=1.0, tile=2, stride=2, layers="all", window_batch=None)
    loss = unet(**inputs).sample.square().mean()
    loss.backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    attn1 = unet.get_submodule(handle.layer_names[0])
    assert attn1.to_q.weight.grad.abs().sum() > 0
    handle.remove()


# ---------------------------------------------------------------------------------------------------
# install / remove on UNets
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_sdxl_unet, tiny_sd15_unet])
def test_install_then_remove_is_bit_identical(make):
    unet = make(seed=0)
    inputs = tiny_unet_inputs(unet, batch=4, seed=0)
    before_procs = dict(unet.attn_processors)
    with torch.no_grad():
        before = unet(**inputs).sample
        handle = install_consistent_attention(unet, rate=0.5, tile=2, layers="all")
        during = unet(**inputs).sample
        handle.remove()
        after = unet(**inputs).sample
    assert torch.equal(before, after)
    assert (during - before).abs().max() > 1e-4  # CSA did change something while installed
    assert all(unet.attn_processors[k] is p for k, p in before_procs.items())


def test_layer_selection_and_cross_attention_untouched(sdxl_unet):
    unet = sdxl_unet
    names = self_attention_layer_names(unet)
    assert all(n.endswith("attn1") for n in names) and len(names) == 8
    with install_consistent_attention(unet, layers="up") as up:
        procs = unet.attn_processors
        assert set(up.layer_names) == {n for n in names if n.startswith("up_blocks.")} and len(up.layer_names) == 4
        assert all(isinstance(procs[n + ".processor"], ConsistentSelfAttnProcessor) for n in up.layer_names)
        assert not any(isinstance(p, ConsistentSelfAttnProcessor) for k, p in procs.items() if ".attn2." in k)
    with install_consistent_attention(unet, layers=lambda n: n.startswith("mid_block")) as mid:
        assert len(mid.layer_names) == 2
    with install_consistent_attention(unet, layers="all") as everything:
        assert len(everything.layer_names) == len(names)
    assert not any(isinstance(p, ConsistentSelfAttnProcessor) for p in unet.attn_processors.values())


def test_up_only_leaves_down_and_mid_outputs_alone(sdxl_unet):
    """With layers='up', the down/mid self-attention layers still run the stock processor: a hook on a
    down-block attn1 sees the same output with and without CSA."""
    unet = sdxl_unet
    inputs = tiny_unet_inputs(unet, batch=4)
    seen = []
    layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1")
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        unet(**inputs)
        with install_consistent_attention(unet, rate=0.5, tile=4, layers="up"):
            unet(**inputs)
    hook.remove()
    assert torch.equal(seen[0], seen[1])


def test_set_tiles_changes_every_layer(sdxl_unet):
    with install_consistent_attention(sdxl_unet, rate=0.5, tile=4, layers="all") as h:
        h.set_tiles(2, 2)
        assert all((p.tile, p.stride) == (2, 2) for p in h.processors.values())
        h.set_tiles(None)
        assert all(p.tile is None and p.stride is None for p in h.processors.values())
        with pytest.raises(ValueError, match="would leave images outside every window"):
            h.set_tiles(2, 3)
        with pytest.raises(ValueError, match="stride needs a tile size"):
            h.set_tiles(None, 2)


def test_handle_state_is_per_handle(sdxl_unet):
    with install_consistent_attention(sdxl_unet, seed=1) as ha, \
            install_consistent_attention(tiny_sd15_unet(seed=0), layers="all", seed=1) as hb:
        ha.set_step(5)
        assert hb.state.step is None and ha.state is not hb.state and ha.bank is not hb.bank


# ---------------------------------------------------------------------------------------------------
# steps: first steps without CSA and the random-skip schedule
# ---------------------------------------------------------------------------------------------------
def test_first_steps_without_csa_and_skip_schedule(sdxl_unet):
    unet = sdxl_unet
    inputs = tiny_unet_inputs(unet, batch=4)
    with torch.no_grad():
        stock = unet(**inputs).sample
        with install_consistent_attention(unet, rate=0.5, tile=4, layers="all", first_steps_without_csa=2) as h:
            h.set_step(1)
            assert torch.equal(unet(**inputs).sample, stock)
            h.set_step(2)
            assert not torch.equal(unet(**inputs).sample, stock)
            with h.off():
                assert torch.equal(unet(**inputs).sample, stock)
        always_skip = SkipSchedule(early_prob=1.0, late_prob=0.0, switch_step=10)
        with install_consistent_attention(unet, rate=0.5, tile=4, layers="all", skip_schedule=always_skip) as h:
            h.set_step(3)
            assert torch.equal(unet(**inputs).sample, stock)
            h.set_step(10)
            assert not torch.equal(unet(**inputs).sample, stock)


def test_official_skip_schedule_frequencies():
    state = CSAState(generator=torch.Generator().manual_seed(0), skip_schedule=OFFICIAL_SKIP_SCHEDULE)
    state.step = 5
    early = sum(not state.csa_active() for _ in range(4000)) / 4000
    state.step = 25
    late = sum(not state.csa_active() for _ in range(4000)) / 4000
    assert abs(early - 0.3) < 0.03 and abs(late - 0.1) < 0.02


def test_same_seed_same_output(sdxl_unet):
    unet = sdxl_unet
    inputs = tiny_unet_inputs(unet, batch=4)
    outs = []
    for seed in (3, 3, 4):
        with torch.no_grad(), install_consistent_attention(unet, rate=0.5, tile=4, layers="all", seed=seed):
            outs.append(unet(**inputs).sample)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# ---------------------------------------------------------------------------------------------------
# the write/read bank
# ---------------------------------------------------------------------------------------------------
def test_bank_write_read_matches_hand_computation():
    """Read: own tokens + the stored tokens as extra keys/values == the stock processor over the sequence
    [bank; own] keeping only the queries of the own tokens (the bank's queries are dropped)."""
    C, N = 16, 6
    attn = random_attention(C, heads=4)
    state = CSAState(generator=torch.Generator().manual_seed(0))
    proc = ConsistentSelfAttnProcessor(0.5, None, state=state, name="layer")
    refs = features(3, N, C, seed=1)  # alice's three reference images
    state.mode, state.characters, state.step = "write", ("alice",), 0
    with torch.no_grad():
        write_out = proc(attn, refs)
    stored = state.bank.read("alice", 0, "layer")  # (G, k, C)
    assert stored.shape == (1, round(0.5 * 3 * N), C)
    flat = refs.reshape(-1, C)
    assert all(any(torch.equal(row, f) for f in flat) for row in stored[0])  # tokens of the reference images
    assert state.bank.nbytes() == stored.numel() * 4 and state.bank.nbytes("alice") == stored.numel() * 4
    assert (write_out - AttnProcessor2_0()(attn, refs)).abs().max() > 1e-4  # write mode also does CSA

    new = features(2, N, C, seed=2)  # two later panels read the bank
    state.mode, state.characters = "read", ("alice",)
    with torch.no_grad():
        read_out = proc(attn, new)
        for b in range(2):
            seq = torch.cat([stored[0], new[b]])[None]  # (1, k + N, C)
            expect = AttnProcessor2_0()(attn, seq)[0, -N:]  # each token's attention over the same keys
            torch.testing.assert_close(read_out[b], expect, **TOL)


def test_bank_two_characters_guidance_halves_steps_and_clear():
    C, N = 8, 4
    attn = random_attention(C, heads=2)
    state = CSAState(guidance_halves=True)
    proc = ConsistentSelfAttnProcessor(0.5, None, state=state, name="L")
    with torch.no_grad():
        for step in (0, 1):
            state.step = step
            for who, seed in (("alice", 1), ("bob", 2)):
                state.mode, state.characters = "write", (who,)
                proc(attn, features(4, N, C, seed=seed))  # 2 reference images x 2 guidance halves
        assert state.bank.characters == ["alice", "bob"] and len(state.bank) == 4
        assert state.bank.read("bob", 1, "L").shape == (2, 4, C)  # (halves, round(0.5 * 2 * 4), C)
        state.mode, state.characters, state.step = "read", ("alice", "bob"), 1
        out = proc(attn, features(2, N, C, seed=3))  # one image, [uncond; cond]
        assert out.shape == (2, N, C)
        state.characters = ("alice",)
        assert not torch.allclose(proc(attn, features(2, N, C, seed=3)), out)  # bob's tokens mattered
        total = state.bank.nbytes()
        state.bank.clear("bob")
        assert state.bank.characters == ["alice"] and state.bank.nbytes() == total // 2
        state.bank.clear()
        assert state.bank.nbytes() == 0 and len(state.bank) == 0


def test_bank_through_the_handle_on_a_unet(sdxl_unet):
    unet = sdxl_unet
    refs = tiny_unet_inputs(unet, batch=4, seed=1)  # 2 reference panels x [uncond; cond]
    later = tiny_unet_inputs(unet, batch=2, seed=2)  # 1 later panel x [uncond; cond]
    with torch.no_grad(), install_consistent_attention(unet, rate=0.5, tile=None, guidance_halves=True) as h:
        plain = None
        for step in range(2):
            h.set_step(step)
            with h.write("alice"):
                unet(**refs)
        assert len(h.bank) == 2 * len(h.layer_names) and h.bank.nbytes() > 0
        h.set_step(1)
        with h.read("alice"):
            read = unet(**later).sample
        with h.off():
            plain = unet(**later).sample
        assert (read - plain).abs().max() > 1e-4
        h.bank.clear()
        with h.read("alice"), pytest.raises(ValueError, match="holds no tokens for character 'alice'"):
            unet(**later)


# ---------------------------------------------------------------------------------------------------
# bad input: clear errors that name the fix
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="rate must be"):
        consistent_self_attention_reference(features(), rate, 2)
    with pytest.raises(ValueError, match="rate must be"):
        ConsistentSelfAttnProcessor(rate)


def test_bad_tile_and_stride():
    x = features(B=4)
    with pytest.raises(ValueError, match="must be >= 1"):
        consistent_self_attention_reference(x, 0.5, 0)
    with pytest.raises(ValueError, match="larger than the batch of 4 images"):
        consistent_self_attention_reference(x, 0.5, 5)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        consistent_self_attention_reference(x, 0.5, 2, stride=0)
    with pytest.raises(ValueError, match="would leave images outside every window"):
        consistent_self_attention_reference(x, 0.5, 2, stride=3)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        ConsistentSelfAttnProcessor(0.5, 2, 0)
    with pytest.raises(ValueError, match="stride needs a tile size"):
        ConsistentSelfAttnProcessor(0.5, None, 2)
    with pytest.raises(ValueError, match="larger than the batch of 4 images"), torch.no_grad():
        ConsistentSelfAttnProcessor(0.5, 8)(identity_attention(8), x)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \(B, N, C\)"):
        consistent_self_attention_reference(torch.randn(4, 8), 0.5, 2)
    x = features(B=6, N=10)
    wrong = draw_sampled_indices(6, 10, 0.5, 3, 3)  # 2 windows, but the call below has 4
    with pytest.raises(ValueError, match="windows of W=3 images"):
        consistent_self_attention_reference(x, 0.5, 3, stride=1, sampled_indices=wrong)
    with pytest.raises(ValueError, match=r"must lie in \[0, W\*N\)"):
        consistent_self_attention_reference(x, 0.5, 3, stride=3, sampled_indices=wrong + 100)
    with pytest.raises(ValueError, match="even batch"), torch.no_grad():
        ConsistentSelfAttnProcessor(0.5, state=CSAState(guidance_halves=True))(identity_attention(8), features(B=3))


def test_bad_processor_use():
    attn = identity_attention(8)
    x = features(B=4)
    with pytest.raises(ValueError, match="self-attention \\(attn1\\) layers only"):
        ConsistentSelfAttnProcessor(0.5)(attn, x, encoder_hidden_states=x)
    with pytest.raises(ValueError, match="does not take an attention_mask"):
        ConsistentSelfAttnProcessor(0.5)(attn, x, attention_mask=torch.ones(4, 10))
    state = CSAState(mode="read", characters=("carol",))
    with pytest.raises(ValueError, match="holds no tokens for character 'carol'"):
        ConsistentSelfAttnProcessor(0.5, state=state, name="L")(attn, x)
    with pytest.raises(ValueError, match="window_batch must be"):
        ConsistentSelfAttnProcessor(0.5, window_batch=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        ConsistentSelfAttnProcessor(0.5, state=CSAState(mode="bogus"))(attn, x)


def test_bad_bank_use():
    bank = ConsistencyBank()
    with pytest.raises(ValueError, match="holds no tokens for character 'dave'"):
        bank.read("dave", 0, "L")
    bank.write("dave", 0, "L", torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="nothing for step 1"):
        bank.read("dave", 1, "L")
    with pytest.raises(ValueError, match="bank tokens must be"):
        bank.write("dave", 0, "L", torch.zeros(2, 3))


def test_bad_install(sdxl_unet):
    unet = sdxl_unet
    with pytest.raises(TypeError, match="needs a diffusers UNet2DConditionModel"):
        install_consistent_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers must be one of"):
        install_consistent_attention(unet, layers="upper")
    with pytest.raises(ValueError, match="no self-attention layer matches"):
        install_consistent_attention(unet, layers=lambda n: False)
    with pytest.raises(ValueError, match="first_steps_without_csa must be"):
        install_consistent_attention(unet, first_steps_without_csa=-1)
    with install_consistent_attention(unet) as h:
        with pytest.raises(ValueError, match="already installed"):
            install_consistent_attention(unet)
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            h.set_step(-1)
        with pytest.raises(ValueError, match="read needs one or more character names"):
            h.read()
        with pytest.raises(ValueError, match="write needs one character name"):
            h.write("")
    with pytest.raises(ValueError, match="SkipSchedule.early_prob"):
        SkipSchedule(early_prob=2.0)


def test_sampled_token_count_rounds_half_up_at_inexact_products():
    """k = floor(rate * pool + 0.5): at rate * pool = 3.5, 2.5 and 0.35 (not only at exact products)."""
    from sdlite.attention import num_sampled_tokens

    assert num_sampled_tokens(2, 7, 0.5) == 4  # pool 7, 3.5 -> 4 (half up, not banker's 4 / floor 3)
    assert num_sampled_tokens(2, 5, 0.5) == 3  # 2.5 -> 3 (banker's rounding would give 2)
    assert num_sampled_tokens(3, 7, 0.25) == 4  # pool 14, 3.5 -> 4
    assert num_sampled_tokens(2, 1, 0.35) == 0 and num_sampled_tokens(2, 3, 0.35) == 1  # 0.35 -> 0, 1.05 -> 1
    assert num_sampled_tokens(2, 4, 0.5, include_self_in_sample=True) == 4  # pool 8 with the image itself


# ---------------------------------------------------------------------------------------------------
# official sampling: one keep-mask per source image and step, shared by a resolution's layers and both halves
# ---------------------------------------------------------------------------------------------------
class OfficialByHand:
    """The official semantics written out for one self-attention layer, image by image: per step, image j's token
    t is kept iff U[j, t] < r, with U one torch.rand(B, N) draw per resolution (the first layer of that resolution
    draws, in UNet order); query image i attends to the kept tokens of every other image of its guidance half, then
    all its own tokens; both halves use the same U."""

    def __init__(self, rate, generator, draws):
        self.rate, self.generator, self.draws = rate, generator, draws  # draws: {tokens: (B, N) bool}, shared

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        x = hidden_states  # (2B, N, C): [uncond; cond]
        n_all, tokens, _ = x.shape
        images = n_all // 2
        if tokens not in self.draws:
            self.draws[tokens] = torch.rand(images, tokens, generator=self.generator) < self.rate
        keep = self.draws[tokens]
        out = torch.empty_like(x)
        heads = attn.heads
        for half in range(2):
            xs = x[half * images:(half + 1) * images]
            for i in range(images):
                kv_tokens = torch.cat([xs[j][keep[j]] for j in range(images) if j != i] + [xs[i]])  # (m + N, C)
                q, k, v = attn.to_q(xs[i]), attn.to_k(kv_tokens), attn.to_v(kv_tokens)
                d = q.shape[-1] // heads
                q, k, v = (t.view(-1, heads, d).transpose(0, 1) for t in (q, k, v))  # (h, L, d)
                w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
                y = (w @ v).transpose(0, 1).reshape(tokens, -1)
                out[half * images + i] = attn.to_out[0](y)
        return out


@pytest.mark.parametrize("make", [tiny_sdxl_unet, tiny_sd15_unet])
def test_official_sampling_equals_the_official_semantics_by_hand(make):
    """The whole UNet with CSA (official sampling, every self-attention layer, both guidance halves) equals the
    UNet with the by-hand layer above, step after step: same keep-masks in every layer of a resolution, in both
    halves, redrawn each step. (The tiny SD1.5 UNet has self-attention at two resolutions, 16x16 and 8x8.)"""
    unet = make(seed=0)
    inputs = tiny_unet_inputs(unet, batch=6, seed=1)  # 3 images x 2 guidance halves
    names = self_attention_layer_names(unet)
    with torch.no_grad():
        handle = install_consistent_attention(unet, rate=0.5, layers="all", guidance_halves=True,
                                              sampling="official", seed=7)
        ours = []
        for step in range(3):
            handle.set_step(step)
            ours.append(unet(**inputs).sample)
        handle.remove()
        original = dict(unet.attn_processors)
        generator = torch.Generator().manual_seed(7)
        by_hand = []
        for step in range(3):
            draws = {}  # a new draw per step, shared by the layers of a resolution
            unet.set_attn_processor({**original, **{n + ".processor": OfficialByHand(0.5, generator, draws)
                                                    for n in names}})
            by_hand.append(unet(**inputs).sample)
        unet.set_attn_processor(original)
    for a, b in zip(ours, by_hand):
        torch.testing.assert_close(a, b, **TOL)
    assert (ours[0] - ours[1]).abs().max() > 1e-4  # new masks every step


def test_official_masks_are_drawn_once_per_step_and_resolution(monkeypatch):
    import sdlite.attention as attention

    unet = tiny_sd15_unet(seed=0)  # self-attention at 16x16 (down 0, up 1) and 8x8 (mid)
    calls = []
    real = attention.draw_keep_masks
    monkeypatch.setattr(attention, "draw_keep_masks",
                        lambda images, tokens, rate, g: calls.append((images, tokens)) or real(images, tokens, rate, g))
    inputs = tiny_unet_inputs(unet, batch=8)
    with torch.no_grad(), install_consistent_attention(unet, rate=0.5, layers="all", guidance_halves=True,
                                                       sampling="official") as h:
        assert len(h.layer_names) == 4
        h.set_step(0)
        unet(**inputs)
        assert sorted(calls) == [(4, 64), (4, 256)]  # one draw per resolution for 4 layers; 4 images a half
        unet(**inputs)  # the same step again (e.g. a second UNet call of a Heun step): the same masks
        assert len(calls) == 2
        h.set_step(1)
        unet(**inputs)
        assert len(calls) == 4


def test_official_counts_are_random_and_the_bank_holds_the_kept_tokens():
    from sdlite.token_sampling import draw_keep_masks, official_key_indices

    keep = draw_keep_masks(4, 100, 0.5, torch.Generator().manual_seed(0))
    counts = [len(m) for m in keep]
    assert len(set(counts)) > 1 and all(30 < c < 70 for c in counts)  # random, about r*N
    assert all(torch.equal(m, m.sort().values) and m.unique().numel() == len(m) for m in keep)
    idx, valid = official_key_indices(keep, 100, tile=4)
    assert idx.shape[:2] == (1, 4) and idx.shape[2] == max(sum(counts) - c + 100 for c in counts)
    for i in range(4):  # image i: the others' kept tokens, then its own 100
        n = int(valid[0, i].sum())
        assert n == sum(counts) - counts[i] + 100
        expect = torch.cat([j * 100 + keep[j] for j in range(4) if j != i] + [i * 100 + torch.arange(100)])
        assert torch.equal(idx[0, i, :n], expect)
    assert all(len(m) == 100 for m in draw_keep_masks(2, 100, 1.0)) and all(
        len(m) == 0 for m in draw_keep_masks(2, 100, 0.0))
    # write mode stores exactly the kept tokens of the step's masks: (G, sum m_j, C)
    attn = random_attention(C=16, heads=4)
    state = CSAState(generator=torch.Generator().manual_seed(3), guidance_halves=True, sampling="official",
                     mode="write", characters=("bob",), step=0)
    proc = ConsistentSelfAttnProcessor(0.5, state=state, name="l")
    x = features(B=6, N=50, C=16)
    proc(attn, x)
    expect = draw_keep_masks(3, 50, 0.5, torch.Generator().manual_seed(3))
    stored = state.bank.read("bob", 0, "l")
    assert stored.shape == (2, sum(len(m) for m in expect), 16)
    torch.testing.assert_close(stored[1], torch.cat([x[3 + j][m] for j, m in enumerate(expect)]))


def test_rates_per_resolution_and_layer_scale(sdxl_unet):
    from sdlite.attention import layer_scale

    assert layer_scale(sdxl_unet, "up_blocks.0.attentions.0.transformer_blocks.0.attn1") == 16
    assert layer_scale(sdxl_unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1") == 16
    assert layer_scale(sdxl_unet, "mid_block.attentions.0.transformer_blocks.0.attn1") == 16
    assert layer_scale(sdxl_unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1", vae_scale_factor=4) == 4
    sd15 = tiny_sd15_unet(seed=0)
    with install_consistent_attention(sd15, rate=0.5, layers="all", rate_by_scale={16: 0.2, 8: 0.9}) as h:
        rates = {n: h.processors[n + ".processor"].rate for n in h.layer_names}
    assert rates == {n: (0.9 if n.startswith(("down_blocks.0", "up_blocks.1")) else 0.2) for n in rates}
    with pytest.raises(ValueError, match="rate must be in"):
        install_consistent_attention(sd15, rate_by_scale={16: 2.0})
    with pytest.raises(ValueError, match="sampling must be one of"):
        install_consistent_attention(sd15, sampling="paper")


# --- mutation survivors (tools/mutation.py attention; docs/mutation.md) ---
def test_features_message_names_the_shape_or_the_type():
    hint = ": flatten each image's H*W grid into N tokens first"
    with pytest.raises(ValueError, match=whole("x must be image features of shape (B, N, C), got (4, 8)" + hint)):
        consistent_self_attention_reference(torch.randn(4, 8), 0.5, 2)
    with pytest.raises(ValueError, match=whole("x must be image features of shape (B, N, C), got list" + hint)):
        consistent_self_attention_reference([[[0.0]]], 0.5, 1)


@pytest.mark.parametrize("stride, include_self", [(2, False), (1, True), (2, True)])
def test_reference_draws_its_sample_with_the_given_stride_and_pool(stride, include_self):
    """Without sampled_indices the reference draws them itself: the same as drawing them first with the same
    generator, the call's stride and its include_self_in_sample (a pool of W*N tokens, not (W-1)*N)."""
    x = features(B=5, N=6, C=8)
    drawn = draw_sampled_indices(5, 6, 0.5, 3, stride, torch.Generator().manual_seed(7), include_self)
    assert drawn.shape[2] == (9 if include_self else 6)  # round(0.5 * 3 * 6) or round(0.5 * 2 * 6)
    expect = consistent_self_attention_reference(x, 0.5, 3, stride=stride, include_self_in_sample=include_self,
                                                 sampled_indices=drawn)
    got = consistent_self_attention_reference(x, 0.5, 3, torch.Generator().manual_seed(7), stride=stride,
                                              include_self_in_sample=include_self)
    torch.testing.assert_close(got, expect, atol=0, rtol=0)


def test_reference_keeps_the_input_dtype_and_device():
    """bfloat16 in, bfloat16 out (the window count too: a float32 count would promote the division); a tensor on
    another device (here "meta", which only tracks shapes) stays there."""
    x = features(B=4, N=6, C=8, dtype=torch.float64)
    idx = draw_sampled_indices(4, 6, 0.5, 3, 1, torch.Generator().manual_seed(0))  # 2 windows: images 1, 2 twice
    want = consistent_self_attention_reference(x, 0.5, 3, sampled_indices=idx)
    low = consistent_self_attention_reference(x.to(torch.bfloat16), 0.5, 3, sampled_indices=idx)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), want, atol=0.05, rtol=0.05)
    meta = consistent_self_attention_reference(x.to("meta"), 0.5, 3, sampled_indices=idx)
    assert meta.device.type == "meta" and meta.shape == x.shape


def test_skip_schedule_switch_step_zero_is_allowed_and_negative_is_refused():
    late_only = SkipSchedule(early_prob=0.3, late_prob=0.1, switch_step=0)  # the late probability from step 0
    assert late_only.skip_probability(0) == 0.1 and late_only.skip_probability(5) == 0.1
    with pytest.raises(ValueError, match=whole("SkipSchedule.switch_step must be >= 0, got -1")):
        SkipSchedule(switch_step=-1)


class SpyProcessor:
    """An `original` processor that counts its calls (and answers like the stock one)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, attn, hidden_states, attention_mask=None, temb=None, **kwargs):
        self.calls += 1
        return AttnProcessor2_0()(attn, hidden_states, attention_mask=attention_mask, temb=temb)


# shape, rate, tile, include_self, guidance_halves, sampling, whether the original processor answers
ORIGINAL_OR_CSA = [
    ((2, 4, 16), 0.1, None, False, False, "exact", True),  # k = round(0.1 * 1 * 4) = 0: nothing to share
    ((2, 8, 16), 0.1, None, False, False, "exact", False),  # k = round(0.1 * 8) = 1
    ((2, 16, 2, 2), 0.1, None, False, False, "exact", True),  # (B, C, H, W): N = H*W = 4, k = 0 (C = 16 not N)
    ((2, 16, 4, 2), 0.1, None, False, False, "exact", False),  # N = 8, k = 1
    ((4, 4, 16), 0.1, 2, False, False, "exact", True),  # windows of 2: k = round(0.1 * 1 * 4) = 0 (of 4: 1)
    ((2, 4, 16), 0.5, None, False, True, "exact", True),  # one image per guidance half
    ((2, 4, 16), 0.1, None, True, False, "exact", False),  # pool W*N = 8 with the image itself: k = 1
    ((2, 4, 16), 0.1, None, False, False, "official", False),  # official: any rate > 0 may keep tokens
    ((2, 4, 16), 0.5, None, False, False, "official", False),
    ((2, 4, 16), 0.0, None, False, False, "official", True),  # official at rate 0: nothing kept
    ((1, 4, 16), 0.5, None, False, False, "official", True),  # official, a single image: nobody to share with
    ((2, 0, 16), 0.5, None, False, False, "official", True),  # no tokens at all: nothing to share
]


@pytest.mark.parametrize("shape, rate, tile, include_self, halves, sampling, original", ORIGINAL_OR_CSA)
def test_the_original_processor_answers_exactly_when_nothing_can_be_shared(shape, rate, tile, include_self,
                                                                           halves, sampling, original):
    """The processor hands the call to the layer's original processor when an image would sample no token of
    the others (k = 0 in exact sampling; rate 0 or one image per window in official sampling), and does CSA
    otherwise. The spy sees which."""
    spy = SpyProcessor()
    state = CSAState(guidance_halves=halves, sampling=sampling)
    proc = ConsistentSelfAttnProcessor(rate, tile, include_self_in_sample=include_self, state=state, original=spy)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = proc(random_attention(16, heads=4), x)
    assert out.shape == x.shape and spy.calls == int(original)


def test_write_mode_needs_exactly_one_character():
    attn = random_attention(8, heads=2)
    for characters in [(), ("alice", "bob")]:
        proc = ConsistentSelfAttnProcessor(0.5, state=CSAState(mode="write", characters=characters))
        with pytest.raises(ValueError, match=whole(
                "write mode stores one character per batch: use `with handle.write('name'):`")), torch.no_grad():
            proc(attn, features(B=2, N=4, C=8))


def test_write_bank_draws_its_sample_from_the_state_generator():
    """The stored tokens are x's tokens at randperm(B*N, generator=state.generator)[:k], k = round(r * B*N): the
    story's seed decides them, not torch's global generator."""
    C, N = 8, 5
    x = features(3, N, C, seed=4)
    state = CSAState(generator=torch.Generator().manual_seed(11), mode="write", characters=("eve",), step=0)
    torch.manual_seed(0)  # the global generator, in a state unrelated to the story's seed
    with torch.no_grad():
        ConsistentSelfAttnProcessor(0.5, state=state, name="L")(random_attention(C, heads=2), x)
    picked = torch.randperm(15, generator=torch.Generator().manual_seed(11))[:8]  # k = round(7.5) = 8
    torch.testing.assert_close(state.bank.read("eve", 0, "L")[0], x.reshape(15, C)[picked], atol=0, rtol=0)


def test_read_mode_needs_a_character_and_a_bank_of_this_layers_shape():
    attn = random_attention(8, heads=2)
    x = features(B=2, N=4, C=8)  # N = 4 tokens of C = 8 channels (N != C: the message names the channels)
    with pytest.raises(ValueError, match=whole(
            "read mode needs at least one character: use `with handle.read('name', ...):`")), torch.no_grad():
        ConsistentSelfAttnProcessor(0.5, state=CSAState(mode="read", characters=()), name="L")(attn, x)
    advice = ": write and read with the same guidance_halves setting and the same layers"
    # written without guidance halves (one group), read with them (two groups); the same channels
    state = CSAState(mode="read", characters=("alice",), step=0, guidance_halves=True)
    state.bank.write("alice", 0, "L", torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match=whole(
            "bank of 'alice' has shape (1, 3, 8) but this layer reads 2 guidance group(s) of 8 channels" + advice)):
        with torch.no_grad():
            ConsistentSelfAttnProcessor(0.5, state=state, name="L")(attn, x)
    # the same groups, other channels (e.g. a bank of another layer)
    state = CSAState(mode="read", characters=("alice",), step=0)
    state.bank.write("alice", 0, "L", torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match=whole(
            "bank of 'alice' has shape (1, 3, 4) but this layer reads 1 guidance group(s) of 8 channels" + advice)):
        with torch.no_grad():
            ConsistentSelfAttnProcessor(0.5, state=state, name="L")(attn, x)


def qk_norm_residual_attention(C=16, heads=4, seed=0):
    """An Attention layer with layer-norms on q and k per head and a residual connection (as SD3/Flux-style blocks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attn = Attention(query_dim=C, heads=heads, dim_head=C // heads, bias=True, qk_norm="layer_norm",
                         residual_connection=True)
        with torch.no_grad():
            for norm in (attn.norm_q, attn.norm_k):  # not the identity's ones/zeros: the norms must show
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
    return attn.eval()


def test_read_mode_uses_the_layers_qk_norm_and_residual():
    """Read with a layer that has norm_q / norm_k and residual_connection: equal to the stock processor over
    [bank; own] (which applies both) keeping the own tokens' rows."""
    C, N = 16, 6
    attn = qk_norm_residual_attention(C)
    stored = features(1, 5, C, seed=1)  # (G=1, Kb=5, C)
    state = CSAState(mode="read", characters=("alice",), step=0)
    state.bank.write("alice", 0, "L", stored)
    new = features(2, N, C, seed=2)
    with torch.no_grad():
        out = ConsistentSelfAttnProcessor(0.5, state=state, name="L")(attn, new)
        for b in range(2):
            expect = AttnProcessor2_0()(attn, torch.cat([stored[0], new[b]])[None])[0, -N:]
            torch.testing.assert_close(out[b], expect, **TOL)
        plain = AttnProcessor2_0()(attn, new)
    assert (out - plain).abs().max() > 1e-3  # the bank changed the result


def test_read_mode_moves_the_bank_to_the_layers_device():
    """A bank kept on the CPU is read by a layer on another device ("meta" here: shapes only)."""
    C, N = 16, 6
    attn = random_attention(C, heads=4).to("meta")
    state = CSAState(mode="read", characters=("alice",), step=0)
    state.bank.write("alice", 0, "L", features(1, 5, C, seed=1))
    with torch.no_grad():
        out = ConsistentSelfAttnProcessor(0.5, state=state, name="L")(attn, features(2, N, C).to("meta"))
    assert out.device.type == "meta" and out.shape == (2, N, C)


def test_self_attention_layers_are_the_transformer_blocks_attn1_only():
    """A UNet with an old-style attention block (AttnDownBlock2D: a self-attention ``Attention`` named
    ``down_blocks.0.attentions.0``, not a transformer block's attn1): only the attn1 layers are chosen."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2, cross_attention_dim=8,
            norm_num_groups=4)
    old_style = unet.get_submodule("down_blocks.0.attentions.0")
    assert type(old_style).__name__ == "Attention" and not old_style.is_cross_attention
    assert self_attention_layer_names(unet) == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "mid_block.attentions.0.transformer_blocks.0.attn1",
    ]


def test_layer_choice_messages(sdxl_unet):
    from sdlite.attention import csa_layer_names, layer_scale

    with pytest.raises(ValueError, match=whole(
            "layer 'conv_in' is not in down_blocks, mid_block or up_blocks: cannot tell its resolution")):
        layer_scale(sdxl_unet, "conv_in")
    with pytest.raises(ValueError, match=whole(
            "layers must be 'up', 'all', 'down', 'mid' or a callable, got int")):
        csa_layer_names(sdxl_unet, 3)


def test_handle_argument_checks_and_messages(sdxl_unet):
    with install_consistent_attention(sdxl_unet) as h:
        for bad in (True, 1.5, "2"):
            with pytest.raises(ValueError, match=whole(
                    f"step must be an int >= 0 (the denoising step index) or None, got {bad!r}")):
                h.set_step(bad)
        h.set_step(0)
        assert h.state.step == 0
        with pytest.raises(ValueError, match=whole(
                "stride needs a tile size: pass tile=W as well (or neither for one window)")):
            h.set_tiles(None, 2)
        for bad in [("",), (42,), ("alice", "")]:
            with pytest.raises(ValueError, match=whole(
                    f"read needs one or more character names, got {bad!r}: e.g. handle.read('alice', 'bob')")):
                h.read(*bad)
        with h.off():
            assert (h.state.mode, h.state.characters) == ("off", ())
        with h.read("alice", "bob"):
            assert (h.state.mode, h.state.characters) == ("read", ("alice", "bob"))
            with h.off():  # off inside read: no characters; read's come back after it
                assert (h.state.mode, h.state.characters) == ("off", ())
            assert (h.state.mode, h.state.characters) == ("read", ("alice", "bob"))


def test_reseed_also_forgets_the_steps_official_masks(sdxl_unet):
    """Official sampling draws one set of keep-masks per step; reseed(s) drops them, so the same step after
    reseed(1) draws anew and equals a handle seeded 1 (reusing the seed-0 masks would not)."""
    inputs = tiny_unet_inputs(sdxl_unet, batch=4)
    outs = {}
    with torch.no_grad():
        with install_consistent_attention(sdxl_unet, rate=0.5, layers="all", sampling="official", seed=0) as h:
            h.set_step(0)
            outs["seed 0"] = sdxl_unet(**inputs).sample
            h.reseed(1)
            outs["reseeded 1"] = sdxl_unet(**inputs).sample
        with install_consistent_attention(sdxl_unet, rate=0.5, layers="all", sampling="official", seed=1) as h:
            h.set_step(0)
            outs["seed 1"] = sdxl_unet(**inputs).sample
    assert torch.equal(outs["reseeded 1"], outs["seed 1"])
    assert (outs["seed 0"] - outs["seed 1"]).abs().max() > 1e-4


def test_bank_steps_are_the_first_n_steps():
    """bank_steps=n: steps 0 .. n-1 are stored and read (step None counts as 0), step n and later are not."""
    def steps_in(n):
        return [s for s in (None, 0, 1, 2, 3) if CSAState(bank_steps=n, step=s).bank_step()]

    assert steps_in(1) == [None, 0]
    assert steps_in(2) == [None, 0, 1]
    assert steps_in(None) == [None, 0, 1, 2, 3]


def test_write_mode_at_rate_one_stores_every_token_in_order():
    x = features(4, 5, 8, seed=6)  # 2 images x [uncond; cond]
    state = CSAState(mode="write", characters=("ann",), step=0, guidance_halves=True)
    with torch.no_grad():
        ConsistentSelfAttnProcessor(1.0, state=state, name="L")(random_attention(8, heads=2), x)
    torch.testing.assert_close(state.bank.read("ann", 0, "L"), x.reshape(2, 10, 8), atol=0, rtol=0)


def test_read_mode_casts_a_half_precision_bank_to_the_layers_dtype():
    """A bank kept in float16 (ConsistencyBank(dtype=torch.float16)) is read by a float32 layer: the tokens are
    cast back, and the result is the stock processor over [bank as float32; own]."""
    C, N = 16, 6
    attn = random_attention(C, heads=4)
    state = CSAState(mode="read", characters=("alice",), step=0, bank=ConsistencyBank(dtype=torch.float16))
    state.bank.write("alice", 0, "L", features(1, 5, C, seed=1))
    stored = state.bank.read("alice", 0, "L")
    assert stored.dtype == torch.float16
    new = features(2, N, C, seed=2)
    with torch.no_grad():
        out = ConsistentSelfAttnProcessor(0.5, state=state, name="L")(attn, new)
        assert out.dtype == torch.float32
        for b in range(2):
            expect = AttnProcessor2_0()(attn, torch.cat([stored[0].float(), new[b]])[None])[0, -N:]
            torch.testing.assert_close(out[b], expect, **TOL)


def test_two_images_per_guidance_half_are_not_one():
    """guidance_halves with 4 images: 2 per half, so CSA runs (a third of the batch, 1 image, would not)."""
    spy = SpyProcessor()
    proc = ConsistentSelfAttnProcessor(0.5, state=CSAState(guidance_halves=True), original=spy)
    with torch.no_grad():
        proc(random_attention(16, heads=4), features(4, 4, 16))
    assert spy.calls == 0


def test_install_passes_its_settings_to_every_processor_and_the_state(sdxl_unet):
    bank = ConsistencyBank(dtype=torch.float16)
    with install_consistent_attention(sdxl_unet, rate=0.3, tile=2, stride=1, include_self_in_sample=True,
                                      window_batch=3, bank=bank, bank_steps=2, layers="all") as h:
        procs = list(h.processors.values())
        assert len(procs) == 8
        assert all((p.rate, p.tile, p.stride, p.include_self_in_sample, p.window_batch) == (0.3, 2, 1, True, 3)
                   for p in procs)
        assert h.bank is bank and h.state.bank_steps == 2 and all(p.state is h.state for p in procs)
    with install_consistent_attention(sdxl_unet) as h:  # the defaults
        procs = list(h.processors.values())
        assert all((p.rate, p.tile, p.stride, p.include_self_in_sample, p.window_batch) == (0.5, None, None, False, 1)
                   for p in procs)
        assert h.state.generator.initial_seed() == 0 and h.state.bank_steps is None
        assert isinstance(h.bank, ConsistencyBank) and len(h.bank) == 0
        assert repr(h) == "ConsistentAttentionHandle(layers=4, mode='batch', step=None, removed=False)"
        assert h.removed is False


def test_rate_by_scale_leaves_other_scales_at_rate_and_uses_vae_scale_factor():
    sd15 = tiny_sd15_unet(seed=0)  # down_blocks.0 / up_blocks.1 at scale 8, mid_block at 16 (vae_scale_factor 8)
    with install_consistent_attention(sd15, rate=0.5, layers="all", rate_by_scale={16: 0.2}) as h:
        rates = {n: h.processors[n + ".processor"].rate for n in h.layer_names}
    assert rates == {n: (0.5 if n.startswith(("down_blocks.0", "up_blocks.1")) else 0.2) for n in rates}
    with install_consistent_attention(sd15, rate=0.5, layers="all", rate_by_scale={4: 0.9, 8: 0.2},
                                      vae_scale_factor=4) as h:  # the scales halve with the VAE's factor
        rates = {n: h.processors[n + ".processor"].rate for n in h.layer_names}
    assert rates == {n: (0.9 if n.startswith(("down_blocks.0", "up_blocks.1")) else 0.2) for n in rates}


def test_remove_twice_does_not_undo_a_later_install(sdxl_unet):
    first = install_consistent_attention(sdxl_unet)
    first.remove()
    assert first.removed is True
    assert repr(first) == "ConsistentAttentionHandle(layers=4, mode='batch', step=None, removed=True)"
    with install_consistent_attention(sdxl_unet, rate=0.25) as second:
        first.remove()  # already removed: nothing happens
        installed = [p for p in sdxl_unet.attn_processors.values() if isinstance(p, ConsistentSelfAttnProcessor)]
        assert len(installed) == 4 and all(p.state is second.state for p in installed)
    assert not any(isinstance(p, ConsistentSelfAttnProcessor) for p in sdxl_unet.attn_processors.values())


class ProcessorsOnly(torch.nn.Module):
    """Has attn_processors but no set_attn_processor: not a UNet2DConditionModel."""

    attn_processors = {}


def test_install_argument_messages(sdxl_unet):
    with pytest.raises(TypeError, match=whole(
            "install_consistent_attention needs a diffusers UNet2DConditionModel, got Linear")):
        install_consistent_attention(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=whole(
            "install_consistent_attention needs a diffusers UNet2DConditionModel, got ProcessorsOnly")):
        install_consistent_attention(ProcessorsOnly())

    def nothing(name):
        return False

    first_four = self_attention_layer_names(sdxl_unet)[:4]
    with pytest.raises(ValueError, match=whole(
            f"no self-attention layer matches layers={nothing!r}; available: {first_four}...")):
        install_consistent_attention(sdxl_unet, layers=nothing)
    with pytest.raises(ValueError, match=whole(
            "include_self_in_sample is a choice of exact sampling: official sampling keeps every own token and "
            "masks the others; drop one of the two")):
        install_consistent_attention(sdxl_unet, sampling="official", include_self_in_sample=True)
    with install_consistent_attention(sdxl_unet, sampling="exact", include_self_in_sample=True) as h:
        assert all(p.include_self_in_sample for p in h.processors.values())
        with pytest.raises(ValueError, match=whole(
                "consistent attention is already installed on this UNet: call handle.remove() first")):
            install_consistent_attention(sdxl_unet)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match=whole(
                f"bank_steps must be an int >= 1 or None (every step), got {bad!r}")):
            install_consistent_attention(sdxl_unet, bank_steps=bad)
    for good in (1, 2):
        with install_consistent_attention(sdxl_unet, bank_steps=good) as h:
            assert h.state.bank_steps == good


def test_install_keeps_each_layers_own_processor_as_the_original(sdxl_unet):
    before = dict(sdxl_unet.attn_processors)
    with install_consistent_attention(sdxl_unet, layers="all") as h:
        assert all(p.original is before[key] for key, p in h.processors.items())


def test_joint_attention_uses_the_layers_qk_norm_and_residual():
    """r = 1 over the whole batch, with a layer that has norm_q / norm_k and a residual connection: the stock
    processor (which applies both) over all B*N tokens as one sequence; the same through the index path."""
    B, N, C = 4, 5, 16
    x = features(B, N, C)
    attn = qk_norm_residual_attention(C)
    with torch.no_grad():
        joint = AttnProcessor2_0()(attn, x.reshape(1, B * N, C)).reshape(B, N, C)
        torch.testing.assert_close(ConsistentSelfAttnProcessor(1.0, B)(attn, x), joint, **TOL)
        idx = draw_sampled_indices(B, N, 1.0, B, B)
        via_index = ConsistentSelfAttnProcessor(1.0 - 1e-9, B)(attn, x, sampled_indices=idx)
        torch.testing.assert_close(via_index, joint, **TOL)


def test_processor_draws_its_sample_with_include_self():
    """Without sampled_indices the processor draws from the state's generator with its include_self_in_sample."""
    x = features(B=4, N=6, C=16)
    attn = random_attention(16, heads=4)
    with torch.no_grad():
        state = CSAState(generator=torch.Generator().manual_seed(5))
        got = ConsistentSelfAttnProcessor(0.5, 2, include_self_in_sample=True, state=state)(attn, x)
        drawn = draw_sampled_indices(4, 6, 0.5, 2, 2, torch.Generator().manual_seed(5), True)
        want = ConsistentSelfAttnProcessor(0.5, 2, include_self_in_sample=True)(attn, x, sampled_indices=drawn)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_disjoint_tiles_with_a_shifted_last_window_average_the_shared_image():
    """3 images in tiles of 2 (stride 2): windows [0, 1] and [1, 2]; image 1 is the mean of its two results, as in
    the reference (identity projections, one head)."""
    x = features(B=3, N=6, C=8)
    idx = draw_sampled_indices(3, 6, 0.5, 2, 2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = ConsistentSelfAttnProcessor(0.5, 2)(identity_attention(8), x, sampled_indices=idx)
    torch.testing.assert_close(fast, consistent_self_attention_reference(x, 0.5, 2, stride=2, sampled_indices=idx),
                               **TOL)


def test_official_sampling_in_disjoint_tiles_is_each_tile_with_its_images_masks():
    """Official sampling, 4 images in tiles of 2: the same as running each tile alone with the masks of its two
    images (this step's masks set by hand in the state)."""
    N, C, r = 6, 16, 0.5
    x = features(B=4, N=N, C=C)
    attn = random_attention(C, heads=4)
    keep = draw_keep_masks(4, N, r, torch.Generator().manual_seed(1))
    with torch.no_grad():
        state = CSAState(sampling="official", keep_masks={(None, 4, N, r): keep})
        tiled = ConsistentSelfAttnProcessor(r, 2, state=state)(attn, x)
        for t in (0, 1):
            alone = CSAState(sampling="official", keep_masks={(None, 2, N, r): keep[2 * t:2 * t + 2]})
            one = ConsistentSelfAttnProcessor(r, state=alone)(attn, x[2 * t:2 * t + 2])
            torch.testing.assert_close(tiled[2 * t:2 * t + 2], one, **TOL)


@pytest.mark.parametrize("sampling, tile, stride", [("exact", 2, 1), ("official", 2, 2), ("official", None, None)])
def test_processor_keeps_the_input_device(sampling, tile, stride):
    """Windows, key masks and image indices follow the input to its device ("meta" here: shapes only)."""
    attn = random_attention(16, heads=4).to("meta")
    state = CSAState(sampling=sampling)
    with torch.no_grad():
        out = ConsistentSelfAttnProcessor(0.5, tile, stride, state=state)(attn, features(4, 6, 16).to("meta"))
    assert out.device.type == "meta" and out.shape == (4, 6, 16)


def test_hidden_states_of_another_rank_are_refused_with_their_shape():
    with pytest.raises(ValueError, match=whole("hidden_states must be (B, N, C) or (B, C, H, W), got (2, 16)")):
        with torch.no_grad():
            ConsistentSelfAttnProcessor(0.5)(random_attention(16, heads=4), torch.randn(2, 16))


def test_spatial_norm_gets_the_features_and_temb():
    """A layer with a spatial norm (conditioned on temb, as in a VQ decoder): CSA with an empty sample (each image
    only on itself) equals the stock processor, which normalises the (B, C, H, W) input with temb first."""
    import copy

    C, B = 32, 2  # SpatialNorm's group norm has 32 groups
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        attn = Attention(query_dim=C, heads=4, dim_head=8, spatial_norm_dim=4).eval()
    x = torch.randn(B, C, 3, 3, generator=torch.Generator().manual_seed(1))
    temb = torch.randn(B, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    empty = torch.zeros(B, 1, 0, dtype=torch.long)  # windows of one image, no sampled token
    with torch.no_grad():
        ours = ConsistentSelfAttnProcessor(0.5, 1)(attn, x, temb=temb, sampled_indices=empty)
        stock = AttnProcessor2_0()(attn, x, temb=temb)
        plain = copy.deepcopy(attn)
        plain.spatial_norm = None
        without_norm = AttnProcessor2_0()(plain, x)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, stock, **TOL)
    assert (stock - without_norm).abs().max() > 1e-3


def test_call_messages_and_off_mode_skips_the_even_batch_check():
    attn = random_attention(16, heads=4)
    x = features(B=3, N=10, C=16)
    proc = ConsistentSelfAttnProcessor(0.5, state=CSAState(guidance_halves=True), name="up.attn1")
    with pytest.raises(ValueError, match=whole(
            "guidance_halves=True needs an even batch [uncond; cond], got 3 images: set handle.guidance_halves = "
            "False when running without classifier-free guidance")), torch.no_grad():
        proc(attn, x)
    with pytest.raises(ValueError, match=whole(
            "ConsistentSelfAttnProcessor on layer 'up.attn1' got encoder_hidden_states: it is for self-attention "
            "(attn1) layers only; leave cross-attention (attn2) alone")), torch.no_grad():
        proc(attn, features(B=2, N=10, C=16), encoder_hidden_states=x)
    spy = SpyProcessor()
    off = ConsistentSelfAttnProcessor(0.5, state=CSAState(guidance_halves=True, mode="off"), original=spy)
    with torch.no_grad():
        off(attn, x)  # off: the original processor, whatever the batch
    assert spy.calls == 1


def test_write_mode_with_one_reference_image_stores_it_and_answers_with_the_original():
    """One reference image shares with nobody: the original processor answers, but its tokens are still stored."""
    spy = SpyProcessor()
    state = CSAState(mode="write", characters=("ann",), step=0)
    x = features(B=1, N=6, C=16)
    with torch.no_grad():
        ConsistentSelfAttnProcessor(0.5, state=state, name="L", original=spy)(random_attention(16, heads=4), x)
    assert spy.calls == 1 and state.bank.read("ann", 0, "L").shape == (1, 3, 16)  # round(0.5 * 6) tokens


class RecordingProcessor:
    """An `original` processor that records what it was given and returns its input."""

    def __init__(self):
        self.seen = []

    def __call__(self, attn, hidden_states, attention_mask=None, temb=None, **kwargs):
        self.seen.append((attention_mask, temb, kwargs))
        return hidden_states


@pytest.mark.parametrize("mode, rate", [("off", 0.5), ("batch", 0.0)])
def test_the_original_processor_gets_the_mask_temb_and_other_arguments(mode, rate):
    """When the original processor answers (CSA off, or nothing to share), it gets the call's attention_mask, temb
    and other keyword arguments as they were given (a masked call is not refused then)."""
    spy = RecordingProcessor()
    x = features(B=2, N=4, C=16)
    mask, temb = torch.ones(2, 4), torch.zeros(2, 8)
    proc = ConsistentSelfAttnProcessor(rate, state=CSAState(mode=mode), original=spy)
    with torch.no_grad():
        out = proc(random_attention(16, heads=4), x, attention_mask=mask, temb=temb, scale=1.0)
    assert out is x and len(spy.seen) == 1
    seen_mask, seen_temb, kwargs = spy.seen[0]
    assert seen_mask is mask and seen_temb is temb and kwargs == {"scale": 1.0}


def test_processor_messages_in_full():
    attn = random_attention(16, heads=4)
    x = features(B=2, N=4, C=16)
    with pytest.raises(ValueError, match=whole(
            "ConsistentSelfAttnProcessor does not take an attention_mask: self-attention layers of "
            "UNet2DConditionModel have none; use the stock processor for masked inputs")), torch.no_grad():
        ConsistentSelfAttnProcessor(0.5)(attn, x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=whole(
            "CSAState.mode must be one of ('batch', 'write', 'read', 'off'), got 'bogus'")), torch.no_grad():
        ConsistentSelfAttnProcessor(0.5, state=CSAState(mode="bogus"))(attn, x)
    with pytest.raises(ValueError, match=whole(
            "stride needs a tile size: pass tile=W as well (or neither for one window)")):
        ConsistentSelfAttnProcessor(0.5, None, 2)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match=whole(
                f"window_batch must be an int >= 1 or None (all windows at once), got {bad!r}")):
            ConsistentSelfAttnProcessor(0.5, window_batch=bad)


def test_processor_settings_and_defaults():
    p = ConsistentSelfAttnProcessor(0.25, 3, 1, include_self_in_sample=1, window_batch=None, name="L")
    assert (p.rate, p.tile, p.stride, p.include_self_in_sample, p.window_batch, p.name) == (0.25, 3, 1, True, None, "L")
    assert repr(p) == "ConsistentSelfAttnProcessor(rate=0.25, tile=3, stride=1, include_self_in_sample=True, name='L')"
    d = ConsistentSelfAttnProcessor()
    assert (d.rate, d.tile, d.stride, d.include_self_in_sample, d.window_batch, d.name) == (
        0.5, None, None, False, 1, "")
    assert isinstance(d.original, AttnProcessor2_0) and isinstance(d.state, CSAState) and d.state.mode == "batch"
    state = CSAState()
    assert ConsistentSelfAttnProcessor(state=state, window_batch=2).state is state


def test_read_mode_after_the_bank_steps_is_the_original_processor():
    """bank_steps=1: step 0 reads the bank; step 1 (nothing stored for it) is answered by the original processor,
    given the layer, the input, temb and the other arguments."""
    spy = RecordingProcessor()
    seen_attn = []
    x, temb = features(B=2, N=4, C=16), torch.zeros(2, 8)
    attn = random_attention(16, heads=4)

    def original(a, hidden_states, **kwargs):
        seen_attn.append((a, hidden_states))
        return spy(a, hidden_states, **kwargs)

    state = CSAState(mode="read", characters=("ann",), step=0, bank_steps=1)
    state.bank.write("ann", 0, "L", features(1, 3, 16, seed=1))
    proc = ConsistentSelfAttnProcessor(0.5, state=state, name="L", original=original)
    with torch.no_grad():
        assert proc(attn, x).shape == x.shape and not spy.seen  # step 0: the bank
        state.step = 1
        out = proc(attn, x, temb=temb, scale=1.0)
    assert out is x and len(seen_attn) == 1 and seen_attn[0][0] is attn and seen_attn[0][1] is x
    mask, seen_temb, kwargs = spy.seen[0]
    assert mask is None and seen_temb is temb and kwargs == {"scale": 1.0}


def test_csa_active_off_mode_first_steps_and_the_skip_draws():
    assert CSAState(mode="off").csa_active() is False
    first = CSAState(first_steps_without_csa=1)  # step None counts as step 0: a first step
    assert first.csa_active() is False
    first.step = 1
    assert first.csa_active() is True
    coin = SkipSchedule(early_prob=0.5, late_prob=0.5, switch_step=0)
    state = CSAState(generator=torch.Generator().manual_seed(3), skip_schedule=coin, step=0)
    torch.manual_seed(0)  # the global generator: not the one the skips come from
    decisions = [state.csa_active() for _ in range(20)]
    g = torch.Generator().manual_seed(3)
    assert decisions == [float(torch.rand((), generator=g)) >= 0.5 for _ in range(20)]


def test_a_skipped_call_gives_the_original_processor_temb_and_the_other_arguments():
    spy = RecordingProcessor()
    x, temb = features(B=2, N=4, C=16), torch.zeros(2, 8)
    proc = ConsistentSelfAttnProcessor(0.5, state=CSAState(first_steps_without_csa=1, step=0), original=spy)
    with torch.no_grad():
        out = proc(random_attention(16, heads=4), x, temb=temb, scale=1.0)
    assert out is x and len(spy.seen) == 1
    mask, seen_temb, kwargs = spy.seen[0]
    assert mask is None and seen_temb is temb and kwargs == {"scale": 1.0}


def test_csa_layer_names_default_to_the_up_blocks(sdxl_unet):
    from sdlite.attention import csa_layer_names

    up = [n for n in self_attention_layer_names(sdxl_unet) if n.startswith("up_blocks.")]
    assert len(up) == 4 and csa_layer_names(sdxl_unet) == up


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiled_csa_keeps_its_index_and_count_tensors_on_the_features_device():
    """Sliding windows on a GPU: the gathered rows and the per-image window count must live on the features' device
    (a CPU index or count fails there; on the CPU both are the same). Runs where CUDA is available."""
    attn = random_attention(16, heads=4).to("cuda")
    x = features(B=5, N=8, C=16).to("cuda")
    with torch.no_grad():
        out = ConsistentSelfAttnProcessor(0.5, 3, 1, state=CSAState(generator=torch.Generator().manual_seed(0)))(attn, x)
    assert out.device.type == "cuda" and out.shape == x.shape and torch.isfinite(out).all()

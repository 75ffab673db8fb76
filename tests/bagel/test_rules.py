"""BAGEL's rules (`mogao.bagel.rules`), each against its written definition on small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from mogao.bagel import rules
from mogao.errors import ConfigError

# ---- positions ----------------------------------------------------------------------------------------------


def test_text_advances_by_its_length_and_an_edit_puts_vae_vit_text_at_p_p1_p2():
    # text of 3 tokens, then a condition image: clean VAE copy (2 tokens + 2 markers), ViT copy (3 + 2), text
    ids, nxt = rules.position_ids([("text", 3), ("vae", 4), ("vit", 5), ("text", 2)])
    assert ids == [0, 1, 2] + [3] * 4 + [4] * 5 + [5, 6]
    assert nxt == 7


def test_a_noisy_copy_does_not_advance_and_shares_its_position_with_the_clean_copy():
    ids, nxt = rules.position_ids([("text", 2), ("noisy", 3), ("vae", 3), ("vit", 3), ("text", 2)])
    assert ids == [0, 1] + [2] * 3 + [2] * 3 + [3] * 3 + [4, 5]
    assert nxt == 6
    assert rules.position_ids([("noisy", 6)], start=9) == ([9] * 6, 9)  # generation at the end of a prompt


def test_a_dropped_condition_copy_still_takes_a_position():
    ids, nxt = rules.position_ids([("text", 2), ("skipped", 0), ("vit", 3), ("text", 1)], start=10)
    assert ids == [10, 11, 13, 13, 13, 14]
    assert nxt == 15


@pytest.mark.parametrize("spans", [[("audio", 2)], [("skipped", 1)], [("text", 0)], [("vit", True)], [("vae", -1)]])
def test_bad_spans_are_refused(spans):
    with pytest.raises(ValueError):
        rules.position_ids(spans)


# ---- position tables ----------------------------------------------------------------------------------------


def test_flattened_position_ids_are_row_times_side_plus_column():
    assert rules.flattened_position_ids(2, 3, 4).tolist() == [0, 1, 2, 4, 5, 6]
    assert rules.flattened_position_ids(1, 1, 70).tolist() == [0]
    with pytest.raises(ValueError, match="does not fit"):
        rules.flattened_position_ids(5, 2, 4)


def test_sincos_table_puts_the_column_first_and_sin_before_cos():
    table = rules.sincos_position_table(3, 8)  # 4 channels per coordinate, frequencies 1 and 1/100
    assert table.shape == (9, 8) and table.dtype == torch.float32

    def row(r: int, c: int) -> list[float]:
        return [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
                math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]

    for r, c in [(2, 1), (0, 2), (1, 0), (2, 2)]:
        assert table[r * 3 + c].tolist() == pytest.approx(row(r, c), abs=1e-7), (r, c)
    with pytest.raises(ValueError):
        rules.sincos_position_table(3, 6)


# ---- timestep embedding -------------------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin_of_the_unscaled_time():
    emb = rules.timestep_embedding(torch.tensor([0.5, 0.0]), dim=4)  # frequencies 1 and 1e4**-0.5 = 0.01
    assert emb[0].tolist() == pytest.approx([math.cos(0.5), math.cos(0.005), math.sin(0.5), math.sin(0.005)])
    assert emb[1].tolist() == [1.0, 1.0, 0.0, 0.0]
    odd = rules.timestep_embedding(torch.tensor([0.5]), dim=5)
    assert odd.shape == (1, 5) and odd[0, 4] == 0.0


def test_timestep_embedding_equals_diffusers_timesteps_with_cos_first():
    from diffusers.models.embeddings import Timesteps

    t = torch.rand(7)
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert torch.allclose(rules.timestep_embedding(t), ref, atol=1e-6)


# ---- flow ---------------------------------------------------------------------------------------------------


def test_timestep_shift():
    assert rules.shift_timestep(0.5, 3.0) == pytest.approx(0.75)
    assert rules.shift_timestep(0.25, 3.0) == pytest.approx(0.5)
    assert rules.shift_timestep(0.0, 3.0) == 0.0 and rules.shift_timestep(1.0, 3.0) == 1.0
    assert rules.shift_timestep(0.3, 1.0) == pytest.approx(0.3)


def test_noise_at_t_one_and_velocity_points_from_data_to_noise():
    x0, eps = torch.tensor([2.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    assert rules.noised_latent(x0, eps, 0.25).item() == pytest.approx(1.25)
    assert rules.noised_latent(x0, eps, 0.0).item() == 2.0 and rules.noised_latent(x0, eps, 1.0).item() == -1.0
    v = rules.velocity_target(x0, eps)
    assert v.item() == -3.0
    h = 1e-3  # v = d x_t / dt
    assert ((rules.noised_latent(x0, eps, 0.4 + h) - rules.noised_latent(x0, eps, 0.4)) / h).item() == pytest.approx(-3.0)


def test_training_timestep_is_a_shifted_sigmoid_and_clean_copies_get_zero():
    t = rules.training_timestep(torch.tensor([0.0, float("-inf"), float("inf")]), shift=3.0)
    assert t.tolist() == pytest.approx([0.75, 0.0, 1.0])


def test_sampling_grid_and_euler_steps_land_on_the_data():
    times, dts = rules.sampling_timesteps(5, 1.0)
    assert times.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25]) and dts.tolist() == pytest.approx([0.25] * 4)
    times, dts = rules.sampling_timesteps(5, 3.0)  # grid 1, .75, .5, .25, 0 shifted
    assert times.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5])
    assert dts.tolist() == pytest.approx([0.1, 0.15, 0.25, 0.5])
    x0, eps = torch.tensor([0.3, -2.0]), torch.tensor([1.0, 0.5])
    x = eps.clone()
    for dt in dts:  # a straight path: the exact velocity brings noise to data whatever the grid
        x = rules.euler_step(x, rules.velocity_target(x0, eps), dt)
    assert torch.allclose(x, x0, atol=1e-6)
    with pytest.raises(ValueError):
        rules.sampling_timesteps(1, 1.0)


# ---- guidance -----------------------------------------------------------------------------------------------


def test_cfg_interval_is_open_below_and_closed_above():
    assert not rules.cfg_applies(0.4, (0.4, 1.0))
    assert rules.cfg_applies(0.41, (0.4, 1.0)) and rules.cfg_applies(1.0, (0.4, 1.0))
    assert not rules.cfg_applies(0.0, (0.0, 1.0)) and not rules.cfg_applies(1.01, (0.4, 1.0))


def T(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_global_renorm_caps_the_guided_norm_at_the_conditional_one():
    v, none = T([3.0, 4.0]), T([0.0, 0.0])
    # g = 0 + 2 * v = (6, 8), norm 10; scale 5 / 10
    assert torch.allclose(rules.combine_cfg(v, none, None, 2.0, 1.0), T([3.0, 4.0]))
    assert torch.allclose(rules.combine_cfg(v, none, None, 2.0, 1.0, renorm_min=0.8), T([4.8, 6.4]))
    # with image guidance: g = (1, 0) + 2 * ((6, 8) - (1, 0)) = (11, 16), then scaled to norm 5
    out = rules.combine_cfg(v, none, T([1.0, 0.0]), 2.0, 2.0)
    assert torch.allclose(out, T([11.0, 16.0]) * 5 / math.sqrt(377))


def test_channel_renorm_is_per_token_and_global_over_the_whole_image():
    v, no_text = T([3.0, 4.0], [0.0, 1.0]), T([0.0, 0.0], [0.0, 0.5])
    g = T([6.0, 8.0], [0.0, 1.5])
    assert torch.allclose(rules.combine_cfg(v, no_text, None, 2.0, 1.0, "channel"), T([3.0, 4.0], [0.0, 1.0]))
    assert torch.allclose(rules.combine_cfg(v, no_text, None, 2.0, 1.0, "global"), g * math.sqrt(26 / 102.25))


def test_text_channel_renormalises_the_text_guidance_before_the_image_guidance():
    v, no_text, no_image = T([3.0, 4.0], [0.0, 1.0]), T([0.0, 0.0], [0.0, 0.5]), T([1.0, 0.0], [0.0, 0.0])
    # text guidance (6, 8), (0, 1.5) renormalised per token to (3, 4), (0, 1); then 2x image guidance, no renorm
    out = rules.combine_cfg(v, no_text, no_image, 2.0, 2.0, "text_channel")
    assert torch.allclose(out, T([5.0, 8.0], [0.0, 2.0]))


def test_no_guidance_unless_the_text_scale_exceeds_one():
    v = T([1.0, 2.0])
    assert rules.combine_cfg(v, None, T([9.0, 9.0]), 1.0, 3.0) is v
    with pytest.raises(ValueError):
        rules.combine_cfg(v, T([0.0, 0.0]), None, 2.0, 1.0, "nope")
    with pytest.raises(ValueError):
        rules.combine_cfg(v, T([0.0, 0.0]), None, 2.0, 1.5)  # image guidance without its branch


# ---- tokens -------------------------------------------------------------------------------------------------


def test_special_tokens_and_wrapping():
    from tiny_bagel import tiny_tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer())
    ids = rules.special_token_ids(tok)
    vocab = tok.get_vocab()
    assert ids == rules.BagelTokens(vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["<|vision_start|>"],
                                    vocab["<|vision_end|>"])
    inputs, labels = rules.wrap_text([10, 11], ids)
    assert inputs == [ids.bos, 10, 11, ids.eos] and labels == [10, 11, ids.eos, rules.IGNORE_INDEX]
    assert rules.wrap_text([10, 11], ids, loss=False)[1] == [rules.IGNORE_INDEX] * 4
    image = rules.wrap_image(3, ids)
    assert image == [ids.start_of_image, -1, -1, -1, ids.end_of_image]
    assert rules.position_ids([("text", len(inputs)), ("vit", len(image))])[0] == [0, 1, 2, 3, 4, 4, 4, 4, 4]


def test_a_tokenizer_without_bagels_tokens_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<|im_start|>": 1}, "a")))
    with pytest.raises(ConfigError, match="<\\|im_end\\|>.*<\\|vision_start\\|>"):
        rules.special_token_ids(tok)

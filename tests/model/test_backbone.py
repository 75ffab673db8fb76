"""The deep-fusion backbone reproduces its source HF model exactly on text, and IL-RoPE reduces to 1-D RoPE."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mogao.attention import get_attention_backend
from mogao.model.backbone import MoTBackbone
from mogao.model.rope import InterleavedRope, frequency_axes
from mogao.model.tiny import save_tiny_llm
from mogao.sequence.layout import Span, TokenLayout
from mogao.sequence.modality import Modality


def _packed_text(lengths: list[int], vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    layout = TokenLayout.from_spans([[Span(Modality.TEXT, n)] for n in lengths])
    phys_ids = torch.empty(layout.num_tokens, dtype=torch.long)
    phys_ids[layout.physical_of_logical] = torch.cat(ids)
    t = layout.order  # text-only: IL-RoPE position (t, t, t) with t the position in the sample
    return ids, layout, phys_ids, torch.stack([t, t, t])


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_text_only_logits_match_hf(tmp_path, family):
    path = save_tiny_llm(tmp_path / family, family=family)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    backbone = MoTBackbone(AutoModelForCausalLM.from_pretrained(path), adaln_cond_dim=64).eval()
    lengths = [9, 17, 4]
    ids, layout, phys_ids, pos = _packed_text(lengths, hf.config.vocab_size)
    attention = get_attention_backend("sdpa_dense")
    with torch.no_grad():
        h_und, h_gen = backbone(
            backbone.embed_tokens(phys_ids), pos, layout.n_und, attention, attention.prepare(layout, False)
        )
        logits = backbone.lm_head(h_und)
        assert h_gen.shape[0] == 0
        logical = logits[layout.physical_of_logical]
        start = 0
        for sample_ids in ids:
            ref = hf(input_ids=sample_ids[None]).logits[0]
            got = logical[start : start + len(sample_ids)]
            start += len(sample_ids)
            assert (got - ref).abs().max().item() <= 1e-5
            assert ref.abs().max().item() > 0.1  # a non-trivial model


def test_generation_expert_is_an_exact_copy_at_init(tmp_path):
    path = save_tiny_llm(tmp_path / "llm")
    backbone = MoTBackbone(AutoModelForCausalLM.from_pretrained(path), adaln_cond_dim=64)
    for layer in backbone.layers:
        und = dict(layer.und.named_parameters())
        for name, p in layer.gen.named_parameters():
            assert torch.equal(p, und[name]) and p.data_ptr() != und[name].data_ptr()
    assert backbone.lm_head.weight is backbone.embed_tokens.weight  # qwen2 tiny ties embeddings


def test_ilrope_text_positions_equal_1d_rope(tmp_path):
    path = save_tiny_llm(tmp_path / "llm", family="llama")
    hf = AutoModelForCausalLM.from_pretrained(path)
    rotary = hf.model.rotary_emb
    rope = InterleavedRope(rotary.inv_freq, rotary.attention_scaling)
    t = torch.arange(50)
    cos, sin = rope(torch.stack([t, t, t]), torch.float32)
    ref_cos, ref_sin = rotary(torch.zeros(1, 50, 8), t[None])
    torch.testing.assert_close(cos, ref_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0], rtol=0, atol=1e-6)


def test_ilrope_frequency_split_head_dim_128():
    axes = frequency_axes(64)
    assert (axes == 0).sum() == 32 and (axes == 1).sum() == 16 and (axes == 2).sum() == 16
    assert axes[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert (axes[48:] == 0).all()  # the lowest quarter of the frequencies goes to T


def test_ilrope_rotation_depends_on_h_and_w():
    rope = InterleavedRope(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    base = torch.tensor([[5], [0], [0]])
    moved_h = torch.tensor([[5], [1], [0]])
    moved_w = torch.tensor([[5], [0], [1]])
    c0, _ = rope(base, torch.float32)
    ch, _ = rope(moved_h, torch.float32)
    cw, _ = rope(moved_w, torch.float32)
    axes = frequency_axes(8)
    changed_h = (c0 != ch)[0, :8]
    changed_w = (c0 != cw)[0, :8]
    assert torch.equal(changed_h, axes == 1) and torch.equal(changed_w, axes == 2)


def test_the_generation_expert_can_start_as_a_copy_of_the_trained_understanding_expert(tmp_path):
    path = save_tiny_llm(tmp_path / "llm")
    backbone = MoTBackbone(AutoModelForCausalLM.from_pretrained(path), adaln_cond_dim=64, qk_norm=True)
    with torch.no_grad():
        for p in (*backbone.layers[0].und.parameters(), *backbone.norm.parameters()):
            p.add_(1.0)  # "trained": the two experts now differ
    assert not torch.equal(backbone.layers[0].gen.mlp.up_proj.weight, backbone.layers[0].und.mlp.up_proj.weight)
    backbone.copy_understanding_to_generation()
    for layer in backbone.layers:
        und, gen = layer.und.state_dict(), layer.gen.state_dict()
        assert und.keys() == gen.keys() and all(torch.equal(und[k], gen[k]) for k in und)
        assert layer.gen.mlp.up_proj.weight.data_ptr() != layer.und.mlp.up_proj.weight.data_ptr()  # copies
    assert torch.equal(backbone.gen_norm.weight, backbone.norm.weight)
    adaln = backbone.layers[0].gen_adaln.state_dict()
    assert adaln and all(not v.abs().sum() for v in adaln.values())  # the zero-initialised AdaLN is not touched

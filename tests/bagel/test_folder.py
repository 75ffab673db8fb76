"""Reading and writing a BAGEL folder (`mogao.bagel.folder`, `configs`): a tiny folder written the way BAGEL
writes one, hostile variants of it, and the round trip."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_bagel import tiny_settings, write_tiny_bagel

from mogao.bagel import folder as bagel_folder
from mogao.bagel.configs import BagelSettings
from mogao.bagel.files import BagelFormatError
from mogao.bagel.flux_ae import FluxAEConfig
from mogao.bagel.folder import check_bagel_folder, load_bagel_folder, load_bagel_tokenizer, write_bagel_folder
from mogao.bagel.keymap import from_mogao_state, to_mogao_state
from mogao.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_bagel(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")


@pytest.fixture
def copy(tiny, tmp_path):
    """A fresh copy of the tiny folder, to spoil."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny.path, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_the_tiny_folder_is_read_with_its_architecture_tokens_and_ignored_fields(tiny):
    info = check_bagel_folder(tiny.path, tiny_settings(tiny))
    a = info.arch
    assert (a.llm.hidden_size, a.llm.num_layers, a.llm.num_kv_heads, a.llm.head_dim) == (32, 2, 2, 8)
    assert (a.vit.config_layers, a.vit.layers, a.vit.positions_per_side) == (3, 2, 4)
    assert a.token_dim == 16
    assert info.tokens.bos != info.tokens.eos and info.tokens.start_of_image != info.tokens.end_of_image
    assert {t.dtype for t in info.ema.values()} == {"BF16"} and {t.dtype for t in info.ae.values()} == {"F32"}
    assert "torch_dtype" in info.ignored_fields["llm_config.json"]  # read, not used, not passed on
    assert info.carried_files == ("tokenizer_config.json",) and info.ignored_files == ()
    tok = load_bagel_tokenizer(tiny.path)
    assert tok.convert_tokens_to_ids("<|vision_start|>") == info.tokens.start_of_image
    assert tok.eos_token == "<|im_end|>"


def test_the_round_trip_through_mogao_names_and_back_to_a_folder_is_bit_identical(tiny, tmp_path):
    ckpt = load_bagel_folder(tiny.path, tiny_settings(tiny))
    converted = to_mogao_state(ckpt.ema, ckpt.ae, ckpt.arch)
    ema, ae = from_mogao_state(converted, ckpt.arch)
    for ours, theirs in ((ema, ckpt.ema), (ae, ckpt.ae)):
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    ckpt.ema, ckpt.ae = ema, ae
    out = write_bagel_folder(tmp_path / "written", ckpt)
    for name in ("ema.safetensors", "ae.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny.path / name).read_bytes(), name
    for name in ("llm_config.json", "vit_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((tiny.path / name).read_text())
    again = load_bagel_folder(out, tiny_settings(tiny))
    assert again.arch == ckpt.arch and all(torch.equal(again.ema[k], ckpt.ema[k]) for k in ckpt.ema)


def test_writing_refuses_a_folder_with_files_and_a_wrong_tensor(tiny, tmp_path):
    ckpt = load_bagel_folder(tiny.path, tiny_settings(tiny))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(BagelFormatError, match="not an empty folder"):
        write_bagel_folder(busy, ckpt)
    assert (busy / "notes.txt").read_text() == "mine"
    ckpt.ema["vae2llm.bias"] = torch.zeros(3)
    with pytest.raises(BagelFormatError, match="vae2llm.bias"):
        write_bagel_folder(tmp_path / "new", ckpt)
    assert not (tmp_path / "new").exists()


# ---- hostile and corrupt folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("file, changes, words", [
    ("llm_config.json", {"auto_map": {"AutoModel": "evil.Model"}}, ["auto_map", "llm_config.json"]),
    ("vit_config.json", {"auto_map": {"AutoModel": "evil.Model"}}, ["auto_map", "vit_config.json"]),
    ("llm_config.json", {"quantization_config": {"quant_method": "x"}}, ["quantization_config"]),
    ("llm_config.json", {"model_type": "llama"}, ["model_type", "'llama'"]),
    ("llm_config.json", {"architectures": ["EvilForCausalLM"]}, ["architectures"]),
    ("llm_config.json", {"layer_module": "Qwen2DecoderLayer"}, ["layer_module"]),
    ("llm_config.json", {"_attn_implementation": "kernels-community/evil"}, ["_attn_implementation"]),
    ("llm_config.json", {"qk_norm": False}, ["qk_norm"]),
    ("llm_config.json", {"qk_norm": 1}, ["qk_norm"]),
    ("llm_config.json", {"architectures": [{"x": 1}]}, ["architectures"]),
    ("llm_config.json", {"tie_word_embeddings": True}, ["tie_word_embeddings"]),
    ("llm_config.json", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_scaling"]),
    ("vit_config.json", {"rope": True}, ["rope"]),
    ("vit_config.json", {"model_type": "clip_vision_model"}, ["model_type"]),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}, ["auto_map", "tokenizer_config"]),
])
def test_fields_that_pick_code_or_classes_are_refused(copy, tiny, file, changes, words):
    _edit_json(copy / file, **changes)
    with pytest.raises(ConfigError) as e:
        check_bagel_folder(copy, tiny_settings(tiny))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("file, changes, field", [
    ("llm_config.json", {"hidden_size": 10**12}, "hidden_size"),
    ("llm_config.json", {"vocab_size": 2**40}, "vocab_size"),
    ("llm_config.json", {"num_hidden_layers": 100000}, "num_hidden_layers"),
    ("llm_config.json", {"num_hidden_layers": True}, "num_hidden_layers"),
    ("llm_config.json", {"hidden_size": "32"}, "hidden_size"),
    ("llm_config.json", {"rms_norm_eps": -1}, "rms_norm_eps"),
    ("vit_config.json", {"image_size": 10**9}, "image_size"),
    ("vit_config.json", {"num_hidden_layers": 1}, "num_hidden_layers"),
])
def test_absurd_sizes_are_refused_before_any_weight_file_is_opened(copy, tiny, monkeypatch, file, changes, field):
    def no_header(*a, **k):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(bagel_folder, "read_header", no_header)
    _edit_json(copy / file, **changes)
    with pytest.raises(BagelFormatError, match=field):
        check_bagel_folder(copy, tiny_settings(tiny))


@pytest.mark.parametrize("text, why", [('{"hidden_size": NaN}', "NaN"), ('{"a": 1, "a": 2}', "duplicate"),
                                       ("[1, 2]", "JSON object"), (b"\xff\xfe{}", "UnicodeDecodeError"),
                                       ("[" * 100000 + "]" * 100000, "RecursionError")])
def test_json_that_is_not_plain_data_is_refused(copy, tiny, text, why):
    path = copy / "llm_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BagelFormatError, match=why):
        check_bagel_folder(copy, tiny_settings(tiny))


def test_configs_that_disagree_with_the_tensors_name_the_keys(copy, tiny):
    _edit_json(copy / "llm_config.json", num_hidden_layers=3)
    with pytest.raises(BagelFormatError) as e:
        check_bagel_folder(copy, tiny_settings(tiny))
    assert "language_model.model.layers.2.self_attn.q_proj.weight" in e.value.missing
    assert "ema.safetensors" in str(e.value)
    _edit_json(copy / "llm_config.json", num_hidden_layers=2)
    _edit_json(copy / "vit_config.json", num_hidden_layers=2)  # the checkpoint then holds 1 ViT layer
    with pytest.raises(BagelFormatError) as e:
        check_bagel_folder(copy, tiny_settings(tiny))
    assert "vit_model.vision_model.encoder.layers.1.mlp.fc1.weight" in e.value.unexpected
    _edit_json(copy / "vit_config.json", num_hidden_layers=3, hidden_size=32)
    with pytest.raises(BagelFormatError) as e:
        check_bagel_folder(copy, tiny_settings(tiny))
    assert any(w.startswith("connector.fc1.weight (32, 16)") for w in e.value.wrong_shapes)


def test_settings_no_file_records_are_checked_against_the_tensors(tiny):
    with pytest.raises(BagelFormatError, match="max_latent_size=8.*BagelSettings") as e:
        check_bagel_folder(tiny.path, BagelSettings(**{**vars(tiny_settings(tiny)), "max_latent_size": 8}))
    assert e.value.wrong_shapes == ["latent_pos_embed.pos_embed (16, 32) (expected (64, 32))"]
    flux = BagelSettings(**{**vars(tiny_settings(tiny)), "autoencoder": BagelSettings().autoencoder})
    with pytest.raises(BagelFormatError, match="vae2llm.weight .*latent channels 16"):
        check_bagel_folder(tiny.path, flux)  # FLUX's 16 latent channels make 64 numbers a token, not 16
    deeper = FluxAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    with pytest.raises(BagelFormatError, match="ae.safetensors: missing .*decoder.up.2"):
        check_bagel_folder(tiny.path, BagelSettings(**{**vars(tiny_settings(tiny)), "autoencoder": deeper}))


@pytest.mark.parametrize("drop, add", [("llm2vae.bias", None), (None, "language_model.model.extra.weight")])
def test_missing_and_unexpected_tensors_are_named(copy, tiny, drop, add):
    state = load_file(str(copy / "ema.safetensors"))
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(2)
    save_file(state, str(copy / "ema.safetensors"))
    with pytest.raises(BagelFormatError) as e:
        check_bagel_folder(copy, tiny_settings(tiny))
    assert (drop or add) in str(e.value)
    assert (e.value.missing if drop else e.value.unexpected) == [drop or add]


def test_files_that_lead_out_of_the_folder_or_are_missing_are_refused(copy, tiny, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.copy(copy / "llm_config.json", outside)
    (copy / "llm_config.json").unlink()
    with pytest.raises(BagelFormatError, match="missing"):
        check_bagel_folder(copy, tiny_settings(tiny))
    (copy / "llm_config.json").symlink_to(outside)
    with pytest.raises(BagelFormatError, match="outside the folder"):
        check_bagel_folder(copy, tiny_settings(tiny))
    (copy / "llm_config.json").unlink()
    shutil.copy(outside, copy / "llm_config.json")
    (copy / "vocab.json").symlink_to("/etc/passwd")  # a carried file too
    with pytest.raises(BagelFormatError, match="vocab.json.*outside the folder"):
        check_bagel_folder(copy, tiny_settings(tiny))


def test_weights_that_are_not_safetensors_are_refused_and_never_unpickled(copy, tiny, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (copy / "ema.safetensors").write_bytes(pickle.dumps({"vae2llm.weight": Payload()}))
    with pytest.raises(BagelFormatError, match="ema.safetensors.*not a readable safetensors"):
        load_bagel_folder(copy, tiny_settings(tiny))
    assert not marker.exists()
    data = (tiny.path / "ema.safetensors").read_bytes()
    (copy / "ema.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(BagelFormatError, match="not a readable safetensors"):
        check_bagel_folder(copy, tiny_settings(tiny))


def test_a_tokenizer_of_another_model_is_refused(copy, tiny):
    _edit_json(copy / "llm_config.json", vocab_size=3)  # BAGEL's token ids would have no embedding row
    with pytest.raises(BagelFormatError, match="beyond the model's vocabulary"):
        check_bagel_folder(copy, tiny_settings(tiny))
    (copy / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(BagelFormatError, match="tokenizer.json"):
        check_bagel_folder(copy, tiny_settings(tiny))

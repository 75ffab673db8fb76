"""LoRA fine-tuning: only adapters train, adapters are saved with the expected keys and the base's identity,
merged weights equal base + adapter, interrupted LoRA runs resume to the same losses, a mismatched base is
refused, every shipped LoRA recipe instantiates, and QLoRA's 4-bit base on CUDA (skipped without it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mogao.cli import main
from mogao.errors import ConfigError
from mogao.lora import LoraSpec, apply_lora, load_adapter, merge_lora, save_adapter
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel
from mogao.recipes import RECIPES_DIR, build_cli

REPO = RECIPES_DIR.parent
LORA_RECIPES = sorted(p.stem for p in (RECIPES_DIR / "lora").glob("*.yaml"))


@pytest.fixture(scope="module")
def base(parts, tmp_path_factory) -> Path:
    """A saved tiny mogao model (with its tokenizer), as a LoRA run's `init_from`."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("lora_base") / "model"
    tok = AutoTokenizer.from_pretrained(parts["tokenizer"])
    torch.manual_seed(0)
    model = load_model(ModelConfig(llm=str(parts["llm"]), vit=str(parts["vit"]), latent_patch=8,
                                   vocab_size=len(tok)))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def lora_args(base: Path, root: Path, steps: int = 4) -> list[str]:
    """Overrides shrinking a tiny LoRA recipe to seconds on the test base."""
    return [
        f"--model.init_args.init_from={base}", f"--model.init_args.tokenizer={base}",
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
        "init_args: {save_last: true, every_n_train_steps: 1}}]",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
        "--data.data.token_budget=400", "--data.data.max_image_tokens=16",
    ]


@pytest.fixture(scope="module")
def t2i_run(base, tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("lora_t2i")
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # the recipe's data paths are relative to the repository
    try:
        cli = build_cli(["fit", "--config", "recipes/lora/tiny-t2i.yaml", *lora_args(base, root)])
    finally:
        os.chdir(cwd)
    return cli, root


def _base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def test_lora_run_trains_only_adapters_and_saves_them(t2i_run, base):
    cli, root = t2i_run
    model = cli.model.model
    saved = load_file(str(base / "model.safetensors"))
    trained = {_base_name(k): v for k, v in model.state_dict().items()}
    spec: LoraSpec = cli.model.lora
    assert spec.full == ["latent_proj"]
    frozen = [k for k in saved if not k.startswith("latent_proj.")]
    assert frozen and all(torch.equal(saved[k], trained[k]) for k in frozen)  # base weights bit-identical
    assert any(not torch.equal(saved[k], trained[k]) for k in saved if k.startswith("latent_proj."))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("latent_proj.") for n in trainable)

    adapter = root / "adapter"
    assert not (root / "model").exists()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    expected = {f"backbone.layers.{i}.gen.self_attn.{m}.lora_{ab}.weight"
                for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    expected |= {"latent_proj.proj_in.weight", "latent_proj.proj_in.bias", "latent_proj.proj_out.weight",
                 "latent_proj.proj_out.bias"}
    assert set(weights) == expected
    assert weights["backbone.layers.0.gen.self_attn.q_proj.lora_A.weight"].shape == (8, 32)  # rank 8, hidden 32
    assert any(weights[f"backbone.layers.{i}.gen.self_attn.q_proj.lora_B.weight"].abs().sum() > 0 for i in range(2))
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["spec"]["rank"] == 8 and meta["spec"]["gen"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert meta["base"]["path"] == str(base) and len(meta["base"]["fingerprint"]) == 16


def _batch(base: Path):
    from transformers import AutoTokenizer

    from mogao.data import DataConfig, collate_plans, load_samples, lower_sample

    tok = AutoTokenizer.from_pretrained(base)
    cfg = DataConfig(token_budget=400, max_image_tokens=16, vit_patch=8, vae_patch=8, p_drop_text=0.0,
                     p_drop_images=0.0)
    samples = load_samples(REPO / "tests/data/lora/interleaved.jsonl")[:2]
    return collate_plans([lower_sample(s, tok, cfg) for s in samples], 400)


def _outputs(model: MogaoModel, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(batch, return_logits=True)
    return torch.cat([out.text_logits.flatten(), out.velocity.flatten()])


def test_merged_model_gives_the_outputs_of_base_plus_adapter(t2i_run, base, tmp_path):
    _, root = t2i_run
    batch = _batch(base)
    with_adapter = _outputs(load_adapter(load_model(base), root / "adapter"), batch)
    plain = _outputs(load_model(base), batch)
    assert (with_adapter - plain).abs().max() > 1e-4  # the adapter changes something
    assert main(["lora", "merge", "--base", str(base), "--adapter", str(root / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert (_outputs(merged, batch) - with_adapter).abs().max() <= 1e-5
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_load_adapter_refuses_another_base(t2i_run, base, parts, tmp_path):
    _, root = t2i_run
    other = load_model(base)
    with torch.no_grad():
        other.backbone.layers[0].und.self_attn.q_proj.weight.add_(0.01)  # same architecture, other weights
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError) as e:
        load_adapter(load_model(tmp_path / "other"), root / "adapter")
    fp = json.loads((root / "adapter" / "adapter_config.json").read_text())["base"]["fingerprint"]
    assert str(base) in str(e.value) and fp in str(e.value) and "fingerprint" in str(e.value)
    assert main(["lora", "merge", "--base", str(tmp_path / "other"), "--adapter", str(root / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 1
    with pytest.raises(ConfigError, match="not a LoRA adapter directory"):
        load_adapter(load_model(base), tmp_path)


def test_lora_spec_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"lora\.gen: unknown module 'qproj'"):
        LoraSpec(gen=["qproj"])
    with pytest.raises(ConfigError, match="no module to adapt"):
        LoraSpec(gen=[], und=[])
    with pytest.raises(ConfigError, match=r"lora\.full: unknown part"):
        LoraSpec(full=["gen"])
    spec = LoraSpec(und=["q_proj"], gen=["mlp"], layers=[-1])
    assert spec.matches("backbone.layers.3.gen.mlp.down_proj", 4)
    assert not spec.matches("backbone.layers.2.gen.mlp.down_proj", 4)
    assert spec.matches("backbone.layers.3.und.self_attn.q_proj", 4)
    assert not spec.matches("backbone.layers.3.und.self_attn.k_proj", 4)


def test_lora_and_train_are_exclusive(base, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="model.train and model.lora are exclusive"):
        build_cli(["--config", "recipes/lora/tiny-t2i.yaml", *lora_args(base, tmp_path), "--model.init_args.train=[gen]"],
                  run=False)


def test_nf4_without_cuda_runs_plain_lora_and_says_so(base, caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: nf4 quantizes")
    model = load_model(base)
    with caplog.at_level(logging.WARNING, logger="mogao.lora.quant"):
        apply_lora(model, LoraSpec(gen=["q_proj"], quantize="nf4"))
    assert "needs CUDA" in caplog.text and "plain LoRA" in caplog.text
    assert not model.lora_state.quantized
    assert type(model.backbone.layers[0].gen.self_attn.q_proj.base_layer) is torch.nn.Linear


@pytest.mark.parametrize("name", LORA_RECIPES)
def test_lora_recipe_instantiates(name, base, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    extra = []
    if not name.startswith("tiny-"):  # real scale: the same config on CPU with the test base and data
        extra = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.num_workers=0",
                 "--data.path=tests/data/lora/interleaved.jsonl"]
    cli = build_cli(["--config", f"recipes/lora/{name}.yaml", *lora_args(base, tmp_path), *extra], run=False)
    assert cli.model.lora is not None and cli.model.train_parts[0] == "lora"
    if extra:  # --data.path: the user's file is the one source
        assert [(s.name, s.path) for s in cli.datamodule.sources] == [("interleaved",
                                                                       "tests/data/lora/interleaved.jsonl")]
    trainable = sum(p.numel() for p in cli.model.model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in cli.model.model.parameters()) / 2


def test_lora_resume_gives_the_same_losses(base, tmp_path, monkeypatch, one_thread):
    from test_runtime_faults import Interrupt
    from test_stages import train_rows

    monkeypatch.chdir(REPO)
    cfg = "recipes/lora/tiny-interleaved.yaml"  # both experts, adapter dropout 0.05
    build_cli(["fit", "--config", cfg, *lora_args(base, tmp_path / "a", steps=5)])
    with pytest.raises(RuntimeError, match="interrupted at step 3"):
        build_cli(["fit", "--config", cfg, *lora_args(base, tmp_path / "b", steps=5)], callbacks=[Interrupt(3)])
    build_cli(["fit", "--config", cfg, *lora_args(base, tmp_path / "b", steps=5), "--ckpt_path=last"])
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        for key in ("loss", "text_loss", "image_loss"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])
    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.gpu
def test_qlora_on_cuda_quantizes_the_base_and_trains_adapters(base, tmp_path):
    import bitsandbytes as bnb

    model = load_model(base)
    apply_lora(model, LoraSpec(gen=["q_proj", "k_proj", "v_proj", "o_proj"], quantize="nf4"), base)
    assert model.lora_state.quantized
    assert isinstance(model.backbone.layers[0].gen.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    model = model.cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(base).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.train()(batch)
    (out.terms.text_sum / out.terms.text_weight + out.terms.image_sum / out.terms.image_weight).backward()
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    save_adapter(model, tmp_path / "adapter")
    merged = merge_lora(load_adapter(load_model(base), tmp_path / "adapter"))
    assert isinstance(merged.backbone.layers[0].gen.self_attn.q_proj, torch.nn.Linear)


@pytest.mark.gpu
def test_qlora_base_keeps_its_quant_state_under_fsdp2(base, tmp_path):
    """The QLoRA recipes shard with FSDP2 (for its per-layer activation checkpointing): the NF4 weights must keep
    their quantization state when FSDP2 replaces each parameter by its sharded one, and train with torch's AdamW."""
    import bitsandbytes as bnb
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = load_model(base)
        apply_lora(model, LoraSpec(gen=["q_proj", "k_proj", "v_proj", "o_proj"], quantize="nf4"), base)
        model = model.cuda()
        for layer in model.backbone.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batch = _batch(base).to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.train()(batch)
        (out.terms.text_sum / out.terms.text_weight + out.terms.image_sum / out.terms.image_weight).backward()
        opt.step()
        q = model.backbone.layers[0].gen.self_attn.q_proj.base_layer
        assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state is not None
    finally:
        dist.destroy_process_group()


def test_generate_with_lora_draws_like_the_merged_model_and_refuses_another_base(t2i_run, base, tmp_path, capsys):
    _, root = t2i_run
    common = ["--prompt", "A small teal circle on a white background.", "--draw", "--steps", "3", "--seed", "1"]
    assert main(["generate", "--ckpt", str(base), "--lora", str(root / "adapter"), *common,
                 "--out", str(tmp_path / "with_lora")]) == 0
    assert main(["lora", "merge", "--base", str(base), "--adapter", str(root / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert main(["generate", "--ckpt", str(tmp_path / "merged"), *common, "--out", str(tmp_path / "merged_out")]) == 0
    assert main(["generate", "--ckpt", str(base), *common, "--out", str(tmp_path / "base_out")]) == 0
    import numpy as np
    from PIL import Image

    def pixels(d: str) -> np.ndarray:
        (png,) = sorted((tmp_path / d).glob("*.png"))
        return np.asarray(Image.open(png), dtype=np.int16)

    assert np.abs(pixels("with_lora") - pixels("merged_out")).max() <= 1  # rounding to 8 bits only
    assert np.abs(pixels("with_lora") - pixels("base_out")).max() > 1  # the adapter changes the image
    other = load_model(base)
    with torch.no_grad():
        other.backbone.layers[0].gen.self_attn.v_proj.weight.mul_(1.5)
    other.save_pretrained(tmp_path / "other")
    for f in base.glob("tokenizer*"):
        (tmp_path / "other" / f.name).write_bytes(f.read_bytes())
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "other"), "--lora", str(root / "adapter"), *common,
                 "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert str(base) in err and str(tmp_path / "other") in err

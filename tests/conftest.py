"""Shared fixtures: tiny random components saved with save_pretrained, loaded through the real code path."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts, train_tokenizer
from mogao.data.shapes_mini import caption_corpus, interleaved_samples
from mogao.model.tiny import save_tiny_llm, save_tiny_vae, save_tiny_vit

# CI runs a fixed example sequence (no flaky red builds); local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n N` the workers share the machine's cores: torch's intra-op threads (one per core each) and
    # those of the processes the tests start would oversubscribe them. One thread a process runs the suite faster.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is faster than several and does not fight the other test worker for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Directories of tiny components covering the built-in vocabulary (tokenizer, LLM, ViT with patch 8), as the
    tiny recipes build them; tests point recipes at them with overrides."""
    from mogao.model.tiny import TinySpec, ensure_tiny_components

    root = tmp_path_factory.mktemp("recipe_parts")
    spec = TinySpec(hidden_size=32, layers=2, heads=2, kv_heads=1, vit_hidden_size=16, vit_patch_size=8)
    d = {k: root / k for k in ("tokenizer", "llm", "vit")}
    ensure_tiny_components(spec, **d)
    return d


@pytest.fixture(scope="session")
def learn_parts(tmp_path_factory) -> dict:
    """The learnability tests' tiny components (`learnability.build_parts`): built once per test process."""
    from learnability import build_parts

    return build_parts(tmp_path_factory.mktemp("learn_parts"))


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Directories of a tiny tokenizer, Qwen2 LLM, SigLIP ViT (patch 4) and AutoencoderKL (downsample 2)."""
    root = tmp_path_factory.mktemp("tiny_parts")
    tok = train_tokenizer(caption_corpus(), vocab_size=300)
    tok.save_pretrained(root / "tokenizer")
    return {
        "root": root,
        "tokenizer": tok,
        "llm": str(save_tiny_llm(root / "llm", vocab_size=len(tok), hidden_size=64, layers=2)),
        "vit": str(save_tiny_vit(root / "vit", hidden_size=32, patch_size=4)),
        "vae": str(save_tiny_vae(root / "vae")),
    }


def make_batch(tokenizer, samples: list[dict], vit_patch: int = 4, vae_patch: int = 4, budget: int = 4096,
               max_image_tokens: int = 16, p_drop: float = 0.0, drop_unread_vae: bool = False):
    cfg = DataConfig(token_budget=budget, max_image_tokens=max_image_tokens, vit_patch=vit_patch,
                     vae_patch=vae_patch, p_drop_text=p_drop, p_drop_images=p_drop, drop_unread_vae=drop_unread_vae)
    plans = [lower_sample(s, tokenizer, cfg) for s in samples_from_dicts(samples)]
    return collate_plans(plans, budget)


@pytest.fixture(scope="session")
def shapes_dicts():
    return interleaved_samples(4, seed=3, max_targets=3)


def shrunk_recipe(directory, name: str = "t2i", n: int = 8, val_n: int = 2):
    """A copy of the tiny recipe `name` in `directory` whose built-in sources have n / val_n samples (fast data
    setup); returns its path."""
    from pathlib import Path

    import yaml

    from mogao.recipes import RECIPES_DIR

    cfg = yaml.safe_load((RECIPES_DIR / "tiny" / f"{name}.yaml").read_text())
    for s in cfg["data"]["sources"]:
        s["n"], s["val_n"] = n, val_n
    out = Path(directory) / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


LARGE_ALLOCATION = 64 * 2**20  # bytes: far above any tensor of the tiny test models


@pytest.fixture
def no_large_allocation(monkeypatch):
    """Fail (MemoryError) as soon as a tensor of more than LARGE_ALLOCATION bytes is allocated outside the meta
    device by `torch.empty` / `torch.empty_like` (how modules create their parameters and `to_empty` moves them):
    the allocation is only reserved, never written, so a test that catches one costs no memory."""
    empty, empty_like = torch.empty, torch.empty_like

    def check(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta and t.numel() * t.element_size() > LARGE_ALLOCATION:
            raise MemoryError(f"a tensor of {tuple(t.shape)} ({t.numel() * t.element_size()} bytes) was allocated")
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: check(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: check(empty_like(*a, **k)))

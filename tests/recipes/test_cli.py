"""The console script's verbs run end to end."""

from __future__ import annotations

import json

from PIL import Image

from mogao.cli import main


def test_data_check_reports_problems_with_file_and_line(tmp_path, capsys):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"segments": [{"text": "hi"}, {"image": "a.png", "generate": True}]}) + "\n")
    assert main(["data", "check", str(good)]) == 0
    assert "1 samples, 1 images (1 generation targets)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"segments": [{"image": "missing.png"}]}) + "\n" + "{not json\n")
    assert main(["data", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.jsonl:1" in out and "missing.png" in out and "bad.jsonl:2" in out


def test_list_prints_every_recipe_with_its_description(capsys):
    from mogao.recipes import RECIPES_DIR

    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in out}
    assert names == {str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml")}
    assert all(len(line.split()) > 3 for line in out)  # a description follows each name


def test_unknown_verb_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "frobnicate" in capsys.readouterr().err


def test_a_trainer_misconfiguration_is_a_clear_error(parts, tmp_path, capsys):
    from mogao.recipes import RECIPES_DIR

    # the tiny recipe's RichProgressBar together with enable_progress_bar=false: Lightning refuses the pair
    code = main(["fit", "--config", str(RECIPES_DIR / "tiny" / "t2i.yaml"), "--trainer.enable_progress_bar=false",
                 f"--trainer.default_root_dir={tmp_path}", f"--model.init_args.tokenizer={parts['tokenizer']}",
                 f"--model.init_args.model.llm={parts['llm']}", f"--model.init_args.model.vit={parts['vit']}",
                 "--model.init_args.tiny=null", "--model.init_args.model.latent_patch=8", "--trainer.max_steps=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mogao: error: Trainer was configured with `enable_progress_bar=False`" in err and "Traceback" not in err


def test_every_package_and_recipe_folder_is_installed():
    """pyproject lists its packages by name (the recipes ship as `mogao._recipes`): a new package or recipe folder
    missing from the list would be left out of `pip install .`."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts) for top in ("mogao", "callbacks")
               for p in (root / top).rglob("__init__.py")}
    on_disk |= {"mogao._recipes"} | {f"mogao._recipes.{d.name}" for d in (root / "recipes").iterdir()
                                     if d.is_dir() and d.name.isidentifier()}
    assert listed == on_disk

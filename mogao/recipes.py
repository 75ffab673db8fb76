"""The shipped recipes and the LightningCLI that runs them: find a recipe by name, list them, build the CLI.

Recipes ship inside the installed package (`mogao._recipes`, the `recipes/` folder of the source tree), so
`mogao list` and `--config tiny/t2i` work from any folder after `pip install .`. A recipe may be given as a path
or by its name (e.g. `tiny/t2i`). This is the one place the default callbacks of a run are wired.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from mogao.errors import ConfigError, printable

RECIPES_DIR = Path(str(files("mogao._recipes")))
TRAINER_VERBS = ("fit", "validate")


def resolve_recipe(name: str) -> Path:
    """A recipe path as given, or `recipes/<name>[.yaml]`; ConfigError naming what was tried when none exists."""
    p = Path(name).expanduser()
    tried = [p]
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        tried.append(cand)
        if cand.is_file():
            return cand
    raise ConfigError(f"recipe file not found: '{name}' (looked at {', '.join(str(t) for t in tried)}); "
                      "`mogao list` shows the shipped recipes")


# a stage module's defaults, written into the resolved config (and so the run's config.yaml) where it leaves them
# unset: model.init_args KEY <- the stage class's attribute
STAGE_DEFAULTS = {"train": "default_train", "lambda_text": "default_lambda_text",
                  "lambda_image": "default_lambda_image", "exact_match_samples": "default_exact_match"}


def write_stage_defaults(model: Any) -> None:
    """Fill the unset stage options of a parsed `model` config (class_path + init_args) with its stage class's
    defaults, so a saved config says what trains and with which loss weights. With LoRA `train` stays unset
    (the adapters train)."""
    from importlib import import_module

    class_path = model.get("class_path") if model is not None else None
    init = model.get("init_args") if class_path else None
    if init is None:
        return
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(import_module(module), name)
    except (ImportError, AttributeError):
        return  # jsonargparse names the bad class path itself
    for key, attr in STAGE_DEFAULTS.items():
        if init.get(key) is None and hasattr(cls, attr) and not (key == "train" and init.get("lora") is not None):
            value = getattr(cls, attr)
            init[key] = list(value) if isinstance(value, tuple) else value


def quiet_third_party() -> None:
    """Keep start-up output to what a user needs: no third-party tips, no notes about optional kernels that a
    run does not use, no warnings about library internals, no download bars for local files. Idempotent."""
    import logging
    import warnings

    # bitsandbytes' CPU backend says so when an optional kernel package is missing (QLoRA runs on CUDA)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in log.filters):
            log.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # the autoencoder is frozen and kept in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _NoTips:
    """A logging filter dropping Lightning's product tips and its note that the run's own summary replaces its
    default one (`callbacks.console.PartsSummary`)."""

    _DROP = ("\N{ELECTRIC LIGHT BULB} Tip", "Trainer already configured with model summary callbacks")

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self._DROP)


def rewrite_config_args(argv: list[str]) -> list[str]:
    """Resolve every `--config X` / `-c X` / `--config=X` to an existing file before anything heavy is imported."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c") and i + 1 < len(argv):
            out += [a, str(resolve_recipe(argv[i + 1]))]
            i += 2
            continue
        if a.startswith("--config="):
            out.append("--config=" + str(resolve_recipe(a.split("=", 1)[1])))
        else:
            out.append(a)
        i += 1
    return out


def _replace_list_overrides(argv: list[str]) -> list[str]:
    """A `--data.sources=[...]` given on the command line replaces the recipe's list; jsonargparse would merge
    it into the recipe's items one by one (keeping, say, a recipe source's `val_path`). Resetting the list
    just before the override makes it a replacement (`--data.sources+=...` still appends)."""
    out = []
    for a in argv:
        if a == "--data.sources" or a.startswith("--data.sources="):
            out.append("--data.sources=[]")
        out.append(a)
    return out


def build_cli(args: list[str], callbacks: list[Any] | None = None, run: bool = True, instantiate: bool = True):
    """Run (or, with run=False, only parse and instantiate) a LightningCLI over the mogao stages and data.

    With instantiate=False (and run=False) the config is only parsed and checked; `cli.model_config` is then
    the recipe's `ModelConfig` (e.g. for building the model on the meta device).
    """
    quiet_third_party()
    from lightning.pytorch.cli import LightningCLI

    from callbacks.console import PartsSummary
    from callbacks.history import MetricsHistory
    from mogao.training.datamodule import MogaoDataModule
    from mogao.training.module import MogaoModule

    class MogaoCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.init_args.tokenizer", "data.tokenizer")

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg["trainer"]
            root = trainer.get("default_root_dir") or "runs/default"
            trainer["default_root_dir"] = root
            if trainer.get("logger") in (None, True):
                # one directory per run: logs, config.yaml, checkpoints/, metrics.jsonl, model/
                trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": root, "name": "", "version": ""}}
            write_stage_defaults(cfg["model"])

        def instantiate_trainer(self, **kwargs: Any):
            # atomic checkpoint files, a checkpoint on pre-emption signals and on crashes (unless configured)
            from callbacks.preemption import add_fault_tolerance
            from mogao.training.checkpointing import with_atomic_checkpoint_io

            plugins = self._get(self.config_init, "trainer", {}).get("plugins")
            kwargs.setdefault("plugins", with_atomic_checkpoint_io(plugins))
            trainer = super().instantiate_trainer(**kwargs)
            add_fault_tolerance(trainer, fit=self.subcommand in (None, "fit"))
            return trainer

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            verb = self.config.get("subcommand")
            # the stage's defaults are part of the config from here on (compared with a checkpoint's, saved)
            write_stage_defaults((self.config[verb] if verb else self.config).get("model"))
            ckpt_path = self.config[verb].get("ckpt_path") if verb else None
            if ckpt_path and Path(ckpt_path).exists():  # LightningCLI reads its hyper-parameters next
                from mogao.model.checkpoint_files import check_checkpoint

                check_checkpoint(ckpt_path)  # a damaged file: a CheckpointError naming it and the problem

        def _parse_ckpt_path(self) -> None:
            # Lightning would merge the checkpoint's hyper-parameters over the config here, letting a file
            # choose classes (`_class_path`) and paths (`save_dir`, `init_from`); the config always wins
            verb = self.config.get("subcommand")
            ckpt_path = self.config[verb].get("ckpt_path") if verb else None
            if ckpt_path and Path(ckpt_path).is_file():
                report_checkpoint_hparams(ckpt_path, self.config[verb].get("model"))

        def before_fit(self) -> None:
            self._resolve_ckpt_path("fit")

        def before_validate(self) -> None:
            self._resolve_ckpt_path("validate")

        def _resolve_ckpt_path(self, verb: str) -> None:
            from mogao.training.checkpointing import resolve_ckpt_path

            cfg = self.config_init[verb]
            cfg["ckpt_path"] = resolve_ckpt_path(self.trainer, cfg.get("ckpt_path"), fit=verb == "fit")

        def instantiate_classes(self) -> None:
            if instantiate:
                try:
                    super().instantiate_classes()
                except ValueError as e:  # jsonargparse wraps errors raised while building the classes
                    raise _unwrap(e) from e
                model = getattr(self.model, "model", None)
                if model is not None and hasattr(self.datamodule, "connect"):
                    self.datamodule.connect(model)  # the data is lowered on the model's patch sizes
                return
            from mogao.model.config import ModelConfig

            self.model_config = ModelConfig.from_dict(self.config["model"]["init_args"]["model"].as_dict())

    if not instantiate and run:
        raise ValueError("instantiate=False needs run=False")
    import warnings

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # `resolve_ckpt_path` decides and says what is resumed; Lightning's generic notes about it are noise here
    warnings.filterwarnings("ignore", message=r"`\.fit\(ckpt_path=None\)` was called without a model")
    warnings.filterwarnings("ignore", message=r'\.(fit|validate)\(ckpt_path="last"\) is set, but there is no')
    return MogaoCLI(
        MogaoModule, MogaoDataModule, subclass_mode_model=True, args=_replace_list_overrides(args), run=run,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, seed_everything_default=0,
        trainer_defaults={"callbacks": [MetricsHistory(), PartsSummary(), *(callbacks or [])]},
        parser_kwargs={"parser_mode": "omegaconf"} if not run else {v: {"parser_mode": "omegaconf"} for v in TRAINER_VERBS},
    )


def _plain(value: Any) -> Any:
    """A config or hyper-parameter value as plain data, for comparing the two."""
    from dataclasses import asdict, is_dataclass

    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        value = value.as_dict()
    elif is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def checkpoint_hparam_differences(hparams: Any, model_config: Any) -> list[str]:
    """The keys (as `model.class_path` / `model.init_args.KEY`) where a checkpoint's saved hyper-parameters
    differ from the model config being run."""
    if not isinstance(hparams, dict):
        return []
    config = _plain(model_config) or {}
    init_args = config.get("init_args") or {}
    keys = []
    if "_class_path" in hparams and _plain(hparams["_class_path"]) != config.get("class_path"):
        keys.append("model.class_path")
    for key, value in hparams.items():
        if str(key).startswith("_"):
            continue
        if _plain(value) != init_args.get(str(key)):
            keys.append(f"model.init_args.{key}")
    return keys


def report_checkpoint_hparams(ckpt_path: str | Path, model_config: Any) -> list[str]:
    """Say (on the first process) where the checkpoint's hyper-parameters differ from the config; returns those
    keys. Nothing is taken from them: a checkpoint restores state, the config chooses classes and paths."""
    import zipfile

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from mogao.model.checkpoint_files import load_checkpoint_file

    hparams = load_checkpoint_file(ckpt_path, mmap=zipfile.is_zipfile(ckpt_path)).get("hyper_parameters")
    keys = checkpoint_hparam_differences(hparams, model_config)
    if keys and rank_zero_only.rank == 0:
        shown = ", ".join(keys[:12]) + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")
        # (the key names come from the checkpoint: escaped before they reach the terminal)
        print(printable(f"[mogao] {ckpt_path} was saved with other hyper-parameters than the config in {shown}: "
                        "the config's values are used (a checkpoint restores state only)"), flush=True)
    return keys


def _unwrap(e: ValueError) -> Exception:
    """The project's own error inside a jsonargparse instantiation error, or a ConfigError with its reasons."""
    from mogao.errors import MogaoError

    seen = e
    while seen is not None:
        if isinstance(seen, MogaoError):
            return seen
        seen = seen.__cause__ or seen.__context__
    reasons = [ln.strip()[2:] for ln in str(e).splitlines()
               if ln.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in ln]
    return ConfigError("; ".join(reasons) or str(e))


def list_recipes(root: Path = RECIPES_DIR) -> list[tuple[str, str]]:
    """(name, description) of every recipe: the description is the first comment line that is not the command."""
    rows = []
    for path in sorted(root.rglob("*.yaml")):
        desc = ""
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            text = line.lstrip("# ").strip()
            if text and not text.startswith("mogao "):
                desc = text
                break
        rows.append((str(path.relative_to(root).with_suffix("")), desc))
    return rows

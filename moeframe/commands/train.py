"""The training commands: ``moeframe fit|validate|test|predict -c CONFIG.yaml [--section.key value ...]``.

A LightningCLI over any LightningModule/DataModule (``class_path`` in the config), with what
moeframe adds before anything is built: registry names for ``--trainer.plugins`` and
``--trainer.strategy`` (with a did-you-mean), ``--ckpt_path last`` and checks of the checkpoint
given, a model config given beside a checkpoint compared with the checkpoint's own, plugin
defaults written into the saved config, and default loggers in a version folder claimed up front.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from moeframe import registry
from moeframe.config import ConfigError, with_plugin_defaults

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def default_loggers(save_dir: str, version: int | None = None) -> list[dict[str, Any]]:
    """CSV always (plain files anyone can read); TensorBoard too when it is installed; both in
    ``<save_dir>/logs/version_<version>`` (None: Lightning picks the next free one)."""
    init_args: dict[str, Any] = {"save_dir": save_dir, "name": "logs"}
    if version is not None:
        init_args["version"] = version
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": dict(init_args)}]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": dict(init_args)})
    return loggers


def claim_default_log_version(save_dir: str) -> int | None:
    """The run's own ``<save_dir>/logs/version_N``, claimed atomically (``moeframe.training.logversions``)
    by rank 0; other ranks never write logs (and ModelCheckpoint takes rank 0's folder), so they claim nothing."""
    from lightning.pytorch.utilities import rank_zero_only

    from moeframe.training.logversions import claim_log_version

    if rank_zero_only.rank != 0 or "://" in save_dir:  # a remote (fsspec) root keeps Lightning's own choice
        return None
    return claim_log_version(Path(save_dir) / "logs")


def check_strategy_name(name: str) -> None:
    """An unknown ``--trainer.strategy`` name ends in one line with a did-you-mean, before
    Lightning launches any process (its own error is a traceback without suggestions)."""
    import difflib

    from lightning.pytorch.strategies import StrategyRegistry

    known = sorted(set(StrategyRegistry.available_strategies()) | {"auto"})
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown trainer.strategy {name!r}.{hint} Available: {', '.join(known)}. moeframe plugins "
        f"add strategies through the entry-point group {registry.KINDS['strategy'].group!r}."
    )


PLUGINS_PARSER_MODE = "moeframe_yaml"


def _lightning_plugin_class_names() -> set[str]:
    """Class names jsonargparse itself resolves in ``trainer.plugins`` (imported subclasses)."""
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
    from lightning.pytorch.plugins import LayerSync
    from lightning.pytorch.plugins.precision import Precision

    names, todo = set(), [Precision, ClusterEnvironment, CheckpointIO, LayerSync]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def resolve_precision_plugin(entry: Any) -> Any:
    """A ``trainer.plugins`` entry with a registry name (``fp8``, or ``{class_path: fp8, init_args:
    {...}}``) as the class path jsonargparse instantiates; other entries unchanged. A bare name that
    is neither registered nor a Lightning plugin class is a ConfigError with a did-you-mean."""
    import difflib

    name = entry.get("class_path") if isinstance(entry, dict) else entry
    if not isinstance(name, str) or "." in name or not name.isidentifier():
        return entry
    registered = registry.available("precision")
    if name in registered:
        try:  # importing it checks the base type and the plugin-API version
            cls = registry.load("precision", name)
        except registry.PluginError as exc:
            raise ConfigError(str(exc)) from None
        class_path = f"{cls.__module__}.{cls.__qualname__}"
        return {**entry, "class_path": class_path} if isinstance(entry, dict) else {"class_path": class_path}
    if name in _lightning_plugin_class_names():
        return entry
    close = difflib.get_close_matches(name, list(registered), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown trainer.plugins entry {name!r}.{hint} Registered precision plugins: "
        f"{', '.join(sorted(registered)) or 'none installed'}; a Lightning plugin can also be given by "
        f"class path (package.module.Class). moeframe plugins add precision plugins through the "
        f"entry-point group {registry.KINDS['precision'].group!r}."
    )


def _resolve_plugins_value(value: Any) -> Any:
    return [resolve_precision_plugin(v) for v in value] if isinstance(value, list) else resolve_precision_plugin(value)


def _resolve_config_plugins(doc: Any) -> Any:
    """Registry names in ``trainer.plugins`` of a loaded config (top level or under a subcommand)."""
    if not isinstance(doc, dict):
        return doc
    if isinstance(doc.get("class_path"), str) and doc["class_path"] in registry.available("precision"):
        return resolve_precision_plugin(doc)  # a value given on the command line as JSON/YAML
    for section in [doc] + [doc[c] for c in TRAINER_COMMANDS if isinstance(doc.get(c), dict)]:
        trainer = section.get("trainer")
        if isinstance(trainer, dict) and trainer.get("plugins") is not None:
            trainer["plugins"] = _resolve_plugins_value(trainer["plugins"])
    return doc


def _register_plugins_loader() -> None:
    """jsonargparse's YAML loader, plus registry names in ``trainer.plugins``: a config file is
    resolved as it is loaded, because jsonargparse rejects an unknown class path right then (its
    loaders are its documented extension point; it has no alias hook)."""
    import jsonargparse
    import yaml

    yaml_load = jsonargparse.get_loader("yaml")
    jsonargparse.set_loader(
        PLUGINS_PARSER_MODE, lambda stream: _resolve_config_plugins(yaml_load(stream)), exceptions=(yaml.YAMLError,)
    )


def resolve_plugin_args(argv: list[str]) -> list[str]:
    """``--trainer.plugins NAME`` / ``--trainer.plugins=NAME`` with a registry name, as a class path."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--trainer.plugins" and i + 1 < len(argv):
            out += [arg, _plugins_arg(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--trainer.plugins="):
            arg = "--trainer.plugins=" + _plugins_arg(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def _plugins_arg(value: str) -> str:
    resolved = _resolve_plugins_value(value)
    return value if resolved == value else json.dumps(resolved)


def build_cli(args: list[str] | None = None, run: bool = True, **kwargs: Any) -> Any:
    """The LightningCLI behind ``moeframe fit|validate|test|predict`` (``run=False`` to only
    parse and instantiate, as the config tests do)."""
    # imported here so `moeframe plugins` stays fast (lightning takes seconds to import)
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    _register_plugins_loader()

    class MoeframeCLI(LightningCLI):
        """LightningCLI over any LightningModule/DataModule (``class_path`` in the config)."""

        def parse_arguments(self, parser: Any, args: Any) -> None:
            # registry names in --trainer.plugins become class paths before jsonargparse sees them
            resolved = resolve_plugin_args(sys.argv[1:]) if args is None else None
            if resolved is not None and resolved != sys.argv[1:]:
                self.config = parser.parse_args(resolved)  # what Lightning does with sys.argv
            else:
                super().parse_arguments(parser, resolve_plugin_args(args) if isinstance(args, list) else args)
            # before LightningCLI reads the checkpoint's hyperparameters (a plain torch.load)
            section = self.config.get(self.config.get("subcommand") or "", None)
            if section is not None and section.get("ckpt_path"):
                section["ckpt_path"] = _checked_ckpt_path(section)
            _write_plugin_defaults(self.config)
            # LightningCLI then replaces the model's arguments with the hyperparameters stored in
            # the checkpoint; what was given is kept to compare in before_instantiate_classes
            self.given_model_config = copy.deepcopy(_model_config_of(self.config))

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            # the model and the data exist now, nothing is built: values that only conflict with
            # each other (data.seq_len > model.max_seq_len, ...) are one line here, not a traceback
            # from the first training step
            from moeframe.training.pretrain import PretrainModule

            if isinstance(self.model, PretrainModule) and self.datamodule is not None:
                self.model.check_data(self.datamodule)
            return super().instantiate_trainer(**kwargs)

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument(
                "--precision_by_machine",
                type=bool,
                default=False,
                help="when trainer.precision is not given: bf16-mixed where this machine's measured bf16 "
                "GEMM rate is at least 2x its float32 rate, else 32-true (moeframe.training.machine_precision)",
            )

        def before_instantiate_classes(self) -> None:
            # a model config given on the command line that disagrees with the checkpoint's would
            # be dropped without a word: say which tensors differ instead
            given, stored = getattr(self, "given_model_config", None), _model_config_of(self.config)
            # a checkpoint from before plugin defaults were written out names fewer options
            if given is not None and stored is not None and with_plugin_defaults(given) != with_plugin_defaults(stored):
                _raise_config_mismatch(given, stored)
            _write_plugin_defaults(self.config)
            config = self.config[self.subcommand] if self.subcommand else self.config
            trainer = config["trainer"]
            if config.get("precision_by_machine") and trainer.get("precision") is None:
                _choose_precision(trainer)  # a precision plugin in trainer.plugins decides instead
            if isinstance(trainer.get("strategy"), str):
                check_strategy_name(trainer["strategy"])
            if trainer.get("default_root_dir"):  # before the model and data are built, not at the first save
                from moeframe.badinput import check_output_path

                check_output_path(trainer["default_root_dir"], "trainer.default_root_dir", folder=True)
            if trainer.get("logger") in (None, True):
                root = trainer.get("default_root_dir") or "."
                self.claimed_log_version = (root, claim_default_log_version(root))
                trainer["logger"] = default_loggers(root, self.claimed_log_version[1])

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except BaseException:
                # a run that stops at config time leaves no empty version folder behind
                root, version = getattr(self, "claimed_log_version", (None, None))
                if version is not None:
                    from moeframe.training.logversions import release_log_version

                    release_log_version(Path(root) / "logs", version)
                raise

    return MoeframeCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, "parser_mode": PLUGINS_PARSER_MODE},
        parser_class=no_abbrev_parser_class(),
        auto_configure_optimizers=False,
        args=args,
        run=run,
        **kwargs,
    )


@functools.cache
def no_abbrev_parser_class() -> type:
    """Lightning's parser without option abbreviations: argparse would take an unambiguous prefix
    as the option (``--model.config.n_head 2`` silently setting ``n_heads``), and a typo must be an
    error. Forced in ``__init__`` because jsonargparse builds the nested parsers of ``class_path``
    arguments (the model, the data) from the parser's class without passing ``allow_abbrev``.
    Built on first use: importing lightning's CLI module is slow and ``moeframe plugins`` does not
    need it."""
    from lightning.pytorch.cli import LightningArgumentParser

    class NoAbbrevArgumentParser(LightningArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["allow_abbrev"] = False
            super().__init__(*args, **kwargs)

    return NoAbbrevArgumentParser


def _choose_precision(trainer: Any) -> None:
    """``trainer.precision`` for a run with ``precision_by_machine: true`` that names none: chosen
    from this machine's measured GEMM rates, said in one line (and saved with the run's config)."""
    from lightning.pytorch.utilities import rank_zero_info

    from moeframe.training.machine_precision import resolve_machine_precision

    if _names_a_precision_plugin(trainer.get("plugins")):
        return  # the plugin is the run's precision (Lightning refuses both)
    single = trainer.get("devices") in (1, "1") and trainer.get("num_nodes") in (1, None)
    choice = resolve_machine_precision(trainer.get("accelerator"), single_process=single)
    trainer["precision"] = choice.precision
    rank_zero_info(
        f"precision_by_machine: trainer.precision {choice.precision} ({choice.why}); --trainer.precision overrides it"
    )


def _names_a_precision_plugin(plugins: Any) -> bool:
    """Whether ``trainer.plugins`` (one entry or a list, resolved class paths) holds a Precision."""
    import importlib

    from lightning.pytorch.plugins.precision import Precision

    for entry in plugins if isinstance(plugins, list) else [plugins] if plugins is not None else []:
        path = entry.get("class_path") if hasattr(entry, "get") else entry
        module, _, name = str(path).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name) if module else None
        except (ImportError, AttributeError):
            cls = None
        if isinstance(entry, Precision) or (isinstance(cls, type) and issubclass(cls, Precision)):
            return True
    return False


def _resumable_checkpoint(root: str) -> str | None:
    """``--ckpt_path last``: the newest intact checkpoint anywhere under the run's root (every
    logger version, preemption and SLURM checkpoints), so a restarted job just says ``last``."""
    from lightning.pytorch.utilities import rank_zero_info

    from moeframe.training.reliability import find_resumable_checkpoint

    found = find_resumable_checkpoint(Path(root))
    rank_zero_info(
        f"--ckpt_path last: resuming from {found}"
        if found
        else f"--ckpt_path last: no checkpoint under {root} yet, starting from scratch"
    )
    return str(found) if found else None


def _model_config_of(config: Any) -> dict[str, Any] | None:
    """The model config (``model.init_args.config``) of a parsed run config as plain data."""
    import dataclasses

    section = config.get(config.get("subcommand") or "", None) if config is not None else None
    value = section.get("model.init_args.config", None) if section is not None else None
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value if isinstance(value, dict) else None


def _write_plugin_defaults(config: Any) -> None:
    """Every plugin option, defaults included, into the run's model config: the ``config.yaml``
    Lightning saves (and the checkpoints' hyperparameters) then reproduce the run by themselves."""
    subcommand = config.get("subcommand") if config is not None else None
    section = config.get(subcommand, None) if subcommand else config  # run=False: no subcommand
    value = section.get("model.init_args.config", None) if section is not None else None
    if value is None or not hasattr(value, "get"):
        return
    plain = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    for key, spec in with_plugin_defaults(plain).items():
        if spec != plain.get(key):
            value[key] = spec


def _raise_config_mismatch(given: dict[str, Any], stored: dict[str, Any]) -> None:
    """CheckpointError naming the config fields and the tensors (shapes from meta-device builds)
    that differ between the config given and the one the checkpoint was trained with."""
    import dataclasses

    from moeframe.config import ModelConfig
    from moeframe.errors import CheckpointError
    from moeframe.model.decoder import build_decoder
    from moeframe.training.reliability import state_dict_differences

    fields = [
        f"{k}: {stored.get(k)!r} in the checkpoint, {given.get(k)!r} given"
        for k in sorted(set(given) | set(stored))
        if given.get(k) != stored.get(k)
    ]
    tensors = ""
    try:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        built = [
            build_decoder(ModelConfig(**{k: v for k, v in cfg.items() if k in names}), device="meta").state_dict()
            for cfg in (given, stored)
        ]
        tensors = state_dict_differences(built[0], built[1])
    except Exception as exc:  # a config that does not even build is reported by its fields alone
        tensors = ""
        import logging

        logging.getLogger(__name__).debug(f"could not build both configs: {exc}")
    raise CheckpointError(
        f"the checkpoint was made with another model config ({'; '.join(fields[:4])})"
        + (f"; tensors: {tensors}" if tensors else "")
        + "; resume with the config it was trained with, or drop the --ckpt_path"
    )


def _checked_ckpt_path(section: Any) -> str | None:
    """``ckpt_path`` of a subcommand's config, resolved and verified: ``last`` is the newest intact
    checkpoint under the run's root; a truncated or corrupt file is one clear line, or, when the
    run's Reliability callback says ``on_corrupt_checkpoint: previous``, the newest intact
    checkpoint beside it (with a warning)."""
    from lightning.pytorch.utilities import rank_zero_warn

    from moeframe.errors import CheckpointError
    from moeframe.training.reliability import newest_other_checkpoint, verify_checkpoint

    trainer = section.get("trainer") or {}
    path = section["ckpt_path"]
    if path == "last":
        return _resumable_checkpoint(trainer.get("default_root_dir") or ".")
    if path in ("best", "hpc", "registry") or "://" in str(path):
        return path
    if not Path(path).exists():
        raise CheckpointError(
            f"--ckpt_path {path} does not exist; check the path, or pass `last` to resume from the "
            "newest checkpoint under trainer.default_root_dir"
        )
    problem = verify_checkpoint(Path(path)) or _not_a_lightning_checkpoint(Path(path))
    if problem is None:
        return path
    fallback = newest_other_checkpoint(Path(path))
    policy = "error"
    for callback in trainer.get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("Reliability"):
            policy = (callback.get("init_args") or {}).get("on_corrupt_checkpoint", policy)
    if policy == "previous" and fallback is not None:
        rank_zero_warn(f"checkpoint {path} is unusable: {problem}; resuming from {fallback} instead")
        return str(fallback)
    hint = (
        f"; the newest intact one beside it is {fallback}"
        if fallback
        else "; pass another checkpoint written by `moeframe fit`, or `last`"
    )
    raise CheckpointError(f"checkpoint {path} is unusable: {problem}{hint}")


def _not_a_lightning_checkpoint(path: Path) -> str | None:
    """Why a checkpoint file that is a complete torch file is still not a Lightning checkpoint
    (Lightning itself would fail with a KeyError), else None. Memory-mapped: tensors are not read."""
    import torch

    if path.is_dir():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # objects the weights-only reader refuses: Lightning's own loader decides
        return None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        return "it is a torch file but not a Lightning checkpoint (no state_dict / pytorch-lightning_version)"
    return None


def train_main(argv: list[str], from_shell: bool) -> int:
    """``moeframe fit|validate|test|predict ...``; ``from_shell``: LightningCLI reads sys.argv itself."""
    from moeframe.badinput import config_problem
    from moeframe.commands.boundary import guarded

    if (problem := config_problem(argv)) is not None:  # before jsonargparse, which reports "<unicode string>"
        print(f"moeframe: error: {problem}", file=sys.stderr)
        return 2

    def run() -> int:
        registry.register_lightning_strategies()
        build_cli(args=None if from_shell else argv)
        return 0

    return guarded("moeframe", run, argv)

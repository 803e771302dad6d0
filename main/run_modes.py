"""Run modes (``run=<mode>``) and what every mode shares: device, seed, run directory, limits.

A mode is a function ``(cfg) -> dict`` registered in ``RUN_MODES`` by the module that defines it. The
package's ``__init__`` imports every such module, so importing anything from ``main`` gives the full table.
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from configs import load_group_option  # importing configs registers its resolvers before Hydra composes
from data_loaders import DatasetCorruptError
from data_loaders.data_models import DataModelStoreError
from utils import distributed as du
from utils.checkpoint import CheckpointError
from utils.config_schema import ConfigError, check_config
from utils.device import seed_everything, set_threads
from utils.pruning.progressive import PruningError
from utils.registry import Registry, UnknownNameError
from utils.train import Limits

log = logging.getLogger(__name__)

RUN_MODES: Registry[Callable[[DictConfig], Dict[str, Any]]] = Registry("run mode")


# Errors caused by the user's input (names, paths, files, settings): entry points print their message
# without a traceback and exit with status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UnknownNameError, FileNotFoundError, DatasetCorruptError, DataModelStoreError, CheckpointError, ConfigError,
               PruningError)


@dataclass
class RunContext:
    """What a run mode needs besides its config: its device, run directory and limits, and where this
    process stands in a distributed job (``dist``; a single process is rank 0 of a world of 1)."""

    device: torch.device
    run_dir: Path
    limits: Limits
    dist: du.DistInfo = field(default_factory=du.DistInfo)


_TOP_LEVEL_TYPES = {"seed": int, "resume": bool, "progress": bool, "num_workers": int, "threads": (int, type(None)),
                    "export_onnx": bool, "evaluate": bool, "channels_last": bool}


def check_top_level(cfg: DictConfig) -> None:
    """Reject mistyped top-level overrides (``seed=abc``) with the key, the value and an example."""
    for key, types in _TOP_LEVEL_TYPES.items():
        value = cfg.get(key)
        if isinstance(value, bool) and types is int:  # bool is an int subclass; seed=true is a mistake
            value = str(value)
        if not isinstance(value, types):
            want = getattr(types, "__name__", "integer or null")
            raise ConfigError(f"{key}={value!r} is not valid: expected {want}, e.g. {key}=" +
                              {"seed": "7", "resume": "false", "progress": "false"}.get(key, "2"))
    threads = cfg.get("threads")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads={threads}: torch's CPU threads are >= 1 (or null, torch's default: one per core), "
                          "e.g. threads=2")


def run_argument(cfg: DictConfig, name: str, alias: str = "index") -> Any:
    """The run mode's argument ``name`` (``shard``, ``slot``, ``target``, ``epochs``), or its ``alias``.

    ``index=`` is the published code's one key for all four; it stays accepted. Both given with different
    values is an error, not a silent choice."""
    named, other = cfg.get(name), cfg.get(alias)
    plain = [OmegaConf.to_container(v) if isinstance(v, ListConfig) else v for v in (named, other)]
    if named is not None and other is not None and plain[0] != plain[1]:
        raise ConfigError(f"{name}={plain[0]} and {alias}={plain[1]} disagree: {alias}= is another name for {name}= "
                          f"in run={cfg.run}; give one of them, e.g. {name}={plain[0]}")
    return plain[0] if named is not None else plain[1]


def alias_note(group: str, choice: str | None, cfg: DictConfig) -> str | None:
    """What a published option name (``method=group_l2_norm_max_normalizer``) maps to, or None.

    An alias is a config file of the group whose defaults list is one of our options. ``choice`` is the option
    the command line chose; the note is only given when ``cfg`` holds what that alias composes to (a stage
    that swapped the method, as the benchmark does, is not mistaken for an alias)."""
    node = cfg.get(group)
    name = node.get("name") if node is not None else None
    if choice is None or name is None or choice == name:
        return None
    try:
        resolved = load_group_option(group, choice).get("name")
    except FileNotFoundError:
        return None
    if resolved != name:
        return None
    return f"{group}={choice} is the published code's name for {group}={name}: running {group}={name}"


def _log_aliases(cfg: DictConfig) -> None:
    if not HydraConfig.initialized():  # composed outside a Hydra app (tests, stage_config): no choices to report
        return
    note = alias_note("method", HydraConfig.get().runtime.choices.get("method"), cfg)
    if note:
        log.info(note)


def prepare_run(cfg: DictConfig) -> RunContext:
    """Check the top-level settings, seed, pick the device once, create the run directory.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this also joins the process group (NCCL on CUDA, gloo on the
    CPU; ``dist.timeout_s`` bounds every collective) and picks this rank's device. The run directory is
    rank 0's (broadcast, so a path holding a timestamp cannot split a job in two) and only rank 0 creates it.
    """
    check_top_level(cfg)
    set_threads(cfg.get("threads"))
    if du.env_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank narrates; the others speak only of trouble
    seed_everything(int(cfg.seed))
    try:
        device, info = du.init_distributed(cfg.get("device", "auto"), float(cfg.get("dist", {}).get("timeout_s", 1800)))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    run_dir = Path(du.broadcast_object(str(cfg.run_dir)))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    du.barrier()
    ranks = f" ranks={info.world_size}" if info.world_size > 1 else ""
    log.info("run=%s task=%s model=%s device=%s%s run_dir=%s", cfg.run, cfg.task.name, cfg.model.name, device, ranks,
             run_dir)
    _log_aliases(cfg)
    return RunContext(device=device, run_dir=run_dir, limits=Limits.from_cfg(cfg.get("debug")), dist=info)


# What each mode needs on the command line (run=help prints these; a test checks every mode has a line).
USAGE: Dict[str, str] = {
    "pretrain": "[seed=S]",
    "generate": "[shard=0] [num=N]   (python -m generate_dataset)",
    "import_published": "path=<published datasets folder> [evaluate=false]",
    "meta_train": "",
    "visualize": "epochs=[0,E1,E2,...]   (0: no metanetwork)",
    "pretrain_final": "slot=K",
    "pruning_final": "slot=K target=T [meta_epoch=E | metanetwork=none]",
    "analyse": "meta_epoch=E",
    "quickstart": "",
    "benchmark": "[benchmark=default|evidence|full]",
    "export": "path=<model.pt>",
}


def help_text() -> str:
    """One line per run mode with its arguments."""
    width = max(map(len, RUN_MODES.names()))
    return "\n".join(f"{name:<{width}}  {USAGE.get(name, '')}".rstrip() for name in RUN_MODES.names())


def answer_without_running(argv: list[str]) -> None:
    """``run=help``, an unknown ``run=`` and ``run=export`` without its file are answered before Hydra starts, so
    none creates a run folder: help prints the modes and exits 0, the others say what is wrong and exit 2."""
    runs = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("run=")]
    if not runs:
        return
    if runs[-1] == "help":
        print(help_text())
        sys.exit(0)
    if runs[-1] not in RUN_MODES:
        print(f"error: {RUN_MODES.unknown_message(runs[-1])} (python -m main run=help lists them with their arguments)",
              file=sys.stderr)
        sys.exit(2)
    if runs[-1] == "export":  # its one argument is a file: check it before any run folder exists
        paths = [arg.split("=", 1)[1] for arg in argv if arg.startswith("path=")]
        why = ("run=export needs the model file as path=<.../model.pt> (a finished run's model.pt)" if not paths else
               f"path={paths[-1]}: no such file; give the model.pt of a finished run" if not Path(paths[-1]).is_file()
               else None)
        if why:
            print(f"error: {why}", file=sys.stderr)
            sys.exit(2)


def _declared(cfg: DictConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def _close_keys(cfg: DictConfig, dotted: str) -> str:
    """``did you mean `task.meta_train.epochs`?`` for a key whose last part is misspelled, or ''."""
    parent, _, last = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(last, [str(k) for k in node.keys()], n=2)
    return " Did you mean " + " or ".join(f"`{parent + '.' if parent else ''}{c}`" for c in close) + "?" if close else ""


def unwritable(path: Any) -> str | None:
    """Why the folder ``path`` cannot be created or written to, or None when it can: it or its nearest existing
    ancestor must be a directory this process may write to."""
    if not path:
        return None
    target = Path(str(path)).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder, so {target} cannot be made"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable, so {target} cannot be {'written to' if probe == target else 'made'}"
    return None


_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i")
_FREE_FORM = ("model.kwargs.",)  # mappings handed on whole (to the model factory): any key may be added
_OTHER_CONFIG = ("-m", "--multirun", "-cn", "--config-name", "-cd", "--config-dir", "-cp", "--config-path")


def check_command_line(argv: list[str], config_name: str) -> None:
    """Compose the config of the command line before Hydra runs anything, and turn what Hydra would report
    with a stack-trace hint and exit status 1 (an unknown option, a key that is not a setting, a broken
    override) into one line and exit status 2. A key added with ``+`` that no config declares is refused
    too: nothing reads it, so it would run and change nothing (``+task.meta_train.epoch=3``). Multirun
    sweeps and other config files are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    if any(a.split("=")[0] in _OTHER_CONFIG for a in argv):
        return
    overrides, skip = [], False
    for a in argv:
        if skip or a.startswith("-"):
            skip = not skip and a in _FLAGS_WITH_VALUE
            continue
        overrides.append(a)
    config_dir = str(Path(__file__).resolve().parents[1] / "configs")

    def composed(chosen: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name, overrides=chosen)

    try:
        cfg = composed(overrides)
    except (HydraException, ValueError, KeyError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        message = lines[0] if lines else type(err).__name__
        if isinstance(err, MissingConfigException) and err.options:
            message += f"; available: {', '.join(err.options)}"
        elif message.startswith("Error parsing override"):
            message += ": an override is key=value, group=option or +key=value"
        key = getattr(err, "full_key", None) or getattr(err.__cause__, "full_key", None)
        hint = ""
        if key:
            try:
                hint = _close_keys(composed([a for a in overrides if a.lstrip("+").split("=")[0] != key]), str(key))
            except (HydraException, ValueError, KeyError):
                hint = ""
        print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(2)
    problem = unwritable(OmegaConf.select(cfg, "paths.output_dir", default=None))
    if problem:
        print(f"error: paths.output_dir: {problem}; set GMP_ROOT or paths.root_dir=<a writable folder>", file=sys.stderr)
        sys.exit(2)
    added = [a.split("=", 1)[0][1:] for a in overrides if a.startswith("+") and not a.startswith("++")]
    if added:
        base = composed([a for a in overrides if not a.startswith("+")])
        for key in added:
            if "/" not in key and not key.startswith(("hydra.", *_FREE_FORM)) and not _declared(base, key):
                print(f"error: +{key} adds a key that no config declares, so nothing would read it."
                      f"{_close_keys(base, key) or ' check its spelling (python -m main --cfg job prints the config)'}",
                      file=sys.stderr)
                sys.exit(2)


def list_run_modes() -> list[str]:
    return RUN_MODES.names()


def dispatch(cfg: DictConfig) -> Dict[str, Any]:
    """Run ``cfg.run``; ``run=help`` lists the modes."""
    if cfg.run == "help":
        print(help_text())
        return {}
    return RUN_MODES.get(str(cfg.run))(cfg)


def run_entry(cfg: DictConfig) -> None:
    """What a Hydra entry point does: dispatch, and turn user errors into one message and exit status 2."""
    try:
        check_config(cfg)  # numeric settings, before any work
        dispatch(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)  # Hydra's logging prints it on the console and into <run_dir>/main.log
        sys.exit(2)
    except KeyboardInterrupt:
        log.warning("interrupted: finished work is checkpointed in %s; re-run the same command to resume", cfg.run_dir)
        sys.exit(130)

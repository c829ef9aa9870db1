"""Run configuration: frozen dataclasses that validate when built, a YAML file, CLI overrides.

A config has five sections, one dataclass each:

- ``data``  — :class:`DataConfig`: which dataset, where, scenario filter, embedding size.
- ``meta``  — :class:`s2meta_fast.meta.MetaConfig`: the meta learner (re-used as is).
- ``train`` — :class:`TrainConfig`: recommender kind, meta-training length and batch.
- ``eval``  — :class:`EvalConfig`: cut-offs, blocks, the baselines' hyper-parameters.
- ``run``   — :class:`RunConfig`: seed, device, output folder, logging.

Every field is an option of the same name: ``meta_steps`` in YAML is ``--meta-steps`` on the
command line. The YAML file may nest options under their section or list them flat::

    data: {dataset: ml100k, min_items: 40}
    meta_steps: 300

Precedence: dataclass defaults < the file < command-line flags. An unknown key anywhere is an
error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from .meta.meta_config import INIT_MODES, STOP_MODES, UPDATE_MODES, MetaConfig
from .meta.trainer import OPTIMIZERS
from .meta.trainer import TrainConfig as TrainerConfig

DEVICES = ("cpu", "cuda")
MODEL_KINDS = ("interaction", "mapping", "hybrid")
METHODS = ("s2meta", "itempop", "global", "finetune")


def _need(ok: bool, cls: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{cls}: {message}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def dataset_names() -> Tuple[str, ...]:
    """Registered dataset names (the data layer's registry)."""
    from . import data
    return tuple(sorted(data.DATASETS))


@dataclass(frozen=True)
class DataConfig:
    """Dataset and scenario construction.

    Attributes:
        dataset: registered dataset name (``ml100k``, ``ml20m``, ``amazon``, ``taobao``, ...).
        data_dir: raw-file folder; None for datasets that ship their files (ml100k via recbole).
        min_items, max_items: scenario size filter in items; None uses the dataset's default.
        embed_dim: d, the size of the user/item embeddings trained on the source domain.
        cache_dir: where prepared data and embeddings are cached; None uses the data layer's default.
        mf_epochs: epochs of the embedding matrix factorisation; None uses the dataset's default.
        heldout_user_frac: share of the shared users held out of meta-training so meta-train,
            meta-valid and meta-test scenarios have disjoint users (docs/data.md); 0 gives the
            paper's shared-user protocol; None uses the data layer's default.
    """

    dataset: str = "ml100k"
    data_dir: Optional[str] = None
    min_items: Optional[int] = None
    max_items: Optional[int] = None
    embed_dim: int = 64
    cache_dir: Optional[str] = None
    mf_epochs: Optional[int] = None
    heldout_user_frac: Optional[float] = None

    def __post_init__(self) -> None:
        _need(isinstance(self.dataset, str) and self.dataset != "", "DataConfig", "dataset must be a name")
        for name in ("min_items", "max_items", "mf_epochs"):
            value = getattr(self, name)
            _need(value is None or _positive_int(value), "DataConfig",
                  f"{name} must be a positive int or null, got {value!r}")
        if self.min_items is not None and self.max_items is not None:
            _need(self.min_items <= self.max_items, "DataConfig",
                  f"min_items ({self.min_items}) must not exceed max_items ({self.max_items})")
        _need(_positive_int(self.embed_dim), "DataConfig", f"embed_dim must be a positive int, got {self.embed_dim!r}")
        _need(self.heldout_user_frac is None or 0.0 <= self.heldout_user_frac < 1.0, "DataConfig",
              f"heldout_user_frac must be in [0, 1) or null, got {self.heldout_user_frac!r}")


@dataclass(frozen=True)
class TrainConfig(TrainerConfig):
    """Meta-training: the trainer's :class:`s2meta_fast.meta.trainer.TrainConfig` plus what to train.

    Its ``seed`` and ``quiet`` are not options of their own: they are taken from the run section.
    Defaults differ from the trainer's (the authors' code) where a default run must finish in
    minutes on a 2-core CPU: 400 meta-steps of 8 scenarios instead of tens of thousands of
    one-scenario steps, hence 10× the authors' Adam rates for ω_R and the update controller (at
    1e-4, 300 steps leave ω_R near its random init: ml100k Recall@20 75.3 vs 83.6 at 1e-3).
    ``--lr-init 1e-4 --lr-update 1e-4`` restores the authors' rates (docs/evaluation.md). The stop
    controller's rate is 200× the authors' 5e-5: at 5e-5, 400 meta-steps leave it at its init
    (p ≈ 0.5, every loop stops right after t_min); at 1e-2 it learns within 50 meta-steps to run
    the loop where updates pay and to stop where they do not, and it won on meta-validation
    (docs/results.md §4).

    Attributes:
        model: recommender kind (interaction, mapping, hybrid).
        meta_steps: meta-training steps in total (each adapts ``meta_batch`` scenarios).
        warm_start: start ω_R from the Global baseline's θ (trained on the meta-train scenarios
            and the source domain) instead of a random init — a departure from the paper
            (docs/method.md). On by default: it won on meta-validation (ml100k Recall@20 79.13
            against 78.36 at seed 0) and, over 5 seeds, puts s²Meta ahead of Global and Finetune
            (docs/results.md); ``--no-warm-start`` is the paper's random init.
    """

    lr_init: float = 1e-3
    lr_update: float = 1e-3
    lr_stop: float = 1e-2
    meta_batch: int = 8
    validate_every: int = 50
    checkpoint_every: int = 50
    log_every: int = 25
    model: str = "interaction"
    meta_steps: int = 400
    warm_start: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(self.model in MODEL_KINDS, "TrainConfig", f"model must be one of {MODEL_KINDS}, got {self.model!r}")
        _need(isinstance(self.meta_steps, int) and not isinstance(self.meta_steps, bool) and self.meta_steps >= 0,
              "TrainConfig", f"meta_steps must be an int >= 0, got {self.meta_steps!r}")
        _need(isinstance(self.warm_start, bool), "TrainConfig", f"warm_start must be true or false, got {self.warm_start!r}")

    def trainer_config(self) -> TrainerConfig:
        """The meta trainer's own config (without ``model`` and ``meta_steps``)."""
        return TrainerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainerConfig)})


@dataclass(frozen=True)
class EvalConfig:
    """The Table-3 protocol and the baselines (docs/evaluation.md).

    Attributes:
        ks: ranking cut-offs.
        methods: which methods ``run`` evaluates.
        eval_stop: s²Meta's stop rule at evaluation (sample: seeded Bernoulli draws, as the authors).
        block_size: test scenarios adapted and scored together.
        max_pairs: largest S·A·B scored in one call (bounds memory).
        global_steps, global_batch, global_lr: Adam training of the Global baseline.
        global_source: also train Global on the source domain's interactions.
        finetune_lrs, finetune_steps: the grid searched on meta-validation scenarios for Finetune.
    """

    ks: Tuple[int, ...] = (10, 20, 50)
    methods: Tuple[str, ...] = METHODS
    eval_stop: str = "sample"
    block_size: int = 16
    max_pairs: int = 4_000_000
    global_steps: int = 2000
    global_batch: int = 512
    global_lr: float = 1e-3
    global_source: bool = True
    finetune_lrs: Tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    finetune_steps: Tuple[int, ...] = (5, 10, 20, 50, 100)

    def __post_init__(self) -> None:
        from .eval.metrics import check_ks
        check_ks(self.ks)
        bad = [m for m in self.methods if m not in METHODS]
        _need(self.methods and not bad, "EvalConfig", f"methods must be a non-empty subset of {METHODS}, got "
              f"{list(self.methods)}")
        _need(self.eval_stop in STOP_MODES, "EvalConfig",
              f"eval_stop must be one of {STOP_MODES}, got {self.eval_stop!r}")
        for name in ("block_size", "max_pairs", "global_steps", "global_batch"):
            _need(_positive_int(getattr(self, name)), "EvalConfig",
                  f"{name} must be a positive int, got {getattr(self, name)!r}")
        _need(self.global_lr > 0, "EvalConfig", f"global_lr must be > 0, got {self.global_lr}")
        _need(len(self.finetune_lrs) > 0 and all(lr > 0 for lr in self.finetune_lrs), "EvalConfig",
              f"finetune_lrs must be positive numbers, got {list(self.finetune_lrs)}")
        _need(len(self.finetune_steps) > 0 and all(_positive_int(s) for s in self.finetune_steps), "EvalConfig",
              f"finetune_steps must be positive ints, got {list(self.finetune_steps)}")


@dataclass(frozen=True)
class RunConfig:
    """Where and how a command runs.

    Attributes:
        seed: seeds the scenario split, meta-training, evaluation draws and baselines.
        device: cpu or cuda.
        out: the run folder (checkpoints, results.json, results.md).
        quiet: no progress bars, warnings and errors only.
        resume: continue the run in ``out`` from its last checkpoint.
    """

    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"
    quiet: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        _need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "RunConfig",
              f"seed must be a non-negative int, got {self.seed!r}")
        _need(self.device in DEVICES, "RunConfig", f"device must be one of {DEVICES}, got {self.device!r}")
        _need(isinstance(self.out, str) and self.out != "", "RunConfig", "out must be a folder path")


SECTIONS: Dict[str, type] = {"data": DataConfig, "meta": MetaConfig, "train": TrainConfig,
                             "eval": EvalConfig, "run": RunConfig}

# Closed sets an option must come from; the CLI turns them into argparse choices.
CHOICES: Dict[str, Tuple[str, ...]] = {"init": INIT_MODES, "update": UPDATE_MODES, "stop": STOP_MODES,
                                       "eval_stop": STOP_MODES, "device": DEVICES, "model": MODEL_KINDS,
                                       "optimizer": OPTIMIZERS, "methods": METHODS}


# Fields of a section that are not options: they are copied from another section's option.
DERIVED: Dict[str, Dict[str, str]] = {"train": {"seed": "seed", "quiet": "quiet"}}


def section_fields(section: str) -> list:
    """The option names of a section, in declaration order."""
    return [f.name for f in dataclasses.fields(SECTIONS[section]) if f.name not in DERIVED.get(section, {})]


def _option_index() -> Dict[str, str]:
    index: Dict[str, str] = {}
    for section in SECTIONS:
        for name in section_fields(section):
            if name in index:
                raise RuntimeError(f"option {name!r} is in both {index[name]!r} and {section!r}")
            index[name] = section
    return index


OPTIONS: Dict[str, str] = _option_index()   # option name -> its section


def option_type(name: str) -> Any:
    """The declared type of an option (resolved annotation)."""
    cls = SECTIONS[OPTIONS[name]]
    return typing.get_type_hints(cls)[name]


@dataclass(frozen=True)
class Config:
    """A complete, validated configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for section in SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(values[k]) if isinstance(values[k], tuple) else values[k]
                            for k in section_fields(section)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **options: Any) -> "Config":
        """A copy with options (by name, any section) changed and re-validated."""
        return build_config(self.to_dict(), options)


class ConfigError(ValueError):
    """A config file or option is invalid; the message says what was expected."""


def _valid_keys_text() -> str:
    return (f"valid sections: {', '.join(SECTIONS)}; valid options: "
            f"{', '.join(sorted(OPTIONS))}")


def flatten(document: Mapping[str, Any], where: str = "config") -> Dict[str, Any]:
    """Options from a nested-or-flat mapping; unknown sections or keys raise :class:`ConfigError`."""
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(document).__name__}")
    options: Dict[str, Any] = {}
    for key, value in document.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: section {key!r} must be a mapping of options")
            for name, inner in value.items():
                if OPTIONS.get(name) != key:
                    valid = ", ".join(section_fields(key))
                    raise ConfigError(f"{where}: unknown key {name!r} in section {key!r}; valid keys: {valid}")
                options[name] = inner
        elif key in OPTIONS:
            options[key] = value
        else:
            raise ConfigError(f"{where}: unknown key {key!r}; {_valid_keys_text()}")
    return options


def _coerce(name: str, value: Any) -> Any:
    """YAML lists become the tuples the dataclasses declare; ints are accepted for float options."""
    kind = option_type(name)
    origin = typing.get_origin(kind)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin is tuple and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return (value,)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def build_config(*layers: Optional[Mapping[str, Any]], where: str = "config") -> Config:
    """Builds a :class:`Config` from layers of options, later layers overriding earlier ones.

    Each layer is a nested-or-flat mapping (see :func:`flatten`); None layers are skipped.
    """
    options: Dict[str, Any] = {}
    for layer in layers:
        options.update(flatten(layer, where))
    per_section: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
    for name, value in options.items():
        per_section[OPTIONS[name]][name] = _coerce(name, value)
    try:
        built: Dict[str, Any] = {}
        for section in ("data", "meta", "eval", "run", "train"):   # run before train: train copies from it
            values = dict(per_section[section])
            for name, source in DERIVED.get(section, {}).items():
                values[name] = getattr(built["run"], source)
            built[section] = SECTIONS[section](**values)
        return Config(**built)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def load_yaml(path: str) -> Dict[str, Any]:
    """Options of a YAML config file (validated against the known keys, not yet built)."""
    try:
        with open(path, encoding="utf-8") as fh:
            document = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path!r} is not valid YAML: {error}") from None
    return flatten(document or {}, where=path)


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `overrides` (e.g. CLI flags)."""
    file_options = load_yaml(path) if path else None
    return build_config(file_options, overrides, where=path or "config")


__all__ = ["CHOICES", "Config", "ConfigError", "DataConfig", "EvalConfig", "MetaConfig", "OPTIONS", "RunConfig",
           "SECTIONS", "TrainConfig", "build_config", "dataset_names", "flatten", "load_config", "load_yaml"]

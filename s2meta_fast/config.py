"""Run configuration: frozen dataclasses that validate when built, presets, a YAML file, CLI flags.

A config has five sections, one dataclass each:

- ``data``  — :class:`DataConfig`: which dataset, where, scenario filter, embedding size.
- ``meta``  — :class:`s2meta_fast.meta.MetaConfig`: the meta learner.
- ``train`` — :class:`s2meta_fast.meta.TrainConfig`: recommender kind, meta-training length, optimiser.
- ``eval``  — :class:`EvalConfig`: cut-offs, blocks, the baselines' hyper-parameters.
- ``run``   — :class:`RunConfig`: seed, device, output folder, logging.

Every field is an option of the same name: ``meta_steps`` in YAML is ``--meta-steps`` on the
command line. The YAML file may nest options under their section or list them flat, and may
name a preset::

    preset: paper
    data: {dataset: ml100k, min_items: 40}
    meta_steps: 300

Precedence: dataclass defaults < the preset < the file < command-line flags. A preset
(:data:`PRESETS`) is a named set of option values, some of them per dataset
(:data:`DATASET_PRESETS`); the library's classes use the bare defaults, ``s2meta`` starts from
the "demo" preset. An unknown key anywhere is an error that lists the valid ones.

Layers: this module sits above the libraries it configures (data, models, meta, eval) and
below the application (:mod:`s2meta_fast.app`) and the CLI; its choice lists come from their
registries.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from .data import DATASETS
from .errors import ConfigError
from .eval.cross_domain import BASELINE_GRIDS
from .eval.methods import METHODS
from .eval.metrics import DEFAULT_KS, check_ks
from .meta.distributed import BACKENDS as DIST_BACKENDS
from .meta.meta_config import INIT_MODES, STATE_INITS, STOP_MODES, UPDATE_MODES, MetaConfig
from .meta.trainer import OPTIMIZERS, WARM_START_DATA, TrainConfig
from .models import MODELS
from .ops.limits import cuda_limit_errors

DEVICES = ("cpu", "cuda")


def _need(ok: bool, cls: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{cls}: {message}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def dataset_names() -> Tuple[str, ...]:
    """Registered dataset names (the data layer's registry)."""
    return tuple(sorted(DATASETS))


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
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(dataset_names())}")
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
class EvalConfig:
    """The Table-3 protocol and the baselines (docs/evaluation.md).

    Attributes:
        ks: ranking cut-offs.
        methods: which methods ``run`` evaluates (names in :data:`s2meta_fast.eval.METHODS`).
        eval_stop: s²Meta's stop rule at validation and evaluation; None (the default) evaluates as
            trained (the meta section's ``stop``: a FixedStep learner keeps its fixed steps,
            "sample" draws seeded Bernoulli stops as the authors do).
        block_size: test scenarios adapted and scored together.
        max_pairs: largest S·A·B scored in one call (bounds memory).
        global_steps, global_batch, global_lr: Adam training of the Global baseline.
        global_source: also train Global on the source domain's interactions.
        finetune_lrs, finetune_steps: the grid searched on meta-validation scenarios for Finetune.
        baseline_grid: the hyper-parameter grids of CDCF, CMF, EMCDR and CoNet searched on the
            meta-validation scenarios: "paper" (Appendix A.3.2) or "reduced" (fewer points, for
            CPU time: docs/evaluation.md).
    """

    ks: Tuple[int, ...] = DEFAULT_KS
    methods: Tuple[str, ...] = tuple(METHODS)
    eval_stop: Optional[str] = None
    block_size: int = 16
    max_pairs: int = 4_000_000
    global_steps: int = 2000
    global_batch: int = 512
    global_lr: float = 1e-3
    global_source: bool = True
    finetune_lrs: Tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    finetune_steps: Tuple[int, ...] = (5, 10, 20, 50, 100)
    baseline_grid: str = "paper"

    def __post_init__(self) -> None:
        check_ks(self.ks)
        _need(self.baseline_grid in BASELINE_GRIDS, "EvalConfig",
              f"baseline_grid must be one of {BASELINE_GRIDS}, got {self.baseline_grid!r}")
        bad = [m for m in self.methods if m not in METHODS]
        _need(bool(self.methods) and not bad, "EvalConfig", f"methods must be a non-empty subset of "
              f"{tuple(METHODS)}, got {list(self.methods)}")
        _need(self.eval_stop is None or self.eval_stop in STOP_MODES, "EvalConfig",
              f"eval_stop must be one of {STOP_MODES} or null (as trained), got {self.eval_stop!r}")
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
        keep_freed_memory: let CPU meta-training keep freed heap memory (glibc ``mallopt``,
            process-wide, see :func:`s2meta_fast.meta.host.keep_freed_memory`). On for a
            command-line run, where it was measured to help; ``MetaTrainer`` leaves it off
            unless asked.
        dist_backend: the torch.distributed backend under torchrun: "auto" (NCCL on CUDA, gloo
            on the CPU), "nccl" or "gloo" (docs/distributed.md); ignored without torchrun.
    """

    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"
    quiet: bool = False
    resume: bool = False
    keep_freed_memory: bool = True
    dist_backend: str = "auto"

    def __post_init__(self) -> None:
        _need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "RunConfig",
              f"seed must be a non-negative int, got {self.seed!r}")
        _need(self.device in DEVICES, "RunConfig", f"device must be one of {DEVICES}, got {self.device!r}")
        _need(isinstance(self.out, str) and self.out != "", "RunConfig", "out must be a folder path")
        _need(self.dist_backend in DIST_BACKENDS, "RunConfig",
              f"dist_backend must be one of {DIST_BACKENDS}, got {self.dist_backend!r}")


SECTIONS: Dict[str, type] = {"data": DataConfig, "meta": MetaConfig, "train": TrainConfig,
                             "eval": EvalConfig, "run": RunConfig}

# Closed sets an option must come from (the registries'); the CLI turns them into argparse choices.
# Dataset names are checked by DataConfig instead, so that an unknown one is listed like any bad value.
CHOICES: Dict[str, Tuple[str, ...]] = {"init": INIT_MODES, "update": UPDATE_MODES, "stop": STOP_MODES,
                                       "eval_stop": STOP_MODES, "state_init": STATE_INITS, "device": DEVICES,
                                       "model": tuple(MODELS), "optimizer": OPTIMIZERS, "methods": tuple(METHODS),
                                       "dist_backend": DIST_BACKENDS, "baseline_grid": BASELINE_GRIDS,
                                       "warm_start_data": WARM_START_DATA}

# Named sets of option values, applied above the defaults and below a config file and flags.
# "demo": a default run that finishes in minutes on a 2-core CPU (what `s2meta` starts from):
#   400 meta-steps of 8 scenarios instead of tens of thousands of one-scenario steps, hence 10x
#   the authors' Adam rates for ω_R and the update controller (at 1e-4, 300 steps leave ω_R near
#   its random init: ml100k Recall@20 75.3 vs 83.6 at 1e-3, docs/evaluation.md), and the reduced
#   grids for the cross-domain baselines (the paper's 500/1000-step points dominate a CPU run).
#   Chosen on meta-validation (docs/results.md): ω_R warm-started from Global, and the stop
#   controller at 1e-2 (at the authors' 5e-5, 400 meta-steps leave it at its init and every loop
#   stops right after t_min), and validation every 10 meta-steps (meta-validation peaks within the
#   first 20-50 steps where scenarios have a taste of their own; `best.pt` keeps the peak).
# "paper": the authors' code, departures included (docs/method.md); it does not choose a length:
#   set meta_steps (the authors trained for tens of thousands of one-scenario steps).
PRESETS: Dict[str, Dict[str, Any]] = {
    "demo": {"meta_steps": 400, "meta_batch": 8, "lr_init": 1e-3, "lr_update": 1e-3, "lr_stop": 1e-2,
             "warm_start": True, "validate_every": 10, "checkpoint_every": 50, "log_every": 25,
             "baseline_grid": "reduced"},
    "paper": {"optimizer": "adam", "lr_init": 1e-4, "lr_update": 1e-4, "lr_stop": 5e-5, "weight_decay": 1e-5,
              "meta_batch": 1, "validate_every": 500, "checkpoint_every": 500, "log_every": 100,
              "state_init": "normal", "zero_hh_bias": True, "forget_bias_fix": False, "inner_batch": None},
}
# Per-dataset values of a preset, applied over the preset's own.
DATASET_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "paper": {"ml100k": {"inner_batch": 128}, "ml20m": {"inner_batch": 128},
              "amazon": {"weight_decay": 1e-6, "model": "mapping"}},
}


def preset_options(preset: Optional[str], dataset: str) -> Dict[str, Any]:
    """The option values preset `preset` gives on `dataset` ({} for None)."""
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return {**PRESETS[preset], **DATASET_PRESETS.get(preset, {}).get(dataset, {})}


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
    """A complete, validated configuration; `preset` records which preset it was built on."""

    preset: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # Caught here, before data preparation and Global's training, rather than when ω_R is set.
        _need(not (self.train.warm_start and self.meta.init == "random"), "Config",
              "warm_start needs a learned initialisation (init: learned); init: random has no ω_R to start "
              "from Global's θ: turn it off (--no-warm-start)")
        # The fused kernels' CUDA limits fail here, before data loading and graph capture.
        if self.run.device == "cuda" and self.meta.fused:
            errors = cuda_limit_errors(hidden_size=self.meta.hidden_size if self.meta.update == "lstm" else None,
                                       scenarios=self.train.meta_batch)
            _need(not errors, "Config", "; ".join(errors) + " (run.device = cuda)")

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"preset": self.preset}
        for section in SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(values[k]) if isinstance(values[k], tuple) else values[k]
                            for k in section_fields(section)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def options(self) -> Dict[str, Any]:
        """Every option by name (flat), without the preset."""
        return {name: value for section in SECTIONS for name, value in self.to_dict()[section].items()}

    def replace(self, **options: Any) -> "Config":
        """A copy with options (by name, any section) changed and re-validated."""
        return build_config(self.to_dict(), options)

    @property
    def stop_at_evaluation(self) -> str:
        """s²Meta's stop rule for validation and evaluation: ``eval_stop``, else as trained."""
        return self.eval.eval_stop or self.meta.stop


def _valid_keys_text() -> str:
    return (f"valid sections: {', '.join(SECTIONS)}; preset; valid options: "
            f"{', '.join(sorted(OPTIONS))}")


def flatten(document: Mapping[str, Any], where: str = "config") -> Dict[str, Any]:
    """Options from a nested-or-flat mapping; unknown sections or keys raise :class:`ConfigError`.

    A top-level ``preset`` key is kept as the option ``preset``.
    """
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
        elif key in OPTIONS or key == "preset":
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

    Each layer is a nested-or-flat mapping (see :func:`flatten`); None layers are skipped. The
    preset named by the last layer that names one (and the dataset the layers end up with)
    goes below every layer.
    """
    options: Dict[str, Any] = {}
    for layer in layers:
        options.update(flatten(layer, where))
    preset = options.pop("preset", None)
    try:
        options = {**preset_options(preset, options.get("dataset", DataConfig.dataset)), **options}
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
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
        return Config(preset=preset, **built)
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


__all__ = ["CHOICES", "Config", "ConfigError", "DATASET_PRESETS", "DataConfig", "EvalConfig", "MetaConfig", "OPTIONS",
           "PRESETS", "RunConfig", "SECTIONS", "TrainConfig", "build_config", "dataset_names", "flatten",
           "load_config", "load_yaml", "preset_options"]

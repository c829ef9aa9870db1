"""``s2meta`` / ``python -m s2meta_fast``: prepare, train, evaluate, run, plot.

Every configuration option (s2meta_fast.config) is a flag of the same name with dashes; a YAML
file given by ``--config`` supplies defaults that flags override. ``evaluate`` and ``plot``
start from the run folder's own config.yaml, so they need no flags beyond the folder.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
import threading
import time
import typing
from typing import Any, Dict, List, Optional, Sequence

from . import config as config_mod
from .config import CHOICES, OPTIONS, Config, ConfigError, section_fields

log = logging.getLogger("s2meta_fast")

COMMANDS = {
    "prepare": ("read the raw files, build scenarios and embeddings (cached)", ("data", "run")),
    "train": ("meta-train s²Meta; checkpoints in --out", ("data", "meta", "train", "eval", "run")),
    "evaluate": ("evaluate methods on the meta-test scenarios; writes results.json/.md in --out",
                 ("data", "meta", "train", "eval", "run")),
    "run": ("prepare + train + evaluate every method; writes results.json/.md in --out",
            ("data", "meta", "train", "eval", "run")),
    "plot": ("draw the paper's Fig. 2 (one scenario's inner loop) from a checkpoint", ()),
}

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """A command line the parser accepted but that cannot run; the message says why."""


# --------------------------------------------------------------------------------------------
# parser


_DEFAULTS: Dict[str, Any] = {name: value for section in Config().to_dict().values() for name, value in section.items()}


def _element_type(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union and len(args) == 1:
        return _element_type(args[0])
    if typing.get_origin(kind) is tuple:
        return args[0]
    return kind


def _add_option(group: argparse._ArgumentGroup, name: str) -> None:
    kind = config_mod.option_type(name)
    flag = "--" + name.replace("_", "-")
    element = _element_type(kind)
    kwargs: Dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"default: {_DEFAULTS[name]}", **kwargs)
        return
    if typing.get_origin(kind) is tuple:
        kwargs["nargs"] = "+"
    kwargs["type"] = element
    if name in CHOICES:
        kwargs["choices"] = CHOICES[name]
    group.add_argument(flag, metavar=name.upper() if "choices" not in kwargs else None,
                       help=f"default: {_DEFAULTS[name]}", **kwargs)


def _add_sections(parser: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (flags override it)")
    for section in sections:
        group = parser.add_argument_group(f"{section} options")
        for name in section_fields(section):
            _add_option(group, name)
        if section == "meta":
            group.add_argument("--pure", dest="fused", action="store_const", const=False, default=argparse.SUPPRESS,
                               help="pure-PyTorch controllers and scoring (UpdateController) instead of the fused ops")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2meta", description="s²Meta (KDD'19) on fused C++/CUDA torch ops.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, sections) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == "plot":
            cmd.add_argument("--checkpoint", required=True, metavar="PATH",
                             help="a checkpoint (best.pt / checkpoint.pt) or a run folder")
            cmd.add_argument("--scenario", required=True, metavar="NAME", help="a scenario name (any split)")
            cmd.add_argument("--out", dest="png", required=True, metavar="FILE", help="the PNG to write")
            cmd.add_argument("--seed", type=int, default=None, help="seed of the inner loop's draws (default: run's)")
            cmd.add_argument("--device", choices=config_mod.DEVICES, default=None)
            cmd.add_argument("--k", type=int, default=20, help="cut-off of the test recall curve")
            cmd.add_argument("--quiet", action="store_true")
            continue
        _add_sections(cmd, sections)
        if name == "evaluate":
            cmd.add_argument("--checkpoint", metavar="PATH", default=None,
                             help="meta learner checkpoint (default: OUT/best.pt, else OUT/checkpoint.pt)")
    return parser


def _valid_flags(parser: argparse.ArgumentParser, command: Optional[str]) -> List[str]:
    for action in parser._subparsers._group_actions:  # the one subparsers action
        if command in action.choices:
            sub = action.choices[command]
            return sorted(o for a in sub._actions for o in a.option_strings if o.startswith("--"))
    return []


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = _valid_flags(parser, args.command)
        hints = []
        for token in [t for t in unknown if t.startswith("-")] or unknown:
            close = difflib.get_close_matches(token.split("=")[0], flags, n=1)
            hints.append(f"{token!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        parser.error(f"unknown option {', '.join(hints)} for `s2meta {args.command}`; valid options: "
                     f"{' '.join(flags)}")
    return args


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    return {name: value for name, value in vars(args).items() if name in OPTIONS}


def resolve_config(args: argparse.Namespace) -> Config:
    """defaults < OUT/config.yaml (evaluate only) < --config FILE < flags."""
    overrides = _overrides(args)
    layers: List[Optional[Dict[str, Any]]] = []
    if args.command == "evaluate":
        out = overrides.get("out")
        if out is None and args.config:
            out = config_mod.load_yaml(args.config).get("out")
        stored = os.path.join(out or config_mod.RunConfig().out, "config.yaml")
        if os.path.exists(stored):
            layers.append(config_mod.load_yaml(stored))
    if args.config:
        layers.append(config_mod.load_yaml(args.config))
    layers.append(overrides)
    cfg = config_mod.build_config(*layers, where=args.config or "options")
    _check_dataset(cfg.data.dataset)
    return cfg


def _check_dataset(name: str) -> None:
    valid = config_mod.dataset_names()
    if name not in valid:
        raise UsageError(f"unknown dataset {name!r}; valid datasets: {', '.join(valid)}")


# --------------------------------------------------------------------------------------------
# commands


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def _print_table(out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.md"), encoding="utf-8") as fh:
        print(fh.read(), end="")


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> None:
    from .eval.pipeline import prepare_data
    prepared = prepare_data(cfg)
    print(prepared.summary())


def cmd_train(cfg: Config, args: argparse.Namespace) -> None:
    from .eval.pipeline import check_run_folder, prepare_data, train_meta
    check_run_folder(cfg)
    train_meta(cfg, prepare_data(cfg))


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> None:
    from .eval.pipeline import adaptation_stage, clear_results, evaluate_methods, load_learner, prepare_data
    if not cfg.run.resume:
        clear_results(cfg.run.out)
    prepared = prepare_data(cfg)
    learner = None
    if "s2meta" in cfg.eval.methods:
        learner = load_learner(cfg, prepared, args.checkpoint).to(cfg.run.device)
    evaluate_methods(cfg, prepared, learner)
    if learner is not None:
        adaptation_stage(cfg, prepared, learner)
    _print_table(cfg.run.out)


def cmd_run(cfg: Config, args: argparse.Namespace) -> None:
    from .eval.pipeline import adaptation_stage, check_run_folder, evaluate_methods, prepare_data, train_meta
    check_run_folder(cfg)
    start = time.perf_counter()
    prepared = prepare_data(cfg)
    seconds = {"prepare_s": time.perf_counter() - start}
    learner = None
    if "s2meta" in cfg.eval.methods:
        # on --resume this is the time of the resumed part only
        learner = train_meta(cfg, prepared).to(cfg.run.device)
        seconds["meta_train_s"] = time.perf_counter() - start - seconds["prepare_s"]
    evaluate_methods(cfg, prepared, learner, seconds)
    if learner is not None:
        adaptation_stage(cfg, prepared, learner)
    log.info("run finished in %.1f s", time.perf_counter() - start)
    _print_table(cfg.run.out)


def cmd_plot(args: argparse.Namespace) -> None:
    from .data.tasks import support_batch
    from .eval.pipeline import eval_tasks, load_learner, prepare_data
    from .plot import draw_figure, record_scenario

    checkpoint = args.checkpoint
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    if os.path.isdir(checkpoint):
        checkpoint = next((os.path.join(folder, n) for n in ("best.pt", "checkpoint.pt")
                           if os.path.exists(os.path.join(folder, n))), None)
        if checkpoint is None:
            raise FileNotFoundError(f"no best.pt or checkpoint.pt in {folder!r}")
    stored = os.path.join(folder, "config.yaml")
    if not os.path.exists(stored):
        raise FileNotFoundError(f"{stored!r} is missing: plot needs the run's config next to its checkpoint")
    overrides: Dict[str, Any] = {"quiet": args.quiet, "resume": False, "out": folder}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.device is not None:
        overrides["device"] = args.device
    cfg = config_mod.build_config(config_mod.load_yaml(stored), overrides, where=stored)
    _setup_logging(cfg.run.quiet)
    prepared = prepare_data(cfg)
    names = {s.name: split for split in ("test", "valid", "train") for s in prepared.scenarios(split)}
    if args.scenario not in names:
        shown = sorted(n for n, split in names.items() if split == "test")
        raise UsageError(f"unknown scenario {args.scenario!r}; meta-test scenarios: {', '.join(shown)} "
                         f"({len(names)} scenarios in all splits)")
    task = next(t for t in eval_tasks(prepared, names[args.scenario], cfg.run.seed) if t.name == args.scenario)
    learner = load_learner(cfg, prepared, checkpoint).to(cfg.run.device)
    record = record_scenario(learner, task, support_batch, stop=cfg.eval.eval_stop, seed=cfg.run.seed, k=args.k)
    draw_figure(record, args.png, title=f"s²Meta on {prepared.name} scenario {args.scenario!r} "
                                        f"({names[args.scenario]} split)")
    print(f"wrote {args.png}: {record['steps']} updates, test recall@{args.k} "
          f"{record['test_recall'][0]:.4f} -> {record['test_recall'][record['steps']]:.4f}")


HANDLERS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "run": cmd_run}


def _error_types() -> tuple:
    from .data.errors import DataFileError, DataFormatError, UnknownDatasetError
    return (ConfigError, UsageError, DataFileError, DataFormatError, UnknownDatasetError, FileNotFoundError,
            ValueError, KeyError)


def _check_device(device: str) -> None:
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``s2meta`` console script; returns the exit status."""
    args = parse(argv)
    if threading.current_thread() is threading.main_thread():
        # A kill (SIGTERM) ends the run like Ctrl-C: every file on disk is whole, --resume continues.
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    import s2meta_fast
    print(s2meta_fast.backend(), file=sys.stderr, flush=True)
    errors = _error_types()
    try:
        if args.command == "plot":
            cmd_plot(args)
            return 0
        cfg = resolve_config(args)
        _check_device(cfg.run.device)
        _setup_logging(cfg.run.quiet)
        HANDLERS[args.command](cfg, args)
        return 0
    except KeyboardInterrupt:
        print("s2meta: interrupted; checkpoints and finished stages in the run folder are intact: "
              "rerun the same command with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, UsageError) as error:
        print(f"s2meta {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except errors as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"s2meta {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

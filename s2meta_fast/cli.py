"""``s2meta`` / ``python -m s2meta_fast``: prepare, train, evaluate, run, plot, export, recommend.

Every configuration option (s2meta_fast.config) is a flag of the same name with dashes; a YAML
file given by ``--config`` supplies defaults that flags override, above the preset (``--preset``,
default "demo"). ``evaluate`` and ``plot`` start from the run folder's own config.yaml, so they
need no flags beyond the folder. The work is :mod:`s2meta_fast.app`'s; this module parses,
calls and reports. A user's mistake (:class:`s2meta_fast.errors.S2MetaError`) is reported in
one line; anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
import threading
import typing
from typing import Any, Dict, List, Optional, Sequence

from . import app
from . import config as config_mod
from ._extension import backend
from .config import CHOICES, OPTIONS, PRESETS, Config, section_fields
from .errors import ConfigError, S2MetaError
from .app.compare import ABLATIONS
from .eval.methods import METHODS
from .eval.results import markdown_table
from .meta.distributed import launched
from .models import MODELS

log = logging.getLogger("s2meta_fast")

COMMANDS = {
    "prepare": ("read the raw files, build scenarios and embeddings (cached)", ("data", "run")),
    "train": ("meta-train s²Meta; checkpoints in --out", ("data", "meta", "train", "eval", "run")),
    "evaluate": ("evaluate methods on the meta-test scenarios; writes results.json/.md in --out",
                 ("data", "meta", "train", "eval", "run")),
    "run": ("prepare + train + evaluate every method; writes results.json/.md in --out",
            ("data", "meta", "train", "eval", "run")),
    "plot": ("draw the paper's Fig. 2 (one scenario's inner loop) from a checkpoint", ()),
    "export": ("write a run's trained meta learner as one self-contained model file", ()),
    "recommend": ("adapt a model file to a new scenario's support pairs and write top-K lists", ()),
    "compare": ("the paper's comparison over seeds: every method, the ablations, the architectures; "
                "writes compare.json/.md in --out (resumable)", ("data", "meta", "train", "eval", "run")),
}

# The preset a command line starts from unless --preset or the config file names another.
DEFAULT_PRESET = "demo"

# A user's mistake, or data, a run folder or a model file that cannot serve the command (2);
# interrupted (130). A bug is none of these: it shows its traceback.
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


# --------------------------------------------------------------------------------------------
# parser


_DEFAULTS: Dict[str, Any] = config_mod.build_config({"preset": DEFAULT_PRESET}).options()


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


def _add_sections(parser: argparse.ArgumentParser, sections: Sequence[str], skip: Sequence[str] = ()) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (flags override it)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=argparse.SUPPRESS,
                        help=f"named option values under the config file and flags (default: {DEFAULT_PRESET}; "
                             f"paper: the authors' settings, docs/method.md)")
    for section in sections:
        group = parser.add_argument_group(f"{section} options")
        for name in section_fields(section):
            if name not in skip:
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
        if name in MODEL_COMMANDS:
            _add_model_command_args(cmd, name)
        if name == "compare":
            _add_sections(cmd, sections, skip=("methods", "resume"))
            study = cmd.add_argument_group("study options")
            study.add_argument("--methods", default="all", metavar="all|LIST",
                               help=f"methods of the main run, comma-separated (default: all = {','.join(METHODS)})")
            study.add_argument("--ablations", nargs="?", const="all", default=None, metavar="all|LIST",
                               help=f"also the Table-4 ablations (bare flag: all = {','.join(ABLATIONS)})")
            study.add_argument("--architectures", nargs="?", const="all", default=None, metavar="all|LIST",
                               help=f"also s²Meta with these recommenders (bare flag: all = {','.join(MODELS)})")
            study.add_argument("--seeds", default="0,1,2", metavar="LIST",
                               help="seeds, comma-separated (default: 0,1,2)")
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


# compare's own flags that share a name with an option (its --methods takes all|LIST)
_STUDY_FLAGS = {"compare": ("methods",)}


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    own = _STUDY_FLAGS.get(args.command, ())
    return {name: value for name, value in vars(args).items()
            if (name in OPTIONS and name not in own) or name == "preset"}


def resolve_config(args: argparse.Namespace) -> Config:
    """defaults < preset < OUT/config.yaml (evaluate only) < --config FILE < flags.

    The preset is --preset, else the one the config file (or OUT/config.yaml) names, else
    :data:`DEFAULT_PRESET`.
    """
    overrides = _overrides(args)
    layers: List[Optional[Dict[str, Any]]] = [{"preset": DEFAULT_PRESET}]
    file_options = config_mod.load_yaml(args.config) if args.config else None
    if args.command == "evaluate":
        out = overrides.get("out") or (file_options or {}).get("out") or config_mod.RunConfig().out
        layers.append(app.run_folder.stored_options(out))
    layers += [file_options, overrides]
    return config_mod.build_config(*layers, where=args.config or "options")


# --------------------------------------------------------------------------------------------
# commands


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def _prints() -> bool:
    """Under torchrun only rank 0 prints what a command returns (every rank returns it)."""
    return os.environ.get("RANK", "0") == "0"


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> None:
    print(app.prepare(cfg).summary())


def cmd_train(cfg: Config, args: argparse.Namespace) -> None:
    app.train(cfg)


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> None:
    doc = app.evaluate(cfg, args.checkpoint)
    if _prints():
        print(markdown_table(doc), end="")


def cmd_run(cfg: Config, args: argparse.Namespace) -> None:
    doc = app.run(cfg)
    if _prints():
        print(markdown_table(doc), end="")


def cmd_plot(args: argparse.Namespace) -> None:
    overrides: Dict[str, Any] = {"quiet": args.quiet}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.device is not None:
        overrides["device"] = args.device
    figure = app.plot(args.checkpoint, args.scenario, args.png, overrides, k=args.k)
    print(f"wrote {figure.path}: {figure.steps} updates, test recall@{figure.k} "
          f"{figure.recall_before:.4f} -> {figure.recall_after:.4f}")


def _add_model_command_args(cmd: argparse.ArgumentParser, name: str) -> None:
    from .app.recommender import ON_UNKNOWN
    from .meta.meta_config import STOP_MODES
    if name == "export":
        cmd.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished `s2meta train` / `run` folder")
        cmd.add_argument("--out", required=True, metavar="MODEL", help="the model file to write")
        cmd.add_argument("--checkpoint", metavar="PATH", default=None,
                         help="meta learner checkpoint (default: RUN_DIR/best.pt, else RUN_DIR/checkpoint.pt)")
        return
    cmd.add_argument("--model", required=True, metavar="MODEL", help="a model file from `s2meta export`")
    cmd.add_argument("--support", required=True, metavar="FILE",
                     help="the scenario's support pairs: CSV (header user_id,item_id) or Parquet")
    cmd.add_argument("--users", required=True, metavar="FILE", help="users to recommend for (column user_id)")
    cmd.add_argument("--candidates", metavar="FILE", default=None,
                     help="the scenario's items (column item_id); the support's items are always candidates")
    cmd.add_argument("--k", type=int, default=20, help="list length per user (default: 20)")
    cmd.add_argument("--out", required=True, metavar="FILE",
                     help="recommendations: .csv, .parquet or .jsonl by extension; - for JSON lines on stdout")
    cmd.add_argument("--stop", choices=STOP_MODES, default=None, help="inner-loop stop rule (default: the model's)")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the inner loop's draws (default: 0)")
    cmd.add_argument("--on-unknown", choices=ON_UNKNOWN, default="error",
                     help="an unknown candidate item: an error naming it (default) or dropped")
    cmd.add_argument("--exclude-support", action="store_true", help="leave each user's own support items out")
    cmd.add_argument("--device", choices=config_mod.DEVICES, default="cpu")


def cmd_export(args: argparse.Namespace) -> None:
    rec = app.export(args.run, args.out, checkpoint=args.checkpoint)
    print(f"wrote {args.out}: {rec.kind} d={rec.embed_dim}, {len(rec.user_ids)} users, {len(rec.item_ids)} items, "
          f"meta-step {rec.info.get('meta_step')} of {args.run} ({os.path.getsize(args.out) / 1e6:.1f} MB)")


def cmd_recommend(args: argparse.Namespace) -> None:
    done = app.recommend(args.model, args.support, args.users, args.out, candidates=args.candidates, k=args.k,
                         stop=args.stop, seed=args.seed, on_unknown=args.on_unknown,
                         exclude_support=args.exclude_support, device=args.device, stream=sys.stdout)
    scen = done.scenario
    dropped = f", {len(scen.candidates_dropped)} unknown candidates dropped" if scen.candidates_dropped else ""
    print(f"s2meta recommend: {scen.n_support} support pairs used, {scen.n_dropped} dropped "
          f"({scen.dropped_unknown_user} unknown user, {scen.dropped_unknown_item} unknown item){dropped}, "
          f"{scen.steps} inner steps ({scen.stop}), {len(scen.candidates)} candidates, {done.n_users} users "
          f"({done.n_fallback_users} without embedding: ItemPop), {len(done.frame)} rows -> {args.out}; "
          f"adapt + rank {done.serve_seconds * 1e3:.1f} ms, load {done.load_seconds * 1e3:.0f} ms",
          file=sys.stderr if args.out == "-" else sys.stdout)


MODEL_COMMANDS = {"export": cmd_export, "recommend": cmd_recommend}
def cmd_compare(cfg: Config, args: argparse.Namespace) -> None:
    study = app.compare_study.Study(methods=app.compare_study.parse_names(args.methods, tuple(METHODS)),
                                    ablations=app.compare_study.parse_names(args.ablations, tuple(ABLATIONS)),
                                    architectures=app.compare_study.parse_names(args.architectures, tuple(MODELS)),
                                    seeds=app.compare_study.parse_seeds(args.seeds))
    app.compare(cfg, study)
    with open(f"{cfg.run.out}/compare.md", encoding="utf-8") as fh:
        print(fh.read(), end="")


HANDLERS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "run": cmd_run,
            "compare": cmd_compare}


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``s2meta`` console script; returns the exit status.

    Under torchrun the process ends here, without the interpreter's teardown: gloo's worker
    threads can still be releasing a finished collective's tensors while Python shuts down, and
    a thread that then needs the GIL aborts the process ("terminate called without an active
    exception"). That would report a rank which finished cleanly as failed, and torchrun would
    restart it. Every file is written and closed by then; the streams are flushed first.
    """
    status = _main(argv)
    if launched():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse(argv)
    if threading.current_thread() is threading.main_thread():
        # A kill (SIGTERM) ends the run like Ctrl-C: every file on disk is whole, --resume continues.
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    if _prints():
        print(backend(), file=sys.stderr, flush=True)
    try:
        if args.command == "plot":
            _setup_logging(args.quiet)
            cmd_plot(args)
            return 0
        if args.command in MODEL_COMMANDS:
            _setup_logging(True)
            MODEL_COMMANDS[args.command](args)
            return 0
        cfg = resolve_config(args)
        _setup_logging(cfg.run.quiet)
        HANDLERS[args.command](cfg, args)
        return 0
    except KeyboardInterrupt:
        if args.command == "compare":
            print("s2meta: interrupted; finished (method, seed) runs in the study folder are kept: rerun the same "
                  "command to continue", file=sys.stderr)
        else:
            print("s2meta: interrupted; the previous results in the run folder are unchanged and the interrupted "
                  "run's checkpoints and finished stages are kept: rerun the same command with --resume to "
                  "continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except S2MetaError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        print(f"s2meta {args.command}: error: {'; '.join(lines) or type(error).__name__}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

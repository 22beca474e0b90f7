"""The ``mmsae`` command: one subcommand per pipeline stage.

The CLI has no logic of its own. Each stage is a config dataclass and a function that takes it;
the flags of a subcommand are generated from the dataclass fields (``field.metadata["help"]``
gives the help text), so the CLI and the Python API always accept the same options.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from typing import Any, Literal, get_args, get_origin

from .config import option_type
from .errors import MmsaeError
from .io import is_no_space, no_space_error

# subcommand -> (module, config class, function, one-line description)
STAGES: dict[str, tuple[str, str, str, str]] = {
    "harvest": ("mmsae.activations", "HarvestConfig", "harvest", "run a model over data and store one layer's activations"),
    "train": ("mmsae.train", "TrainConfig", "train", "train a sparse autoencoder on stored (or live) activations"),
    "evaluate": ("mmsae.evaluate", "EvaluateConfig", "evaluate", "measure an SAE: FVU, L0, dead latents, spliced-in loss"),
    "index": ("mmsae.index", "IndexConfig", "build_index", "find each feature's top images with patch maps"),
    "explain": ("mmsae.explain", "ExplainConfig", "explain", "have a multimodal model explain each feature"),
    "score": ("mmsae.score", "ScoreConfig", "score", "score explanations (IoU, CLIP score, detection) against baselines"),
    "steer": ("mmsae.steer", "SteerConfig", "steer", "generate with features clamped, added or scaled"),
    "attribute": ("mmsae.attribute", "AttributeConfig", "attribute", "attribute an answer to features over patches and tokens"),
    "dashboard": ("mmsae.report", "DashboardConfig", "build_dashboard", "build the static feature dashboard and run report"),
    "demo": ("mmsae.demo", "DemoConfig", "run_demo", "run the whole pipeline offline on the demo model ('demo build' builds it)"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    # ``X | None`` -> X; ``X | list[X]`` (one value or several: a grid) -> list[X], a multi-value flag
    return option_type(tp)[0]


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one flag per field of a config dataclass (fields without a default are required)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp = _unwrap_optional(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if has_default and default is not None and tp is not bool:
            help_text += f" (default: {default})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if not has_default:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = get_origin(tp)
        if origin is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif origin in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = _unwrap_optional(get_args(tp)[0])
            inner = kwargs["type"]
            if get_origin(inner) is Literal:
                kwargs["choices"] = list(get_args(inner))
                kwargs["type"] = type(get_args(inner)[0])
        else:
            kwargs["type"] = tp if callable(tp) else str
        parser.add_argument(_flag(f.name), **kwargs)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(config_cls) if f.init and f.metadata.get("cli") is not False}
    values = {k: v for k, v in vars(args).items() if k in names}
    for k, v in values.items():
        if isinstance(v, list) and get_origin(_unwrap_optional(typing.get_type_hints(config_cls)[k])) is tuple:
            values[k] = tuple(v)
    return config_cls(**values)


def _load_stage(name: str) -> tuple[type, Any]:
    module_name, cls_name, fn_name, _ = STAGES[name]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), getattr(module, fn_name)


def build_parser(argv_stage: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmsae", description="mmsae: sparse autoencoders for multimodal models. One subcommand per stage.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mmsae {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (_, _, _, description) in STAGES.items():
        p = sub.add_parser(name, help=description, description=description)
        # Only the chosen stage's module is imported, so a slow import never delays the others.
        if name == argv_stage:
            config_cls, _ = _load_stage(name)
            if name == "demo":
                p.add_argument("action", nargs="?", choices=["run", "build"], default="run",
                               help="'run' (default) runs the pipeline; 'build' only builds the demo model")
            add_config_arguments(p, config_cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(stage if stage in STAGES else None)
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 0
    config_cls, fn = _load_stage(args.stage)
    try:
        cfg = config_from_args(config_cls, args)
        if args.stage == "demo" and args.action == "build":
            from .demo import build_demo_model

            build_demo_model(cfg)
        else:
            fn(cfg)
    except MmsaeError as e:
        print(f"mmsae {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk met by a write outside mmsae.io (which turns it into MmsaeError)
        if not is_no_space(e):
            raise
        print(f"mmsae {args.stage}: error: {no_space_error(getattr(e, 'filename', None) or 'the output')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmsae {args.stage}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``mimscale`` command. Each sub-command lives beside the code it drives and registers itself here.

A module in COMMAND_MODULES exposes ``register(subparsers)``, which adds its parser and sets
``func=<callable(args) -> int>`` as the parser default. Imports are deferred to keep ``mimscale --help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mimscale.config import ConfigError

COMMAND_MODULES = [
    "mimscale.train",  # train
    "mimscale.engine.ckpt_cli",  # ckpt info|convert
    "mimscale.plan",  # plan
    "mimscale.shards.cli",  # shards create|verify|inspect
    "mimscale.eval.export",  # export
    "mimscale.eval.evaluators",  # eval knn|linear|finetune
    "mimscale.eval.analysis",  # analyze
]


def build_parser(modules: list[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The parser with the sub-commands of ``modules`` (all by default; ``train`` alone skips the slow imports
    of the others, torch and timm among them, so a stop signal in start-up is acted on within a second)."""
    parser = argparse.ArgumentParser(prog="mimscale", description="Masked image modeling pretraining at scale.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(subparsers)
    subparsers.add_parser(  # handled in main() before parsing: everything after it is DeepSpeed's runner's
        "launch",
        help="the deepspeed launcher (same arguments), with SIGTERM/SIGUSR1 forwarded so the ranks checkpoint",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # first thing, before the slow imports: a stop signal in start-up is never a crash
        from mimscale.engine import preempt

        preempt.install_stop_handlers()
    if argv[:1] == ["launch"]:  # `deepspeed`'s own arguments follow, unparsed (see mimscale.engine.launcher)
        from mimscale.engine.deepspeed import pin_torch_extensions_dir
        from mimscale.engine.launcher import main as launch

        pin_torch_extensions_dir()  # the ranks inherit this environment's own extensions folder
        return launch(argv[1:])
    parser = build_parser(["mimscale.train"] if argv[:1] == ["train"] else COMMAND_MODULES)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"mimscale: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"mimscale: error: {err}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The `mimscale` console script: main(), then a quick exit (mimscale.process_exit)."""
    from mimscale.process_exit import exit_quickly

    exit_quickly(main())


if __name__ == "__main__":
    console_main()

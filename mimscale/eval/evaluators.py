"""Evaluators register here, as methods do in mimscale/presets.py: one entry per protocol, with the function
that runs it for `mimscale eval <name>` and, where it is cheap enough, the in-run monitor the engine calls every
``eval.knn_every`` steps (``eval.monitor`` picks it by name). Entries name functions as "module:function",
imported when used, so this module imports nothing heavy: config.py checks ``eval.monitor`` against it, and no
evaluator module imports another through it. A new evaluator is its own module plus one entry here.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluator:
    """``run(args) -> exit code`` for `mimscale eval`; ``monitor(cfg) -> (backbone -> {metric: value})`` for the
    in-run monitor ("" when the protocol is too costly to run inside training); ``arguments(parser)`` adds the
    protocol's own command-line options ("" when it has none beyond the shared ones)."""

    run: str
    help: str
    monitor: str = ""
    arguments: str = ""


EVALUATORS: dict[str, Evaluator] = {
    "knn": Evaluator(
        "mimscale.eval.probe:run_knn", "DINO weighted kNN on frozen features", monitor="mimscale.eval.probe:in_run_knn"
    ),
    "linear": Evaluator(
        "mimscale.eval.probe:run_linear", "linear probe on frozen features", monitor="mimscale.eval.probe:in_run_linear"
    ),
    "finetune": Evaluator(
        "mimscale.eval.finetune:run_finetune",
        "end-to-end fine-tuning with layer-wise lr decay",
        arguments="mimscale.eval.finetune:add_arguments",
    ),
}
MONITORS = tuple(name for name, evaluator in EVALUATORS.items() if evaluator.monitor)


def resolve(spec: str) -> Callable:
    """The function a "module:function" entry names."""
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def in_run_monitors(cfg) -> list[Callable]:
    """The in-run monitor ``eval.monitor`` names, when ``eval.knn_every`` asks for one (the engine never imports
    eval/ itself: the entry point hands it these)."""
    if not cfg.eval.knn_every:
        return []
    return [resolve(EVALUATORS[cfg.eval.monitor].monitor)(cfg)]


def run_eval(args: argparse.Namespace) -> int:
    return int(resolve(EVALUATORS[args.protocol].run)(args) or 0)


def register(subparsers) -> None:
    from mimscale.engine.safe_load import add_trust_argument

    parser = subparsers.add_parser("eval", help="kNN / linear-probe accuracy of frozen features, or fine-tuning")
    parser.add_argument(
        "protocol",
        choices=tuple(EVALUATORS),
        help="; ".join(f"{name}: {evaluator.help}" for name, evaluator in EVALUATORS.items()),
    )
    parser.add_argument(
        "--model", required=True, help="exported folder, run/checkpoint folder, or random:<config.yaml | run folder>"
    )
    parser.add_argument("--train", required=True, help="labelled training shards (folder, glob or brace pattern)")
    parser.add_argument("--val", required=True, help="labelled validation shards")
    parser.add_argument("--pool", choices=("cls", "mean"), default="cls", help="feature pooling (Swin: always mean)")
    parser.add_argument(
        "--layer",
        type=int,
        help="features of this ViT block / Swin stage (1-based; -1 = last, before the final norm); default: final",
    )
    parser.add_argument("--image-size", type=int, default=0, help="input side; default: the model's training size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for a random:<config> model"
    )
    parser.add_argument("--k", type=int, default=20, help="kNN neighbours")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    parser.add_argument(
        "--epochs", type=int, default=100, help="linear-probe epochs per grid point; finetune epochs without --steps"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    for evaluator in EVALUATORS.values():
        if evaluator.arguments:
            resolve(evaluator.arguments)(parser)
    add_trust_argument(parser)
    parser.set_defaults(func=run_eval)

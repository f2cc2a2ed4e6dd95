"""Training entry point: `mimscale train --config X` or `deepspeed --module mimscale.train --config X`.

Both run the same code; under a launcher every rank runs this module (DeepSpeed adds --local_rank).
"""

from __future__ import annotations

import argparse
import sys

from mimscale.config import load_config
from mimscale.engine import safe_load


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (newest complete checkpoint in run.output_dir, the default), none, or a checkpoint path",
    )
    parser.add_argument(
        "--allow-objective-change",
        action="store_true",
        help="resume a checkpoint trained with another method or objective version (refused by default): its "
        "weights, optimizer state and schedule go on under this config's objective",
    )
    safe_load.add_trust_argument(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _stopped_during_startup(where: str, output_dir: str | None = None) -> int | None:
    """The exit code (75, or 130 for Ctrl-C) if a stop signal arrived before training began; rank 0 then asks the
    job script to requeue. None when no signal came."""
    from mimscale.engine import preempt
    from mimscale.engine.slurm import requeue_stopped_startup

    early = preempt.exit_if_stopped_during_startup(where)
    if early is not None:
        requeue_stopped_startup(output_dir, early, preempt.EXIT_REQUEUE)
    return early


def run(args: argparse.Namespace) -> int:
    from mimscale.engine import preempt

    early = _stopped_during_startup("before reading the config")
    if early is not None:
        return early
    cfg = load_config(args.config, args.overrides)
    preempt.set_stop_timeout(cfg.run.stop_timeout_s)
    early = _stopped_during_startup("config loaded", cfg.run.output_dir)  # before the slow imports below
    if early is not None:
        return early
    from mimscale.engine.deepspeed import pin_torch_extensions_dir

    pin_torch_extensions_dir()  # before deepspeed builds its CPU communication op in init_distributed
    from mimscale.engine.checkpoint import CheckpointWriteError
    from mimscale.engine.loop import TrainingError, train
    from mimscale.eval.evaluators import in_run_monitors

    evaluators = in_run_monitors(cfg)  # eval.monitor every eval.knn_every steps; the engine never imports eval/
    try:
        summary = train(
            cfg,
            resume=args.resume,
            evaluators=evaluators,
            trusted=safe_load.trust_decision(args),
            allow_objective_change=args.allow_objective_change,
        )
    except (TrainingError, CheckpointWriteError) as err:
        print(f"mimscale: training stopped: {err}", file=sys.stderr)
        return 1
    return summary["exit_code"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="pretrain a model (one process, or under the deepspeed launcher)")
    add_train_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m mimscale.train ...` is `mimscale train ...` (the launcher adds --local_rank)."""
    from mimscale.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from mimscale.process_exit import exit_quickly

    exit_quickly(main())

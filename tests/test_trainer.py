"""The Trainer owns the loop's state: the logged lr is the scheduler's, history is bounded, and the production
step calls the engine's forward directly (fault injection only wraps it when the failure tests ask)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mimscale.config import load_config

TINY = ["model.student_args.depth=1", "data.batch_size=2", "run.device=cpu", "optim.warmup_steps=2"]
TINY += ["train.max_steps=5", "optim.lr=1e-3", "optim.min_lr=1e-5"]


@pytest.mark.usefixtures("one_rank", "one_torch_thread")
def test_trainer_logs_the_schedulers_lr_and_keeps_a_bounded_history(tmp_path):
    from mimscale.engine import faults
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import HISTORY_LENGTH, Trainer
    from mimscale.engine.optim import warmup_cosine
    from mimscale.pipeline.masking import mask_generator_for

    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    assert trainer.forward is trainer.engine and not faults.FAULTS  # no fault check in the production step
    generator, rng, size = mask_generator_for(cfg, trainer.method), np.random.default_rng(0), cfg.data.image_size
    batch = {
        "image": torch.randn(2, 3, size, size),
        "mask": torch.from_numpy(np.stack([generator(rng) for _ in range(2)])),
        "sample_id": torch.arange(2),
    }
    source = itertools.repeat(batch)
    schedule = [warmup_cosine(s, base_lr=1e-3, min_lr=1e-5, warmup_steps=2, max_steps=5) for s in range(5)]
    for step in range(1, 5):
        trainer.train_step(source)
        assert trainer.step == step and trainer.lr == pytest.approx(schedule[step - 1])
        assert trainer.engine.optimizer.param_groups[0]["lr"] == pytest.approx(schedule[step])  # next one already
    assert trainer.history.maxlen == HISTORY_LENGTH and trainer.samples_seen == 8


@pytest.mark.usefixtures("one_rank", "one_torch_thread")
def test_fit_closes_the_batch_iterator_when_a_step_fails(tmp_path):
    """A failing step (a forward, a collective) must still shut the stream's workers down: left suspended, the
    iterator keeps them alive and exit-time cleanup can wait for them forever."""
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import Trainer
    from mimscale.engine.metrics import StepLogger

    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    closed = []

    def batches():
        try:
            while True:
                yield {}
        finally:
            closed.append(True)

    class Stream:
        def __iter__(self):
            self.iterator = batches()  # still referenced after the failure, as a real run's objects may be
            return self.iterator

    def failing_step(iterator):
        next(iterator)
        raise RuntimeError("collective failed")

    trainer.train_step = failing_step
    logger = StepLogger(tmp_path, enabled=False, max_steps=5, start_step=0, progress=False)
    stream = Stream()
    with pytest.raises(RuntimeError, match="collective failed"):
        trainer.fit(stream, logger)
    assert closed == [True]

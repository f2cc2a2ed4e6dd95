"""End-to-end training through the real CLI and the real `deepspeed` launcher (2 CPU ranks, gloo).

One uninterrupted 2-rank ZeRO-3 bf16 reference run is shared by the resume tests: every interrupted run
(stopped, killed, killed while saving, resumed on another world size) must reproduce its weights and its
per-step data checksum.
"""

from __future__ import annotations

import glob
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
# Small and fast: 2-block ViT-Tiny at 64 px, 4 images per rank, 6 steps, a checkpoint every 2 steps.
TINY = [
    "model.student_args.depth=2",
    "data.batch_size=4",
    "data.num_workers=1",
    "train.max_steps=6",
    "train.log_every=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=5",
    "optim.warmup_steps=2",
    "eval.knn_every=0",
]
ZERO3_BF16 = ["deepspeed.zero_stage=3", "deepspeed.precision=bf16"]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def overrides(output_dir: Path, *extra: str) -> list[str]:
    args = []
    for item in [*TINY, f"run.output_dir={output_dir}", *extra]:
        args += ["--set", item]
    return args


def env_with(**extra) -> dict:
    # One thread per rank: two ranks on a 2-core machine must not oversubscribe it.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MIMSCALE_INJECT_FAULT", None)
    env.update(extra)
    return env


def launcher_cmd(ranks: int, *args: str) -> list[str]:
    return [
        "deepspeed",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--module",
        "mimscale.train",
        "--config",
        str(DEMO),
        *args,
    ]


def run_capped(command: list[str], *, env=None, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run a command in its own session; past ``timeout`` kill the whole tree (launcher, ranks, workers, so nothing
    lingers to load the next test) and fail with what it printed, so a hang shows where it stopped."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env or env_with(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... still ran after {timeout} s\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch(ranks: int, *args: str, env=None, timeout=400) -> subprocess.CompletedProcess:
    return run_capped(launcher_cmd(ranks, *args), env=env, timeout=timeout)


def train_single(*args: str, env=None, timeout=400) -> subprocess.CompletedProcess:
    return run_capped(
        [sys.executable, "-m", "mimscale.cli", "train", "--config", str(DEMO), *args], env=env, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:08d}")


def scalars(run_dir: Path, name: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for event_file in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        if name in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(name)})
    return values


# On CPU a resumed run ends with bit-identical weights, and that is what is tested. On CUDA, SDPA attention
# backward, gather/index backward (visible-only students) and multinomial (attention-guided masks) use atomics and
# are not bit-reproducible, so two *uninterrupted* runs already differ in the last bits: there the weights are
# compared within this tolerance (6 bf16 steps), while the data order (sample-id checksums) stays exact everywhere.
CUDA_RESUME_TOLERANCE = {"rtol": 1e-3, "atol": 1e-5}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    if torch.cuda.is_available():
        different = [key for key in a if not torch.allclose(a[key], b[key], **CUDA_RESUME_TOLERANCE)]
    else:
        different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank ZeRO-3 bf16 run every resume test compares against."""
    run_dir = tmp_path_factory.mktemp("reference")
    ok(launch(2, *overrides(run_dir, *ZERO3_BF16)))
    return run_dir


def test_single_process_cli_logs_tensorboard_checkpoints_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    knn = ["eval.knn_every=4", "eval.train_shards=shards/sample-val/*.tar", "eval.val_shards=shards/sample-val/*.tar"]
    first = ok(train_single(*overrides(run_dir, "train.max_steps=4", "checkpoint.keep_last=1", *knn)))
    lines = [line for line in first.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and lines[-1].startswith("step 4/4 | loss ")
    for field in ("lr ", "grad_norm ", "img/s ", "mem "):
        assert field in lines[-1]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "deepspeed_config.json").is_file()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000004"]  # keep_last=1 pruned step 2
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    for name in ("train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec"):
        assert sorted(scalars(run_dir, name)) == [1, 2, 3, 4], name
    knn_top1 = scalars(run_dir, "eval/knn_top1")  # in-run kNN on 19 photo classes: chance is about 0.05
    assert list(knn_top1) == [4] and 0.2 < knn_top1[4] <= 1.0 and "eval step 4 | knn_top1" in first.stdout

    second = ok(train_single(*overrides(run_dir, "train.max_steps=6", "checkpoint.keep_last=1")))
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    assert [line.split("|")[0].strip() for line in second.stdout.splitlines() if line.startswith("step ")] == [
        "step 5/6",
        "step 6/6",
    ]
    assert sorted(scalars(run_dir, "train/loss")) == [1, 2, 3, 4, 5, 6]
    (run_dir / "checkpoints" / "step_00000006" / "rng_rank0.pt").unlink()  # a warning, not damage
    other_model = train_single(*overrides(run_dir, "train.max_steps=8", "model.student_args.depth=3"))
    assert other_model.returncode == 2 and "rng_rank0.pt is missing" in other_model.stderr
    assert (
        "differ (saved -> now):\n  model.student_args: {'patch_size': 8, 'depth': 2} -> {'patch_size': 8, 'depth': 3}"
        in (other_model.stderr)
    ), other_model.stderr[-3000:]


def test_zero3_bf16_stop_and_resume_is_bit_identical(reference, tmp_path):
    run_dir = tmp_path / "stopped"
    stopped = ok(launch(2, *overrides(run_dir, *ZERO3_BF16, "train.stop_at_step=3")))
    assert "step 3/6" in stopped.stdout and "step 4/6" not in stopped.stdout
    resumed = ok(launch(2, *overrides(run_dir, *ZERO3_BF16)))
    assert "at step 3" in resumed.stdout
    assert_same_weights(weights(reference, 6), weights(run_dir, 6))
    assert scalars(run_dir, "train/loss") == scalars(reference, "train/loss")  # the curve continues exactly
    assert scalars(run_dir, "data/sample_id_sum") == scalars(reference, "data/sample_id_sum")


def test_kill_9_at_a_random_moment_then_resume_matches(reference, tmp_path):
    run_dir = tmp_path / "killed"
    command = launcher_cmd(2, *overrides(run_dir, *ZERO3_BF16))
    port = command[command.index("--master_port") + 1]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env_with(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = run_dir / "checkpoints" / "step_00000002" / "mimscale.json"
    deadline = time.time() + 180
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))  # somewhere in steps 3-4, possibly inside the step-4 save
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert marker.exists(), "the run never reached its first checkpoint"
    # DeepSpeed's CPU all-reduce buffers (66 MB each in /dev/shm) must not outlive even a killed run
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    ok(launch(2, *overrides(run_dir, *ZERO3_BF16)))
    assert_same_weights(weights(reference, 6), weights(run_dir, 6))


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
    run_dir = tmp_path / "killed_in_save"
    dying = launch(
        2, *overrides(run_dir, *ZERO3_BF16), env=env_with(MIMSCALE_INJECT_FAULT="kill_in_save:rank=0:step=4")
    )
    assert dying.returncode != 0
    assert not (run_dir / "checkpoints" / "step_00000004" / "mimscale.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    resumed = ok(launch(2, *overrides(run_dir, *ZERO3_BF16)))
    assert "step_00000004 is incomplete" in resumed.stdout and "at step 2" in resumed.stdout
    assert_same_weights(weights(reference, 6), weights(run_dir, 6))


def copy_checkpoint(source: Path, run_dir: Path, step: int) -> None:
    tag = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / tag, run_dir / "checkpoints" / tag)
    (run_dir / "checkpoints" / "latest").write_text(tag)


def planted_pickle(marker: Path) -> bytes:
    """What an attacker leaves in a checkpoint folder: a pickle that runs a shell command when unpickled."""
    return b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."


def test_planted_pickles_are_refused_and_a_damaged_checkpoint_is_skipped(reference, tmp_path):
    """Resume, export and eval refuse a checkpoint with a code-running pickle (naming the file) and run nothing;
    a truncated rank file makes the 2-rank resume fall back to the previous checkpoint, which continues exactly."""
    run_dir, marker = tmp_path / "hostile", tmp_path / "code-ran"
    for step in (2, 4):
        copy_checkpoint(reference, run_dir, step)
    rng1 = run_dir / "checkpoints" / "step_00000004" / "rng_rank1.pt"
    original = rng1.read_bytes()
    rng1.write_bytes(planted_pickle(marker))
    refused = train_single(*overrides(run_dir, *ZERO3_BF16, "data.batch_size=8"))
    assert refused.returncode == 2 and "rng_rank1.pt" in refused.stderr and "--trust-checkpoint" in refused.stderr
    model_file = run_dir / "checkpoints" / "step_00000002" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model_file.write_bytes(planted_pickle(marker))
    cli = [sys.executable, "-m", "mimscale.cli"]
    export = subprocess.run(
        [*cli, "export", str(run_dir), str(tmp_path / "out"), "--tag", "step_00000002"],
        cwd=REPO,
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 2 and "zero_pp_rank_0_mp_rank_00_model_states.pt" in export.stderr
    knn = [*cli, "eval", "knn", "--model", str(run_dir / "checkpoints" / "step_00000002"), "--train", "x", "--val", "y"]
    evaluated = subprocess.run(knn, cwd=REPO, env=env_with(), capture_output=True, text=True, timeout=120)
    assert evaluated.returncode != 0 and "model_states.pt" in evaluated.stderr and "refusing" in evaluated.stderr
    assert not marker.exists()

    copy_checkpoint(reference, run_dir / "fresh", 2)  # restore step 2, truncate rank 1's file of step 4
    shutil.rmtree(run_dir / "checkpoints" / "step_00000002")
    (run_dir / "fresh" / "checkpoints" / "step_00000002").rename(run_dir / "checkpoints" / "step_00000002")
    rng1.write_bytes(original[: len(original) // 2])
    resumed = ok(launch(2, *overrides(run_dir, *ZERO3_BF16)))
    assert "step_00000004 is damaged (rng_rank1.pt" in resumed.stdout and "at step 2" in resumed.stdout
    assert_same_weights(weights(reference, 6), weights(run_dir, 6))


@pytest.mark.parametrize("stage", [1, 3])  # ZeRO-2 writes the same files as ZeRO-1 (DeepSpeed's stage_1_and_2)
def test_two_rank_checkpoint_resumes_on_one_rank_with_the_same_data(reference, tmp_path, stage):
    """Same global batch (2 x 4 -> 1 x 8): the data order continues exactly and the weights stay close."""
    run_dir = tmp_path / f"zero{stage}"
    settings = ["deepspeed.precision=bf16", f"deepspeed.zero_stage={stage}"]
    if stage == 3:  # the reference's own step-2 checkpoint
        copy_checkpoint(reference, run_dir, 2)
    else:
        ok(launch(2, *overrides(run_dir, *settings, "train.stop_at_step=2")))
    resumed = ok(train_single(*overrides(run_dir, *settings, "data.batch_size=8")))
    assert "universal checkpoint" in resumed.stdout and "at step 2" in resumed.stdout
    expected_ids = {step: value for step, value in scalars(reference, "data/sample_id_sum").items() if step > 2}
    assert {s: v for s, v in scalars(run_dir, "data/sample_id_sum").items() if s > 2} == expected_ids
    if stage == 3:  # same training as the reference up to the summation order of bf16 gradients
        a, b = weights(reference, 6), weights(run_dir, 6)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=2e-2, rtol=2e-2)


def test_one_rank_checkpoint_resumes_on_two_ranks(reference, tmp_path):
    run_dir = tmp_path / "grow"
    settings = [*ZERO3_BF16]
    # data.streams=2 as the 2-rank reference got by default: the order is a function of the streams set at the start
    ok(train_single(*overrides(run_dir, *settings, "data.batch_size=8", "train.stop_at_step=2", "data.streams=2")))
    ok(launch(2, *overrides(run_dir, *settings)))
    assert scalars(run_dir, "data/sample_id_sum") == scalars(reference, "data/sample_id_sum")


def test_nan_on_one_rank_is_skipped_on_all_ranks(tmp_path):
    run_dir = tmp_path / "nan"
    result = ok(
        launch(2, *overrides(run_dir, "train.max_steps=3"), env=env_with(MIMSCALE_INJECT_FAULT="nan:rank=1:step=2"))
    )
    assert "non-finite loss on some rank; micro-batch skipped on all ranks" in result.stdout
    assert "step 3/3" in result.stdout
    assert scalars(run_dir, "train/skipped_steps")[3] == 1.0


def _processes_to_signal(target: str, launcher_pid: int) -> list:
    """`mimscale launch` runs DeepSpeed's runner in-process; its child is the node launcher, whose children are the
    ranks (each with its DataLoader workers)."""
    import psutil

    runner = psutil.Process(launcher_pid)
    (node_launcher,) = runner.children()
    return {"runner": [runner], "launch.py": [node_launcher], "ranks": node_launcher.children()}[target]


def _wait_for_step(process: subprocess.Popen, lines: list[str], deadline: float) -> None:
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        if line.startswith("step ") or time.time() > deadline:
            return


@pytest.mark.parametrize(
    "target,signum",
    # the ranks alone: tests/test_multinode.py signals node 2's ranks and node launcher; tests/test_signals.py one rank
    [("runner", signal.SIGUSR1), ("launch.py", signal.SIGTERM), ("group", signal.SIGTERM)],
)
def test_preemption_signal_anywhere_checkpoints_once_and_exits_75(tmp_path, target, signum):
    """A stop signal sent to the runner, the node launcher, the ranks or the whole process group (as scancel sends
    it) ends in one complete checkpoint and exit 75 within a bounded time; DataLoader workers survive it. While
    the run is alive a second run into the same folder is refused, naming the holder."""
    run_dir = tmp_path / "preempted"
    command = [sys.executable, "-m", "mimscale.cli", "launch", *launcher_cmd(2)[1:]]
    command += overrides(run_dir, "train.max_steps=400", "checkpoint.every_steps=1000", "train.log_every=1")
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env_with(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    _wait_for_step(process, lines, deadline=time.time() + 240)
    ranks = _processes_to_signal("ranks", process.pid)
    if target == "group":
        second = train_single(*overrides(run_dir))
        assert second.returncode == 2 and "is in use by another run" in second.stderr, second.stderr[-2000:]
        assert any(f"pid {rank.pid}," in second.stderr for rank in ranks) and socket.gethostname() in second.stderr
        os.killpg(process.pid, signum)
    else:
        for victim in _processes_to_signal(target, process.pid):
            victim.send_signal(signum)
    sent = time.time()
    output = "".join(lines) + process.communicate(timeout=180)[0]
    assert process.returncode == 75, output[-4000:]
    assert time.time() - sent < 120
    assert f"stopped by signal {int(signum)}" in output and "DataLoader worker" not in output
    saved = [path for path in (run_dir / "checkpoints").glob("step_*")]
    assert len(saved) == 1 and (saved[0] / "mimscale.json").is_file()
    import psutil

    assert not [rank for rank in ranks if rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE]


def _limit_file_size(max_bytes: int):
    # Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG, as a full disk fails with ENOSPC.
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def test_full_disk_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "full"
    settings = ["deepspeed.zero_stage=2"]
    ok(train_single(*overrides(run_dir, "train.max_steps=2", *settings)))
    biggest = max(p.stat().st_size for p in (run_dir / "checkpoints" / "step_00000002").iterdir())
    command = [sys.executable, "-m", "mimscale.cli", "train", "--config", str(DEMO)]
    command += overrides(run_dir, "train.max_steps=4", *settings)
    result = subprocess.run(
        command,
        cwd=REPO,
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=_limit_file_size(biggest // 2),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "could not write checkpoint" in result.stderr and "(step_00000002) is intact" in result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (run_dir / "checkpoints" / "step_00000004").exists()
    resumed = ok(train_single(*overrides(run_dir, "train.max_steps=4", *settings)))
    assert "at step 2" in resumed.stdout


def test_late_rank_joins_and_hung_rank_times_out_and_is_named(tmp_path):
    """Rank 0 (the store's host) joins 8 s late: the rendezvous waits (its own timeout); then rank 1 hangs at step 3
    and the 5 s collective timeout names it."""
    run_dir = tmp_path / "hung"
    result = launch(
        2,
        *overrides(run_dir, "train.max_steps=4", "run.collective_timeout_s=5"),
        env=env_with(MIMSCALE_INJECT_FAULT="slow_start:rank=0:step=8,hang:rank=1:step=3"),
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "step 2/4" in output and "client socket has timed out" not in output
    assert "stalled rank(s): 1" in output


def test_unwritable_output_dir_and_bad_config_fail_fast_and_clearly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = train_single(*overrides(blocker / "run"))
    assert result.returncode == 2 and "run.output_dir" in result.stderr and "not writable" in result.stderr
    bad = train_single("--set", "optim.lrr=1")
    assert bad.returncode == 2 and "unknown key 'optim.lrr'" in bad.stderr and "Did you mean 'lr'" in bad.stderr


TINY_OPEN_CLIP = (
    "teacher.model_args={embed_dim: 64, vision_cfg: {image_size: 56, layers: 2, width: 64, patch_size: 14, "
    "head_width: 32}, text_cfg: {context_length: 8, vocab_size: 64, width: 32, heads: 2, layers: 1}}"
)
GIANTS = {
    # ViT-g/14 (width 1408) at depth 2, distilling a tiny random open_clip tower at 56 px.
    "maskdistill_vit_giant_1b": [
        "model.student_args.depth=2",
        "data.image_size=56",
        "teacher.random_init=true",
        "teacher.pretrained=",
        TINY_OPEN_CLIP,
    ],
    # SimMIM's BEiT-style ViT-B (timm Beit, shared relative position bias) at depth 2, under ZeRO-3 + bf16 with
    # activation checkpointing (the preset itself runs ZeRO-1 at full size).
    "simmim_vit_base": [
        "model.student_args.depth=2",
        "data.image_size=64",
        "mask.patch_size=32",
        "deepspeed.zero_stage=3",
        "deepspeed.activation_checkpointing=true",
    ],
    # SwinV2-G (width 512 -> 4096) with one block per stage at 96 px.
    "simmim_swinv2_giant_3b": ["model.student_args.depths=[1,1,1,1]", "data.image_size=96", "mask.patch_size=32"],
}


@pytest.mark.parametrize("preset", sorted(GIANTS))
def test_giant_preset_runs_a_zero3_step_on_two_cpu_ranks(tmp_path, preset):
    """The billion-parameter presets keep their width, ZeRO-3, bf16 and checkpointing; only depth is cut."""
    settings = [
        *GIANTS[preset],
        f"run.output_dir={tmp_path / preset}",
        "run.device=cpu",
        "data.shards=shards/sample/*.tar",
        "data.batch_size=1",
        "data.num_workers=0",
        "train.max_steps=1",
        "train.log_every=1",
        "eval.knn_every=0",
    ]
    command = launcher_cmd(2, *(arg for item in settings for arg in ("--set", item)))
    command[command.index(str(DEMO))] = str(REPO / "configs" / f"{preset}.yaml")
    result = ok(run_capped(command))
    assert "step 1/1 | loss " in result.stdout
    ds_config = (tmp_path / preset / "deepspeed_config.json").read_text()
    assert '"stage": 3' in ds_config and '"bf16": {\n    "enabled": true' in ds_config
    assert (tmp_path / preset / "checkpoints" / "step_00000001" / "mimscale.json").is_file()


def test_remote_shards_resume_the_reference_exactly(reference, tmp_path):
    """The reference's step-2 checkpoint resumed with its shards served over HTTP into a cold node cache:
    bit-identical weights and the same per-step sample ids; the 2 ranks' workers fetched each shard once."""
    from http_serve import ShardServer

    run_dir = tmp_path / "remote"
    copy_checkpoint(reference, run_dir, 2)
    with ShardServer(REPO / "shards" / "sample") as server:
        remote = [f"data.shards={server.url('sample-{000..003}.tar')}", f"data.cache_dir={tmp_path / 'cache'}"]
        resumed = ok(launch(2, *overrides(run_dir, *ZERO3_BF16, *remote)))
        assert max(server.requests[f"sample-00{n}.tar"] for n in range(4)) == 1
    assert "at step 2" in resumed.stdout
    assert_same_weights(weights(reference, 6), weights(run_dir, 6))
    expected = {step: value for step, value in scalars(reference, "data/sample_id_sum").items() if step > 2}
    assert {step: value for step, value in scalars(run_dir, "data/sample_id_sum").items() if step > 2} == expected


def test_frozen_sincos_table_survives_zero3_checkpoints_and_the_universal_resume(tmp_path):
    """MaskAlign's preset keeps MAE's 2-D sin-cos table frozen: saved by 2 ZeRO-3 ranks, resumed on 1 rank through
    the universal conversion, and still the table (bf16-rounded, as training held it) while the rest trained."""
    from mimscale.models.students import mae_sincos_table

    run_dir = tmp_path / "maskalign_frozen"
    config = str(REPO / "configs" / "demo_maskalign.yaml")
    settings = [
        f"run.output_dir={run_dir}",
        "run.device=cpu",
        "data.batch_size=2",
        "data.num_workers=0",
        "train.log_every=1",
        "train.max_steps=3",
        "eval.knn_every=0",
        "checkpoint.every_steps=2",
        "model.pos_embed_init=sincos_frozen",
        "model.student_args={patch_size: 8, depth: 2}",
        *ZERO3_BF16,
    ]
    args = [arg for item in settings for arg in ("--set", item)]
    first = launcher_cmd(2, *args, "--set", "train.stop_at_step=2")
    first[first.index(str(DEMO))] = config
    ok(run_capped(first))
    resume = [sys.executable, "-m", "mimscale.cli", "train", "--config", config, *args, "--set", "data.batch_size=4"]
    resumed = ok(run_capped(resume))
    assert "universal checkpoint" in resumed.stdout and "at step 2" in resumed.stdout
    table = mae_sincos_table(192, (8, 8)).to(torch.bfloat16).float()
    before, after = weights(run_dir, 2), weights(run_dir, 3)
    for state in (before, after):
        pos_embed = state["student.backbone.pos_embed"].float()
        assert torch.equal(pos_embed[0, 1:], table) and not pos_embed[0, 0].any()
    assert not torch.equal(before["student.mask_token"], after["student.mask_token"]) or not torch.equal(
        before["head.mixing"], after["head.mixing"]
    )

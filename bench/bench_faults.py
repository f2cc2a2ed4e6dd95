"""Reliability figures: for each fault, what was lost and how long recovery took, on the tiny CPU demo model.

Every fault is real: `kill -9` of the whole launcher group, SIGTERM to the whole group (as scancel sends it),
a truncated rank file in the newest checkpoint, a planted code-running pickle, a second run into a busy folder;
then one row per class of issue 20's run-folder probes: links planted in the run folder, a mistyped mimscale.json,
a stored config naming a file for timm, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, and every signal at every moment
(start-up SIGTERM, Ctrl-C, a second Ctrl-C and a wedged rank, on one rank through `mimscale train`).
"Lost" is training steps that must be redone; "recover" is from the restart command to the resumed run's first
step line (or to the refusal). Prints a markdown table for bench/RESULTS.md.

The node cache, remote locations and index probes (issue 20: what the cache deletes and trusts, pipe: and signed
locations, bounded time and memory, full or read-only cache) run without the launcher: each is the real test in
tests/test_storage_safety.py (real HTTP server, real files, a real tmpfs), so the bench and the suite cannot drift;
``--only storage`` prints just their table; ``--only issue20`` runs only the run-folder, metadata and
signal probes of issue 20.

    PYTHONPATH=. python bench/bench_faults.py [--ranks 2] [--out /tmp/bench_faults] [--only all|launch|storage|issue20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.student_args.depth=2",
    "data.batch_size=4",
    "data.num_workers=1",
    "train.log_every=1",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=3",
    "eval.knn_every=0",
    "train.max_steps=400",
]


def port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def command(ranks: int, run_dir: Path, *extra: str) -> list[str]:
    sets = [arg for item in [*TINY, f"run.output_dir={run_dir}", *extra] for arg in ("--set", item)]
    return [
        sys.executable,
        "-m",
        "mimscale.cli",
        "launch",
        "--num_gpus",
        str(ranks),
        "--master_port",
        port(),
        "--module",
        "mimscale.train",
        "--config",
        str(REPO / "configs" / "demo_cpu.yaml"),
        *sets,
    ]


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def start(ranks: int, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        command(ranks, run_dir, *extra),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def until_step(process: subprocess.Popen, step: int | None = None) -> tuple[int, float, str]:
    """Read output until a step line (number >= step, or any); returns (step, time, output so far)."""
    seen = []
    for line in iter(process.stdout.readline, ""):
        seen.append(line)
        if line.startswith("step "):
            number = int(line.split()[1].split("/")[0])
            if step is None or number >= step:
                return number, time.time(), "".join(seen)
    raise RuntimeError("run ended before the step:\n" + "".join(seen)[-3000:])


def newest_checkpoint(run_dir: Path) -> int:
    done = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "mimscale.json").is_file()]
    return max(done, default=0)


def resume_and_time(ranks: int, run_dir: Path) -> tuple[int, float]:
    """Restart; (step the resumed run continued from, seconds from the command to its first step line)."""
    begin = time.time()
    process = start(ranks, run_dir)
    step, at, _ = until_step(process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return step - 1, at - begin


def kill_9(ranks: int, run_dir: Path) -> dict:
    process = start(ranks, run_dir)
    step, _, _ = until_step(process, 6)  # checkpoint at 4, killed at 6
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed_at, seconds = resume_and_time(ranks, run_dir)
    return {
        "fault": "kill -9 of the whole launcher group",
        "lost": f"{step - resumed_at} steps (since step {resumed_at})",
        "stop": "instant",
        "recover": seconds,
    }


def sigterm_group(ranks: int, run_dir: Path) -> dict:
    process = start(ranks, run_dir)
    step, _, _ = until_step(process, 6)
    sent = time.time()
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate()
    stopped = time.time() - sent
    assert process.returncode == 75, process.returncode
    resumed_at, seconds = resume_and_time(ranks, run_dir)
    lost = step - resumed_at if resumed_at < step else 0  # it saved the step it was on (or the next)
    return {
        "fault": "SIGTERM to the whole process group (scancel)",
        "lost": f"{lost} steps (checkpointed step {resumed_at}, exit 75)",
        "stop": stopped,
        "recover": seconds,
    }


def truncated_rank_file(ranks: int, run_dir: Path) -> dict:
    newest = newest_checkpoint(run_dir)
    previous = sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))[-2]
    victim = run_dir / "checkpoints" / f"step_{newest:08d}" / f"rng_rank{ranks - 1}.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    resumed_at, seconds = resume_and_time(ranks, run_dir)
    assert resumed_at == previous, (resumed_at, previous)
    return {
        "fault": f"truncated rng_rank{ranks - 1}.pt in the newest checkpoint",
        "lost": f"{newest - previous} steps (fell back to step {previous})",
        "stop": "-",
        "recover": seconds,
    }


def planted_pickle(ranks: int, run_dir: Path) -> dict:
    marker = run_dir / "code-ran"
    newest = newest_checkpoint(run_dir)
    victim = run_dir / "checkpoints" / f"step_{newest:08d}" / "rng_rank0.pt"
    victim.write_bytes(b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    begin = time.time()
    result = subprocess.run(command(ranks, run_dir), cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode != 0 and "rng_rank0.pt" in result.stdout + result.stderr and not marker.exists()
    return {
        "fault": "planted code-running pickle in rng_rank0.pt",
        "lost": "nothing; no code ran, refused by name",
        "stop": "-",
        "recover": time.time() - begin,
    }


def busy_folder(ranks: int, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    process = start(ranks, run_dir)
    until_step(process, 1)
    begin = time.time()
    second = subprocess.run(command(1, run_dir), cwd=REPO, env=env(), capture_output=True, text=True)
    seconds = time.time() - begin
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert second.returncode != 0 and "in use by another run" in second.stdout + second.stderr
    return {
        "fault": "second run into the same run.output_dir",
        "lost": "nothing; refused naming host/pid/start",
        "stop": "-",
        "recover": seconds,
    }


STORAGE_PROBES = {  # test in tests/test_storage_safety.py -> (fault, what happens when it passes)
    "test_eviction_never_deletes_or_counts_files_the_cache_did_not_write": (
        "user's own files in the cache folder while eviction runs",
        "kept, not counted, named once",
    ),
    "test_planted_lock_links_are_refused_and_never_followed": (
        "symlinks planted in .locks/ (and .locks itself a link)",
        "refused by name; nothing created outside",
    ),
    "test_a_poisoned_cached_shard_is_dropped_and_fetched_again": (
        "same-size poisoned cached shard (mtime put back), one planted without a record, a manifest mismatch",
        "dropped and fetched again with a message; never served",
    ),
    "test_the_default_cache_folder_is_private": (
        "default cache folder mode 0777 / owned by another user",
        "refused, saying why; created 0700",
    ),
    "test_a_pipe_set_runs_one_command_per_shard_and_nothing_else": (
        "pipe: set with no index",
        "one command per shard, none derived; data.index used when named",
    ),
    "test_signed_urls_are_never_edited_to_look_for_siblings": (
        "pre-signed URLs (query with slashes) on a store answering 403 to edited URLs",
        "no sibling request; indexed from its shards; same fingerprint as the local set",
    ),
    "test_a_trickling_server_is_cut_off_by_the_download_deadline": (
        "server trickling 1 byte / 0.1 s (per-read timeout never fires)",
        "cut off at size/min_rate + timeout, retried",
    ),
    "test_download_min_rate_and_index_are_config_keys": (
        "data.download_min_rate=0; the new keys reach the cache",
        "refused by the config rule; passed through",
    ),
    "test_hostile_index_headers_are_refused_before_anything_is_allocated": (
        "sparse 4 KB samples.idx claiming 10^7 shards; wrapped u64 counts; ../ names",
        "refused before allocating",
    ),
    "test_a_full_or_read_only_cache_folder_is_named": (
        "full disk (300 KB tmpfs) while reserving or writing; read-only cache",
        "'no space left on <dir>' / 'not writable'",
    ),
    "test_a_shard_the_cache_cannot_fetch_stops_the_stream_by_name_not_as_corrupt_samples": (
        "a shard deleted from the store after the index was read",
        "the stream stops naming the URL (HTTP 404)",
    ),
    "test_inspect_names_a_manifest_whose_classes_is_not_a_list": (
        'shards inspect with a manifest "classes": 5',
        "clear error naming the key",
    ),
}


def storage_probes(out: Path) -> list[dict]:
    """Run the storage probes (the tests themselves) and turn each outcome into a row."""
    report = out / "storage.xml"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            str(REPO / "tests" / "test_storage_safety.py"),
        ],
        cwd=REPO,
        env=env(),
        check=False,
    )
    rows = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        fault, outcome = STORAGE_PROBES.get(case.get("name"), (case.get("name"), "passed"))
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        verdict = "FAILED" if failed else ("skipped" if skipped else outcome)
        rows.append({"fault": fault, "lost": verdict, "stop": "-", "recover": float(case.get("time", 0))})
    return rows


PRECIOUS = "a file outside the run: must survive\n"


def run_to_end(ranks: int, run_dir: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(ranks, run_dir, *extra),
        cwd=REPO,
        env={**env_for_probe(), **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def env_for_probe() -> dict:
    environ = env()
    environ.pop("MIMSCALE_INJECT_FAULT", None)
    return environ


def planted_lock_link(ranks: int, run_dir: Path, outside: Path) -> dict:
    target = outside / "lock-target"
    target.write_text(PRECIOUS)
    run_dir.mkdir(parents=True)
    (run_dir / ".mimscale.lock").symlink_to(target)
    begin = time.time()
    result = run_to_end(ranks, run_dir, "train.max_steps=4")
    assert result.returncode != 0 and "is a symbolic link" in result.stdout + result.stderr, result.stderr[-2000:]
    assert target.read_text() == PRECIOUS
    (run_dir / ".mimscale.lock").unlink()
    return {
        "fault": ".mimscale.lock planted as a link to another file",
        "lost": "nothing; refused by name, the file it points to untouched",
        "stop": "-",
        "recover": time.time() - begin,
    }


def planted_run_folder_links(ranks: int, run_dir: Path, outside: Path) -> dict:
    names = ["config.yaml", "config.yaml.tmp", "deepspeed_config.json", "checkpoints/latest", "checkpoints/latest.tmp"]
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    targets = []
    for name in names:
        targets.append(outside / name.replace("/", "_"))
        targets[-1].write_text(PRECIOUS)
        (run_dir / name).symlink_to(targets[-1])
    linked_step = outside / "step_folder"
    linked_step.mkdir()
    targets.append(linked_step / "mimscale.json")
    targets[-1].write_text(PRECIOUS)
    (run_dir / "checkpoints" / "step_00000004").symlink_to(linked_step, target_is_directory=True)
    begin = time.time()
    result = run_to_end(ranks, run_dir, "train.max_steps=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(target.read_text() == PRECIOUS for target in targets) and os.listdir(linked_step) == ["mimscale.json"]
    assert not (run_dir / "checkpoints" / "step_00000004").is_symlink()
    return {
        "fault": "links planted at config.yaml(.tmp), deepspeed_config.json, latest(.tmp), step_00000004",
        "lost": "nothing; trained to step 8, every link replaced, no target written",
        "stop": "-",
        "recover": time.time() - begin,
    }


def edit_record(tag_dir: Path, **changes) -> None:
    record = tag_dir / "mimscale.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), **changes}))


def mistyped_record(ranks: int, run_dir: Path) -> dict:
    edit_record(run_dir / "checkpoints" / "step_00000008", step="x")
    begin = time.time()
    process = start(ranks, run_dir)
    step, at, output = until_step(process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert step == 5 and "step must be an integer of at least 0" in output, output[-3000:]
    return {
        "fault": 'mimscale.json of the newest checkpoint says step: "x"',
        "lost": "4 steps (named file and key, fell back to step 4)",
        "stop": "-",
        "recover": at - begin,
    }


def stored_config_reads_a_file(run_dir: Path, out: Path) -> dict:
    tag_dir = run_dir / "checkpoints" / "step_00000004"
    config = json.loads((tag_dir / "mimscale.json").read_text())["config"]
    config["model"]["student_args"]["checkpoint_path"] = "/etc/passwd"
    edit_record(tag_dir, config=config)
    begin = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "mimscale.cli", "export", str(run_dir), str(out / "export")],
        cwd=REPO,
        env=env_for_probe(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "model.student_args.checkpoint_path='/etc/passwd'" in result.stderr
    return {
        "fault": "stored config: model.student_args.checkpoint_path=/etc/passwd, then export",
        "lost": "nothing; refused before timm opens it",
        "stop": "-",
        "recover": time.time() - begin,
    }


def forced_unsafe_env(ranks: int, run_dir: Path) -> dict:
    begin = time.time()
    result = run_to_end(ranks, run_dir, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set in the environment" in output
    return {
        "fault": "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment, then resume",
        "lost": "nothing; the variable named with what to do (was torch's 'Only one of ...')",
        "stop": "-",
        "recover": time.time() - begin,
    }


def single(run_dir: Path, *extra: str, **extra_env: str) -> subprocess.Popen:
    """`mimscale train` on one rank (Ctrl-C reaches a rank itself; the launchers' SIGINT handling is theirs)."""
    sets = [arg for item in [*TINY, f"run.output_dir={run_dir}", *extra] for arg in ("--set", item)]
    return subprocess.Popen(
        [sys.executable, "-m", "mimscale.cli", "train", "--config", str(REPO / "configs" / "demo_cpu.yaml"), *sets],
        cwd=REPO,
        env={**env_for_probe(), **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def handles(pid: int, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def until_text(process: subprocess.Popen, text: str) -> str:
    seen = []
    for line in iter(process.stdout.readline, ""):
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise RuntimeError(f"run ended before {text!r}:\n" + "".join(seen)[-3000:])


def complete(run_dir: Path) -> int:
    return len([p for p in (run_dir / "checkpoints").glob("step_*") if (p / "mimscale.json").is_file()])


def seconds_to_exit(process: subprocess.Popen, signum: int) -> tuple[float, str]:
    """Send ``signum``; (seconds until the process itself exits, its remaining output). Timed on the process, not
    on its output pipe, which forked DataLoader workers keep open until they notice their parent is gone."""
    sent = time.time()
    process.send_signal(signum)
    while process.poll() is None:
        time.sleep(0.02)
    return time.time() - sent, process.communicate(timeout=300)[0]


def startup_sigterm(run_dir: Path) -> dict:
    process = single(run_dir)
    while not handles(process.pid, signal.SIGTERM):
        time.sleep(0.005)
    seconds, output = seconds_to_exit(process, signal.SIGTERM)
    assert process.returncode == 75 and "during start-up" in output and complete(run_dir) == 0, output[-3000:]
    return {
        "fault": "SIGTERM in the first second of start-up (1 rank)",
        "lost": "nothing to save; exit 75 (was 143)",
        "stop": seconds,
        "recover": "-",
    }


def ctrl_c(run_dir: Path) -> dict:
    process = single(run_dir)
    step, _, _ = until_step(process, 6)
    seconds, output = seconds_to_exit(process, signal.SIGINT)
    assert process.returncode == 130 and newest_checkpoint(run_dir) >= step, output[-3000:]
    return {
        "fault": "Ctrl-C (SIGINT) at step 6 (1 rank)",
        "lost": "0 steps (checkpointed, exit 130; was a KeyboardInterrupt and nothing saved)",
        "stop": seconds,
        "recover": "-",
    }


def second_ctrl_c(run_dir: Path) -> dict:
    process = single(run_dir, MIMSCALE_INJECT_FAULT="hang:rank=0:step=1")
    until_text(process, "hangs at step 1")
    process.send_signal(signal.SIGINT)
    time.sleep(1)
    seconds, output = seconds_to_exit(process, signal.SIGINT)
    assert process.returncode == 130 and "second Ctrl-C" in output, output[-3000:]
    return {
        "fault": "two Ctrl-C, the rank wedged in its first step (1 rank)",
        "lost": "nothing (no step done); exit 130 at the second",
        "stop": seconds,
        "recover": "-",
    }


def wedged_rank(run_dir: Path) -> dict:
    process = single(run_dir, "run.stop_timeout_s=5", MIMSCALE_INJECT_FAULT="hang:rank=0:step=1")
    until_text(process, "hangs at step 1")
    seconds, output = seconds_to_exit(process, signal.SIGTERM)
    assert process.returncode == 124 and "in maybe_hang" in output, output[-3000:]
    return {
        "fault": "SIGTERM to a rank wedged before its first step, run.stop_timeout_s=5 (1 rank)",
        "lost": "nothing (no step done); its Python stack printed, exit 124 (was: only SIGKILL ended it)",
        "stop": seconds,
        "recover": "-",
    }


def issue20_rows(ranks: int, out: Path) -> list[dict]:
    run_dir, outside = out / "links", out / "outside"
    outside.mkdir(parents=True)
    rows = [
        planted_lock_link(ranks, run_dir, outside),
        planted_run_folder_links(ranks, run_dir, outside),
        mistyped_record(ranks, run_dir),
        stored_config_reads_a_file(run_dir, out),
        forced_unsafe_env(ranks, run_dir),
    ]
    return rows + [
        startup_sigterm(out / "startup"),
        ctrl_c(out / "ctrl_c"),
        second_ctrl_c(out / "ctrl_c2"),
        wedged_rank(out / "wedged"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_faults")
    parser.add_argument("--only", choices=("all", "launch", "storage", "issue20"), default="all")
    args = parser.parse_args()
    run_dir = Path(args.out) / "run"
    shutil.rmtree(args.out, ignore_errors=True)
    if args.only in ("all", "storage"):
        storage = storage_probes(Path(args.out))
        passed = sum(row["lost"] not in ("FAILED", "skipped") for row in storage)
        print(f"| storage probe ({passed} of {len(storage)} passed) | outcome | - | probe time |")
        print("|---|---|---|---|")
        for row in storage:
            print(f"| {row['fault']} | {row['lost']} | - | {row['recover']:.1f} s |")
        if args.only == "storage":
            return
    rows = []
    if args.only in ("all", "launch"):
        rows = [
            kill_9(args.ranks, run_dir),
            sigterm_group(args.ranks, run_dir),
            truncated_rank_file(args.ranks, run_dir),
            planted_pickle(args.ranks, run_dir),
            busy_folder(args.ranks, run_dir),
        ]
    if args.only in ("all", "issue20"):
        rows += issue20_rows(args.ranks, Path(args.out) / "issue20")
    print(
        f"| fault ({args.ranks} CPU ranks, mimscale launch) | what was lost | signal to exit | restart to first step / refusal |"
    )
    print("|---|---|---|---|")
    for row in rows:
        stop, recover = (
            value if isinstance(value, str) else f"{value:.1f} s" for value in (row["stop"], row["recover"])
        )
        print(f"| {row['fault']} | {row['lost']} | {stop} | {recover} |")


if __name__ == "__main__":
    main()

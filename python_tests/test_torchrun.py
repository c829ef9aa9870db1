"""`torchrun --nproc-per-node 2 -m s2meta_fast run` on a tiny synthetic dataset: a worker killed
mid-training is restarted (--max-restarts 1), resumes from the last checkpoint and ends with the
metrics of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s2meta_fast.app.transaction import STAGING

from s2meta_fast.data.synthetic import write_raw

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40   # long enough that the kill lands mid-training even on a fast machine
TINY = ["--meta-steps", str(STEPS), "--meta-batch", "2", "--t-max", "5", "--t-min", "2", "--validate-every", "4",
        "--checkpoint-every", "4", "--methods", "s2meta", "itempop", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_raw("ml20m", str(root / "raw"), seed=0, n_users=400, n_scenarios=12, per_scenario=8, per_source=12)
    return ["--dataset", "ml20m", "--data-dir", str(root / "raw"), "--cache-dir", str(root / "cache"),
            "--min-items", "5", "--max-items", "1000", "--embed-dim", "32", "--mf-epochs", "5"]


def torchrun(out, dataset, restarts=0):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(restarts), "-m", "s2meta_fast", "run", *dataset, *TINY, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_of_rank(parent: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of `parent`)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise LookupError(f"no worker of rank {rank} under {parent}: {children}")


def finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker to kill through /proc")
def test_killed_worker_restarts_resumes_and_ends_like_an_uninterrupted_run(dataset, tmp_path):
    straight = tmp_path / "straight"
    finish(torchrun(straight, dataset))
    expected = json.loads((straight / "results.json").read_text())
    assert (expected["world_size"], expected["dist_backend"]) == (2, "gloo")

    killed = tmp_path / "killed"
    process = torchrun(killed, dataset, restarts=1)
    deadline = time.monotonic() + 240
    # the first checkpoint (meta-step 4), in the staging folder a run works in until it commits
    while not (killed / STAGING / "checkpoint.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    os.kill(worker_of_rank(process.pid, 1), signal.SIGKILL)
    _, stderr = finish(process)
    assert stderr.count("torchrun restart 1: resuming") == 1   # rank 0 logs, the others are quiet
    resumed_at = [int(line.rsplit(" ", 1)[1]) for line in stderr.splitlines() if "resumed from" in line]
    assert resumed_at and 4 <= resumed_at[0] < STEPS, stderr[-3000:]   # mid-training, from a checkpoint
    got = json.loads((killed / "results.json").read_text())
    assert got["methods"] == expected["methods"]

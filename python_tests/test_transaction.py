"""The run folder as a transaction: lock, staging, commit, recovery from a cut-short commit."""
import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from s2meta_fast.errors import RunFolderError
from s2meta_fast.app.transaction import COMMIT_MARKER, LOCK, RUN_FILES, STAGING, RunLock, RunTransaction


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def _tree(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path).read()
    return out


@pytest.fixture
def previous_run(tmp_path):
    out = str(tmp_path / "run")
    for name, text in {"config.yaml": "old config", "results.json": "old results", "best.pt": "old best",
                       "checkpoint.pt": "old ckpt", "checkpoint.1.pt": "older ckpt", "methods/s2meta.json": "old m",
                       "notes.txt": "the user's own file"}.items():
        _write(os.path.join(out, name), text)
    return out


def test_a_failed_run_leaves_the_previous_one(previous_run):
    before = _tree(previous_run)
    with pytest.raises(RuntimeError, match="boom"):
        with RunTransaction(previous_run) as folder:
            _write(os.path.join(folder.staging, "config.yaml"), "new config")
            raise RuntimeError("boom")
    after = _tree(previous_run)
    assert {k: v for k, v in after.items() if not k.startswith(STAGING)} == before
    assert after[os.path.join(STAGING, "config.yaml")] == "new config"   # kept for --resume
    assert not os.path.exists(os.path.join(previous_run, LOCK))


def test_a_commit_replaces_exactly_the_previous_runs_files(previous_run):
    with RunTransaction(previous_run) as folder:
        assert os.listdir(folder.staging) == []
        _write(os.path.join(folder.staging, "config.yaml"), "new config")
        _write(os.path.join(folder.staging, "checkpoint.pt"), "new ckpt")
        _write(os.path.join(folder.staging, "methods", "itempop.json"), "new m")
        folder.commit()
    assert _tree(previous_run) == {"config.yaml": "new config", "checkpoint.pt": "new ckpt",
                                   os.path.join("methods", "itempop.json"): "new m",
                                   "notes.txt": "the user's own file"}


def test_resume_starts_from_the_committed_run_without_touching_it(previous_run):
    before = _tree(previous_run)
    with pytest.raises(KeyboardInterrupt):
        with RunTransaction(previous_run, resume=True) as folder:
            staged = _tree(folder.staging)
            assert staged["config.yaml"] == "old config" and staged["checkpoint.pt"] == "old ckpt"
            _write(os.path.join(folder.staging, "results.json"), "new results")   # replaced, never edited
            raise KeyboardInterrupt
    assert {k: v for k, v in _tree(previous_run).items() if not k.startswith(STAGING)} == before
    # the interrupted run is what the next --resume continues
    with RunTransaction(previous_run, resume=True) as folder:
        assert _tree(folder.staging)["results.json"] == "new results"
        folder.commit()
    assert _tree(previous_run)["results.json"] == "new results"
    # a fresh run discards an interrupted one
    with pytest.raises(KeyboardInterrupt):
        with RunTransaction(previous_run, resume=True) as folder:
            _write(os.path.join(folder.staging, "results.json"), "interrupted")
            raise KeyboardInterrupt
    with RunTransaction(previous_run) as folder:
        assert os.listdir(folder.staging) == []


def test_resume_drops_what_a_killed_writer_left_half_written(previous_run):
    with pytest.raises(KeyboardInterrupt):
        with RunTransaction(previous_run) as folder:
            _write(os.path.join(folder.staging, "config.yaml"), "new config")
            # what atomic_write leaves when its process is killed between mkstemp and the rename
            _write(os.path.join(folder.staging, ".tmp-checkpoint.pt.k9x2.tmp"), "half a checkpoint")
            _write(os.path.join(folder.staging, "methods", ".tmp-s2meta.json.k9x2.tmp"), "half a result")
            raise KeyboardInterrupt
    with RunTransaction(previous_run, resume=True) as folder:
        assert sorted(_tree(folder.staging)) == ["config.yaml"]
        folder.commit()
    assert not [name for name in _tree(previous_run) if ".tmp-" in name]
    assert _tree(previous_run)["config.yaml"] == "new config"


def test_a_folder_that_the_run_created_and_left_empty_is_removed(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with RunTransaction(str(out)):
            raise RuntimeError
    assert not out.exists()


def test_a_cut_short_commit_is_finished_by_the_next_run(previous_run):
    folder = RunTransaction(previous_run).open()
    _write(os.path.join(folder.staging, "config.yaml"), "new config")
    _write(os.path.join(folder.staging, "results.json"), "new results")
    names = ["config.yaml", "results.json"]
    _write(os.path.join(folder.staging, COMMIT_MARKER), json.dumps(names))
    os.replace(os.path.join(folder.staging, "config.yaml"), os.path.join(previous_run, "config.yaml"))
    folder.lock.release()   # the process "dies" here: one entry moved, stale files still there
    with RunTransaction(previous_run, resume=True):
        pass
    assert _tree(previous_run) == {"config.yaml": "new config", "results.json": "new results",
                                   "notes.txt": "the user's own file"}


def test_out_naming_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunTransaction(str(path)).open()
    assert path.read_text() == "x"


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    out = str(tmp_path / "run")
    with RunLock(out):
        with pytest.raises(RunFolderError) as exc:
            RunTransaction(out).open()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(exc.value)
        assert "another run is using this folder" in str(exc.value)
    with RunTransaction(out):   # free again once released
        pass


def test_a_lock_held_by_another_process_is_refused(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    # The protocol RunLock speaks, without importing the package (and torch) in the holder.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, socket, sys\n"
        f"fd = os.open({os.path.join(out, LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode())\n"
        "print('locked', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid} on host"):
            RunLock(out).acquire()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write(str(out / LOCK), json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="s2meta_fast"):
        with RunLock(str(out)) as lock:
            assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    assert lock.took_over is not None and "no longer running" in lock.took_over
    assert f"taking over the stale lock" in caplog.text and f"pid {int(dead.stdout)}" in caplog.text
    assert not (out / LOCK).exists()


def test_evaluate_does_not_discard_an_interrupted_run(previous_run):
    with pytest.raises(KeyboardInterrupt):
        with RunTransaction(previous_run) as folder:
            _write(os.path.join(folder.staging, "config.yaml"), "interrupted")
            raise KeyboardInterrupt
    with pytest.raises(RunFolderError, match="an interrupted run waits in .*continue it with --resume"):
        RunTransaction(previous_run, carry=True).open()
    assert open(os.path.join(previous_run, STAGING, "config.yaml")).read() == "interrupted"
    assert not os.path.exists(os.path.join(previous_run, LOCK))


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _write(str(out / LOCK), json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunFolderError, match=f"pid {os.getppid()} on host .*delete .*.lock if that run is gone"):
        RunLock(str(out)).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write(str(out / LOCK), json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with RunLock(str(out)) as lock:
        assert "no longer running" in lock.took_over


def test_a_commit_replaces_every_file_a_run_folder_names():
    # run_folder names the files a run writes; a commit must know them all, or a new run that does
    # not write one (a train-only run: no results) leaves the previous run's next to its own.
    from s2meta_fast.app import run_folder
    from s2meta_fast.meta.trainer import BEST, LAST
    named = {run_folder.CONFIG_FILE, run_folder.GLOBAL_FILE, run_folder.GLOBAL_SOURCE_FILE, run_folder.FINETUNE_FILE,
             run_folder.METHODS_DIR, BEST, LAST, *run_folder.RESULT_FILES, *run_folder.ADAPTATION_FILES}
    assert named <= set(RUN_FILES)

"""A run folder (--out) as a transaction: a lock, a staging area, and a commit that swaps results in.

    with RunTransaction(out, resume=False) as folder:   # takes OUT/.lock, prepares OUT/.staging
        ...write the run's files into folder.staging...
        folder.commit()                                  # the staged run replaces the previous one

The mechanics only; :func:`s2meta_fast.app.run_folder.staged` runs a command's stages inside one.

- **Lock.** ``OUT/.lock`` holds the pid and host of the run that owns the folder and is held
  with ``flock`` for the run's lifetime, so a second run into the same folder is refused with a
  one-line :class:`RunFolderError`. The kernel drops the ``flock`` when its process dies, so a
  lock left by a killed run is stale: the next run takes it over and says so.
- **Staging.** Every run writes into ``OUT/.staging``. A fresh run starts it empty; ``--resume``
  continues an interrupted run found there or, when there is none, a copy of the committed run. A run
  that fails or is interrupted leaves the staging area for ``--resume`` and the previous results
  untouched.
- **Commit.** The staged entries replace the previous run's files (:data:`RUN_FILES`, and any
  ``checkpoint*.pt``); other files in OUT are left alone. A marker listing the staged entries is
  written first, so a commit cut short by a crash is finished by the next run that opens the
  folder.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from typing import List, Optional

from ..errors import RunFolderError
from ..fileio import TEMP_PREFIX

log = logging.getLogger("s2meta_fast")

LOCK = ".lock"
STAGING = ".staging"
PREVIOUS = ".previous"
COMMIT_MARKER = ".commit"
CARRIED = ".carried"     # in a staging area that holds only a copy of the committed run plus new results

# The files and folders a run produces; a commit replaces exactly these (and checkpoint*.pt).
# (run_folder names each; a test keeps the two in step, since run_folder imports this module.)
RUN_FILES = ("config.yaml", "results.json", "results.md", "adaptation.json", "validation_curve.png", "global.pt",
             "global_source.pt", "finetune.json", "best.pt", "checkpoint.pt", "methods")


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or (name.startswith("checkpoint") and name.endswith(".pt"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_out(out: str) -> None:
    """Refuses an --out that cannot be a run folder, before anything is written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"--out {out}: is a file, not a folder; name a folder for the run's files")
    parent = os.path.dirname(os.path.abspath(out))
    existing = out if os.path.isdir(out) else parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunFolderError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out}: {existing} is not writable")


class RunLock:
    """An advisory lock on a run folder: ``OUT/.lock`` with the holder's pid and host, under flock."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK)
        self.fd: Optional[int] = None
        self.took_over: Optional[str] = None

    def acquire(self) -> "RunLock":
        for _ in range(10):
            try:
                os.makedirs(self.out, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise RunFolderError(f"--out {self.out}: cannot create {self.path}: {error.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    # A filesystem without flock (some network mounts): the pid in the file decides.
                    log.warning("--out %s: the filesystem does not support flock (%s); the lock relies on the "
                                "pid in %s", self.out, error.strerror, self.path)
                    self.fd = fd
                    self._refuse_if_held_by_live_pid()
                    self._take_over_if_stale()
                    self._write()
                    return self
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunFolderError(f"--out {self.out}: another run is using this folder "
                                         f"({self._describe(self._read())}); wait for it to finish or "
                                         f"choose another --out") from None
                raise RunFolderError(f"--out {self.out}: cannot lock {self.path}: {error.strerror}") from None
            # The holder we waited on may have removed the file before we locked it: lock the live one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            self._take_over_if_stale()
            self._write()
            return self
        raise RunFolderError(f"--out {self.out}: could not lock {self.path}; another run keeps replacing it")

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as fh:
                holder = json.load(fh)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _describe(holder: dict) -> str:
        if not holder:
            return "holder unknown"
        return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"

    def _refuse_if_held_by_live_pid(self) -> None:
        holder = self._read()
        pid = holder.get("pid")
        alive = holder.get("host") != socket.gethostname() or (isinstance(pid, int) and _pid_alive(pid))
        if holder and pid != os.getpid() and alive:
            os.close(self.fd)
            self.fd = None
            raise RunFolderError(f"--out {self.out}: another run is using this folder ({self._describe(holder)}); "
                                 f"wait for it to finish, or delete {self.path} if that run is gone")

    def _take_over_if_stale(self) -> None:
        # We hold the flock (or checked the pid), so whoever wrote a pid here is gone.
        holder = self._read()
        if not holder:
            return
        pid, host = holder.get("pid"), holder.get("host")
        gone = host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
        self.took_over = self._describe(holder) + (", no longer running" if gone else "")
        log.warning("--out %s: taking over the stale lock of a run that ended without releasing it (%s)",
                    self.out, self.took_over)

    def _write(self) -> None:
        assert self.fd is not None
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _copy(src: str, dst: str) -> None:
    # Copies, not hard links: a writer that edited a file in place would otherwise edit the
    # committed run too. A run folder's files are small (checkpoints of the meta learner, JSON).
    if os.path.isdir(src):
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


class RunTransaction:
    """The run folder `out`, locked and staged (see the module docstring).

    Args:
        out: the run folder; created if absent (and removed again if the run leaves it empty).
        resume: continue the interrupted run in the staging area, or else the committed one.
        carry: start from the committed run's files even when not resuming (``evaluate`` reads
            the trained checkpoints and rewrites only the results).
    """

    def __init__(self, out: str, resume: bool = False, carry: bool = False):
        self.out = out
        self.resume = resume
        self.carry = carry
        self.staging = os.path.join(out, STAGING)
        self.lock = RunLock(out)
        self.created = False
        self.committed = False
        self.continued = False   # an interrupted run found in the staging area is being continued
        self._opened_as: dict = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> "RunTransaction":
        check_out(self.out)
        self.created = not os.path.exists(self.out)
        self.lock.acquire()
        try:
            self._finish_interrupted_commit()
            self._prepare_staging()
        except BaseException:
            self.close()
            raise
        self._opened_as = self._snapshot()
        return self

    def _snapshot(self) -> dict:
        files = {}
        for root, _, names in os.walk(self.staging):
            for name in names:
                st = os.stat(os.path.join(root, name))
                files[os.path.join(root, name)] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return files

    def close(self) -> None:
        """Releases the lock; a staging area this run made and wrote nothing into is dropped, any
        other is kept for ``--resume`` (an interrupted run found here stays even when the resume was
        refused, e.g. for other settings, so that a corrected ``--resume`` still finds it)."""
        if (not self.committed and not self.continued and os.path.isdir(self.staging)
                and self._snapshot() == self._opened_as):
            _remove(self.staging)
        self.lock.release()
        if self.created and os.path.isdir(self.out) and not os.listdir(self.out):
            os.rmdir(self.out)

    def __enter__(self) -> "RunTransaction":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- staging -------------------------------------------------------------------------------
    def _prepare_staging(self) -> None:
        staged = os.path.isfile(os.path.join(self.staging, "config.yaml"))
        if self.resume and staged:
            log.info("--resume: continuing the interrupted run in %s", self.staging)
            self.continued = True
            self._drop_partial_writes()
            return
        if staged and self.carry and not os.path.exists(os.path.join(self.staging, CARRIED)):
            # Building on the committed run would discard an interrupted training: let the user choose.
            raise RunFolderError(f"--out {self.out}: an interrupted run waits in {self.staging}; continue it with "
                                 f"--resume, or start a new run (which discards it) before evaluating")
        if staged:
            log.warning("--out %s: discarding the interrupted run in %s (a new run starts; --resume would have "
                        "continued it)", self.out, self.staging)
        _remove(self.staging)
        os.makedirs(self.staging)
        if self.resume or self.carry:
            # Resuming a committed run: start from its files; they stay untouched until the commit.
            for name in self.previous_files():
                _copy(os.path.join(self.out, name), os.path.join(self.staging, name))
            if not self.resume:
                open(os.path.join(self.staging, CARRIED), "w").close()

    def _drop_partial_writes(self) -> None:
        # An atomic write's temp file (fileio.TEMP_PREFIX) outlives its writer only when that
        # writer was killed mid-write. We hold the lock, so no writer is alive: without this the
        # commit would carry the half-written file into OUT.
        for root, _, names in os.walk(self.staging):
            for name in names:
                if name.startswith(TEMP_PREFIX):
                    os.unlink(os.path.join(root, name))

    def previous_files(self) -> List[str]:
        """The previous run's entries in OUT (what a commit replaces)."""
        if not os.path.isdir(self.out):
            return []
        return sorted(n for n in os.listdir(self.out) if _is_run_file(n))

    def has_run(self) -> bool:
        """Whether the staging area holds a run (an interrupted one, or the committed one carried in)."""
        return os.path.isfile(os.path.join(self.staging, "config.yaml"))

    # -- commit --------------------------------------------------------------------------------
    def commit(self) -> None:
        """The staged run replaces the previous run's files in OUT."""
        names = sorted(n for n in os.listdir(self.staging) if n not in (COMMIT_MARKER, CARRIED))
        marker = os.path.join(self.staging, COMMIT_MARKER)
        fd, tmp = tempfile.mkstemp(dir=self.staging, prefix=TEMP_PREFIX)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(names, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, marker)
        self._apply(names)
        self.committed = True

    def _finish_interrupted_commit(self) -> None:
        marker = os.path.join(self.staging, COMMIT_MARKER)
        if not os.path.isfile(marker):
            _remove(os.path.join(self.out, PREVIOUS))
            return
        try:
            with open(marker, encoding="utf-8") as fh:
                names = json.load(fh)
        except (OSError, ValueError):
            names = None
        if not isinstance(names, list):
            # Only a crash between writing and renaming the marker gets here: nothing moved yet.
            _remove(marker)
            return
        log.warning("--out %s: finishing the commit of a run that was cut short while replacing the results",
                    self.out)
        self._apply(names)

    def _apply(self, names: List[str]) -> None:
        """Idempotent: OUT's run files not in `names` go, staged entries move in, staging goes."""
        previous = os.path.join(self.out, PREVIOUS)
        os.makedirs(previous, exist_ok=True)
        for name in self.previous_files():
            if name not in names:
                _remove(os.path.join(previous, name))
                os.replace(os.path.join(self.out, name), os.path.join(previous, name))
        for name in names:
            src = os.path.join(self.staging, name)
            if not os.path.lexists(src):
                continue  # moved in before a crash
            dst = os.path.join(self.out, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                _remove(os.path.join(previous, name))
                os.replace(dst, os.path.join(previous, name))
            os.replace(src, dst)
        _remove(previous)
        _remove(self.staging)

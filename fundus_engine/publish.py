"""One build at a time per output folder, and its outputs published in one atomic step.

A build writes `dataset/`, `manifest.json`, `card/`, `benchmark/` and `rejects.parquet` into a
fresh `OUT/builds/<build id>/`; the last step switches the symlink `OUT/current` to it with one
rename. `OUT/dataset`, `OUT/manifest.json`, ... are fixed symlinks through `current`, so a reader
always sees one build's outputs together, and at no moment sees none: a crash before the switch
leaves the previous build published, a crash after it the new one.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path

PUBLISHED = ("dataset", "manifest.json", "card", "benchmark", "rejects.parquet")


class OutputLocked(RuntimeError):
    """Another build is writing into the same output folder."""


class BuildLock:
    """An exclusive lock on an output folder for the length of a build (`flock` on
    `OUT/.build.lock`): the kernel drops it when the holder dies, so a killed run's lock is
    taken over by the next build; the file says who held it. Local file systems only: `flock`
    does not lock across machines on every network file system."""

    def __init__(self, out: Path, run: str):
        self.path = Path(out) / ".build.lock"
        self.run = run
        self.fd: int | None = None
        self.taken_over: dict | None = None  # the holder of a stale lock, if there was one

    def __enter__(self) -> "BuildLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputLocked(f"{self.path.parent}: another build is writing here ({_describe(holder)}); "
                               "wait for it to finish or choose another output folder") from None
        self.taken_over = _read_holder(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": self.run,
                                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly, nothing to take over
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"run {holder.get('run')}, pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def new_build_dir(out: Path, build_id: str) -> Path:
    """An empty folder for this build's published outputs."""
    path = Path(out) / "builds" / build_id
    shutil.rmtree(path, ignore_errors=True)  # a crashed attempt under the same id
    path.mkdir(parents=True)
    return path


def publish(out: Path, build_dir: Path) -> None:
    """Make `build_dir` the published build in one rename, then drop builds no reader needs."""
    out = Path(out)
    _link_published_names(out)
    current = out / "current"
    previous = os.readlink(current) if current.is_symlink() else None
    tmp = out / ".current.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path("builds") / build_dir.name)
    os.replace(tmp, current)
    keep = {build_dir.name, Path(previous).name if previous else None}  # readers may still hold the previous one
    for old in (out / "builds").iterdir():
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)  # older builds and attempts that never finished


def _link_published_names(out: Path) -> None:
    """`OUT/dataset` -> `current/dataset`, ...: created once; an output folder written before
    builds were versioned has its real files moved into a build of their own first."""
    legacy = out / "builds" / "legacy"
    for name in PUBLISHED:
        link = out / name
        if link.is_symlink():
            continue
        if link.exists():
            legacy.mkdir(parents=True, exist_ok=True)
            link.rename(legacy / name)
        link.symlink_to(Path("current") / name)
    if legacy.is_dir() and not (out / "current").exists():  # readers keep seeing the old build until the switch
        (out / "current").symlink_to(Path("builds") / "legacy")

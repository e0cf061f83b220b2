"""The photographs' files: found under the input folder (`scan`), named by content hash, and
shown by path.

Bad files never stop a run: each becomes a Reject (of the ingest stage) naming the file and the
reason.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG

from fundus_engine import dicom
from fundus_engine.config import IMAGE_EXTENSIONS
from fundus_engine.models import Reject

STAGE = "ingest"  # the stage whose rejects these are


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_version(path: Path | str) -> tuple[int, int]:
    """(modification time, size): part of every in-process cache keyed by a path, because crops
    and weights are rewritten in place and a cache keyed by the path alone would serve the old file."""
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4096)
def _sha256_of_version(path: str, version: tuple[int, int]) -> str:
    return sha256_file(Path(path))


def cached_sha256(path: Path | str) -> str:
    """sha256 of a file, computed once per version of it."""
    return _sha256_of_version(str(path), file_version(path))


def shown(path: Path | str) -> str:
    """A path as valid UTF-8, for rows, logs and reasons: a name that is not UTF-8 (Latin-1 from
    old Windows archives; Python holds its bytes as surrogates) shows its bytes escaped, \\xe9."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_path(path: Path) -> Path:
    """A UTF-8 path that opens the file. Parquet, the dataset's readers and the model client need
    valid UTF-8, which no spelling of a Latin-1 name is; such a file is reached through a link
    named by a hash of its path, kept in the user cache (the input folder is never written)."""
    try:
        str(path).encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    folder = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fundus-engine" / "names").resolve()
    link = folder / (hashlib.sha256(os.fsencode(path)).hexdigest()[:32] + shown(path.suffix).lower())
    try:
        if not (link.is_symlink() and os.readlink(link) == str(path)):
            folder.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(path)
            tmp.replace(link)  # atomic: a concurrent build never sees the link missing
    except OSError as exc:
        raise OSError(f"file name is not UTF-8 and no UTF-8 link to it could be made in {folder}: {exc}") from exc
    return link


def scan(input_dir: Path, exclude: Iterable[Path] = (), labelled=lambda relpath: False
         ) -> tuple[list[SourceFile], list[Reject]]:
    """List image files under input_dir by content hash, outside the `exclude` folders (the
    build's output; the label folders of `ingest.label_layouts`, whose masks are no photographs).

    Byte-identical copies are rejected; the copy kept is the one the labels manifest names,
    else the first by path, so a stray duplicate never costs an image its labels.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    copies: dict[str, list[str]] = {}
    files, rejects = _walk(input_dir, exclude)
    for path in sorted(files):
        if path.suffix.lower() not in IMAGE_EXTENSIONS and not dicom.is_dicom(path):
            continue
        rel = path.relative_to(input_dir).as_posix()
        try:
            copies.setdefault(sha256_file(path), []).append(rel)
        except OSError as exc:
            rejects.append(Reject(stage=STAGE, item=shown(path), reason=f"cannot read file: {exc}"))
    sources = []
    for sha, rels in copies.items():
        keep = next((r for r in rels if labelled(r)), rels[0])
        sources.append(SourceFile(keep, sha))
        rejects += [Reject(stage=STAGE, item=shown(input_dir / r), reason=f"duplicate: same bytes as {shown(keep)}")
                    for r in rels if r != keep]
    return sorted(sources, key=lambda s: s.relpath), rejects


def _walk(input_dir: Path, exclude: Iterable[Path]) -> tuple[list[Path], list[Reject]]:
    """Every file under input_dir, hidden ones and the exclude folders aside. Linked folders are
    followed; a link back into its own ancestors (a loop) or to nothing is a reject, never
    skipped in silence nor followed for ever."""
    def identity(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    skip = {identity(Path(e).stat()) for e in exclude if Path(e).is_dir()}
    files, rejects = [], []
    todo = [(input_dir, frozenset([identity(input_dir.stat())]))]
    while todo:
        folder, ancestors = todo.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            rejects.append(Reject(stage=STAGE, item=shown(folder), reason=f"cannot read folder: {exc}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                st = path.stat()
            except OSError as exc:
                if not entry.is_symlink():
                    reason = f"cannot read file: {exc}"
                elif exc.errno == errno.ELOOP:
                    reason = "symlink loop"
                else:
                    reason = "broken symlink: target missing" if exc.errno == errno.ENOENT else f"broken symlink: {exc}"
                rejects.append(Reject(stage=STAGE, item=shown(path), reason=reason))
                continue
            if S_ISDIR(st.st_mode):
                if identity(st) in ancestors:
                    rejects.append(Reject(stage=STAGE, item=shown(path), reason="symlink loop"))
                elif identity(st) not in skip:
                    todo.append((path, ancestors | {identity(st)}))
            elif S_ISREG(st.st_mode):
                files.append(path)
    return files, rejects

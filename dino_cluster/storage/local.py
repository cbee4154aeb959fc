"""Local-folder backend of dino_cluster.storage (file:// URLs and plain paths).

Writes go to a temp file in the target's own directory and are renamed into place, so a
reader (or a listing) sees either the old object, the new one, or nothing: never a torn file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dino_cluster.storage.base import TEMP_PREFIX, ObjectInfo, ObjectStore, check_key


class LocalStore(ObjectStore):
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.url = "file://" + self.root.as_posix()

    def _path(self, key: str) -> Path:
        # check_key already refuses '..' and absolute keys; the resolve check also stops a
        # symlinked folder inside the root from leading writes outside it.
        path = self.root / check_key(key)
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
            raise ValueError(f"storage key {key!r} resolves outside the store root {self.url}")
        return path

    def child(self, subpath: str) -> LocalStore:
        return LocalStore(str(self.root / check_key(subpath.strip("/"))))

    def open_read(self, key: str, start: int = 0) -> BinaryIO:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        path = self._path(key)
        if path.is_dir():
            raise FileNotFoundError(f"{self.url_for(key)} is a folder, not an object")
        f = open(path, "rb")  # noqa: SIM115 - returned to the caller
        if start:
            f.seek(start)
        return f

    def _atomic_write(self, key: str, fill: Callable[[BinaryIO], None]) -> None:
        path = self._path(key)
        fd, tmp = _temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                # fsync before rename: a crash must not leave a renamed but empty file.
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def upload_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, 1024 * 1024))

    def download_file(self, key: str, path: str | os.PathLike) -> None:
        dest = Path(path)
        fd, tmp = _temp_beside(dest)
        try:
            with os.fdopen(fd, "wb") as out, self.open_read(key) as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
            os.replace(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_key(prefix, prefix=True)
        # S3 prefixes are string prefixes ("shard-0" matches "shard-01.tar"): walk the deepest
        # folder the prefix names fully, then filter by string.
        folder, _, _ = prefix.rpartition("/")
        top = self.root / folder if folder else self.root
        out: list[ObjectInfo] = []
        if not top.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:  # deleted while we walked
                    continue
                out.append(ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime))
        out.sort(key=lambda info: info.key)
        return out

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object {self.url_for(key)}")
        return path.stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._prune_empty(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        infos = self.list(prefix)
        for info in infos:
            (self.root / info.key).unlink(missing_ok=True)
        for info in infos:
            self._prune_empty((self.root / info.key).parent)
        return len(infos)

    def sweep_temporaries(self, older_than_s: float) -> int:
        # A writer killed between mkstemp and os.replace leaves its temporary forever: listings
        # skip it, so retention never sees it. A live writer keeps touching its file, so only
        # the ones untouched for `older_than_s` are taken.
        cutoff = time.time() - older_than_s
        removed = 0
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if not name.startswith(TEMP_PREFIX):
                    continue
                path = Path(dirpath, name)
                try:
                    if path.stat().st_mtime >= cutoff:
                        continue
                    path.unlink()
                except FileNotFoundError:  # finished (renamed) or removed meanwhile
                    continue
                removed += 1
                self._prune_empty(path.parent)
        return removed

    def _prune_empty(self, folder: Path) -> None:
        # Folders are an artefact of local storage (S3 has none): drop the empty ones we
        # leave behind, never the root itself.
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


def _temp_beside(path: Path, attempts: int = 5) -> tuple[int, str]:
    """A new temporary file in `path`'s folder, creating the folder. A concurrent delete
    prunes the folders it empties, so the folder can vanish between mkdir and mkstemp: try
    again. Once the temporary is inside, the folder is not empty and stays."""
    for attempt in range(attempts):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")

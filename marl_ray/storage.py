"""A run's storage: a local or NFS path, or an object store, through `pyarrow.fs` (Ray's filesystem layer).

`run.storage` names it as Ray Train's `storage_path` does: a path (`/mnt/shared/runs/x`), `file://...`,
`s3://bucket/prefix`, `gs://bucket/prefix` (pyarrow's URI options after `?`, for example
`s3://bucket/p?endpoint_override=host:9000&scheme=http`). Every node that writes or reads it must reach
it: the model hosts write their policies' files there themselves, the driver its own state.

Object stores have no rename: a folder is complete when its manifest file is there, written last.
"""

from __future__ import annotations

import posixpath
from pathlib import Path


class Storage:
    """Files under one root of a filesystem; paths are relative to it, '/'-separated."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.uri = str(uri)
        if "://" in self.uri:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        else:  # a plain path: the local (or NFS-mounted) filesystem
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(self.uri).resolve())
        self.root = self.root.rstrip("/")

    def __reduce__(self):  # sent to the hosts as its URI: each opens its own filesystem client
        return Storage, (self.uri,)

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def describe(self, rel: str = "") -> str:
        """The URI or path a person reads in a message."""
        base = self.uri.split("?")[0].rstrip("/")
        return f"{base}/{rel}" if rel else base

    def write(self, rel: str, data: bytes):
        self.fs.create_dir(posixpath.dirname(self._path(rel)), recursive=True)
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(data)

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int | None:
        """A file's size in bytes; None when it does not exist."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self._path(rel))
        return info.size if info.type == pafs.FileType.File else None

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the files and folders directly under `rel` ([] when it does not exist)."""
        import pyarrow.fs as pafs

        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), recursive=False))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def delete(self, rel: str):
        """Remove a file or a folder and everything under it (nothing when it does not exist)."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self._path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._path(rel))

    def write_files(self, rel: str, files: dict[str, bytes]):
        for name, data in files.items():
            self.write(posixpath.join(rel, name), data)

    def read_files(self, rel: str) -> dict[str, bytes]:
        """Every file directly under folder `rel`, by name."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), recursive=False))
        return {posixpath.basename(i.path): self.read(posixpath.join(rel, posixpath.basename(i.path)))
                for i in infos if i.type == pafs.FileType.File}

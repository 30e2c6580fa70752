"""The one module that reads tar shards, for the whole project (webdataset layout).

A sample ``KEY`` is the run of consecutive members ``KEY.<ext>``: the key is the member path up to the first dot
of its basename, the extension the rest, lower-cased (webdataset's ``base_plus_ext`` rule).

* :func:`expand_urls` — shard specs to a URL list: ``::``-separated parts, brace patterns (``{000..099}``,
  ``{a,b}``; webdataset's ``braceexpand``), globs for local paths; ``pipe:CMD`` and other URL schemes are kept as
  they are and opened by ``webdataset.gopen`` (``pipe:aws s3 cp s3://bucket/x.tar -``).
* :func:`iter_tar` — stream one shard's samples in file order. ``select(index)`` decides which samples are
  read: the others are passed over without reading their bytes from a local file (seek) and without keeping
  them from a stream (read and dropped). Nothing is decoded here.
* :func:`index_tar` / :func:`read_member` — random access into local shards for the map-style readers (LLaVA's
  caption shards, RAE's class-labelled shards).

Bad input never raises: a shard that cannot be opened (``unreadable_shard``) or that ends inside a member
(``truncated_shard``) stops with the samples read so far, and ``on_error(reason, url, detail)`` is told.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

from braceexpand import braceexpand

__all__ = ["TarSample", "expand_urls", "is_local", "shard_name", "split_member", "iter_tar", "index_tar",
           "read_member"]

ErrorFn = Callable[[str, str, str], None]
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


class TarSample(NamedTuple):
    """One sample of a shard: its position in the shard (0-based), key, and member bytes by extension."""

    url: str
    index: int
    key: str
    members: dict[str, bytes]


def is_local(url: str) -> bool:
    """A plain path or ``file:`` URL (seekable), as opposed to ``pipe:``/``http:``... streams."""
    return url.startswith("file:") or not _SCHEME.match(url) or bool(re.match(r"^[a-zA-Z]:[\\/]", url))


def _local_path(url: str) -> str:
    return os.path.expanduser(re.sub(r"^file:(//)?", "", url))


def expand_urls(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a/{000..009}.tar::b/*.tar"`` (or a list of such) → URLs. Local patterns that match nothing are dropped;
    the caller decides whether an empty result is an error (and names its config key)."""

    parts = [p for s in ([spec] if isinstance(spec, str) else spec) for p in str(s).split("::") if p.strip()]
    out: list[str] = []
    for part in parts:
        for url in braceexpand(part.strip()):
            if not is_local(url):
                out.append(url)
            elif glob.has_magic(url):
                out += sorted(glob.glob(_local_path(url)))
            elif os.path.exists(_local_path(url)):
                out.append(_local_path(url))
    return out


def shard_name(url: str) -> str:
    """A shard's file name without ``.tar`` (``pipe:aws s3 cp s3://b/00042.tar -`` → ``00042``): the name of its
    latent-cache file and of its per-sample random streams."""
    hits = re.findall(r"([^/\s'\"]+?)\.tar(?:\.gz)?\b", url)
    if hits:
        return hits[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(url.rstrip("/")) or url)


def split_member(name: str) -> tuple[str | None, str]:
    """(key, extension) of a member path, webdataset's rule; (None, "") for a name without an extension."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _open(url: str):
    """(file object, TarFile): seekable for local files, a stream (``r|*``) for everything webdataset opens."""
    if is_local(url):
        f = open(_local_path(url), "rb")  # noqa: SIM115 (closed by the caller)
        try:
            return f, tarfile.open(fileobj=f, mode="r:*")
        except BaseException:
            f.close()
            raise
    from webdataset.gopen import gopen

    f = gopen(url, "rb")
    try:
        return f, tarfile.open(fileobj=f, mode="r|*")
    except BaseException:
        _close(f, quiet=True)
        raise


def _close(f, quiet: bool) -> str | None:
    """Close; a pipe's command that failed reports here (its exit status). Returns the problem, if any."""
    try:
        f.close()
    except OSError as e:  # webdataset's Pipe raises IOError for a non-zero exit status
        return None if quiet else str(e)
    return None


def _ends_cleanly(f, tf) -> bool:
    """A local archive whose member list ended at an end-of-archive block (not at a cut-off header)."""
    f.seek(tf.offset)
    return f.read(512) == b"\0" * 512


def iter_tar(url: str, select: Callable[[int], bool] | None = None, stop: int | None = None,
             on_error: ErrorFn | None = None) -> Iterator[TarSample]:
    """The samples of one shard in file order (see the module doc). ``stop``: stop before sample ``stop``."""
    try:
        f, tf = _open(url)
    except _TAR_ERRORS as e:
        if on_error is not None:
            on_error("unreadable_shard", url, str(e))
        return
    key, members, index, wanted = None, {}, -1, False
    finished = False
    try:
        try:
            for m in tf:
                tf.members = []  # no member list that grows with the shard
                if not m.isreg():
                    continue
                k, ext = split_member(m.name)
                if k is None or k.startswith("__"):
                    continue
                if k != key:
                    if wanted:
                        yield TarSample(url, index, key, members)
                    key, members, index = k, {}, index + 1
                    if stop is not None and index >= stop:
                        wanted = False
                        finished = True
                        return
                    wanted = select is None or select(index)
                if wanted:
                    fh = tf.extractfile(m)
                    data = fh.read() if fh is not None else b""
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"member {m.name}: {len(data)} of {m.size} bytes")
                    members[ext] = data
        except _TAR_ERRORS as e:
            wanted = False  # the sample cut by the damage is dropped with it
            if on_error is not None:
                on_error("truncated_shard" if index >= 0 else "unreadable_shard", url, str(e))
            finished = True
            return
        if is_local(url) and not _ends_cleanly(f, tf):
            wanted = False
            if on_error is not None:
                on_error("truncated_shard", url, "the archive ends inside a member header or data")
        if wanted:
            yield TarSample(url, index, key, members)
        finished = True
    finally:
        problem = _close(f, quiet=not finished)
        if problem and on_error is not None:
            on_error("unreadable_shard", url, problem)


def index_tar(path: str, on_error: ErrorFn | None = None) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {ext: (offset, size)})]`` of a local shard in file order (headers only; member data is not read).
    A damaged shard keeps the samples before the damage."""
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        f, tf = _open(path)
    except _TAR_ERRORS as e:
        if on_error is not None:
            on_error("unreadable_shard", path, str(e))
        return out
    size = os.fstat(f.fileno()).st_size
    try:
        for m in tf:
            tf.members = []
            k, ext = split_member(m.name) if m.isreg() else (None, "")
            if k is None or k.startswith("__"):
                continue
            if m.offset_data + m.size > size:
                raise tarfile.ReadError(f"member {m.name} runs past the end of the file")
            if not out or out[-1][0] != k:
                out.append((k, {}))
            out[-1][1][ext] = (m.offset_data, m.size)
        if not _ends_cleanly(f, tf):
            raise tarfile.ReadError("the archive ends inside a member header")
    except _TAR_ERRORS as e:
        if on_error is not None:
            on_error("truncated_shard", path, str(e))
    finally:
        f.close()
    return out


def read_member(path: str, offset: int, size: int, handles: dict | None = None) -> bytes:
    """``size`` bytes at ``offset`` of a local shard (fewer if the file is shorter). ``handles``: a per-process
    dict of open files to reuse (random access without re-opening)."""
    if handles is None:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    f = handles.get(path)
    if f is None:
        f = handles[path] = open(path, "rb")  # noqa: SIM115 (kept open for random access, one per process)
    f.seek(offset)
    return f.read(size)

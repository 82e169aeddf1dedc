"""The file-system side of QSFTP: name confinement, atomic writes, safe reads and listings.

Name policy
-----------
A remote name is a relative, ``/``-separated path inside the served root. It is refused
(:class:`~qsftp.errors.BadPath`) when it:

- is empty (except where the root itself is meant, e.g. listing it: then ``""``);
- contains NUL or any other control character (U+0000-U+001F, U+007F) or a backslash;
- starts with ``/`` or a Windows drive prefix such as ``C:``;
- has an empty component (``a//b``, a trailing ``/``) or a ``.`` or ``..`` component;
- has a component whose NFKC form is ``.`` or ``..`` or contains ``/`` or ``\\``
  (look-alikes: ``‥`` U+2025, full-width full stop U+FF0E and solidus U+FF0F);
- is longer than 4096 bytes of UTF-8, has a component longer than 255 bytes, or more than
  64 components;
- has a component ending in ``.qsftp-part``: that suffix is reserved for files being written;
- cannot be encoded as UTF-8 (lone surrogates).

Accepted names are returned in Unicode NFC, and the server stores and looks up that form.

Symbolic links are never followed. Every name is resolved one component at a time from a
directory file descriptor on the root, opening each component with ``O_NOFOLLOW``, so a link
anywhere in the path, even one pointing inside the root, is refused with ``BadPath``:
confinement does not rest on string checks alone. Listings show only regular files and
directories whose names the policy accepts as they are; links, devices, FIFOs, sockets and partial
files are left out.

Writes go to a hidden temporary file (``.<name>.<random>.qsftp-part``) in the target directory,
created with mode 0o666 so the umask decides the permissions. On commit its size and SHA-256 are
checked, the data is flushed and fsync'd, the file is renamed over the final name and the
directory is fsync'd. Any failure before the rename removes the temporary file, so the final name
holds either the old content or the complete new one. Parent directories created for a write
stay when it is aborted.

A resumable download (:class:`PartialDownload`) writes instead to ``.<name>.qsftp-part`` next to
its destination, a name fixed by the destination so that a later attempt finds it. That file
survives a failed attempt; its bytes are always a prefix of the remote file as it was read, and
the next attempt has the server check that prefix (SHA-256) before it continues. The final name
appears only through the same verified, fsync'd rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import pathlib
import secrets
import stat
import threading
import time
import unicodedata
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Self

from qsftp.errors import (
    BadPath,
    ChecksumMismatch,
    LocalFileError,
    NoSpace,
    NotFound,
    QsftpError,
    TooLarge,
    UsageError,
)

__all__ = [
    "MAX_COMPONENT_BYTES",
    "MAX_DEPTH",
    "MAX_NAME_BYTES",
    "PARTIAL_SUFFIX",
    "AtomicWriter",
    "RangeWriter",
    "Entry",
    "PartialDownload",
    "Root",
    "normalize_name",
    "open_local_writer",
    "partial_download_path",
    "sha256_file",
    "sha256_prefix",
    "sync_directory",
    "too_large",
]

logger = logging.getLogger(__name__)

# Linux PATH_MAX: a longer relative name could not be opened in one call anyway, and it bounds
# the work one request can cause.
MAX_NAME_BYTES = 4096
# NAME_MAX of ext4, xfs, btrfs and tmpfs; a longer component fails on the disk with ENAMETOOLONG.
MAX_COMPONENT_BYTES = 255
# Each level holds a directory fd open while walking; 64 is deeper than real trees go.
MAX_DEPTH = 64
# Marks temporary files of unfinished writes; reserved in names so a client can neither read,
# overwrite nor list another transfer's partial data.
PARTIAL_SUFFIX = ".qsftp-part"

# Incoming data arrives in QUIC-frame sized pieces (1-16 KiB); a 1 MiB buffer turns them into
# few large write() calls, and bounds the memory one open upload holds. A file whose size is
# declared and smaller gets a buffer of its size (at least io's default): a 1 MiB allocation,
# mapped and unmapped again, per 4 KiB file showed in profiles of a burst of small uploads.
WRITE_BUFFER_SIZE = 1024 * 1024
# Random part of temporary names: O_EXCL catches a collision, so 32 bits only need to make one
# rare among concurrent writers of the same name.
_TEMP_TOKEN_BYTES = 4
# Longest name quoted in an error message: errors go back to the peer, keep them short.
_SHOWN_NAME_CHARS = 100

_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer before we can refuse it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# A striped upload's ranges share one partial file: created by whichever range comes first,
# read as well as written (fs.PrefixHash reads back ranges that arrived ahead of the prefix).
_PARTIAL_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_UPLOAD_ID_BYTES = 16
_HEX = frozenset("0123456789abcdef")
# Read size when hashing a whole partial file at commit (hashlib releases the GIL per call).
_HASH_BLOCK = 1024 * 1024
# Striped uploads whose running whole-file hash a Root keeps (one small object each). Past this
# the least recently used is forgotten, and its COMMIT reads and hashes the file instead.
_MAX_PREFIX_HASHES = 256
# Written-but-not-yet-hashed intervals one of them remembers. Striping keeps a few (one per
# connection ahead of the prefix); a client sending many scattered ranges only loses the
# shortcut, since whatever is not remembered is read at COMMIT.
_MAX_PENDING_INTERVALS = 64


def _show(name: str) -> str:
    if len(name) > _SHOWN_NAME_CHARS:
        name = name[:_SHOWN_NAME_CHARS] + "…"
    return repr(name)


def normalize_name(name: str, *, allow_empty: bool = False) -> str:
    """Validate an untrusted remote name and return its NFC form (policy: module docstring).

    ``allow_empty`` accepts ``""``, meaning the root itself. Raises :class:`BadPath` saying
    what is wrong.
    """
    if name == "":
        if allow_empty:
            return ""
        raise BadPath("empty name")
    shown = _show(name)
    nfc = unicodedata.normalize("NFC", name)
    try:
        size = len(nfc.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadPath(f"{shown}: not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise BadPath(f"{shown}: longer than {MAX_NAME_BYTES} bytes")
    for ch in nfc:
        if ch < " " or ch == "\x7f":
            raise BadPath(f"{shown}: contains control character {ch!r}")
    if "\\" in nfc:
        raise BadPath(f"{shown}: contains a backslash")
    if nfc.startswith("/"):
        raise BadPath(f"{shown}: absolute path (names are relative to the root)")
    if len(nfc) >= 2 and nfc[1] == ":" and nfc[0].isascii() and nfc[0].isalpha():
        raise BadPath(f"{shown}: starts with a drive prefix")
    parts = nfc.split("/")
    if len(parts) > MAX_DEPTH:
        raise BadPath(f"{shown}: deeper than {MAX_DEPTH} components")
    for part in parts:
        if part == "":
            raise BadPath(f"{shown}: empty component ('//' or a trailing '/')")
        if part in (".", ".."):
            raise BadPath(f"{shown}: {part!r} component")
        compat = unicodedata.normalize("NFKC", part)
        if compat in (".", "..") or "/" in compat or "\\" in compat:
            raise BadPath(f"{shown}: component {_show(part)} looks like {compat!r}")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise BadPath(f"{shown}: a component is longer than {MAX_COMPONENT_BYTES} bytes")
        if part.endswith(PARTIAL_SUFFIX):
            raise BadPath(f"{shown}: names ending in {PARTIAL_SUFFIX!r} are reserved")
    return nfc


def _is_listable(name: str) -> bool:
    try:
        return normalize_name(name) == name
    except BadPath:
        return False


def _split(name: str) -> list[str]:
    return name.split("/") if name else []


def _os_error(exc: OSError, name: str) -> QsftpError:
    """Map an OSError about ``name`` to the QSFTP error the caller should see."""
    shown = _show(name)
    if exc.errno == errno.ENOENT:
        return NotFound(f"{shown}: no such file or directory")
    if exc.errno in _NO_SPACE_ERRNOS:
        return NoSpace(f"{shown}: {exc.strerror}")
    return LocalFileError(f"{shown}: {exc.strerror}")


def _write_error(exc: OSError, name: str) -> QsftpError:
    if exc.errno in _NO_SPACE_ERRNOS:
        return NoSpace(f"{_show(name)}: {exc.strerror}")
    return LocalFileError(f"{_show(name)}: {exc.strerror}")


def too_large(name: str, size: int) -> TooLarge:
    """The error for data beyond ``size``, the declared size of ``name``: one message for every
    path that enforces it (:meth:`AtomicWriter.write`, or a server buffering a small upload)."""
    return TooLarge(f"{_show(name)}: more than the declared {size} bytes")


def _check_size(size: int | None) -> None:
    if size is not None and size < 0:
        raise UsageError(f"negative size {size}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """A regular file or directory under a :class:`Root`."""

    name: str
    """Relative path from the root, ``/``-separated (``""`` for the root itself)."""
    kind: str
    """``"file"`` or ``"dir"``."""
    size: int
    """Size in bytes; 0 for directories."""
    mtime_ns: int
    """Modification time, nanoseconds since the epoch."""


def _entry(name: str, st: os.stat_result) -> Entry | None:
    if stat.S_ISREG(st.st_mode):
        return Entry(name=name, kind="file", size=st.st_size, mtime_ns=st.st_mtime_ns)
    if stat.S_ISDIR(st.st_mode):
        return Entry(name=name, kind="dir", size=0, mtime_ns=st.st_mtime_ns)
    return None


def _kind_error(name: str, st: os.stat_result, *, want_dir: bool) -> BadPath:
    """Say why ``st`` is not the regular file (or, with ``want_dir``, directory) expected."""
    if stat.S_ISLNK(st.st_mode):
        return BadPath(f"{_show(name)} is a symbolic link")
    if stat.S_ISDIR(st.st_mode):
        return BadPath(f"{_show(name)} is a directory")
    return BadPath(f"{_show(name)} is not a {'directory' if want_dir else 'regular file'}")


def _open_error(
    parent_fd: int, component: str, name: str, exc: OSError, *, want_dir: bool
) -> QsftpError:
    """Map a failed ``open(component, O_NOFOLLOW, dir_fd=parent_fd)`` to a QSFTP error."""
    # O_DIRECTORY|O_NOFOLLOW on a link gives ENOTDIR, not ELOOP; devices and sockets give ENXIO
    # or ENODEV: look at what is there to say which.
    if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.ENODEV):
        return _os_error(exc, name)
    try:
        st = os.stat(component, dir_fd=parent_fd, follow_symlinks=False)
    except OSError as again:
        return _os_error(again, name)
    return _kind_error(name, st, want_dir=want_dir)


class _CleanedUpOnExit:
    """``with obj:`` calls ``obj._on_exit()`` on the way out (close, or abort a writer)."""

    def _on_exit(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._on_exit()


class Root(_CleanedUpOnExit):
    """A directory that confines every name. Opens one O_DIRECTORY fd; close() / context manager.

    Every method takes an untrusted remote name, applies :func:`normalize_name` and walks it from
    the root fd without following symbolic links. Apart from :meth:`close`, methods are safe to
    call from several threads.
    """

    path: pathlib.Path
    """The root directory, resolved."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self._fd = -1
        try:
            if create:
                pathlib.Path(path).mkdir(parents=True, exist_ok=True)
            self.path = pathlib.Path(path).resolve(strict=True)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalFileError(f"root {os.fspath(path)!r}: {exc.strerror}") from exc
        # Running whole-file hashes of striped uploads, by (name, upload id); oldest first.
        self._prefix_hashes: dict[tuple[str, str], PrefixHash] = {}
        self._prefix_hashes_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"

    def close(self) -> None:
        """Close the root fd. Writers already created keep working."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _on_exit(self) -> None:
        self.close()

    def open_read(self, name: str) -> tuple[BinaryIO, Entry]:
        """Open a regular file for reading; return the file and its :class:`Entry`."""
        name = normalize_name(name)
        parts = _split(name)
        parent = self._open_dir(parts[:-1], name)
        try:
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
            except OSError as exc:
                raise _open_error(parent, parts[-1], name, exc, want_dir=False) from None
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _kind_error(name, st, want_dir=False)
            os.set_blocking(fd, True)
            file = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        return file, Entry(name=name, kind="file", size=st.st_size, mtime_ns=st.st_mtime_ns)

    def stat(self, name: str) -> Entry:
        """Describe a regular file or directory; ``""`` is the root itself."""
        name = normalize_name(name, allow_empty=True)
        if not name:
            st = os.fstat(self._root_fd())
            return Entry(name="", kind="dir", size=0, mtime_ns=st.st_mtime_ns)
        parts = _split(name)
        parent = self._open_dir(parts[:-1], name)
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            raise _os_error(exc, name) from None
        finally:
            os.close(parent)
        entry = _entry(name, st)
        if entry is None:
            raise _kind_error(name, st, want_dir=False)
        return entry

    def listdir(self, name: str = "", *, recursive: bool = False) -> list[Entry]:
        """List a directory (``""``: the root), sorted by name.

        Only regular files and directories whose names :func:`normalize_name` accepts unchanged
        are listed; symbolic links are neither listed nor followed. ``recursive`` lists the whole
        subtree, directories included, down to :data:`MAX_DEPTH`.
        """
        name = normalize_name(name, allow_empty=True)
        fd = self._open_dir(_split(name), name)
        entries: list[Entry] = []
        try:
            self._scan(fd, name, recursive, entries)
        finally:
            os.close(fd)
        entries.sort(key=lambda entry: entry.name)
        return entries

    def create_writer(self, name: str, *, size: int | None = None) -> AtomicWriter:
        """Start writing the file ``name``, creating missing parent directories inside the root.

        ``size``, when given, is the exact number of bytes the caller will write.
        """
        name = normalize_name(name)
        _check_size(size)
        parts = _split(name)
        parent = self._open_dir(parts[:-1], name, create=True)
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            os.close(parent)
            raise _os_error(exc, name) from None
        else:
            if not stat.S_ISREG(st.st_mode):
                os.close(parent)
                raise _kind_error(name, st, want_dir=False)
        return AtomicWriter(parent, parts[-1], name=name, size=size, refuse=BadPath)

    def store(
        self,
        name: str,
        data: bytes | memoryview,
        *,
        size: int | None = None,
        expected_sha256: str | None = None,
    ) -> str:
        """Write the whole file ``name`` from memory in one call; return its SHA-256.

        The same steps, guarantees and errors as :meth:`create_writer`, :meth:`AtomicWriter.write`
        and :meth:`AtomicWriter.commit` in sequence (which is what it does): ``size`` is the
        declared size (default: ``len(data)``), so more data is :class:`TooLarge` and less is
        :class:`ChecksumMismatch`; nothing appears under ``name`` unless every check passed,
        and the temporary file is gone after any failure. One call instead of three is one
        worker-thread hop for a server storing a small upload.
        """
        view = memoryview(data).cast("B")
        with self.create_writer(name, size=view.nbytes if size is None else size) as writer:
            writer.write(view)
            return writer.commit(expected_sha256=expected_sha256)

    def remove_stale_partials(self, max_age: float, *, now: float | None = None) -> int:
        """Delete partial files (``*.qsftp-part``) not modified for ``max_age`` seconds, in
        the whole tree; return how many went. Temporaries of a crashed server and partial
        files of abandoned striped uploads end here. Links are never followed."""
        cutoff = (time.time() if now is None else now) - max_age
        removed = 0
        stack: list[tuple[int, int]] = [(os.open(".", _DIR_FLAGS, dir_fd=self._root_fd()), 0)]
        while stack:
            fd, depth = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
                            try:
                                child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                            except OSError:
                                continue
                            stack.append((child, depth + 1))
                        elif (
                            stat.S_ISREG(st.st_mode)
                            and entry.name.endswith(PARTIAL_SUFFIX)
                            and st.st_mtime < cutoff
                        ):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(entry.name, dir_fd=fd)
                                removed += 1
            finally:
                os.close(fd)
        if removed:
            logger.info("removed %d stale partial files", removed)
        return removed

    def free_bytes(self) -> int:
        """Bytes available to an unprivileged writer on the root's file system."""
        st = os.fstatvfs(self._root_fd())
        return st.f_bavail * st.f_frsize

    def open_range(
        self, name: str, upload_id: str, *, total_size: int, hashed: bool = True
    ) -> RangeWriter:
        """Open the shared partial file of upload ``upload_id`` of ``name`` for one range
        (striped or resumed uploads); whichever range comes first creates the file. With
        ``hashed`` False the range keeps no SHA-256 of its own (PUT_BLOCK)."""
        name = normalize_name(name)
        _check_size(total_size)
        parts = _split(name)
        parent = self._open_dir(parts[:-1], name, create=True)
        try:
            self._check_target(parent, parts[-1], name)
            partial = _partial_name(parts[-1], upload_id)
            try:
                fd = os.open(partial, _PARTIAL_FLAGS, 0o666, dir_fd=parent)
            except OSError as exc:
                raise _write_error(exc, name) from None
        finally:
            os.close(parent)
        st = os.fstat(fd)
        prefix = self._prefix_hash((name, upload_id), create=True, file_id=(st.st_dev, st.st_ino))
        # Not preallocated: the partial file's size is what has been written up to its end,
        # which is what a resumed upload asks for (probe_partial); COMMIT checks the size.
        return RangeWriter(fd, name=name, total_size=total_size, prefix=prefix, hashed=hashed)

    def _prefix_hash(
        self, key: tuple[str, str], *, create: bool, file_id: tuple[int, int] = (0, 0)
    ) -> PrefixHash | None:
        """The running hash of striped upload ``key``: made (or replaced, when the partial file
        is not the one it hashed) with ``create``, else removed from the table and returned."""
        with self._prefix_hashes_lock:
            found = self._prefix_hashes.pop(key, None)
            if not create:
                return found
            if found is None or found.file_id != file_id:
                found = PrefixHash(file_id)
            self._prefix_hashes[key] = found  # now the most recently used
            while len(self._prefix_hashes) > _MAX_PREFIX_HASHES:
                del self._prefix_hashes[next(iter(self._prefix_hashes))]
            return found

    def probe_partial(self, name: str, upload_id: str) -> tuple[int, str]:
        """Size and SHA-256 of what the partial file of ``upload_id`` holds ((0, digest of
        nothing) when there is none): a resuming client compares them with its own prefix."""
        name = normalize_name(name)
        parts = _split(name)
        nothing = hashlib.sha256().hexdigest()
        try:
            parent = self._open_dir(parts[:-1], name)
        except NotFound:
            return 0, nothing
        try:
            try:
                fd = os.open(_partial_name(parts[-1], upload_id), _READ_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                return 0, nothing
            except OSError as exc:
                raise _os_error(exc, name) from None
            try:
                st = os.fstat(fd)
                return st.st_size, PrefixHash((st.st_dev, st.st_ino)).finish(fd, st.st_size)
            except OSError as exc:
                raise _os_error(exc, name) from None
            finally:
                os.close(fd)
        finally:
            os.close(parent)

    def commit_partial(
        self, name: str, upload_id: str, *, total_size: int, expected_sha256: str
    ) -> str:
        """Verify the whole partial file of a striped upload, make it durable and rename it
        to ``name``; return its SHA-256. A mismatch removes the partial file."""
        name = normalize_name(name)
        parts = _split(name)
        parent = self._open_dir(parts[:-1], name)
        try:
            partial = _partial_name(parts[-1], upload_id)
            try:
                fd = os.open(partial, _READ_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                raise NotFound(f"{_show(name)}: no ranges of this upload arrived") from None
            except OSError as exc:
                raise _os_error(exc, name) from None
            prefix = self._prefix_hash((name, upload_id), create=False)
            try:
                st = os.fstat(fd)
                if prefix is None or prefix.file_id != (st.st_dev, st.st_ino):
                    prefix = PrefixHash((st.st_dev, st.st_ino))
                digest = prefix.finish(fd, st.st_size)
                os.fsync(fd)
            except OSError as exc:
                raise _write_error(exc, name) from None
            finally:
                os.close(fd)
            size = st.st_size
            if size != total_size or digest != expected_sha256.lower():
                with contextlib.suppress(OSError):
                    os.unlink(partial, dir_fd=parent)
                raise ChecksumMismatch(
                    f"{_show(name)}: stored {size} bytes with SHA-256 {digest}, "
                    f"expected {total_size} bytes with {expected_sha256}"
                )
            self._check_target(parent, parts[-1], name)
            try:
                os.replace(partial, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
                sync_directory(parent)
            except OSError as exc:
                raise _write_error(exc, name) from None
        finally:
            os.close(parent)
        logger.debug(
            "committed striped upload %r: %d bytes, %d of them read at commit",
            name,
            size,
            prefix.read_at_finish,
        )
        return digest

    def abort_partial(self, name: str, upload_id: str) -> bool:
        """Remove the partial file of a striped upload; False when there was none."""
        name = normalize_name(name)
        self._prefix_hash((name, upload_id), create=False)
        parts = _split(name)
        try:
            parent = self._open_dir(parts[:-1], name)
        except NotFound:
            return False
        try:
            os.unlink(_partial_name(parts[-1], upload_id), dir_fd=parent)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _os_error(exc, name) from None
        finally:
            os.close(parent)
        return True

    @staticmethod
    def _check_target(parent: int, final: str, name: str) -> None:
        """The final name must be absent or a regular file (never a link or directory)."""
        try:
            st = os.stat(final, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _os_error(exc, name) from None
        if not stat.S_ISREG(st.st_mode):
            raise _kind_error(name, st, want_dir=False)

    def _root_fd(self) -> int:
        if self._fd < 0:
            raise UsageError(f"{self!r} is closed")
        return self._fd

    def _open_dir(self, parts: list[str], name: str, *, create: bool = False) -> int:
        """Return a new fd on the directory ``parts`` below the root, following no link."""
        fd = os.open(".", _DIR_FLAGS, dir_fd=self._root_fd())
        try:
            for depth, component in enumerate(parts, 1):
                child = self._open_child(fd, component, "/".join(parts[:depth]), create)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_child(parent: int, component: str, name: str, create: bool) -> int:
        try:
            return os.open(component, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise NotFound(f"{_show(name)}: no such directory") from None
        except OSError as exc:
            raise _open_error(parent, component, name, exc, want_dir=True) from None
        try:
            os.mkdir(component, 0o777, dir_fd=parent)
            os.fsync(parent)  # so the new directory, and later the file in it, survive a crash
            logger.debug("created directory %r", name)
        except FileExistsError:
            pass  # made concurrently, or not a directory: the open below tells
        except OSError as exc:
            raise _os_error(exc, name) from None
        try:
            return os.open(component, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _open_error(parent, component, name, exc, want_dir=True) from None

    def _scan(self, fd: int, prefix: str, recursive: bool, out: list[Entry]) -> None:
        subdirs: list[tuple[str, str]] = []
        with os.scandir(fd) as it:
            for dirent in it:
                rel = f"{prefix}/{dirent.name}" if prefix else dirent.name
                if not _is_listable(rel):
                    continue
                try:
                    entry = _entry(rel, dirent.stat(follow_symlinks=False))
                except OSError:
                    continue  # removed while we were listing
                if entry is None:
                    continue
                out.append(entry)
                if entry.kind == "dir" and recursive:
                    subdirs.append((dirent.name, rel))
        for component, rel in subdirs:
            try:
                child = os.open(component, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # removed, or swapped for a link, since the scan
            try:
                self._scan(child, rel, recursive, out)
            finally:
                os.close(child)


class _DirectorySync:
    """Group commit for one directory: a sync that starts after a rename covers it, so
    concurrent renames in one directory share fsync calls instead of queueing one each."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.requested = 0  # renames that asked for a sync
        self.done = 0  # every request up to this number is durable
        self.running = False
        self.users = 0  # callers inside sync_directory; the entry goes when none are left


_DIRECTORY_SYNCS: dict[tuple[int, int], _DirectorySync] = {}
_DIRECTORY_SYNCS_LOCK = threading.Lock()


def sync_directory(dir_fd: int) -> None:
    """fsync ``dir_fd`` so that renames made in it before this call are durable. Concurrent
    callers for the same directory share one fsync when they can (group commit)."""
    st = os.fstat(dir_fd)
    key = (st.st_dev, st.st_ino)
    with _DIRECTORY_SYNCS_LOCK:
        state = _DIRECTORY_SYNCS.setdefault(key, _DirectorySync())
        state.users += 1
    try:
        _group_sync(state, dir_fd)
    finally:
        with _DIRECTORY_SYNCS_LOCK:
            state.users -= 1
            if state.users == 0 and _DIRECTORY_SYNCS.get(key) is state:
                del _DIRECTORY_SYNCS[key]


def _group_sync(state: _DirectorySync, dir_fd: int) -> None:
    with state.cond:
        state.requested += 1
        mine = state.requested
        while state.done < mine:
            if state.running:
                state.cond.wait()
                continue
            state.running = True
            target = state.requested  # every rename registered so far happened before this sync
            state.cond.release()
            try:
                os.fsync(dir_fd)
            finally:
                state.cond.acquire()
                state.running = False
                state.cond.notify_all()
            state.done = max(state.done, target)


def _partial_name(final: str, upload_id: str) -> str:
    if len(upload_id) != 2 * _UPLOAD_ID_BYTES or any(
        c not in "0123456789abcdef" for c in upload_id
    ):
        raise BadPath("malformed upload id")
    room = MAX_COMPONENT_BYTES - len(f"..{upload_id}{PARTIAL_SUFFIX}")
    stem = final.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return f".{stem}.{upload_id}{PARTIAL_SUFFIX}"


class PrefixHash:
    """The SHA-256 of a striped upload's partial file, kept up to date while its ranges are
    written, so that COMMIT does not read and hash the whole file again after the last range.

    Bytes written at the end of the hashed prefix are hashed from memory as they are written;
    bytes written further on are remembered as intervals and read back from the file (the page
    cache, usually) once the prefix reaches them. One thread hashes at a time; the others only
    record what they wrote. A write into the hashed prefix (a range sent again) spoils the
    running hash, and :meth:`finish` then hashes the whole file. ``file_id`` (device, inode)
    ties the hash to one partial file: a file removed and created again is hashed afresh.

    What this process did not see — ranges written by another server process (``--workers``)
    or before a restart — is read at :meth:`finish`, so the digest is always the file's.
    """

    def __init__(self, file_id: tuple[int, int]) -> None:
        self.file_id = file_id
        self._sha256 = hashlib.sha256()
        self._cond = threading.Condition()
        self._hashed = 0  # bytes [0, _hashed) are in _sha256
        self._claimed = 0  # ... or being added by the thread that is hashing (up to here)
        self._pending: list[tuple[int, int]] = []  # written, not hashed: sorted, disjoint
        self._hashing = False
        self._spoiled = False
        self.read_at_finish = 0
        "Bytes :meth:`finish` had to read from the file (0: all were hashed as they came)."

    def written(self, fd: int, offset: int, data: memoryview) -> None:
        """Note that ``data`` was written at ``offset`` of ``fd``; hash what is now contiguous
        (in the calling thread, unless another thread is hashing)."""
        end = offset + data.nbytes
        with self._cond:
            if self._spoiled or offset == end:
                return
            if offset < self._claimed:
                self._spoiled = True
                return
            if self._hashing or offset != self._hashed:
                self._add_pending(offset, end)
                return
            self._hashing = True
            self._claimed = end
        try:
            self._sha256.update(data)
        except BaseException:
            self._release(spoil=True)
            raise
        self._advance(fd, end)

    def finish(self, fd: int, size: int) -> str:
        """Hash the rest of the file ``fd`` (``size`` bytes) and return the whole SHA-256."""
        with self._cond:
            while self._hashing:
                self._cond.wait()
            if self._spoiled or self._hashed > size:
                self._sha256, self._hashed, self._spoiled = hashlib.sha256(), 0, False
            self._pending.clear()  # all of it is read below
            self._hashing = True
            self._claimed = size
            start = self._hashed
        self.read_at_finish = size - start
        try:
            self._hash_file(fd, start, size)
        finally:
            self._release(spoil=True)  # used once: a later write must not reuse this state
        return self._sha256.hexdigest()

    def _add_pending(self, offset: int, end: int) -> None:
        merged = []
        for start, stop in self._pending:
            if stop < offset or start > end:
                merged.append((start, stop))
            else:
                offset, end = min(start, offset), max(stop, end)
        if len(merged) >= _MAX_PENDING_INTERVALS:
            return  # not remembered: finish() reads it
        merged.append((offset, end))
        merged.sort()
        self._pending = merged

    def _advance(self, fd: int, hashed: int) -> None:
        """Having hashed up to ``hashed``, go on through the pending intervals that follow."""
        try:
            while True:
                with self._cond:
                    self._hashed = hashed
                    if self._spoiled or not self._pending or self._pending[0][0] != hashed:
                        break
                    _, end = self._pending.pop(0)
                    self._claimed = end
                self._hash_file(fd, hashed, end)
                hashed = end
        except BaseException:
            self._release(spoil=True)
            raise
        self._release(spoil=False)

    def _hash_file(self, fd: int, start: int, end: int) -> None:
        # One buffer read into again and again: a fresh 1 MiB bytes object per read costs a
        # new mapping and its page faults each time (the allocator's mmap threshold).
        buffer = memoryview(bytearray(min(_HASH_BLOCK, end - start)))
        while start < end:
            count = os.preadv(fd, [buffer[: end - start]], start)
            if not count:
                raise OSError(errno.EIO, "partial file shorter than what was written to it")
            self._sha256.update(buffer[:count])
            start += count

    def _release(self, *, spoil: bool) -> None:
        with self._cond:
            self._hashing = False
            self._claimed = self._hashed
            if spoil:
                self._spoiled = True
            self._cond.notify_all()


class RangeWriter:
    """Writes one byte range into a striped upload's shared partial file (from
    :meth:`Root.open_range`), hashing the range as it goes."""

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        total_size: int,
        prefix: PrefixHash | None = None,
        hashed: bool = True,
    ) -> None:
        self.name = name
        self.total_size = total_size
        self._fd = fd
        self._sha256 = hashlib.sha256() if hashed else None
        self._prefix = prefix

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` (ranges arrive in order within themselves)."""
        view = memoryview(data)
        if offset + view.nbytes > self.total_size:
            raise TooLarge(f"{_show(self.name)}: range ends beyond {self.total_size} bytes")
        if self._sha256 is not None:
            self._sha256.update(view)
        start, rest = offset, view
        try:
            while rest:
                written = os.pwrite(self._fd, rest, offset)
                rest = rest[written:]
                offset += written
        except OSError as exc:
            raise _write_error(exc, self.name) from None
        if self._prefix is not None:
            try:
                self._prefix.written(self._fd, start, view)
            except OSError as exc:
                raise _os_error(exc, self.name) from None

    def hexdigest(self) -> str:
        """SHA-256 of this range so far (a range opened with ``hashed`` False has none)."""
        if self._sha256 is None:
            raise UsageError("this range keeps no SHA-256 of its own")
        return self._sha256.hexdigest()

    def close(self) -> None:
        """Release the file (the partial stays for the other ranges and the commit)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _temp_name(final: str) -> str:
    token = secrets.token_hex(_TEMP_TOKEN_BYTES)
    # Keep the temporary name within NAME_MAX even when the final name uses all of it.
    room = MAX_COMPONENT_BYTES - len(f"..{token}{PARTIAL_SUFFIX}")
    stem = final.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return f".{stem}.{token}{PARTIAL_SUFFIX}"


class AtomicWriter(_CleanedUpOnExit):
    """Writes to a temp file in the target directory; the final name appears only on commit().

    Made by :meth:`Root.create_writer` and :func:`open_local_writer`. Any failure in
    :meth:`write` or :meth:`commit` removes the temporary file before raising; leaving a
    ``with`` block without committing does the same.
    """

    name: str
    """The final name: relative to the root for a :class:`Root`, else the local path."""
    bytes_written: int
    """Bytes accepted by :meth:`write` so far."""

    def __init__(
        self,
        dir_fd: int,
        final: str,
        *,
        name: str,
        size: int | None,
        refuse: type[QsftpError],
        overwrite: bool = True,
    ) -> None:
        """Take ownership of ``dir_fd`` and create the temp file for ``final`` inside it.

        ``refuse`` is the error raised when the final name turns out to be unusable (BadPath
        for remote names, LocalFileError for local paths).
        """
        self.name = name
        self.bytes_written = 0
        self._dir_fd = dir_fd
        self._final = final
        self._size = size
        self._refuse = refuse
        self._overwrite = overwrite
        self._sha256 = hashlib.sha256()
        self._committed = False
        self._temp = _temp_name(final)
        try:
            fd = os.open(self._temp, _TEMP_FLAGS, 0o666, dir_fd=dir_fd)
        except OSError as exc:
            os.close(dir_fd)
            raise _write_error(exc, name) from None
        buffering = WRITE_BUFFER_SIZE
        if size is not None:
            buffering = max(io.DEFAULT_BUFFER_SIZE, min(size, WRITE_BUFFER_SIZE))
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=buffering)
        logger.debug("writing %r via %r", name, self._temp)

    def __repr__(self) -> str:
        return f"<AtomicWriter {self.name!r} {self.bytes_written} bytes>"

    @property
    def closed(self) -> bool:
        """True once committed or aborted."""
        return self._file is None

    @property
    def committed(self) -> bool:
        """True once :meth:`commit` has renamed the file to its final name."""
        return self._committed

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` and add it to the running SHA-256.

        Raises :class:`TooLarge` past the declared size, :class:`NoSpace` when the disk is full
        (ENOSPC, EDQUOT, EFBIG) and :class:`LocalFileError` for other I/O errors.
        """
        file = self._open_file()
        view = memoryview(data).cast("B")
        if self._size is not None and self.bytes_written + view.nbytes > self._size:
            self.abort()
            raise too_large(self.name, self._size)
        try:
            file.write(view)
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.name) from None
        self._sha256.update(view)
        self.bytes_written += view.nbytes

    def hexdigest(self) -> str:
        """SHA-256 of what was written so far, lowercase hex."""
        return self._sha256.hexdigest()

    def commit(self, *, expected_sha256: str | None = None) -> str:
        """Check, make durable and rename the file to its final name; return its SHA-256.

        Raises :class:`ChecksumMismatch` when fewer bytes than the declared size were written or
        the SHA-256 differs from ``expected_sha256``; :class:`NoSpace` or
        :class:`LocalFileError` when flushing or syncing fails. The temp file is removed first.
        """
        file = self._open_file()
        digest = self.hexdigest()
        try:
            if self._size is not None and self.bytes_written != self._size:
                raise ChecksumMismatch(
                    f"{_show(self.name)}: size {self.bytes_written} != declared {self._size}"
                )
            if expected_sha256 is not None and expected_sha256.lower() != digest:
                raise ChecksumMismatch(
                    f"{_show(self.name)}: SHA-256 {digest} != expected {expected_sha256}"
                )
            try:
                file.flush()
                os.fsync(file.fileno())
                file.close()
            except OSError as exc:
                raise _write_error(exc, self.name) from None
            if not self._overwrite and self._exists(self._final):
                raise self._refuse(f"{_show(self.name)} already exists")
            try:
                os.replace(
                    self._temp, self._final, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd
                )
            except IsADirectoryError:
                raise self._refuse(f"{_show(self.name)} is a directory") from None
            except OSError as exc:
                raise _write_error(exc, self.name) from None
        except BaseException:
            self.abort()
            raise
        self._committed = True
        self._file = None
        try:
            # The rename is only durable once the directory is; the data already is.
            sync_directory(self._dir_fd)
        except OSError as exc:
            raise _write_error(exc, self.name) from None
        finally:
            os.close(self._dir_fd)
        logger.debug("committed %r: %d bytes, sha256 %s", self.name, self.bytes_written, digest)
        return digest

    def abort(self) -> None:
        """Close and remove the temp file. Idempotent; does nothing after a commit."""
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            os.unlink(self._temp, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove %r: %s", self._temp, exc.strerror)
        with contextlib.suppress(OSError):  # unflushed data of a file just removed
            file.close()
        os.close(self._dir_fd)
        logger.debug("aborted %r after %d bytes", self.name, self.bytes_written)

    def _on_exit(self) -> None:
        self.abort()

    def _open_file(self) -> BinaryIO:
        if self._file is None:
            state = "committed" if self._committed else "aborted"
            raise UsageError(f"{self!r} is already {state}")
        return self._file

    def _exists(self, final: str) -> bool:
        try:
            os.stat(final, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True


def open_local_writer(
    path: str | os.PathLike[str], *, size: int | None = None, overwrite: bool = True
) -> AtomicWriter:
    """Start writing the local file ``path`` atomically (a client-side download).

    The parent directory must exist. With ``overwrite=False`` an existing file is refused now
    and again just before the rename. Errors are :class:`LocalFileError` (or :class:`NoSpace`).
    """
    _check_size(size)
    final = pathlib.Path(path)
    shown = os.fspath(path)
    if final.name in ("", ".", ".."):
        raise LocalFileError(f"{shown!r} does not name a file")
    try:
        dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalFileError(f"{final.parent}: {exc.strerror}") from None
    try:
        st = os.stat(final.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        os.close(dir_fd)
        raise LocalFileError(f"{shown}: {exc.strerror}") from None
    else:
        if stat.S_ISDIR(st.st_mode) or not overwrite:
            os.close(dir_fd)
            problem = "is a directory" if stat.S_ISDIR(st.st_mode) else "already exists"
            raise LocalFileError(f"{shown} {problem}")
    return AtomicWriter(
        dir_fd, final.name, name=shown, size=size, refuse=LocalFileError, overwrite=overwrite
    )


def partial_download_path(path: str | os.PathLike[str]) -> pathlib.Path:
    """Where a resumable download to ``path`` keeps its bytes until they are verified."""
    final = pathlib.Path(path)
    room = MAX_COMPONENT_BYTES - len(f".{PARTIAL_SUFFIX}")
    stem = final.name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return final.with_name(f".{stem}{PARTIAL_SUFFIX}")


class PartialDownload(_CleanedUpOnExit):
    """The hidden partial file of a resumable download (see the module docstring).

    Opening it takes an exclusive ``flock``, so two processes never append to one partial file.
    :meth:`prefix_sha256` hashes what it holds; :meth:`write` appends and continues that hash;
    :meth:`restart` empties it; :meth:`commit` verifies the whole file and renames it to the
    destination. :meth:`close` keeps the file for a later attempt; :meth:`discard` removes it.
    Writes are unbuffered (the caller hands over large blocks), so whatever reached the disk
    before a crash is a prefix of the data received. Errors are :class:`LocalFileError` (or
    :class:`NoSpace`).
    """

    size: int
    """Bytes the partial file holds (its size when opened, then what was written)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        final = pathlib.Path(path)
        self.name = os.fspath(path)
        if final.name in ("", ".", ".."):
            raise LocalFileError(f"{self.name!r} does not name a file")
        self._final = final.name
        self._partial = partial_download_path(final).name
        try:
            self._dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalFileError(f"{final.parent}: {exc.strerror}") from None
        try:
            self._fd = self._open()
        except BaseException:
            os.close(self._dir_fd)
            raise
        self.size = os.fstat(self._fd).st_size
        self._sha256 = hashlib.sha256()
        self._hashed = False

    def _open(self) -> int:
        try:
            st = os.stat(self._final, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LocalFileError(f"{self.name}: {exc.strerror}") from None
        else:
            if stat.S_ISDIR(st.st_mode):
                raise LocalFileError(f"{self.name} is a directory")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._partial, flags, 0o666, dir_fd=self._dir_fd)
        except OSError as exc:
            raise _write_error(exc, self.name) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise LocalFileError(f"{self._partial} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LocalFileError(f"{self.name}: another download is writing it") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def path(self) -> pathlib.Path:
        """The partial file."""
        return pathlib.Path(self.name).with_name(self._partial)

    def prefix_sha256(self) -> bytes:
        """SHA-256 of what the partial file holds (read back from disk); sets :attr:`size`."""
        fd = self._check_open()
        hasher = hashlib.sha256()
        size = 0
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            while block := os.read(fd, _HASH_BLOCK):
                hasher.update(block)
                size += len(block)
        except OSError as exc:
            raise LocalFileError(f"{self._partial}: {exc.strerror}") from None
        self._sha256, self.size, self._hashed = hasher, size, True
        return hasher.digest()

    def restart(self) -> None:
        """Forget what the partial file holds: the download starts over from byte 0."""
        fd = self._check_open()
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as exc:
            raise _write_error(exc, self.name) from None
        self._sha256, self.size, self._hashed = hashlib.sha256(), 0, True

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` (after :meth:`prefix_sha256` or :meth:`restart`)."""
        fd = self._check_open()
        if not self._hashed:
            raise UsageError("hash the partial file (prefix_sha256) before appending to it")
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.write(fd, view)
                self._sha256.update(view[:written])
                self.size += written
                view = view[written:]
        except OSError as exc:
            raise _write_error(exc, self.name) from None

    def commit(self, *, size: int, expected_sha256: str) -> str:
        """Check the whole file's size and SHA-256, fsync, rename it to the destination and
        fsync the directory; return the SHA-256. A mismatch removes the partial file (its
        bytes are wrong, so a later attempt must start over) and raises ChecksumMismatch."""
        fd = self._check_open()
        digest = self._sha256.hexdigest()
        if not self._hashed or self.size != size or digest != expected_sha256.lower():
            self.discard()
            raise ChecksumMismatch(
                f"{_show(self.name)}: {self.size} bytes with SHA-256 {digest}, expected "
                f"{size} bytes with SHA-256 {expected_sha256}"
            )
        try:
            os.fsync(fd)
            os.replace(self._partial, self._final, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except IsADirectoryError:
            raise LocalFileError(f"{self.name} is a directory") from None
        except OSError as exc:
            raise _write_error(exc, self.name) from None
        try:
            sync_directory(self._dir_fd)
        except OSError as exc:
            raise _write_error(exc, self.name) from None
        finally:
            self._release()  # the partial file is the destination now
        return digest

    def discard(self) -> None:
        """Remove the partial file and close."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial, dir_fd=self._dir_fd)
        self._release()

    def close(self) -> None:
        """Release the partial file, keeping it for a later attempt unless it is empty (then
        there is nothing to resume). Idempotent."""
        if self._fd >= 0 and self.size == 0:
            with contextlib.suppress(OSError):
                os.unlink(self._partial, dir_fd=self._dir_fd)
        self._release()

    def _on_exit(self) -> None:
        self.close()

    def _release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # also releases the lock
            os.close(self._dir_fd)

    def _check_open(self) -> int:
        if self._fd < 0:
            raise UsageError(f"the partial download of {self.name!r} is closed")
        return self._fd


def sha256_prefix(file: BinaryIO, count: int) -> tuple[int, hashlib._Hash]:
    """Read up to ``count`` bytes of ``file`` from where it stands; return how many there were
    and a SHA-256 object over them (to be continued with the rest)."""
    hasher = hashlib.sha256()
    done = 0
    while done < count:
        block = file.read(min(_HASH_BLOCK, count - done))
        if not block:
            break
        hasher.update(block)
        done += len(block)
    return done, hasher


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a local file, lowercase hex, read in blocks."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise LocalFileError(f"{os.fspath(path)}: {exc.strerror}") from None

"""Reading user data with file:line:field errors, and one output discipline for every command.

- A writer never leaves a partial file behind: it writes to a temporary sibling named after its
  target and its process id, and renames it into place only when complete, so an interrupted run
  leaves either the old output or the new one. Temporaries of dead processes are removed the next
  time anything writes the same target.
- An output never replaces one of the command's inputs, nor an existing output unless asked to
  (`check_output`), and one writer at a time holds an output (`output_lock`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from embedforge.errors import ConfigError, InputError

# A line longer than this is refused before it is held in memory whole (a file without newlines
# would otherwise be read at once); EMBEDFORGE_MAX_LINE_MB raises it.
DEFAULT_MAX_LINE_MB = 64


def max_line_bytes() -> int:
    """The longest line a JSON-lines reader accepts, in bytes."""
    raw = os.environ.get("EMBEDFORGE_MAX_LINE_MB", "")
    try:
        return int(float(raw) * (1 << 20)) if raw.strip() else DEFAULT_MAX_LINE_MB << 20
    except ValueError:
        raise ConfigError(f"EMBEDFORGE_MAX_LINE_MB={raw!r}: expected a number of MiB") from None


def _existing_file(path: str) -> None:
    if not os.path.exists(path):
        raise InputError("file not found", path=path)
    if os.path.isdir(path):
        raise InputError("expected a file, got a folder", path=path)


def iter_raw_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line_number, bytes) of each line, a line longer than `max_line_bytes()` refused unread."""
    path = str(path)
    _existing_file(path)
    limit = max_line_bytes()
    with open(path, "rb") as fh:
        number = 0
        while raw := fh.readline(limit + 1):
            number += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise InputError(f"line longer than {limit / (1 << 20):g} MiB; split the text or raise "
                                 "EMBEDFORGE_MAX_LINE_MB", path=path, line=number)
            yield number, raw


def iter_text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line_number, text) of each line of a UTF-8 text file, bad bytes located."""
    for number, raw in iter_raw_lines(path):
        yield number, decode_line(raw, str(path), number)


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, JSON value) for each non-blank line; a bad line raises InputError."""
    path = str(path)
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})", path=path, line=number) from None
        except RecursionError:
            raise InputError("invalid JSON (nested too deeply)", path=path, line=number) from None


def decode_line(raw: bytes, path: str, line: int) -> str:
    """UTF-8 text of one line, or an InputError naming the file, the line and the bad byte.
    A byte-order mark opening the file is dropped (editors on Windows write one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                         path=path, line=line) from None
    return text[1:] if line == 1 and text.startswith("\ufeff") else text


def read_text_file(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file; bad bytes raise an InputError naming their line and column."""
    path = str(path)
    _existing_file(path)
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        raise InputError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start - line_start + 1})",
                         path=path, line=data.count(b"\n", 0, exc.start) + 1) from None
    return text.removeprefix("\ufeff")


def read_json_file(path: str | os.PathLike) -> Any:
    """A whole JSON file (results, manifests, trails); bad bytes or bad JSON name file and line."""
    path = str(path)
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})", path=path, line=exc.lineno) from None
    except RecursionError:
        raise InputError("invalid JSON (nested too deeply)", path=path) from None


def brief(value: Any, limit: int = 60) -> str:
    """repr of a value for an error message, cut to `limit` characters (a line may be megabytes)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    suffix = f"...({len(text)} chars)"
    return text[:max(limit - len(suffix), 8)] + suffix


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each non-blank line; a non-object line raises InputError."""
    for number, obj in iter_json_lines(path):
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, got {type(obj).__name__}", path=str(path), line=number)
        yield number, obj


def require_str(obj: dict, field: str, *, path: str, line: int, allow_empty: bool = False) -> str:
    """The string value of `field`, or an InputError naming file, line and field."""
    if field not in obj:
        raise InputError("missing field", path=path, line=line, field=field)
    value = obj[field]
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}", path=path, line=line, field=field)
    if not allow_empty and not value.strip():
        raise InputError("empty string", path=path, line=line, field=field)
    return value


def read_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Texts from a JSONL file whose rows are {"text": ...} objects or bare JSON strings."""
    texts = []
    for number, obj in iter_json_lines(path):
        if isinstance(obj, str):
            if not obj.strip():
                raise InputError("empty string", path=str(path), line=number)
            texts.append(obj)
        elif isinstance(obj, dict):
            texts.append(require_str(obj, field, path=str(path), line=number))
        else:
            raise InputError(f"expected a string or an object with {field!r}, got {type(obj).__name__}",
                             path=str(path), line=number)
    return texts


def temp_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}."


def clean_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove temporaries of `final` left by processes that no longer run (killed mid-write)."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for tmp in final.parent.glob(f".{glob_escape(final.name)}.*.tmp"):
        pid = tmp.name[len(final.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if tmp.name.endswith(".old.tmp") and not final.exists():
            os.replace(tmp, final)  # killed between the two renames of a replacement: the old output is back
            continue
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are meant to be shared like folders
    try:
        with disk_errors(final):
            yield Path(tmp)
            os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only when the block succeeds.

    An existing `path` is refused unless overwrite=True, in which case it is replaced only after
    the new folder is complete.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise InputError("output folder exists; pass --overwrite to replace it", path=str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes owner-only folders; outputs are meant to be shared
    try:
        with disk_errors(final, staging=tmp):
            yield tmp
            if final.exists():
                old = final.with_name(f"{temp_prefix(final)}old.tmp")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def disk_errors(target: str | os.PathLike, *, staging: Path | None = None) -> Iterator[None]:
    """A full disk or a read-only target becomes one line naming what was being written: the output,
    never the temporary (`staging`) it was being built in, which is gone by the time the user reads it."""
    try:
        yield
    except DiskError as exc:
        if staging is not None and exc.path and Path(exc.path).is_relative_to(staging):
            raise DiskError(exc.reason, path=str(target)) from None
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskError("no space left on the device while writing; free space and rerun to resume",
                            path=str(target)) from None
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise DiskError(f"cannot write here ({exc.strerror})", path=str(target)) from None
        raise


class DiskError(InputError):
    """A full disk or an unwritable target; `reason` is the message without the path."""

    def __init__(self, reason: str, *, path: str):
        self.reason = reason
        super().__init__(reason, path=path)


def check_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *,
                 overwrite: bool = False, resumable: bool = False) -> Path:
    """Refuse an output that is one of the inputs (or holds or lies inside one), and an existing
    output unless `overwrite` (or `resumable`: the command continues what is there)."""
    out = Path(output).resolve()
    for source in inputs:
        if source is None or not str(source) or ":" in str(source) and not os.path.exists(source):
            continue  # Hub ids and builtin: names are not files
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise InputError(f"output would write over the input {source}; choose another output",
                             path=str(output))
    if out.exists() and not (overwrite or resumable):
        if out.is_dir() and not any(out.iterdir()):
            return out
        raise InputError("output exists; pass --overwrite to replace it", path=str(output))
    return out


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold an advisory lock on `output` for the whole command; a second writer is refused.

    The lock file `.NAME.lock` beside the output records the holder's PID and host, and is removed
    when the command ends. The lock is an `fcntl.flock`, which the kernel releases when the holder
    dies, so a lock left by a killed process is never in the way; a writer that opened a lock file
    its previous holder was removing locks the current file instead (the inode check)."""
    import fcntl

    final = Path(output)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.parent / f".{final.name}.lock"
    while True:
        fh = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole command
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ConfigError(f"{final}: in use by {holder}; wait for it to finish or choose another output") from None
        try:
            current = os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        fh.close()
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still holding it: a waiting writer then finds the file gone and retries
        fh.close()


def publishable(folder: str | os.PathLike) -> None:
    """Folders 0755, files 0644: temporary folders and files are created owner-only, and a model
    folder is meant to be shared."""
    os.chmod(folder, 0o755)
    for path in Path(folder).rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically; returns the number written."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

"""Append-only JSONL shards that survive a kill at any instant.

Each finished passage is one line, or one group of lines when a call wrote several queries for
it, written with a single `write`, flushed and fsynced before the next. A kill can therefore
tear only the last line or group; reopening truncates a torn tail (a partial line, or a group
with fewer lines than it declares), so the passage is redone once: never duplicated, never lost.
The set of passage ids already in the shard is what a resumed run skips. A run that finishes
rewrites its shard in corpus order (`rewrite_in_order`), atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from embedforge.errors import ConfigError, InputError
from embedforge.io import atomic_path, read_json_file, write_json


def shard_name(prefix: str, shard_index: int, num_shards: int, suffix: str = "jsonl") -> str:
    return f"{prefix}-{shard_index:05d}-of-{num_shards:05d}.{suffix}"


def _torn_group(rows: list[dict[str, Any]]) -> int:
    """How many trailing rows are the start of a group cut short by a kill (0 if none).

    A group's rows carry `provenance.group = [index, size]` and are written by one `write`, so a
    kill leaves a prefix of them: the group is whole exactly when its last row is the last index.
    """
    group = rows[-1].get("provenance", {}).get("group") if rows else None
    if not group:
        return 0
    index, size = group
    return 0 if index == size - 1 else index + 1


def recover_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of a shard, after cutting a torn final line or group; returns (rows, bytes cut)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished write
    # split on "\n" only: JSON written with ensure_ascii=False may hold U+2028, which splitlines() splits on
    lines = data[:keep].split(b"\n")[:-1]
    rows, sizes = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
            sizes.append(len(line) + 1)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines):  # a torn last record whose newline reached the disk
                keep -= len(line) + 1
                break
            raise InputError(
                "corrupt record in the middle of a shard; it was not written by embedforge",
                path=str(path),
                line=number,
            ) from None
    torn = _torn_group(rows)
    if torn:
        keep -= sum(sizes[-torn:])
        rows = rows[:-torn]
    cut = len(data) - keep
    if cut:
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return rows, cut


def read_finished_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a shard another process may be appending to: read-only, a partial last line ignored."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows = []
    for number, line in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError("corrupt record in a shard; it was not written by embedforge", path=str(path),
                                 line=number) from None
    return rows


class AppendOnlyShard:
    """One shard file opened for appending, recovered first."""

    def __init__(self, path: Path, fsync: bool = True):
        self.path = path
        self.rows, self.recovered_bytes = recover_jsonl(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held across appends; see close)
        self._fsync = fsync

    def append(self, record: dict[str, Any]) -> None:
        self.append_group([record])

    def append_group(self, records: list[dict[str, Any]]) -> None:
        """Several rows in one write (tag them with `provenance.group`, see `_torn_group`)."""
        self._fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def rewrite_in_order(path: Path, position: dict[str, int]) -> bool:
    """Rewrite a finished shard with its rows in corpus order (a group keeps its own order), so the
    file, and every stage after it, no longer depends on the order the replies arrived in.
    Returns whether anything moved; the rewrite is atomic."""
    rows, _ = recover_jsonl(path)
    last = len(position)
    ordered = sorted(rows, key=lambda r: (position.get(r["passage_id"], last), r["passage_id"]))
    if ordered == rows:
        return False
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
        fh.flush()
        os.fsync(fh.fileno())
    return True


LAYOUT_FILE = "layout.json"
_SHARD_FILE = re.compile(r"^(?:pairs|failed|manifest)-\d{5}-of-(\d{5})\.jsonl?$")


def layouts_in(folder: Path) -> set[int]:
    """The shard counts (`num_shards`) that files in a synth output folder were written under."""
    found = {int(m[1]) for p in folder.iterdir() if (m := _SHARD_FILE.match(p.name))} if folder.is_dir() else set()
    marker = folder / LAYOUT_FILE
    if marker.is_file():
        recorded = read_json_file(marker)
        if not isinstance(recorded, dict) or not isinstance(recorded.get("num_shards"), int):
            raise InputError("expected {\"num_shards\": N}", path=str(marker), field="num_shards")
        found.add(recorded["num_shards"])
    return found


def claim_layout(folder: Path, num_shards: int) -> None:
    """Record the shard layout of a synth output folder, or refuse a different one.

    Shards of two layouts would overlap (a passage belongs to one shard of each), and per-shard
    locks cannot stop two layouts from generating the same passage at once; readers of the folder
    take every `pairs-*` file. The check and the record happen under a lock that each starting
    shard holds for a moment (it waits, never refuses), so shards launched together all pass."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{LAYOUT_FILE}.lock", "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        other = sorted(layouts_in(folder) - {num_shards})
        if other:
            n = other[0]
            raise ConfigError(
                f"{folder}: holds the shards of a {n}-shard layout (*-of-{n:05d}.*), not {num_shards}; resume "
                f"with --num-shards {n}, or write the new layout to another output folder"
            )
        if not (folder / LAYOUT_FILE).exists():
            write_json(folder / LAYOUT_FILE, {"num_shards": num_shards})

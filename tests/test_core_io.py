"""The output discipline every command shares: no write over an input, no silent overwrite, one
writer at a time, no partial output, temporaries of killed writers cleaned; located UTF-8 errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from embedforge.errors import ConfigError, InputError
from embedforge.io import (
    atomic_dir,
    atomic_path,
    check_output,
    clean_stale_temporaries,
    iter_jsonl,
    output_lock,
    read_texts,
)


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(InputError, match=r"b.jsonl:2: not valid UTF-8 \(byte 0xff at column 11\)"):
        list(iter_jsonl(path))
    with pytest.raises(InputError, match="b.jsonl:2: not valid UTF-8"):
        read_texts(path)


def test_check_output_refuses_inputs_and_existing_outputs(tmp_path):
    data = tmp_path / "beir"
    data.mkdir()
    (data / "corpus.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="write over the input"):
        check_output(data / "corpus.jsonl", [data])  # inside an input folder
    with pytest.raises(InputError, match="write over the input"):
        check_output(data, [data / "corpus.jsonl"])  # a folder holding an input
    with pytest.raises(InputError, match="write over the input"):
        check_output(tmp_path / "t.jsonl", [tmp_path / "t.jsonl"], overwrite=True)
    existing = tmp_path / "out.npy"
    existing.write_text("x")
    with pytest.raises(InputError, match="output exists; pass --overwrite"):
        check_output(existing, [data])
    assert check_output(existing, [data], overwrite=True) == existing.resolve()
    assert check_output(tmp_path / "new", ["Qwen/Qwen3-Embedding-0.6B", "builtin:minilm"]).name == "new"


def test_second_writer_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    out = tmp_path / "run"
    with output_lock(out):
        script = textwrap.dedent(f"""
            from embedforge.io import output_lock
            with output_lock({str(out)!r}):
                pass
        """)
        held = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
        assert held.returncode != 0 and "in use by pid" in held.stderr
    # a holder killed with SIGKILL: the kernel drops its flock, the next writer proceeds
    killer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from embedforge.io import output_lock
        with output_lock({str(out)!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)])
    killer.wait()
    with output_lock(out):
        pass


def test_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "w").write_text("new")
        raise RuntimeError("killed")
    assert (target / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(InputError, match="exists"), atomic_dir(target):
        pass


def test_temporaries_of_killed_writers_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "pairs.jsonl"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    pid = int(dead.stdout)
    stale_file = tmp_path / f".pairs.jsonl.{pid}.abc.tmp"
    stale_file.write_text("partial")
    stale_dir = tmp_path / f".pairs.jsonl.{pid}.def.tmp"
    stale_dir.mkdir()
    live = tmp_path / f".pairs.jsonl.{os.getpid()}.ghi.tmp"  # a writer still running: kept
    live.write_text("in progress")
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert not stale_file.exists() and not stale_dir.exists() and live.exists()
    assert target.read_text() == "done" and oct(target.stat().st_mode & 0o777) == "0o644"


def test_a_kill_between_the_two_renames_restores_the_old_output(tmp_path):
    target = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    old = tmp_path / f".model.{int(dead.stdout)}.old.tmp"
    old.mkdir()
    (old / "w").write_text("old")
    clean_stale_temporaries(target)
    assert (target / "w").read_text() == "old" and not old.exists()


def test_lock_error_is_a_config_error(tmp_path):
    with output_lock(tmp_path / "x"), pytest.raises(ConfigError), output_lock(tmp_path / "x"):
        pass


def test_a_line_longer_than_the_cap_is_refused_and_one_at_the_cap_is_read(tmp_path, monkeypatch):
    from embedforge.io import max_line_bytes

    monkeypatch.setenv("EMBEDFORGE_MAX_LINE_MB", str(1024 / (1 << 20)))  # 1 KiB
    limit = max_line_bytes()
    assert limit == 1024
    at_cap = '{"text": "' + "a" * (limit - 12) + '"}'
    assert len(at_cap) == limit
    path = tmp_path / "t.jsonl"
    path.write_text(at_cap + "\n" + at_cap + "b\n")
    rows = iter_jsonl(path)
    assert next(rows)[1]["text"] == "a" * (limit - 12)
    with pytest.raises(InputError, match=r"t.jsonl:2: line longer than 0.000976562 MiB"):
        next(rows)


def test_whole_file_readers_locate_bad_bytes_and_drop_a_byte_order_mark(tmp_path):
    from embedforge.io import brief, read_json_file, read_text_file

    text = tmp_path / "doc.txt"
    text.write_bytes(b"one\ntwo\nth\x93ree\n")
    with pytest.raises(InputError, match=r"doc.txt:3: not valid UTF-8 \(byte 0x93 at column 3\)"):
        read_text_file(text)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert read_json_file(bom) == {"a": 1}
    broken = tmp_path / "r.json"
    broken.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(InputError, match=r"r.json:3: invalid JSON \(Expecting property name"):
        read_json_file(broken)
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"text": "x"}\n')
    assert read_texts(lines) == ["x"]
    assert len(brief(["x" * 10_000])) <= 60 and brief("ok") == "'ok'"

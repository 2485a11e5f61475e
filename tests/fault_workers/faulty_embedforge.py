"""`embedforge` with one planted fault: the process SIGKILLs itself at a chosen point.

    python tests/fault_workers/faulty_embedforge.py run RECIPE.yaml --workdir W

runs `embedforge.cli.main` exactly as the `embedforge` command does; EMBEDFORGE_TEST_KILL (set only
by the tests) chooses the point: `KIND:N[:REGEX]` kills at the Nth time (counted from 1 in this
process) the point KIND is reached with a path matching REGEX (searched in the absolute path; any
path when absent). Deterministic, unlike a kill after a sleep:

- `append`: before the Nth synthetic row group is appended to a synth shard (nothing of it written);
- `torn-append`: in the middle of the Nth append: half of its bytes reach the disk, then the kill;
- `safetensors`: inside the Nth safetensors file write (transformers, accelerate and the trainer all
  write through `safetensors.torch.serialize_file`): the file is written, cut to half, then the kill;
- `merge-tensor`: after the Nth tensor the streaming merge writer appended to its output;
- `st-config`: before the sentence-transformers files (modules.json, pooling) of the Nth embedder
  folder are written, its weights and tokenizer already there;
- `metrics`: before the Nth training metrics line (the optimizer step of that line is done);
- `json`: before the Nth JSON file whose path matches is written atomically (`embedforge.io.write_json`
  as the pipeline, the trainer and the checkpoint writer call it);
- `rename`: before the Nth `os.replace` whose destination matches (a complete temporary about to
  take its final name).
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys

KILL_ENV = "EMBEDFORGE_TEST_KILL"


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Trigger:
    def __init__(self, spec: str):
        kind, n, *pattern = spec.split(":", 2)
        self.kind, self.n, self.count = kind, int(n), 0
        self.pattern = re.compile(pattern[0]) if pattern else None

    def hit(self, path: object = "") -> bool:
        """Whether this call is the Nth matching one."""
        if self.pattern is not None and not self.pattern.search(os.path.abspath(str(path))):
            return False
        self.count += 1
        return self.count == self.n


def install(spec: str) -> None:
    trigger = Trigger(spec)
    kind = trigger.kind
    if kind in ("append", "torn-append"):
        from embedforge.data_synth.shards import AppendOnlyShard

        real_append = AppendOnlyShard.append_group

        def append_group(self, records):
            if trigger.hit(self.path):
                if kind == "torn-append":
                    import json

                    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
                    with open(self.path, "ab") as fh:
                        fh.write(data[: len(data) // 2])
                        fh.flush()
                        os.fsync(fh.fileno())
                die()
            return real_append(self, records)

        AppendOnlyShard.append_group = append_group
    elif kind == "safetensors":
        import safetensors.torch as st

        real_serialize = st.serialize_file

        def serialize_file(tensors, filename, *args, **kwargs):
            result = real_serialize(tensors, filename, *args, **kwargs)
            if trigger.hit(filename):
                size = os.path.getsize(filename)
                with open(filename, "r+b") as fh:
                    fh.truncate(size // 2)
                    fh.flush()
                    os.fsync(fh.fileno())
                die()
            return result

        st.serialize_file = serialize_file
    elif kind == "merge-tensor":
        from embedforge.merge.stream import ShardedWriter

        real_write = ShardedWriter.write

        def write(self, name, tensor):
            real_write(self, name, tensor)
            if trigger.hit(getattr(self, "folder", "")):
                die()

        ShardedWriter.write = write
    elif kind == "st-config":
        embedder = importlib.import_module("embedforge.embedder")

        real_config = embedder.write_sentence_transformers_config

        def write_sentence_transformers_config(folder, *args, **kwargs):
            if trigger.hit(folder):
                die()
            return real_config(folder, *args, **kwargs)

        embedder.write_sentence_transformers_config = write_sentence_transformers_config
    elif kind == "metrics":
        trainer = importlib.import_module("embedforge.train.trainer")

        real_line = trainer._append_line

        def append_line(path, record):
            if trigger.hit(path):
                die()
            return real_line(path, record)

        trainer._append_line = append_line
    elif kind == "json":
        io = importlib.import_module("embedforge.io")

        real_json = io.write_json

        def write_json(path, obj):
            if trigger.hit(path):
                die()
            return real_json(path, obj)

        io.write_json = write_json
        for name in ("embedforge.pipeline", "embedforge.train.checkpoint", "embedforge.train.trainer"):
            module = importlib.import_module(name)
            module.write_json = write_json
    elif kind == "rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if trigger.hit(dst):
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        raise SystemExit(f"{KILL_ENV}: unknown kind {kind!r}")


def main() -> int:
    spec = os.environ.get(KILL_ENV, "")
    if spec:
        install(spec)
    import torch

    torch.set_num_threads(1)
    from embedforge.cli import main as embedforge_main

    return embedforge_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

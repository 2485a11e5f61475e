"""`embedforge`: one entry point; each subcommand parses flags and calls a stage function.

Stage modules register their own subcommands (`register(subparsers)`), importing torch and
transformers only inside their handlers, so `embedforge --help` answers at once.

One error discipline for every command: a failure the user can act on (bad bytes or JSON, a bad
setting, a full disk, a missing permission, corrupt weights, an unreachable server) is printed as
one line naming the file, line and field or the resource, with exit status 2; `--debug` prints the
traceback as well. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback

from embedforge import __version__
from embedforge.errors import EmbedforgeError

# (module, required): the core commands live here; each stage adds its own.
STAGE_CLI_MODULES = (
    "embedforge.core_cli",
    "embedforge.data_synth.cli",
    "embedforge.train.cli",
    "embedforge.merge.cli",
    "embedforge.export.cli",
    "embedforge.eval.cli",
    "embedforge.pipeline_cli",
)
USER_ERROR = 2
_DEBUG_HELP = "on an error, print the traceback too (EMBEDFORGE_DEBUG=1 does the same)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedforge",
        description="Build Qwen3-style embedders and rerankers: synth -> filter -> mine -> train -> merge -> "
        "export -> eval.",
    )
    parser.add_argument("--version", action="version", version=f"embedforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not built yet: skip it, never hide a broken import inside it
                continue
            raise
        module.register(subparsers)
    for sub in subparsers.choices.values():  # `embedforge CMD ... --debug` works as well as `embedforge --debug CMD`
        if "--debug" not in sub._option_string_actions:
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


_NETWORK_MODULES = ("httpx", "httpx2", "requests", "urllib3", "aiohttp", "http", "socket", "ssl")


def user_error(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can act on, or None for a bug."""
    if isinstance(exc, EmbedforgeError):
        return str(exc)
    names = {f"{c.__module__.split('.')[0]}.{c.__name__}" for c in type(exc).__mro__}
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if any(n.endswith(".SafetensorError") for n in names):
        return f"corrupt or unreadable safetensors file ({first})"
    if any(n.endswith(".OutOfMemoryError") for n in names) or isinstance(exc, MemoryError):
        return f"out of memory ({first}); lower the batch size or the maximum length"
    if isinstance(exc, OSError):
        return _os_error(exc, first, names)
    if any(n.split(".")[0] in _NETWORK_MODULES and n.endswith(("Error", "Exception", "Timeout")) for n in names):
        return f"network: {type(exc).__name__}: {first}"
    return None


def _os_error(exc: OSError, first: str, names: set[str]) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}no space left on the device; free space and rerun to resume"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}cannot write or read here ({exc.strerror})"
    if exc.errno == errno.ENOENT:
        return f"{where}no such file or folder"
    if exc.strerror:
        return f"{where}{exc.strerror}"
    if any(n.split(".")[0] in _NETWORK_MODULES or "HTTP" in n for n in names):
        return f"network: {type(exc).__name__}: {first}"
    return f"{type(exc).__name__}: {first}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = args.debug or os.environ.get("EMBEDFORGE_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"embedforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"embedforge {args.command}: error: {message}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())

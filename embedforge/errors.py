"""The errors embedforge raises for things a user can fix. The CLI prints these as one line and
exits non-zero; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class EmbedforgeError(Exception):
    """Base class: a problem with the user's input, files or configuration."""


class InputError(EmbedforgeError, ValueError):
    """Bad input data, located as precisely as possible: file, line and field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            if field is not None:
                where += f": field {field!r}"
            where += ": "
        elif field is not None:
            where = f"field {field!r}: "
        super().__init__(where + message)


class ModelLoadError(EmbedforgeError, OSError):
    """A model or tokenizer could not be found or loaded."""


class ConfigError(EmbedforgeError, ValueError):
    """A recipe or configuration value is unknown, mistyped or inconsistent."""


class PushError(EmbedforgeError):
    """A Hub push that failed after the export was written: the folder stands, the push can be rerun."""

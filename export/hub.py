"""Push a finished export folder to the Hugging Face Hub with `huggingface_hub`.

The token comes from the caller, `HF_TOKEN`, or `hf auth login` (huggingface_hub's `get_token`
reads both); it is handed to `HfApi` and never printed or logged. Only a complete folder is
pushed: the export writes and checks it first, then calls `push_folder`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from embedforge.errors import ConfigError, InputError, PushError

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id or ""):
        raise ConfigError(f"--push-to-hub {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def resolve_token(token: str | None = None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def files_to_upload(folder: str | os.PathLike) -> list[str]:
    """The relative paths `upload_folder` would send (hidden files and folders excluded)."""
    root = Path(folder)
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload model exported with embedforge",
) -> str:
    """Create the repo (and branch) if needed and upload `folder`; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").exists() or not (folder / "config.json").exists():
        raise InputError("not a finished export (README.md and config.json expected)", path=str(folder))
    check_repo_id(repo_id)
    api = HfApi(token=resolve_token(token))
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        logger.info("uploading %d files from %s to %s%s", len(files_to_upload(folder)), folder, repo_id,
                    f"@{revision}" if revision else "")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=[".*", "**/.*"],
        )
    except Exception as exc:
        if not _network_or_http(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PushError(f"push to {repo_id} failed ({type(exc).__name__}: {first}); the export in {folder} is "
                        f"complete: rerun the push with `hf upload {repo_id} {folder}`") from exc
    return str(getattr(commit, "commit_url", commit))


def _network_or_http(exc: BaseException) -> bool:
    """Refused, reset or timed-out connections and HTTP error statuses, whichever HTTP client
    huggingface_hub uses (requests, httpx or httpx2): the push can be retried, the export stands."""
    modules = {c.__module__.split(".")[0] for c in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(modules & {"httpx", "httpx2", "requests", "urllib3", "huggingface_hub"})

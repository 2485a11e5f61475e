"""Resumable checkpoints that are either complete or ignored, and never a folder we did not write.

A checkpoint is written by `accelerator.save_state` (model or adapter weights, optimizer, scheduler,
every process's RNG states; DeepSpeed and FSDP shards through their own writers) into
`checkpoint-N.tmp`, with (by default) a loadable `model/` folder beside it, then the trainer state
(step, sampler cursors, best metric) and a `COMPLETE` marker are added and the folder is renamed to
`checkpoint-N`. A rename is atomic, so a process killed at any moment leaves either no
`checkpoint-N` or a complete one.

Ownership: `checkpoint-N.tmp` comes into existence already holding a `WRITING` marker (it is
prepared under a temporary name and renamed), so a `.tmp` folder with the marker is a write of ours
that was interrupted, and is removed at the next start. A `checkpoint-N` or `checkpoint-N.tmp`
without our markers was put there by someone else: it is never deleted, and a run refuses to start
beside it (its step would collide with ours). Old checkpoints beyond `save_total_limit` are renamed to
a hidden temporary name before they are deleted, so a kill during the deletion never leaves a
half-deleted `checkpoint-N` that looks foreign or, worse, complete.

With LoRA (some parameters frozen) only the trainable parameters are written, outside DeepSpeed and
FSDP which own their format: the frozen base is the recipe's model and need not be copied at every
save, and resuming restores exactly the adapters.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from embedforge.errors import EmbedforgeError, InputError
from embedforge.io import clean_stale_temporaries, disk_errors, read_json_file, temp_prefix, write_json

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"
WRITING_MARKER = "WRITING"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable_parameters.safetensors"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_PARTIAL = re.compile(rf"^{PREFIX}(\d+)\.tmp$")
# Our hidden temporaries (embedforge.io naming): `.checkpoint-N[.tmp].PID.<anything>.tmp`, a folder
# being prepared or being deleted; group 1 is the name they stand for.
_HIDDEN = re.compile(rf"^\.({PREFIX}\d+(?:\.tmp)?)\.\d+\..*\.tmp$")


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / COMPLETE_MARKER).exists() and (folder / STATE_FILE).exists()


def _is_partial(folder: Path) -> bool:
    return folder.is_dir() and (folder / WRITING_MARKER).exists()


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and _is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def foreign_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` and `checkpoint-N.tmp` entries this module did not write (no COMPLETE marker,
    no WRITING marker): a run must not start beside them, since it would write over them."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    foreign = []
    for child in sorted(root.iterdir()):
        ours = _is_complete(child) if _NAME.match(child.name) else _is_partial(child)
        if (_NAME.match(child.name) or _PARTIAL.match(child.name)) and not ours:
            foreign.append(child)
    return foreign


def remove_incomplete(output_dir: str | os.PathLike) -> list[Path]:
    """Delete what interrupted writes of ours left: `checkpoint-N.tmp` folders holding our WRITING
    marker, and our hidden temporaries whose process is gone. Returns what was removed."""
    root = Path(output_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for child in list(root.iterdir()):
        hidden = _HIDDEN.match(child.name)
        if hidden:
            removed += clean_stale_temporaries(root / hidden.group(1))  # only those of dead processes
        elif _PARTIAL.match(child.name) and _is_partial(child):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if removed:
        logger.warning("removed interrupted checkpoint write(s): %s", ", ".join(p.name for p in removed))
    return removed


def new_partial(output_dir: str | os.PathLike, step: int) -> Path:
    """Create `checkpoint-{step}.tmp` holding the WRITING marker from its first moment (prepared
    under a hidden name, then renamed); an earlier interrupted write of the same step is removed."""
    root = Path(output_dir)
    tmp = root / f"{PREFIX}{step}.tmp"
    if tmp.exists():
        if not _is_partial(tmp):
            raise InputError("not a checkpoint folder embedforge wrote; move it away", path=str(tmp))
        shutil.rmtree(tmp)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(tmp), suffix=".tmp", dir=root))
    (staging / WRITING_MARKER).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n", encoding="utf-8")
    os.replace(staging, tmp)
    return tmp


def _delete(folder: Path) -> None:
    """Rename out of sight, then delete: a kill midway leaves a hidden temporary, never a husk."""
    doomed = folder.with_name(f"{temp_prefix(folder)}deleted.tmp")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def read_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / COMPLETE_MARKER).exists():
        raise InputError("not a complete checkpoint (no COMPLETE marker)", path=str(folder))
    return read_json_file(folder / STATE_FILE)


def _uses_own_format(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def register_trainable_only_hooks(accelerator, model: torch.nn.Module) -> bool:
    """Make `save_state`/`load_state` write and read only the trainable parameters of `model` when
    some are frozen (LoRA). Returns whether the hooks were installed."""
    unwrapped = accelerator.unwrap_model(model)
    if _uses_own_format(accelerator) or all(p.requires_grad for p in unwrapped.parameters()):
        return False
    from safetensors.torch import load_file, save_file

    def trainable_names(module: torch.nn.Module) -> list[str]:
        return [name for name, p in module.named_parameters() if p.requires_grad]

    def save_hook(models, weights, output_dir):
        index = next(i for i, m in enumerate(models) if accelerator.unwrap_model(m) is unwrapped)
        weights.pop(index)  # accelerate would otherwise write the whole model, frozen base included
        params = dict(unwrapped.named_parameters())
        tensors = {name: params[name].detach().contiguous().cpu() for name in trainable_names(unwrapped)}
        if accelerator.is_main_process:
            save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE))

    def load_hook(models, input_dir):
        index = next(i for i, m in enumerate(models) if accelerator.unwrap_model(m) is unwrapped)
        models.pop(index)
        path = os.path.join(input_dir, TRAINABLE_FILE)
        if not os.path.exists(path):
            raise InputError(f"no {TRAINABLE_FILE} in the checkpoint (written by a full fine-tuning run?)",
                             path=input_dir)
        tensors = load_file(path)
        expected = set(trainable_names(unwrapped))
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
            raise InputError(f"checkpoint parameters do not match this model (missing {missing}, unexpected {extra}); "
                             "was it written with another LoRA configuration?", path=input_dir)
        params = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return True


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, trainer_state: dict[str, Any],
                    keep: int, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically on every process (collective), then keep the
    newest `keep` checkpoints. `write_extra(tmp_folder)` is called on every process after the state
    is saved and before the folder is marked complete. A full disk is one line naming the folder;
    the partial folder is removed."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f"{PREFIX}{step}.tmp"
    try:
        with disk_errors(tmp):
            if accelerator.is_main_process:
                new_partial(root, step)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            if write_extra is not None:
                write_extra(tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_json(tmp / STATE_FILE, trainer_state)
                (tmp / COMPLETE_MARKER).write_text(f"step {step}\n", encoding="utf-8")
                (tmp / WRITING_MARKER).unlink()
                if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
                    _delete(final)
                os.replace(tmp, final)
    except BaseException:
        if accelerator.is_main_process and (tmp / WRITING_MARKER).exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for _, folder in complete_checkpoints(root)[:-keep]:
            _delete(folder)
    accelerator.wait_for_everyone()
    return final


# What reading a damaged checkpoint raises inside torch.load / safetensors / the optimizer's
# load_state_dict (truncated or overwritten files, a state from another optimizer).
_DAMAGED = (RuntimeError, ValueError, EOFError, KeyError, OSError, pickle.UnpicklingError)


def load_checkpoint(accelerator, folder: str | os.PathLike) -> dict[str, Any]:
    """Restore model/adapters, optimizer, scheduler and RNG from a complete checkpoint (collective);
    returns its trainer state. A damaged checkpoint is one line naming it."""
    state = read_trainer_state(folder)
    try:
        accelerator.load_state(str(folder))
    except EmbedforgeError:
        raise
    except Exception as exc:
        damaged = isinstance(exc, _DAMAGED) or type(exc).__name__ == "SafetensorError"
        if not damaged:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(f"cannot restore this checkpoint ({type(exc).__name__}: {first}); delete it to resume "
                         "from the one before, or start afresh with another output_dir", path=str(folder)) from None
    return state

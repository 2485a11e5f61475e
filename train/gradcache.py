"""GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): the gradient of a contrastive loss over a large batch, with the memory of one chunk.

  1. embed every chunk without gradient (activations freed at once);
  2. compute the full-batch loss on leaf copies of those embeddings (Matryoshka widths, cross-device
     gather and all) and take d loss / d embeddings;
  3. re-embed each chunk WITH gradient and backpropagate `(embeddings * cached_grad).sum()`, whose
     parameter gradient is exactly the chunk's share of d loss / d parameters.
Step 3 replays the random state captured before step 1 for that chunk, so dropout draws the same
masks twice and the result equals the plain loss computed chunk by chunk with gradient.

Because the loss sees plain tensors, Matryoshka and the gather compose with it unchanged: the
cached gradient is already the sum over widths and over every rank's loss, so a wide batch over
several processes costs no more memory than one chunk and loses no gradient path.

Distributed data parallel: every chunk's backward would all-reduce the parameter gradients. Pass
`no_sync` (e.g. `model.no_sync` or `lambda: accelerator.no_sync(model)`): every chunk but the last
then runs inside it, and the last chunk's backward synchronises the accumulated gradients once.
The forward must be inside the context as well (DDP decides at forward time), which is why the
hook wraps the whole re-forward + backward. Under gradient accumulation (accelerate's
`accumulate`), the outer context already suppresses sync on non-final micro-steps; nesting is safe.
DeepSpeed's engine counts every backward as a micro-step and steps the optimizer at an accumulation
boundary: the trainer's `no_sync` (`Trainer.accumulating`) also marks every chunk but the last as a
non-boundary micro-step, so ZeRO runs one optimizer step per global batch
(tests/test_train_deepspeed.py trains to the one-process weights that way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from embedforge.train.losses import LossOutput

Tensor = torch.Tensor


class RandomState:
    """The CPU and current-CUDA-device random states at construction; `replay()` runs a block from
    them and afterwards restores whatever the states were before the block.

    Captures CPU and, when CUDA is initialised, the current CUDA device (where the model runs);
    other accelerator back-ends are not captured."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_devices: list[int] = []
        self.cuda_states: list[Tensor] = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()
            self.cuda_devices, self.cuda_states = [device], [torch.cuda.get_rng_state(device)]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda_states):
                torch.cuda.set_rng_state(state, device)
            yield


def gradcache_step(
    embed_fn: Callable[[Any], Tensor],
    chunks: Mapping[str, Sequence[Any]],
    loss_fn: Callable[[dict[str, Tensor]], LossOutput | Tensor],
    *,
    backward_fn: Callable[[Tensor], None] | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> LossOutput:
    """One GradCache forward/backward: leaves parameter gradients in `.grad`, returns the loss.

    Args:
        embed_fn: `embed_fn(features) -> Tensor[n, D]` for one chunk (e.g. `embedder.embed`); the
            same function for every role. It must be deterministic given the random state.
        chunks: role -> list of chunk features, e.g. {"q": [...], "d_pos": [...], "d_neg": [...]}.
            A role's embeddings are its chunks' outputs concatenated in order; every role needs at
            least one chunk (leave a role out instead).
        loss_fn: `loss_fn({role: Tensor[rows, D]}) -> LossOutput | Tensor` on the full batch. It may
            gather across ranks, apply Matryoshka and scale by `GatheredBatch.loss_scale`; it must not
            own trainable parameters (their gradient would bypass `backward_fn`).
        backward_fn: how to backpropagate each chunk's surrogate loss; default `Tensor.backward`.
            Pass `accelerator.backward` so that gradient-accumulation division and fp16 loss scaling
            apply (both are linear, so applying them per chunk is exact).
        no_sync: context factory that suppresses DDP gradient sync (see the module docstring).

    Returns:
        LossOutput with the loss detached and the stats of `loss_fn`.

    The result equals computing `loss_fn` on embeddings made chunk by chunk with gradient, starting
    from the same random state; the random state afterwards is also the same.
    """
    backward_fn = backward_fn or Tensor.backward
    cached: dict[str, Tensor] = {}
    replays: list[tuple[str, Any, RandomState, int, int]] = []  # role, features, state, row start, row stop
    for role, role_chunks in chunks.items():
        if not role_chunks:
            raise ValueError(f"role {role!r} has no chunks; leave the role out instead")
        parts: list[Tensor] = []
        start = 0
        for features in role_chunks:
            state = RandomState()
            with torch.no_grad():
                parts.append(embed_fn(features))
            replays.append((role, features, state, start, start + parts[-1].shape[0]))
            start += parts[-1].shape[0]
        cached[role] = torch.cat(parts).detach().requires_grad_()
        del parts

    out = loss_fn(cached)
    out = out if isinstance(out, LossOutput) else LossOutput(out)
    roles = list(cached)
    grads = dict(zip(roles, torch.autograd.grad(out.loss, [cached[r] for r in roles], allow_unused=True)))
    del cached
    # A role the loss ignores has no gradient to push into the model: skip its chunks.
    replays = [item for item in replays if grads[item[0]] is not None]

    for index, (role, features, state, start, stop) in enumerate(replays):
        last = index == len(replays) - 1
        sync_context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_context, state.replay():
            embeddings = embed_fn(features)
            surrogate = (embeddings * grads[role][start:stop].to(embeddings.dtype)).sum()
            backward_fn(surrogate)
    return LossOutput(out.loss.detach(), out.stats)

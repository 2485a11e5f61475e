"""Merge arithmetic as small pure functions: slerp, lerp, weighted linear and spherical averages,
with or without a common base whose deltas are merged instead of the raw weights.

Every method here is a linear combination of the input tensors, `sum_i c_i * v_i`; only the
coefficients differ. So the work splits into three steps a test can check separately:

1. `gram_matrix`: the dot products between the inputs (or between their deltas from a base),
2. a coefficient rule (`slerp_coefficients`, `spherical_coefficients`, `normalize_weights`), which
   is scalar math on that small N x N matrix,
3. `combine`: the weighted sum, cast back to the caller's dtype on the caller's device.

Steps 1 and 3 walk the tensors in fixed-size chunks of the flattened data, so a merge needs the
input tensors plus one output tensor and a few chunks of scratch, never float32 copies of whole
tensors. Arithmetic runs in float32 for half-precision inputs and in float64 for float32/float64
inputs: the extra precision makes t=0, t=1 and the merge of identical tensors return the inputs
bit for bit after the cast back.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from embedforge.merge.weights import DOT_THRESHOLD, normalize_weights

EPS = 1e-8
"""Norms below this make the angle undefined; such tensors are interpolated linearly."""

CHUNK_ELEMENTS = 1 << 22
"""Elements per chunk of the flattened tensors (16 MiB of float32 scratch per input)."""


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float32/float64, else float32 (for bf16/fp16 inputs)."""
    return torch.float64 if any(d in (torch.float32, torch.float64) for d in dtypes) else torch.float32


def _check_same_shape(tensors: Sequence[torch.Tensor]) -> None:
    if not tensors:
        raise ValueError("need at least one tensor")
    shape = tensors[0].shape
    for i, tensor in enumerate(tensors[1:], start=1):
        if tensor.shape != shape:
            raise ValueError(f"tensor {i} has shape {tuple(tensor.shape)}, tensor 0 has {tuple(shape)}")


def _chunks(numel: int) -> range:
    return range(0, numel, CHUNK_ELEMENTS)


def gram_matrix(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """G[i, j] = <v_i - base, v_j - base> over the flattened tensors (base omitted: raw tensors).

    Returned as a float64 CPU matrix; the tensors are read chunk by chunk.
    """
    group = list(tensors) + ([base] if base is not None else [])
    _check_same_shape(group)
    dtype = compute_dtype(*(t.dtype for t in group))
    flat = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    n = len(flat)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in _chunks(flat[0].numel()):
        end = start + CHUNK_ELEMENTS
        parts = [f[start:end].to(dtype) for f in flat]
        if flat_base is not None:
            b = flat_base[start:end].to(dtype)
            parts = [p - b for p in parts]
        stacked = torch.stack(parts)
        gram += (stacked @ stacked.T).to(device="cpu", dtype=torch.float64)
    return gram


def cosine_matrix(gram: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cosines between the inputs from their Gram matrix; 0 where a norm is below eps."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    ok = norms > eps
    safe = torch.where(ok, norms, torch.ones_like(norms))
    cos = (gram / safe[:, None] / safe[None, :]).clamp(-1.0, 1.0)
    cos = torch.where(ok[:, None] & ok[None, :], cos, torch.zeros_like(cos))
    return cos


def slerp_coefficients(
    t: float, gram: torch.Tensor, *, eps: float = EPS, dot_threshold: float = DOT_THRESHOLD
) -> tuple[list[float], bool]:
    """The sine weights (s0, s1) of slerp from v0 to v1, and whether it fell back to lerp.

    theta is the angle between the unit-normalised inputs; the weights sin((1-t) theta)/sin(theta)
    and sin(t theta)/sin(theta) are then applied to the ORIGINAL tensors (mergekit's convention),
    so magnitudes are carried along, not forced onto the unit sphere. When |cos theta| exceeds
    dot_threshold, or either norm is below eps, the angle is meaningless and (1-t, t) is returned.
    """
    if gram.shape != (2, 2):
        raise ValueError(f"slerp takes two tensors, got a Gram matrix of shape {tuple(gram.shape)}")
    norms = gram.diagonal().clamp_min(0).sqrt()
    if bool((norms <= eps).any()):
        return [1.0 - t, t], True
    dot = float(cosine_matrix(gram, eps)[0, 1])
    if abs(dot) > dot_threshold:
        return [1.0 - t, t], True
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return [math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta], False


def spherical_coefficients(
    weights: Sequence[float],
    gram: torch.Tensor,
    *,
    eps: float = EPS,
    dot_threshold: float = DOT_THRESHOLD,
    max_iter: int = 200,
    tol: float = 1e-12,
) -> tuple[list[float], bool]:
    """Coefficients of the weighted spherical average of N tensors, and whether it fell back to linear.

    Generalises slerp to N inputs without depending on their order: the result direction is the
    weighted Karcher (Frechet) mean of the unit-normalised inputs on the sphere, the point that
    minimises sum_i w_i * angle(m, u_i)^2. For two inputs with weights (1-t, t) that point is exactly
    slerp at t. Written as m = sum_i c_i u_i, its coefficients c_i are applied to the ORIGINAL
    tensors, as slerp's sine weights are. Pairwise merging (slerp A with B, then with C) would
    instead depend on the order.

    The mean is found by Riemannian gradient descent (log map, average, exp map), carried out
    entirely in the span of the inputs through the Gram matrix, so each step costs O(N^2), not
    O(numel). Falls back to the normalised weights themselves (a linear average) when every pair is
    parallel (|cos| > dot_threshold), when some pair is antipodal (no unique mean), or when a norm
    is below eps.
    """
    w = torch.tensor(normalize_weights(weights), dtype=torch.float64)
    n = w.numel()
    if gram.shape != (n, n):
        raise ValueError(f"{n} weights but a Gram matrix of shape {tuple(gram.shape)}")
    linear = [float(x) for x in w]
    if n == 1:
        return linear, True
    if n == 2:
        return slerp_coefficients(float(w[1]), gram, eps=eps, dot_threshold=dot_threshold)
    norms = gram.diagonal().clamp_min(0).sqrt()
    if bool((norms <= eps).any()):
        return linear, True
    cos = cosine_matrix(gram, eps).to(torch.float64)
    off_diagonal = cos[~torch.eye(n, dtype=torch.bool)]
    if bool((off_diagonal.abs() > dot_threshold).all()) or bool((off_diagonal < -dot_threshold).any()):
        return linear, True

    def norm_in_span(a: torch.Tensor) -> float:  # |sum_i a_i u_i|
        return math.sqrt(max(float(a @ cos @ a), 0.0))

    a = w / norm_in_span(w)  # start at the normalised linear average
    for _ in range(max_iter):
        c = (cos @ a).clamp(-1.0, 1.0)  # cos(angle(m, u_i)), since |m| = 1
        theta = torch.arccos(c)
        ratio = torch.where(theta > 1e-12, theta / torch.sin(theta), torch.ones_like(theta))
        # tangent vector at m: sum_i w_i * theta_i/sin(theta_i) * (u_i - c_i m), in u-coordinates
        step = w * ratio - (w * ratio * c).sum() * a
        length = norm_in_span(step)
        if length < tol:
            break
        a = math.cos(length) * a + (math.sin(length) / length) * step
        a = a / norm_in_span(a)
    else:
        warnings.warn(f"spherical average did not converge in {max_iter} steps", RuntimeWarning, stacklevel=2)
    return [float(x) for x in a], False


def combine(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[float], *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """sum_i coefficients[i] * tensors[i], computed chunk by chunk, on the inputs' device.

    The result has out_dtype, or the first tensor's dtype.
    """
    _check_same_shape(tensors)
    if len(coefficients) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors but {len(coefficients)} coefficients")
    first = tensors[0]
    out = torch.empty(first.shape, dtype=out_dtype or first.dtype, device=first.device)
    dtype = compute_dtype(*(t.dtype for t in tensors))
    flat = [t.reshape(-1) for t in tensors]
    flat_out = out.view(-1)
    for start in _chunks(flat_out.numel()):
        end = start + CHUNK_ELEMENTS
        acc = torch.zeros(flat_out[start:end].shape, dtype=dtype, device=first.device)
        for coefficient, f in zip(coefficients, flat):
            if coefficient != 0.0:
                acc.add_(f[start:end].to(dtype), alpha=float(coefficient))
        flat_out[start:end] = acc
    return out


def with_base(coefficients: Sequence[float]) -> list[float]:
    """Coefficients over [base, v_1..v_N] for base + sum_i c_i (v_i - base).

    Rewriting the delta merge as one linear combination of the stored tensors avoids
    materialising the deltas.
    """
    return [1.0 - sum(coefficients), *coefficients]


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """(1 - t) * v0 + t * v1, in v0's dtype."""
    return combine([v0, v1], [1.0 - t, t])


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted average; weights are normalised to sum to 1. Independent of the input order."""
    return combine(tensors, normalize_weights(weights))


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    eps: float = EPS,
    dot_threshold: float = DOT_THRESHOLD,
) -> torch.Tensor:
    """Spherical linear interpolation of two tensors treated as flat vectors.

    The angle comes from unit-normalised copies; the sine weights multiply the originals; nearly
    parallel inputs (|cos| > dot_threshold) are interpolated linearly. Keeps v0's dtype and device.
    """
    coefficients, _ = slerp_coefficients(t, gram_matrix([v0, v1]), eps=eps, dot_threshold=dot_threshold)
    return combine([v0, v1], coefficients)


def slerp_multi(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    eps: float = EPS,
    dot_threshold: float = DOT_THRESHOLD,
) -> torch.Tensor:
    """Weighted spherical average of N tensors (see `spherical_coefficients`); slerp when N == 2."""
    coefficients, _ = spherical_coefficients(
        weights, gram_matrix(tensors), eps=eps, dot_threshold=dot_threshold
    )
    return combine(tensors, coefficients)


def slerp_deltas(
    t: float,
    base: torch.Tensor,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    eps: float = EPS,
    dot_threshold: float = DOT_THRESHOLD,
) -> torch.Tensor:
    """base + slerp(t, v0 - base, v1 - base): slerp of what two fine-tunes changed.

    Checkpoints of one run are nearly parallel as raw weights (slerp == lerp there); their
    deltas from the common starting point are not, which is where slerp differs from lerp.
    """
    coefficients, _ = slerp_coefficients(
        t, gram_matrix([v0, v1], base=base), eps=eps, dot_threshold=dot_threshold
    )
    return combine([base, v0, v1], with_base(coefficients), out_dtype=v0.dtype)


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """The deltas v_i - base, in the inputs' dtype (for inspection; merges never materialise them)."""
    return [combine([t, base], [1.0, -1.0]) for t in tensors]

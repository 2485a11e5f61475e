"""Tolerances from floating-point precision and problem size, shared by the training tests.

Two computations of the same mathematics in different orders (chunked or whole, two processes or one,
a loop transcription or a vectorised implementation) differ only by rounding. A floating-point sum
of n terms, in any order, is within gamma_n = n*u / (1 - n*u) of the exact sum, relative to the sum of
the terms' magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., 2002,
section 4.2), u being the unit roundoff of the dtype: 2^-53 for float64, 2^-24 for float32, 2^-8 for
bfloat16. Two orders therefore differ by at most 2 * gamma_n (`reorder_rtol`).

n counts the longest chain of accumulated roundings behind one compared number:
- a reduction over d values (a dot product, a norm, a softmax denominator) adds d;
- a parameter gradient of a transformer sums over the batch's T tokens, and each token's term went
  through L layers whose dot products run over H (hidden) or F (intermediate) values and whose
  attention sums over at most T positions: `transformer_terms` = 2*T + L*(H + F).

The bound holds relative to the magnitudes of the summed terms; where a compared quantity may be much
smaller than its terms (cancellation), the comparison is made over a whole tensor or a whole gradient
(`relative_error`, a norm over all entries), never entry by entry, and the scale it is relative to is
stated where it is used. Any real defect these tests look for (a missing chunk, a wrong loss scale, a
dropped gradient path, an unsynchronised process) changes results by more than 1e-3 relative, far
above every bound computed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def gamma(dtype: torch.dtype, n: int) -> float:
    """Higham's gamma_n: the relative error bound of a sum of n terms in `dtype`."""
    nu = n * UNIT_ROUNDOFF[dtype]
    assert nu < 0.5, f"{n} terms exceed what {dtype} can bound"
    return nu / (1 - nu)


def reorder_rtol(dtype: torch.dtype, n: int) -> float:
    """How far two evaluation orders of the same n-term computation may drift apart (relative)."""
    return 2 * gamma(dtype, n)


def model_sizes(folder: str | Path) -> tuple[int, int, int]:
    """(layers, hidden size, intermediate size) from a transformers model folder's config.json."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]


def transformer_terms(tokens: int, folder: str | Path) -> int:
    """n for a loss or a parameter gradient of the model in `folder` over a batch of `tokens` tokens."""
    layers, hidden, intermediate = model_sizes(folder)
    return 2 * tokens + layers * (hidden + intermediate)


def relative_error(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> float:
    """||other - reference|| / ||reference||, the norm taken over every entry of every tensor."""
    assert set(reference) == set(other) and reference
    diff = sum(float((other[k].double() - reference[k].double()).pow(2).sum()) for k in reference)
    norm = sum(float(reference[k].double().pow(2).sum()) for k in reference)
    assert norm > 0, "nothing to compare: the reference is zero"
    return (diff / norm) ** 0.5


def forward_atol(folder: str | Path, tokenizer, texts: list[str], extra_terms: int = 0) -> float:
    """Absolute tolerance for two float32 forwards of `texts` through the model in `folder` computed
    in different orders, for outputs of scale 1 (unit-norm embedding entries, probabilities): each
    output depends on its own text's tokens only, so T is the longest text's token count."""
    tokens = max(len(ids) for ids in tokenizer(texts)["input_ids"])
    return reorder_rtol(torch.float32, transformer_terms(tokens, folder) + extra_terms)

"""The int8 ONNX graph against the same arithmetic recomputed in PyTorch, product by product.

The reference does not read the graph's scales: it calibrates SmoothQuant factors itself (forward hooks
on every `nn.Linear` while the float model embeds `CALIBRATION_TEXTS` one by one, Linears fed the same
tensor sharing a factor) and quantizes the weights itself. Then each int8 product of the graph is fed
its own input as onnxruntime computed it, and its output is held against
`fq_token(x / s) @ fq_column(diag(s) W^T)`.

Whole vectors are not compared with an emulation: float32 differences of 1e-7 between onnxruntime's
and PyTorch's kernels flip a rounding here and there, a flip moves the next layer's inputs by a
quantization step, which flips more, and after a few layers the two are as far apart as either is
from float. Per product, the only differences left are such flips: x * (1/s) in the graph against
x / s here can land on the other side of a rounding edge. One flip moves an output row by at most one
activation step times the largest weight, so the bound is three of those plus float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

TEXTS = ["what is spherical linear interpolation?", "qwen3", ("Slerp interpolates between two vectors along the "
         "great circle of the sphere they lie on, which keeps their norm."), "Paris is the capital of France.",
         "x", "def add(a, b):\n    return a + b"]


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(x / scale) * scale


def calibrate(embedder, texts) -> dict[str, torch.Tensor]:
    """SmoothQuant factor per Linear, shared by Linears that read the same tensor."""
    linears = {name: m for name, m in embedder.model.named_modules() if isinstance(m, torch.nn.Linear)}
    peaks: dict[str, torch.Tensor] = {}
    readers: dict[int, set[str]] = {}
    seen = []  # keeps every input alive, so no two of them share an id

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            seen.append(args[0])
            readers.setdefault(id(args[0]), set()).add(name)
            peak = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for text in texts:
                features = embedder.tokenize([text])
                embedder.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    factors = {}
    for group in {frozenset(names) for names in readers.values()}:
        weight_peak = torch.stack([linears[n].weight.detach().abs().amax(dim=0) for n in group]).amax(dim=0)
        activation_peak = peaks[next(iter(group))]
        usable = (activation_peak > 0) & (weight_peak > 0)
        s = torch.ones_like(activation_peak, dtype=torch.float64)
        s[usable] = activation_peak[usable].double().sqrt() / weight_peak[usable].double().sqrt()
        for name in group:
            factors[name] = s.float()
    return factors


def linear_name(product_node: str) -> str:
    """The module path of the Linear a traced MatMul came from ("/backbone/encoder/layer.0/attention/self/query/
    MatMul#12/int8/matmul" -> "encoder.layer.0.attention.self.query")."""
    return product_node.split("/MatMul")[0].removeprefix("/backbone/").replace("/", ".")


def graph_products(path):
    """For each int8 product: Linear name, its input activation, its output, its inverse smoothing constant."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    smooth = {n.name: n for n in model.graph.node if n.name.endswith("smooth")}
    products = []
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            prefix = node.input[0].removesuffix("uint8")
            reshape = next(n for n in model.graph.node if n.name == node.name.removesuffix("matmul") + "reshape")
            mul = smooth[prefix + "smooth"]
            products.append({"linear": linear_name(node.name), "input": mul.input[0], "output": reshape.output[0],
                             "inverse_smoothing": constants[mul.input[1]]})
    return model, products


def run_exposing(model, names, embedder, texts) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    features = embedder.tokenize(texts)
    values = session.run(names, {"input_ids": features["input_ids"].numpy(),
                                 "attention_mask": features["attention_mask"].numpy()})
    return dict(zip(names, values))


@pytest.mark.parametrize("model", ["tiny_qwen3_embedder", "minilm"])
def test_int8_graph_computes_per_token_smoothquant_products(model, request, tmp_path):
    from embedforge import Embedder
    from embedforge.export.onnx import export_onnx
    from embedforge.export.onnx_int8 import CALIBRATION_TEXTS

    torch.set_num_threads(1)
    embedder = Embedder.from_pretrained(request.getfixturevalue(model), dtype="float32", device="cpu")
    result = export_onnx(embedder, tmp_path, ["int8"])
    assert all(c.passed for c in result.checks)
    factors = calibrate(embedder, CALIBRATION_TEXTS)
    graph, products = graph_products(tmp_path / "onnx" / "model_qint8.onnx")
    on_path = [name for name in factors if not name.startswith("pooler.")]  # BERT's pooler feeds no hidden state
    assert sorted(p["linear"] for p in products) == sorted(on_path)  # every Linear once, and nothing else
    assert len(products) == result.facts["int8"]["quantized_products"]
    values = run_exposing(graph, sorted({n for p in products for n in (p["input"], p["output"])}), embedder, TEXTS)
    linears = dict(embedder.model.named_modules())
    for product in products:
        s = factors[product["linear"]]
        np.testing.assert_allclose(1 / product["inverse_smoothing"], s.numpy(), rtol=1e-5)
        weight = linears[product["linear"]].weight.detach().t() * s[:, None]  # [in, out]
        w_scale = weight.abs().amax(dim=0).clamp_min(torch.finfo(torch.float32).tiny) / 127
        w_q = torch.round(weight / w_scale).clamp(-127, 127) * w_scale
        x = torch.from_numpy(values[product["input"]]) / s
        want = fake_quant_rows(x) @ w_q
        got = torch.from_numpy(values[product["output"]])
        step = x.abs().amax(dim=-1, keepdim=True) / 127
        bound = 3 * step * weight.abs().max() + 1e-5 * want.abs().amax(dim=-1, keepdim=True)
        assert ((got - want).abs() <= bound).all(), product["linear"]
        float_product = x @ weight
        assert (got - float_product).abs().max() > (got - want).abs().max()  # the int8 error is there, and emulated


def test_smoothing_balances_channel_ranges():
    """s_k = sqrt(max|x_k| / max|W_k|): after x/s and diag(s) W both ranges are sqrt(max|x_k| max|W_k|)."""
    from embedforge.export.onnx_int8 import smoothing_factors

    activation = np.array([100.0, 1.0, 0.0, 4.0])
    weights = [np.array([[1.0, -1.0], [4.0, 0.0], [1.0, 1.0], [0.0, 0.0]])]
    s = smoothing_factors(activation, weights)
    np.testing.assert_allclose(s, [10.0, 0.5, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose((activation / s)[:2], (np.abs(weights[0]).max(axis=1) * s)[:2], rtol=1e-6)

"""An export's ONNX files through sentence-transformers' own ONNX backend, against its PyTorch backend.

That backend needs optimum-onnx, which pins transformers < 4.58, so it cannot live in embedforge's
environment (transformers 5); run this in a separate one:

    python -m venv /tmp/stonnx && /tmp/stonnx/bin/pip install torch==2.13.0 sentence-transformers "optimum-onnx[onnxruntime]"
    /tmp/stonnx/bin/python bench/export_st_onnx_check.py EXPORT_FOLDER
"""
import json
import sys

import numpy as np
import torch

torch.set_num_threads(1)
import sentence_transformers
import transformers
from sentence_transformers import SentenceTransformer

folder = sys.argv[1]
texts_q = ["what is spherical linear interpolation?", "qwen3"]
texts_d = ["Slerp interpolates between two vectors along the great circle.", "Paris is the capital of France."]
ref = SentenceTransformer(folder, device="cpu")
want = np.concatenate([ref.encode(texts_q, prompt_name="query"), ref.encode(texts_d)])
out = {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__}
for name in ("onnx/model.onnx", "onnx/model_qint8.onnx"):
    m = SentenceTransformer(folder, device="cpu", backend="onnx", model_kwargs={"file_name": name})
    got = np.concatenate([m.encode(texts_q, prompt_name="query"), m.encode(texts_d)])
    out[name] = {"max_abs_diff": float(np.abs(got - want).max()), "min_cosine": float((got * want).sum(1).min())}
print(json.dumps(out, indent=1))

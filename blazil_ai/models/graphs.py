"""Small ONNX graphs written directly from numpy weights (plain ONNX operators both engines run).

The project's own trained models (time series, audio) are linear or small dense networks; writing
their graphs here keeps them to operators that onnxruntime and tract both support, so the parity
tests cover them. ``mlp_model`` is also the synthetic model the benchmarks use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17


def dense_nodes(prefix: str, x: str, layers: Sequence[tuple[np.ndarray, np.ndarray]], activation: str = "Relu",
                final: str | None = None) -> tuple[list[Any], list[Any], str]:
    """Nodes and initializers for ``x @ W + b`` layers with ``activation`` between them; returns the output name."""
    from onnx import helper, numpy_helper

    nodes, inits = [], []
    cur = x
    for i, (w, b) in enumerate(layers):
        wn, bn, out = f"{prefix}_w{i}", f"{prefix}_b{i}", f"{prefix}_h{i}"
        inits += [numpy_helper.from_array(np.asarray(w, np.float32), wn),
                  numpy_helper.from_array(np.asarray(b, np.float32).reshape(-1), bn)]
        nodes.append(helper.make_node("Gemm", [cur, wn, bn], [out]))
        cur = out
        if i < len(layers) - 1:
            nodes.append(helper.make_node(activation, [cur], [out + "_act"]))
            cur = out + "_act"
    if final:
        attrs: dict[str, Any] = {"axis": -1} if final == "Softmax" else {}
        nodes.append(helper.make_node(final, [cur], [f"{prefix}_{final.lower()}"], **attrs))
        cur = f"{prefix}_{final.lower()}"
    return nodes, inits, cur


def make_model(nodes: list[Any], inits: list[Any], inputs: list[Any], outputs: list[Any], name: str) -> Any:
    """An ``onnx.ModelProto`` at the project's opset from graph parts."""
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="blazil")
    model.ir_version = 8  # readable by every onnxruntime and tract release we support
    return model


def mlp_model(path: str | Path, d_in: int, hidden: Sequence[int], d_out: int, *, seed: int = 0,
              input_name: str = "x", output_name: str = "y") -> Path:
    """Write a random dense network [batch, d_in] -> [batch, d_out] (ReLU between layers) to ``path``."""
    from onnx import TensorProto, helper

    from blazil_ai.models.store import save_onnx

    rng = np.random.default_rng(seed)
    sizes = [d_in, *hidden, d_out]
    layers = [(rng.normal(0, 1 / np.sqrt(a), (a, b)), rng.normal(0, 0.1, b)) for a, b in zip(sizes[:-1], sizes[1:])]
    nodes, inits, out = dense_nodes("mlp", input_name, layers)
    nodes.append(helper.make_node("Identity", [out], [output_name]))
    model = make_model(nodes, inits, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", d_in])],
                       [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", d_out])], "mlp")
    return save_onnx(model, Path(path), {"type": "mlp", "sizes": sizes, "seed": seed})

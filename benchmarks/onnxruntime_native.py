"""Per-call cost of onnxruntime's public ``InferenceSession.run`` vs its native ``_sess.run`` (which
blazil_ai/models/session.py calls), on a small MLP at batch 1, 64 and 8189; one JSON line per batch with the
medians of interleaved rounds and each way's ratio to the native call. Re-run it when onnxruntime changes.

    .venv/bin/python benchmarks/onnxruntime_native.py [ROUNDS]
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def mlp(path, width=32):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((width, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 1)).astype(np.float32), "w2")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("MatMul", ["r", "w2"], ["z"]), helper.make_node("Sigmoid", ["z"], ["p"])],
                          "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)

with tempfile.TemporaryDirectory() as d:
    path = f"{d}/m.onnx"
    mlp(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    native = sess._sess.run
    ways = {"public run(None, feeds)": lambda f: sess.run(None, f),
            "public run(names, feeds)": lambda f: sess.run(names, f),
            "native _sess.run": lambda f: native(names, f, None)}
    for batch in (1, 64, 8189):
        feeds = {"x": np.random.default_rng(1).standard_normal((batch, 32)).astype(np.float32)}
        calls = max(20, 20000 // batch)
        per = {k: [] for k in ways}
        for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 15):
            for k, fn in (ways.items() if rep % 2 else reversed(list(ways.items()))):
                fn(feeds)
                t = time.perf_counter()
                for _ in range(calls):
                    fn(feeds)
                per[k].append((time.perf_counter() - t) / calls * 1e6)
        med = {k: statistics.median(v) for k, v in per.items()}
        base = med["native _sess.run"]
        print(json.dumps({"batch": batch, "calls_per_rep": calls, "median_us": {k: round(v, 2) for k, v in med.items()},
                          "ratio_to_native": {k: round(v / base, 3) for k, v in med.items()}}))

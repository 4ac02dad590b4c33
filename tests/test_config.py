"""The build manifest: validation errors name the field, value and expectation; --set overrides validate the same way."""

import pytest

from mifa_pipeline.config import ManifestError, load_manifest, output_determining


def test_defaults_and_overrides_are_typed(tmp_path):
    m = load_manifest(None, ["sampler.steps=12", "sampler.guidance_scale=3", "identities.count=2"], output=tmp_path)
    assert (m.sampler.steps, m.sampler.guidance_scale, m.identities.count) == (12, 3.0, 2)
    assert m.output == str(tmp_path)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("sampler:\n  stepz: 3\n")
    with pytest.raises(ManifestError, match=r"sampler\.stepz: unknown key"):
        load_manifest(path)


@pytest.mark.parametrize("override, field", [
    ("sampler.steps=0", "sampler.steps"),
    ("sampler.resolution=100", "sampler.resolution"),
    ("writer.image_format=gif", "writer.image_format"),
    ("prompts.au_names=[AU1,AU99]", "prompts.au_names"),
    ("identities.count=-1", "identities.count"),
])
def test_bad_values_name_field_and_value(override, field):
    with pytest.raises(ManifestError) as info:
        load_manifest(None, [override])
    assert field in str(info.value)
    assert override.split("=", 1)[1].split(",")[0].strip("[") in str(info.value)


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ManifestError, match="expected dotted.key=value"):
        load_manifest(None, ["sampler.steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.yaml")


def test_runtime_knobs_do_not_change_the_output_fingerprint():
    a = load_manifest(None, ["sampler.batch_size=1", "resources.generation_workers=3"], output="/a")
    b = load_manifest(None, ["sampler.batch_size=32"], output="/b")
    c = load_manifest(None, ["sampler.steps=7"], output="/a")
    assert output_determining(a) == output_determining(b)
    assert output_determining(a) != output_determining(c)


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    (tmp_path / "refs").mkdir()
    path = tmp_path / "m.yaml"
    path.write_text("identities:\n  source: folder\n  folder: refs\n  count: 1\n")
    m = load_manifest(path)
    assert m.identities.folder == tmp_path / "refs"


def test_without_batch_invariance_batching_enters_the_fingerprint():
    a = load_manifest(None, ["sampler.batch_invariant=false", "sampler.batch_size=8"], output="/a")
    b = load_manifest(None, ["sampler.batch_invariant=false", "sampler.batch_size=16"], output="/a")
    c = load_manifest(None, ["sampler.batch_invariant=false", "resources.identities_per_unit=9"], output="/a")
    assert output_determining(a) != output_determining(b)
    assert output_determining(a) != output_determining(c)


def test_random_aus_only_must_name_aus_of_the_set_and_enters_the_fingerprint_only_when_set():
    with pytest.raises(ManifestError, match=r"random_aus\.only \['AU5', 'AU7'\] names AUs outside au_names"):
        load_manifest(None, ["prompts.random_aus.only=[AU5,AU7]"])
    with pytest.raises(ManifestError, match="only must name at least one AU"):
        load_manifest(None, ["prompts.random_aus.only=[]"])
    with pytest.raises(ManifestError, match=r"random_aus\.min_aus \(2\) is more than the 1 AUs"):
        load_manifest(None, ["prompts.random_aus.only=[AU5]", "prompts.random_aus.min_aus=2", "prompts.random_aus.max_aus=2"])
    default = load_manifest(None, [], output="/a")
    narrowed = load_manifest(None, ["prompts.random_aus.only=[AU5,AU17]"], output="/a")
    # builds made before the option existed keep their fingerprints (and so resume) ...
    assert "only" not in output_determining(default)["prompts"]["random_aus"]
    # ... and a narrowed pool is another data set
    assert output_determining(narrowed) != output_determining(default)

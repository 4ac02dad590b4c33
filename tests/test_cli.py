"""The CLI as a user meets it: exit codes, messages naming the problem, dry runs, inspect and verify."""

import json

from typer.testing import CliRunner

from mifa_pipeline.cli import app

runner = CliRunner()
SMALL = ["--set", "identities.count=4", "--set", "identities.samples_per_identity=2",
         "--set", "writer.samples_per_shard=3", "--set", "resources.identities_per_unit=2",
         # the fake model draws no faces: the judges of demo.yaml are tested elsewhere
         "--set", "filter.face.detector=none", "--set", "filter.identity.embedder=none", "--set", "filter.au.estimator=none"]


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "inspect", "report", "verify", "filter", "schema"):
        assert command in result.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(out), "--dry-run", *SMALL])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["planned_samples"] == 8 and plan["shards"] == 3 and plan["identity_blocks"] == 2
    assert plan["stages"] == ["prompts", "identities", "duplicates", "generate", "filter", "write"]
    assert not out.exists()


def test_invalid_override_exits_2_naming_field_and_value(tmp_path):
    result = runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(tmp_path / "o"), "--set", "sampler.steps=zero"])
    assert result.exit_code == 2
    assert "sampler.steps" in result.output and "zero" in result.output
    assert not (tmp_path / "o").exists()


def test_missing_model_exits_2_and_keeps_existing_output(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(out), "--set", "model.checkpoint=/no/such"])
    assert result.exit_code == 2 and "model.checkpoint" in result.output and "/no/such" in result.output
    assert (out / "keep.txt").read_text() == "x"


def test_build_inspect_verify_with_local_runner(tmp_path, fake_model):
    out = tmp_path / "o"
    result = runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(out), "--runner", "local",
                                 "--no-progress", *SMALL])
    assert result.exit_code == 0, result.output
    assert "8 samples" in result.output
    again = runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(out), "--runner", "local", *SMALL])
    assert again.exit_code == 0 and "already complete" in again.output
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "AU12" in shown.output and "expression" in shown.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    (out / "train-000000.parquet").unlink()
    broken = runner.invoke(app, ["verify", str(out)])
    assert broken.exit_code == 1 and "train-000000.parquet: missing" in broken.output


def test_verify_and_inspect_on_a_non_build_exit_2(tmp_path):
    assert runner.invoke(app, ["verify", str(tmp_path)]).exit_code == 2
    assert runner.invoke(app, ["inspect", str(tmp_path)]).exit_code == 2


def test_teacher_command_writes_a_verified_labelled_data_set(tmp_path):
    import webdataset as wds

    out = tmp_path / "teacher"
    result = runner.invoke(app, ["teacher", str(out), "-n", "3", "-m", "2", "--resolution", "64",
                                 "--runner", "local", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "builtin:teacher-renderer" and manifest["counts"]["kept_samples"] == 6
    for sample in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False).decode("rgb8"):
        meta = sample["json"]
        assert sample["png"].shape == (64, 64, 3)
        assert meta["intensity_rounded"] == meta["requested_aus"]
    # each identity's shape parameters, for `mifa train --identity-attribute-weight`
    import pyarrow.parquet as pq

    from mifa_pipeline.stages.teacher import SHAPE_ATTRIBUTES, identity_params

    attributes = pq.read_table(out / "identity_attributes.parquet").to_pylist()
    seeds = {r["identity"]: r["seed"]
             for r in pq.read_table(out / "identities.parquet", columns=["identity", "seed"]).to_pylist()}
    assert sorted(r["identity"] for r in attributes) == sorted(seeds) and len(seeds) == 3
    for row in attributes:
        params = identity_params(seeds[row["identity"]])
        assert {k: row[k] for k in SHAPE_ATTRIBUTES} == {k: getattr(params, k) for k in SHAPE_ATTRIBUTES}


def test_filter_command_makes_a_new_version(tmp_path, fake_model):
    parent = tmp_path / "v1"
    assert runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(parent), "--runner", "local",
                               "--no-progress", *SMALL]).exit_code == 0
    refused = runner.invoke(app, ["filter", str(parent), "--set", "filter.min_pixel_std=127.5", "--runner", "local"])
    assert refused.exit_code == 2 and "drops every sample" in refused.output and "--allow-empty" in refused.output
    assert not (tmp_path / "v1-v1.1.0").exists()
    result = runner.invoke(app, ["filter", str(parent), "--set", "filter.min_pixel_std=127.5", "--runner", "local",
                                 "--no-progress", "--allow-empty"])
    assert result.exit_code == 0, result.output
    assert "every sample was dropped (blank_image: 8)" in result.output
    new = tmp_path / "v1-v1.1.0"
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["stages"]["filter"]["dropped"] == {"blank_image": 8} and manifest["parent"]["version"] == "1.0.0"
    assert "scores reused" in result.output
    refused = runner.invoke(app, ["filter", str(parent), "--set", "seed=3", "--runner", "local"])
    assert refused.exit_code == 2 and "changes only filter" in refused.output


def test_filter_versions_never_collide_and_a_no_op_is_refused(tmp_path, fake_model):
    parent = tmp_path / "v1"
    assert runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(parent), "--runner", "local",
                               "--no-progress", *SMALL]).exit_code == 0

    def run(*args):
        return runner.invoke(app, ["filter", str(parent), *args, "--runner", "local", "--no-progress"])

    def label(folder):
        ds = json.loads((folder / "manifest.json").read_text())["dataset"]
        return ds["name"], ds["version"]

    no_op = run()
    assert no_op.exit_code == 2 and "no filter setting changes" in no_op.output
    same = run("--set", "filter.min_pixel_std=2.0")  # the value it already has
    assert same.exit_code == 2 and "no filter setting changes" in same.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]  # nothing written

    first = run("--set", "filter.min_pixel_std=120")
    assert first.exit_code == 0, first.output
    assert "mifa filter summary" in first.output and "mifa build summary" not in first.output
    assert label(tmp_path / "v1-v1.1.0")[1] == "1.1.0"
    # another change: the default name is taken, so the next free version, and the message says so
    second = run("--set", "filter.min_pixel_std=110")
    assert second.exit_code == 0, second.output
    assert "1.1.0 already exists" in second.output and "--version" in second.output
    assert label(tmp_path / "v1-v1.2.0")[1] == "1.2.0"
    # the first command again finds its own version complete (no third copy)
    again = run("--set", "filter.min_pixel_std=120")
    assert again.exit_code == 0 and "already complete" in again.output and "v1-v1.1.0" in again.output
    # --out elsewhere still gets a label of its own
    elsewhere = tmp_path / "elsewhere" / "strict"
    third = run("--set", "filter.min_pixel_std=100", "--out", str(elsewhere))
    assert third.exit_code == 0, third.output
    assert label(elsewhere)[1] == "1.3.0"
    # an explicit --version another data set carries is refused, naming it
    taken = run("--set", "filter.min_pixel_std=90", "--out", str(tmp_path / "x"), "--version", "1.2.0")
    assert taken.exit_code == 2 and "already the label of" in taken.output and "v1-v1.2.0" in taken.output
    assert not (tmp_path / "x").exists()
    labels = [label(p) for p in (parent, tmp_path / "v1-v1.1.0", tmp_path / "v1-v1.2.0", elsewhere)]
    assert len(set(labels)) == len(labels)


def test_a_location_that_does_not_exist_is_named_by_every_command(tmp_path):
    missing = tmp_path / "nowhere"
    for args in (["filter", str(missing), "--set", "filter.min_pixel_std=3"], ["verify", str(missing)],
                 ["inspect", str(missing)], ["report", str(missing)], ["train", str(missing), "--out", str(tmp_path / "t")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and f"{missing}: does not exist" in result.output, (args, result.output)

"""`mifa inspect`: score percentiles over every planned sample, and threshold tables that tell the truth
(what `mifa filter --set` then drops), checked against the scores tables read directly."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mifa_pipeline.cli import app
from mifa_pipeline.faces import models_available
from mifa_pipeline.inspect import PERCENTILES, summarise
from mifa_pipeline.refilter import prepare_refilter, run_refilter
from tests.curated import make_versions

pytestmark = pytest.mark.skipif(not models_available(), reason="run scripts/install-face-models.sh (make setup does)")


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    return make_versions(tmp_path_factory.mktemp("curated"))


def scores_of(folder):
    """Every planned sample's (scores, keep) straight from the scores tables."""
    rows = []
    for table in sorted((folder / "scores").glob("*.parquet")):
        for r in pq.read_table(table, columns=["scores", "keep", "drop_reason"]).to_pylist():
            rows.append((json.loads(r["scores"]), r["keep"], r["drop_reason"]))
    return rows


def quiet():
    return Console(file=open("/dev/null", "w"), width=200)


def test_percentiles_cover_kept_and_dropped_samples(versions):
    _, version = versions
    rows = scores_of(version)
    assert any(not keep for _, keep, _ in rows) and any(keep for _, keep, _ in rows)
    summary = summarise(version, quiet())
    for name in ("identity_cosine", "face_fraction", "au_agreement", "pixel_std", "au_est_AU12"):
        values = [s[name] for s, _, _ in rows if s.get(name) is not None]
        got = summary["scores"][name]
        assert got["n"] == len(values) == len(rows)
        for p in PERCENTILES:
            assert got[f"p{p}"] == pytest.approx(np.percentile(values, p))


def test_threshold_table_counts_match_the_scores_tables_and_a_real_refilter(versions, tmp_path):
    parent, version = versions
    rows = scores_of(parent)
    table = summarise(parent, quiet())["thresholds"]
    cosine = table["identity_cosine"]
    assert cosine["setting"] == "filter.identity.min_cosine" and cosine["current"] is None
    assert cosine["dropped"]["off"] == sum(not keep for _, keep, _ in rows)  # the parent as it is
    dropped_elsewhere = {i for i, (_, keep, reason) in enumerate(rows) if not keep}
    for value, dropped in cosine["dropped"].items():
        if value == "off":
            continue
        failing = {i for i, (s, _, _) in enumerate(rows) if s["identity_cosine"] < float(value)}
        assert dropped == len(dropped_elsewhere | failing), value
    # the table predicts what `mifa filter` does: two of its values, re-filtered for real
    values = [v for v in cosine["dropped"] if v != "off" and 0 < cosine["dropped"][v] < len(rows)][:2]
    assert values
    for value in values:
        m = run_refilter(prepare_refilter(parent, [f"filter.identity.min_cosine={value}"], tmp_path / value),
                         "local", progress=False).manifest
        assert m["counts"]["planned_samples"] - m["counts"]["kept_samples"] == cosine["dropped"][value]
    # in the tight version the current setting's row is its own drop count
    tight = summarise(version, quiet())["thresholds"]
    now = tight["identity_cosine"]
    assert now["current"] == 0.9
    assert now["dropped"]["0.9"] == sum(not keep for _, keep, _ in scores_of(version))
    assert set(tight) >= {"pixel_std", "face_fraction", "identity_cosine", "au_agreement"}


def test_inspect_prints_percentiles_and_threshold_tables(versions):
    _, version = versions
    result = CliRunner().invoke(app, ["inspect", str(version)])
    assert result.exit_code == 0, result.output
    assert "kept and dropped" in result.output and "p95" in result.output
    assert "filter.identity.min_cosine (now 0.9)" in result.output and "current" in result.output

"""`mifa report`: one self-contained HTML page, checked in a real headless browser (Chromium)."""

import re

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mifa_pipeline.cli import app
from mifa_pipeline.faces import models_available
from mifa_pipeline.report import SECTIONS
from tests.chromium import find_browser, open_page
from tests.curated import make_versions
from tests.test_cli import SMALL

runner = CliRunner()
PAGE_FACTS = """(() => {
  const imgs = [...document.images];
  return {images: imgs.map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
          sections: [...document.querySelectorAll('section')].map(s => s.id),
          kept: document.querySelectorAll('figure.card.kept').length,
          dropped: [...document.querySelectorAll('figure.card.dropped img')].map(i => i.alt),
          height: document.body.scrollHeight};
})()"""


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    if not models_available():
        pytest.skip("run scripts/install-face-models.sh (make setup does)")
    return make_versions(tmp_path_factory.mktemp("curated"))


def test_report_renders_in_headless_chromium(versions, tmp_path):
    if find_browser() is None:
        pytest.skip("no Chromium to render the page: install Debian's `chromium` package (make setup does)")
    _, version = versions
    page = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(version), "--out", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert not re.search(r"(src|href)=['\"](https?:|//)", text)  # self-contained: nothing fetched from elsewhere
    screenshot = tmp_path / "report.png"
    seen = open_page(page, PAGE_FACTS, screenshot)
    assert seen.errors == []
    assert all(url.startswith(("file:", "data:")) for url in seen.requests), seen.requests
    facts = seen.value
    assert facts["sections"] == list(SECTIONS)
    assert len(facts["images"]) == text.count("<img ") > 20
    broken = [i["alt"] for i in facts["images"] if not (i["complete"] and i["width"] > 0)]
    assert broken == []
    # dropped samples are shown (their images come from the scores tables), beside kept ones
    dropped = {r["key"] for f in (version / "scores").glob("*.parquet")
               for r in pq.read_table(f, columns=["key", "keep"]).to_pylist() if not r["keep"]}
    assert dropped and set(facts["dropped"]) <= dropped and facts["dropped"] and facts["kept"]
    assert "identity_mismatch: identity_cosine" in text and "filter.identity.min_cosine: None -&gt; 0.9" in text
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 50_000
    print(f"screenshot: {screenshot} ({facts['height']} px tall)")


def test_report_of_a_build_without_judges_and_its_refusals(tmp_path, fake_model):
    out = tmp_path / "o"
    assert runner.invoke(app, ["build", "manifests/demo.yaml", "--out", str(out), "--runner", "local",
                               "--no-progress", *SMALL]).exit_code == 0
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "o-report.html").read_text()  # beside the data set by default, never inside it
    for key in SECTIONS:
        assert f"<section id='{key}'>" in text
    assert "No identity embedder ran" in text and "No sample was dropped" in text
    # a version that dropped every sample: the pictures come from the scores tables, with the failed score
    assert runner.invoke(app, ["filter", str(out), "--set", "filter.min_pixel_std=127.5", "--allow-empty", "--runner", "local",
                               "--no-progress"]).exit_code == 0
    assert runner.invoke(app, ["report", str(tmp_path / "o-v1.1.0"), "--out", str(tmp_path / "v2.html")]).exit_code == 0
    text = (tmp_path / "v2.html").read_text()
    assert text.count("class='card dropped'") >= 8 and "class='card kept'" not in text
    assert text.count("blank_image: pixel_std") >= 8 and "src='data:image/png;base64," in text
    inside = runner.invoke(app, ["report", str(out), "--out", str(out / "r.html")])
    assert inside.exit_code == 2 and "inside the data set" in inside.output and not (out / "r.html").exists()
    missing = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere: does not exist" in missing.output

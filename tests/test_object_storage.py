"""Outputs on object storage: any fsspec URL, checked up front; exactly-once commits; a lease lock; a real S3
server (SeaweedFS) for builds, verify, inspect, filter and readers. Multi-node Ray is in test_cluster.py."""

import json
import os
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mifa_pipeline.cli import app
from mifa_pipeline.done import CommitConflict, DamagedSource, copy_verified, read_done, write_done
from mifa_pipeline.lease_lock import LeaseLock
from mifa_pipeline.lock import LOCK_NAME, OutputLockError
from mifa_pipeline.runner import BuildError, build_data, prepare
from mifa_pipeline.storage import PIECE, Location, StorageError, digest_pieces
from mifa_pipeline.verify import verify
from tests.outputs import digests

cli = CliRunner()


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


# ------------------------------------------------------------------------------------ checked up front
@pytest.mark.parametrize("url, message", [
    ("s3://", "no bucket"),
    ("s3:///prefix", "no bucket"),
    ("nosuchscheme://bucket/x", "unknown storage scheme"),
])
def test_a_bad_url_is_refused_before_anything_runs(url, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["build", "--dry-run", "--out", url, "--set", "identities.count=2"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []  # no local folder named after the URL


@pytest.mark.parametrize("scheme, module, extra", [("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure")])
def test_a_scheme_without_its_driver_names_the_extra_to_install(scheme, module, extra, tmp_path, monkeypatch):
    if not _missing(module):
        pytest.skip(f"{module} is installed here")
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["build", "--dry-run", "--out", f"{scheme}://bucket/x"])
    assert result.exit_code == 2 and f"mifa[{extra}]" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_credentials_in_the_manifest_are_refused(tmp_path):
    result = cli.invoke(app, ["build", "--dry-run", "--out", str(tmp_path / "o"),
                              "--set", "storage_options.secret=abc"])
    assert result.exit_code == 2 and "credentials are never read from a manifest" in result.output, result.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(StorageError, match="carries a user or password"):
        Location("s3://b/x", {"endpoint_url": "http://me:pw@host:9000"})


# ------------------------------------------------------------------------------------ memory:// (no server)
def test_a_build_to_memory_equals_a_local_build(small_manifest, fake_model, tmp_path):
    local = small_manifest("filter.identity.min_cosine=0.99", out=tmp_path / "local")
    build_data(prepare(local), "local", progress=False)
    url = f"memory://mifa-{os.getpid()}-{time.monotonic_ns()}/demo"
    in_memory = small_manifest("filter.identity.min_cosine=0.99", out=url)
    result = build_data(prepare(in_memory), "local", progress=False)
    assert result.state == "built" and digests(url) == digests(tmp_path / "local")
    assert verify(url) == [] and prepare(in_memory).state == "complete"
    assert not Location(url).exists(LOCK_NAME)
    from mifa_pipeline.training.data import load_folder  # `mifa train` reads a URL as it reads a folder

    remote, here = load_folder(url, 32), load_folder(tmp_path / "local", 32)
    assert remote.keys == here.keys and (remote.images == here.images).all()
    assert (remote.ref_images == here.ref_images).all()


def test_the_teacher_command_writes_to_a_url_and_training_reads_it():
    """`mifa teacher URL` writes its data set and identity_attributes.parquet through the storage layer, and
    `mifa train`'s loader reads both from the URL."""
    from typer.testing import CliRunner

    from mifa_pipeline.cli import app
    from mifa_pipeline.training.data import load_folder

    url = f"memory://teacher-{time.monotonic_ns()}/t"
    result = CliRunner().invoke(app, ["teacher", url, "-n", "3", "-m", "2", "--resolution", "32", "--runner", "local",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"{url.removeprefix('memory://')}/identity_attributes.parquet" in result.output and verify(url) == []
    data = load_folder(url, 32)
    assert len(data.keys) == 6 and data.identity_attributes is not None and data.identity_attributes.shape[0] == 3


# ------------------------------------------------------------------------------------ exactly once
@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_done_record_is_committed_once(where, tmp_path):
    out = Location(tmp_path / "o" if where == "local" else f"memory://once-{time.monotonic_ns()}/o")
    out.write_bytes("a.tar", b"shard bytes")
    first = write_done(out, "a", "fp", ["a.tar"], nsamples=1)
    assert write_done(out, "a", "fp", ["a.tar"], nsamples=1) == first  # a retry of the same task: the same files
    out.write_bytes("a.tar", b"other bytes")
    with pytest.raises(CommitConflict, match="another writer committed it first"):
        write_done(out, "a", "fp", ["a.tar"], nsamples=1)
    assert read_done(out, "a")[0] == first


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_verified_copy_commits_only_the_bytes_it_proved(where, tmp_path):
    """A file copied from another data set (a re-filter's unchanged shard) is streamed and committed only when
    the bytes written have the digest and size its data set recorded: a damaged source leaves nothing behind."""
    base = tmp_path if where == "local" else f"memory://copy-{time.monotonic_ns()}"
    source, out = Location(f"{base}/parent"), Location(f"{base}/child")
    data = os.urandom(3 * PIECE + 5)  # several pieces, the last one short
    source.write_bytes("a.tar", data)
    want = digest_pieces([data])
    assert copy_verified(source, "a.tar", want, out) == want and out.read_bytes("a.tar") == data
    for damaged in (data[:-1] + bytes([data[-1] ^ 1]), data[:-1]):  # a flipped byte, a truncation
        source.write_bytes("b.tar", damaged)
        with pytest.raises(DamagedSource, match=r"b\.tar: .* \(changed or damaged since it was built"):
            copy_verified(source, "b.tar", want, out)
        assert out.find() == ["a.tar"]  # neither the file nor a staging file of it


def test_a_lease_lock_refuses_a_live_holder_and_takes_over_a_lapsed_one():
    out = Location(f"memory://lease-{time.monotonic_ns()}/o")
    first = LeaseLock(out, lease_s=1.0, renew_s=0.1)
    assert first.acquire() is None
    with pytest.raises(OutputLockError, match=f"in use by another run: host {socket.gethostname()}, pid {os.getpid()}"):
        LeaseLock(out).acquire()
    time.sleep(1.5)  # past the first lease: only renewals keep it live
    assert json.loads(out.read_bytes(LOCK_NAME))["lease_until"] > time.time()
    with pytest.raises(OutputLockError, match="in use by another run"):
        LeaseLock(out).acquire()
    first.release()
    assert not out.exists(LOCK_NAME)
    out.write_bytes(LOCK_NAME, json.dumps({  # a run on another host whose lease ran out
        "host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00", "process_start": None,
        "command": "mifa build", "run_id": "0" * 32, "lease_until": time.time() - 1}).encode())
    taker = LeaseLock(out)
    assert "took over the lock of a lapsed run (host elsewhere" in taker.acquire()
    taker.release()


# ------------------------------------------------------------------------------------ a real S3 server
s3 = pytest.mark.slow


@s3
def test_exclusive_create_is_refused_by_a_real_s3_server(s3_server):
    out = Location(s3_server.url(f"excl-{time.monotonic_ns()}"))
    assert out.create("x.json", b"1") is True
    assert out.create("x.json", b"2") is False and out.read_bytes("x.json") == b"1"


@s3
def test_a_build_to_s3_is_the_local_build_and_every_command_reads_it(s3_server, small_manifest, fake_model, tmp_path):
    import webdataset as wds

    sets = ("filter.identity.min_cosine=0.99",)
    build_data(prepare(small_manifest(*sets, out=tmp_path / "local")), "local", progress=False)
    url = s3_server.url(f"build-{time.monotonic_ns()}")
    m = small_manifest(*sets, out=url)
    result = build_data(prepare(m), "local", progress=False)
    assert result.manifest["driver_received_bytes_last_run"] < 2000 * len(result.manifest["shards"])
    assert digests(url) == digests(tmp_path / "local")
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()

    assert cli.invoke(app, ["verify", url]).exit_code == 0
    shown = cli.invoke(app, ["inspect", url])
    assert shown.exit_code == 0 and "AU12" in shown.output, shown.output
    done = cli.invoke(app, ["filter", url, "--set", "filter.identity.min_cosine=0.995", "--runner", "local", "--no-progress"])
    assert done.exit_code == 0, done.output
    version = f"{url}-v1.1.0"
    assert cli.invoke(app, ["verify", version]).exit_code == 0
    assert json.loads(Location(version).read_text("manifest.json"))["parent"]["path"] == url

    # standard readers, through fsspec: webdataset (a gopen handler) and wids (a download handler)
    from mifa_pipeline.data import register_url_schemes  # what the README tells readers to call

    shards = [f"{url}/{s['path']}" for s in result.manifest["shards"]]
    register_url_schemes(shards)
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb"))
    assert len(samples) == result.manifest["counts"]["kept_samples"]
    import wids

    index = json.loads(Location(url).read_text("shardindex.json"))
    for entry in index["shardlist"]:
        entry["url"] = f"{url}/{entry['url']}"
    dataset = wids.ShardListDataset(index["shardlist"], cache_dir=str(tmp_path / "wids-cache"))
    assert len(dataset) == len(samples) and dataset[0]["__key__"] == samples[0]["__key__"]
    # and mifa's own loader, streaming and random access, straight from the bucket
    from mifa_pipeline.data import MifaIndexed, MifaIterable

    streamed = list(MifaIterable(url))
    indexed = MifaIndexed(url, cache_dir=tmp_path / "mifa-cache")
    assert len(streamed) == len(indexed) == len(samples)
    assert (streamed[0]["image"] == indexed[0]["image"]).all()


@s3
def test_a_second_build_into_a_held_s3_output_is_refused(s3_server, small_manifest, fake_model):
    url = s3_server.url(f"held-{time.monotonic_ns()}")
    holder = LeaseLock(Location(url), purpose="mifa-build")
    holder.acquire()
    try:
        with pytest.raises(BuildError, match="in use by another run"):
            build_data(prepare(small_manifest(out=url)), "local", progress=False)
    finally:
        holder.release()
    assert Location(url).find() == []  # refused before writing anything


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "no Ray cluster answers there (a TCP connection to 127.0.0.1:1 failed"),
    ("nonsense", "expected HOST:PORT"),
])
def test_an_unreachable_ray_address_is_one_line_and_leaves_nothing(address, message, tmp_path):
    result = cli.invoke(app, ["build", "--out", str(tmp_path / "o"), "--ray-address", address, "--no-progress",
                              "--set", "identities.count=2"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()

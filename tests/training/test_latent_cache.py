"""The on-disk latent cache: read back only under the key it was written with, rebuilt when stale or broken."""

from __future__ import annotations

import torch

from mifa_pipeline.training import latent_cache


def _parts():
    vae = torch.nn.Conv2d(3, 4, 3)
    images = {"lat": torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8),
              "paint": torch.zeros(1, 3, 8, 8, dtype=torch.uint8)}
    return vae, images


def test_round_trip_is_exact(tmp_path):
    vae, images = _parts()
    key = latent_cache.cache_key(vae, images, torch.device("cpu"))
    tensors = {"lat_mean": torch.randn(5, 4, 2, 2), "lat_std": torch.rand(5, 4, 2, 2)}
    path = tmp_path / latent_cache.CACHE_FILE
    latent_cache.save(path, key, tensors)
    loaded, why = latent_cache.load(path, key)
    assert why == "loaded" and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert not path.with_name(path.name + ".tmp").exists()


def test_key_follows_vae_weights_images_and_device():
    vae, images = _parts()
    cpu = torch.device("cpu")
    key = latent_cache.cache_key(vae, images, cpu)
    assert latent_cache.cache_key(vae, {k: v.clone() for k, v in images.items()}, cpu) == key
    with torch.no_grad():
        vae.weight[0, 0, 0, 0] += 1e-6
    assert latent_cache.cache_key(vae, images, cpu) != key
    vae2, _ = _parts()
    key2 = latent_cache.cache_key(vae2, images, cpu)
    changed = {k: v.clone() for k, v in images.items()}
    changed["lat"][4, 2, 7, 7] ^= 1
    assert latent_cache.cache_key(vae2, changed, cpu) != key2
    assert latent_cache.cache_key(vae2, images, torch.device("cuda")) != key2


def test_stale_missing_or_broken_files_are_not_used(tmp_path):
    vae, images = _parts()
    path = tmp_path / latent_cache.CACHE_FILE
    assert latent_cache.load(path, "k") == (None, "none on disk")
    latent_cache.save(path, "old", {"lat_mean": torch.zeros(1)})
    loaded, why = latent_cache.load(path, "new")
    assert loaded is None and why.startswith("stale")
    path.write_bytes(b"\x00\x01 not a safetensors file")
    loaded, why = latent_cache.load(path, "new")
    assert loaded is None and why.startswith("unreadable")

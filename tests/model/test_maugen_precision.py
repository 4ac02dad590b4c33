"""The GPU path as far as a CPU proves it: the whole sampler (text side with the <ID> splice, label branch,
UNet, VAE) in bfloat16 and float16, channels_last and torch.compile against float32 eager, and a step loop
that never waits for the device.

Stated tolerances (labels of the tiny model, 4 DDIM steps, CFG 7.5): occurrence probability within 0.01 and
intensity (0..5) within 0.05 of float32 for both half types; channels_last and compiled within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_inputs
from mifa_pipeline.maugen import MAUGen
from mifa_pipeline.maugen import sampler as sampler_module

PROMPTS = ["a photo of <ID> <ID2> smiling", "a calm face", "<ID> <ID2> frowning"]
HALF = {"occurrence_prob": 0.01, "intensity": 0.05}
SAME = {"occurrence_prob": 1e-4, "intensity": 1e-4}


def _run(model, steps=4):
    images, masks = make_inputs(3)
    ident = MAUGen.tiny(seed=0).encode_identity(torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(7)))
    return model.sample(PROMPTS, images, masks, ident.to(model.dtype),
                        [torch.Generator().manual_seed(100 + i) for i in range(3)], num_inference_steps=steps)


@pytest.fixture(scope="module")
def reference():
    return _run(MAUGen.tiny(seed=0))


def _close(out, ref, tol):
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    for field, atol in tol.items():
        got, want = getattr(out, field), getattr(ref, field)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=f"{field} beyond {atol}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_labels_match_float32(reference, dtype):
    model = MAUGen.tiny(seed=0).to(dtype=dtype)  # a fresh model: the UNet taps are hooks bound to their model
    assert model.dig.unet.conv_in.weight.dtype == model.vae.decoder.conv_out.weight.dtype == dtype
    assert model.text.text_encoder.get_input_embeddings().weight.dtype == dtype
    out = _run(model)
    _close(out, reference, HALF)
    # the identity splice still matters in half precision: another identity changes the labels
    assert not torch.equal(out.occurrence_prob[0], out.occurrence_prob[1])


def test_channels_last_matches_eager(reference):
    out = _run(MAUGen.tiny(seed=0).enable_speedups(channels_last=True))
    _close(out, reference, SAME)
    torch.testing.assert_close(out.images, reference.images, rtol=0, atol=1e-4)


@pytest.mark.slow  # inductor compiles the tiny UNet and VAE decoder in ~75 s on the 2 shared cores
def test_compiled_unet_and_decoder_match_eager(reference):
    model = MAUGen.tiny(seed=0).enable_speedups(channels_last=False, compile=True)
    out = _run(model)
    _close(out, reference, SAME)
    torch.testing.assert_close(out.images, reference.images, rtol=0, atol=1e-4)


SYNCS = ("item", "cpu", "tolist", "numpy")


def test_step_loop_never_syncs_the_host(monkeypatch):
    """`.item()`, `.cpu()`, `.tolist()`, `.numpy()` and `torch.cuda.synchronize` are counted inside the step loop
    only (they are what make a CUDA host wait); the sampler runs them before and after, never per step."""
    calls: list[str] = []
    counting = [False]

    def counter(name, original):
        def wrapped(*args, **kwargs):
            if counting[0]:
                calls.append(name)
            return original(*args, **kwargs)
        return wrapped

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counter(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counter("cuda.synchronize", torch.cuda.synchronize))
    original_loop = sampler_module._denoise
    loops = []

    def loop(*args, **kwargs):
        counting[0] = True
        try:
            loops.append(1)
            return original_loop(*args, **kwargs)
        finally:
            counting[0] = False

    monkeypatch.setattr(sampler_module, "_denoise", loop)
    out = _run(MAUGen.tiny(seed=0), steps=3)
    assert loops == [1] and out.images.shape[0] == 3
    assert calls == [], f"host syncs inside the step loop: {calls}"
    # the counter does count: a sync outside the loop under counting is seen
    counting[0] = True
    torch.zeros(1).item()
    counting[0] = False
    assert calls == ["item"]

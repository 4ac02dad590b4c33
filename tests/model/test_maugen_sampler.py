"""Sampling: determinism, batch invariance, identity handling, schedulers, DIG wiring."""

from __future__ import annotations

import pytest
import torch

from conftest import make_inputs
from mifa_pipeline.maugen import MAUGen, MAUGenOutput

PROMPTS = ["a photo of <ID> <ID2> smiling", "<ID> <ID2> with raised brows", "a calm face", "<ID> <ID2> frowning",
           "a surprised person"]


def _run(model, idx, identities, steps=4, scheduler="ddim", guidance=7.5):
    images, masks = make_inputs(5)
    return model.sample(
        [PROMPTS[i] for i in idx], images[idx], masks[idx], identities[idx] if identities is not None else None,
        [torch.Generator().manual_seed(100 + i) for i in idx], num_inference_steps=steps,
        guidance_scale=guidance, scheduler=scheduler,
    )


@pytest.fixture(scope="module")
def identities(tiny):
    return tiny.encode_identity(torch.rand(5, 3, 48, 40, generator=torch.Generator().manual_seed(7)))


def test_output_contract(tiny, identities):
    out = _run(tiny, [0, 1, 2], identities)
    assert isinstance(out, MAUGenOutput)
    assert out.images.shape == (3, 3, 64, 64) and out.images.dtype == torch.float32 and out.images.device.type == "cpu"
    assert 0 <= out.images.min() and out.images.max() <= 1
    a = len(tiny.au_names)
    assert out.occurrence_prob.shape == out.intensity.shape == out.intensity_rounded.shape == (3, a)
    assert out.occurrence_prob.dtype == out.intensity.dtype == torch.float32
    assert out.intensity_rounded.dtype == torch.int64
    assert ((out.intensity >= 0) & (out.intensity <= 5)).all()
    assert torch.equal(out.intensity_rounded, torch.round(out.intensity).long())


def test_tiny_is_bitwise_deterministic(identities):
    a, b = MAUGen.tiny(seed=3), MAUGen.tiny(seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a.au_cue, MAUGen.tiny(seed=4).au_cue)
    ids = a.encode_identity(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    oa, ob = _run(a, [0, 1], ids.repeat(3, 1, 1)), _run(b, [0, 1], ids.repeat(3, 1, 1))
    assert torch.equal(oa.images, ob.images) and torch.equal(oa.intensity, ob.intensity)


def test_batch_invariance(tiny, identities):
    """Sample 3 alone and at position 3 of a batch of 5: same image and labels (float tolerance)."""
    batch = _run(tiny, [0, 1, 2, 3, 4], identities)
    alone = _run(tiny, [3], identities)
    torch.testing.assert_close(alone.images[0], batch.images[3], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone.occurrence_prob[0], batch.occurrence_prob[3], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone.intensity[0], batch.intensity[3], rtol=0, atol=1e-5)
    assert torch.equal(alone.intensity_rounded[0], batch.intensity_rounded[3])
    # and the samples in the batch differ from each other (generators and prompts are really per sample)
    assert not torch.allclose(batch.images[0], batch.images[1])


def test_identity_broadcast_equals_repeat(tiny, identities):
    shared = identities[:1]
    a = _run(tiny, [0, 1], shared.expand(5, -1, -1).clone())
    images, masks = make_inputs(5)
    b = tiny.sample([PROMPTS[0], PROMPTS[1]], images[:2], masks[:2], shared,
                    [torch.Generator().manual_seed(100 + i) for i in (0, 1)], num_inference_steps=4)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.intensity, b.intensity, rtol=0, atol=1e-6)


def test_identity_reaches_labels_without_id_token(tiny, identities):
    """With no <ID> in the prompt the identity still enters the label branch through the IDM (reference §2)."""
    a = _run(tiny, [2], identities)
    swapped = identities.roll(1, 0)
    b = _run(tiny, [2], swapped)
    torch.testing.assert_close(a.images, b.images)  # image branch: prompt has no <ID>
    assert not torch.allclose(a.intensity, b.intensity)


def test_no_identity(tiny):
    out = _run(tiny, [2, 4], None)
    assert out.images.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="no identity"):
        _run(tiny, [0], None)


@pytest.mark.parametrize("scheduler", ["dpm++", "euler", "euler_a", "DDPMScheduler"])
def test_other_schedulers_batch_invariant(tiny, identities, scheduler):
    batch = _run(tiny, [1, 3], identities, steps=3, scheduler=scheduler)
    alone = _run(tiny, [3], identities, steps=3, scheduler=scheduler)
    torch.testing.assert_close(alone.images[0], batch.images[1], rtol=0, atol=1e-5)
    assert torch.isfinite(batch.intensity).all()


def test_input_validation(tiny, identities):
    images, masks = make_inputs(2)
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    with pytest.raises(ValueError, match="one generator per sample"):
        tiny.sample(["a", "b"], images, masks, None, gens[:1])
    with pytest.raises(ValueError, match="multiples of"):
        tiny.sample(["a", "b"], images[:, :, :48, :48], masks[:, :, :48, :48], None, gens)
    with pytest.raises(ValueError, match="identity_embeds"):
        tiny.sample(["a", "b"], images, masks, identities[:3], gens)
    with pytest.raises(ValueError, match="unknown scheduler"):
        tiny.sample(["a", "b"], images, masks, None, gens, scheduler="nope")


def test_dig_image_branch_is_stock_unet_on_89_tokens(tiny):
    """Image branch = diffusers UNet on concat(text, AU cue); label rows computed alone equal the full batch."""
    torch.manual_seed(0)
    dig, d = tiny.dig, tiny.token_dim
    x = torch.randn(4, 9, 16, 16)
    text, cue, ident = torch.randn(4, 77, d), tiny.au_cue.expand(4, -1, -1), torch.randn(2, 2, d)
    noise, det, reg, tokens = dig(x, torch.tensor(500), text, cue, ident.repeat(2, 1, 1))
    stock = dig.unet(x, 500, encoder_hidden_states=torch.cat([text, cue], 1)).sample
    assert torch.equal(noise, stock)
    _, det_half, reg_half, _ = dig(x, torch.tensor(500), text, cue, ident, label_rows=slice(2, 4))
    torch.testing.assert_close(det_half, det[2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(reg_half, reg[2:], rtol=0, atol=1e-5)
    assert tokens.shape == (4, len(tiny.au_names), d)


def test_encode_identity_center_crops(tiny):
    face = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    wide = torch.zeros(1, 3, 40, 60)
    wide[:, :, :, 10:50] = face  # same face with side bands: the crop removes them, no squashing
    torch.testing.assert_close(tiny.encode_identity(wide), tiny.encode_identity(face))
    assert tiny.encode_identity(face).shape == (1, 2, tiny.token_dim)


def test_au_cue_language_init(tiny):
    m = MAUGen.tiny(seed=0)
    m.init_au_cue_from_text()
    want = m.text.pooled(["Inner Brow Raiser"])
    torch.testing.assert_close(m.au_cue[0, 0], want[0])
    assert m.au_cue.shape == (1, 12, m.token_dim)


@pytest.mark.parametrize("micro", [1, 4])
def test_fixed_micro_batch_is_bitwise_batch_invariant(identities, micro):
    """Batched CPU kernels (GEMM M=1 vs M>1, oneDNN conv) differ in the last bits between batch sizes;
    fixed-size (padded) chunks don't, whatever the position of the sample in its chunk."""
    model = MAUGen.tiny(seed=0)
    model.micro_batch_size = micro
    batch = _run(model, [0, 1, 2, 3, 4], identities, steps=3)  # micro=4: chunks [0..3], [4 + 3 pads]
    for i in (0, 3, 4):
        alone = _run(model, [i], identities, steps=3)           # position 0 of a padded chunk
        assert torch.equal(alone.images[0], batch.images[i])
        assert torch.equal(alone.occurrence_prob[0], batch.occurrence_prob[i])
        assert torch.equal(alone.intensity[0], batch.intensity[i])
    assert batch.images.shape[0] == 5
    shared = _run(model, [1, 2], identities[1:2].expand(5, -1, -1), steps=3)  # [1,2,D] broadcast == per sample
    assert torch.equal(shared.images[0], batch.images[1])


def test_generator_order_latents_then_posterior(tiny):
    """Each sample's generator gives first its initial latents, then its VAE posterior noise (reference §4.4)."""
    images, masks = make_inputs(2)
    seen = []
    handle = tiny.dig.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        tiny.sample(["a", "b"], images[:2], masks[:2], None, [torch.Generator().manual_seed(s) for s in (11, 12)],
                    num_inference_steps=2)
    finally:
        handle.remove()
    x = seen[0]  # first step, [uncond(2) | cond(2)] x [noisy 4 | mask 1 | masked latent 4]
    for row, s in enumerate((11, 12)):
        g = torch.Generator().manual_seed(s)
        first = torch.randn(1, 4, 16, 16, generator=g)
        second = torch.randn(1, 4, 16, 16, generator=g)
        assert torch.equal(x[2 + row, :4], first[0])  # DDIM: init_noise_sigma 1, scale_model_input identity
        post = tiny.vae.encode((images[row:row + 1] * (1 - masks[row:row + 1])) * 2 - 1).latent_dist
        want = (post.mean + post.std * second) * tiny.vae.config.scaling_factor
        torch.testing.assert_close(x[2 + row, 5:], want[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(x[row], x[2 + row])  # both CFG halves see the same input
    assert set(x[:, 4].unique().tolist()) == {0.0, 1.0}


def test_labels_come_from_conditional_half(tiny, identities):
    """Re-run the recorded UNet inputs through the DIG: the read-out equals the 1/(t+1)-weighted conditional half."""
    calls = []
    original = tiny.dig.forward

    def spy(x, t, text, cue, ident, label_rows=None):
        calls.append((x, t, text, cue, ident))
        return original(x, t, text, cue, ident, label_rows=label_rows)

    tiny.dig.forward = spy
    try:
        out = _run(tiny, [0, 2], identities, steps=3)
    finally:
        del tiny.dig.forward
    from mifa_pipeline.maugen.sampler import make_scheduler
    sched = make_scheduler("ddim", tiny.scheduler_config)
    sched.set_timesteps(3)
    w = 1.0 / (sched.timesteps.double() + 1)
    w = (w / w.sum()).tolist()
    halves = {}
    for name, rows in (("uncond", slice(0, 2)), ("cond", slice(2, 4))):
        det = sum(wi * tiny.dig(x, t, tx, c, i, label_rows=rows)[1] for wi, (x, t, tx, c, i) in zip(w, calls))
        halves[name] = torch.sigmoid(det)
    torch.testing.assert_close(out.occurrence_prob, halves["cond"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.occurrence_prob, halves["uncond"], rtol=1e-5, atol=1e-6)


def test_runs_in_bfloat16(identities):
    model = MAUGen.tiny(seed=0).to(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.identity_encoder.cls_token.dtype == torch.float32
    ids = model.encode_identity(torch.rand(2, 3, 40, 40))
    assert ids.dtype == torch.bfloat16
    out = _run(model, [0, 1], ids.repeat(3, 1, 1)[:5], steps=2)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    assert torch.isfinite(out.intensity).all()


def test_other_resolutions(tiny):
    """Not 512-only: PE lengths follow the actual feature size (reference §7 item 5)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 64, 96, generator=g)
    masks = torch.zeros(1, 1, 64, 96)
    masks[..., 16:48, 24:72] = 1
    out = tiny.sample(["a face"], images, masks, None, [torch.Generator().manual_seed(0)], num_inference_steps=2)
    assert out.images.shape == (1, 3, 64, 96) and torch.isfinite(out.intensity).all()

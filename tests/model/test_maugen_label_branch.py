"""Label branch pieces against hand-written formulas from the reference (§1.3-§1.7, §4.6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mifa_pipeline.maugen.label_branch import IDM, AuxiliaryHead, DualPredictionHead, patchify, sinusoidal_pe
from mifa_pipeline.maugen.sampler import LabelReadout, make_scheduler
from mifa_pipeline.maugen import configs


def _idm_reference(idm: IDM, z: torch.Tensor, c: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference §1.4, literally, one sample at a time (c: [2D])."""
    b, ch, h, w = z.shape
    L = h * w
    x = F.layer_norm(z.reshape(b, ch, L).permute(0, 2, 1), (ch,))
    q, k, v = idm.W_Q(x), idm.W_K(x), idm.W_V(x)
    u = idm.mlp(c)
    g = torch.sigmoid(k @ u)                              # [B, L]
    logits = (q @ k.transpose(1, 2)) * (scale if scale is not None else 1 / math.sqrt(L))  # 1/sqrt(L), not 1/sqrt(d)
    logits = logits * g[:, None, :]                       # gate multiplies the logits, per key
    a = idm.W_O(logits.softmax(-1) @ v)
    p = idm.linear_projection(c)
    s = torch.sigmoid((a * p).sum(-1, keepdim=True))
    f = a - s * p
    f = (f - f.mean(dim=(1, 2), keepdim=True)) / torch.sqrt(f.var(dim=(1, 2), unbiased=False, keepdim=True) + 1e-5)
    return f.reshape(b, ch, h, w)                         # raw reshape, no transpose


def test_idm_matches_reference_formula_per_sample_identity():
    torch.manual_seed(0)
    idm = IDM(channels=12, identity_dim=8, hidden=6)
    z = torch.randn(3, 12, 4, 6)
    ident = torch.randn(3, 8)
    got = idm(z, ident)
    for i in range(3):
        torch.testing.assert_close(got[i:i + 1], _idm_reference(idm, z[i:i + 1], ident[i]), rtol=1e-4, atol=1e-5)
    # a single identity broadcasts over the batch
    torch.testing.assert_close(idm(z, ident[:1]), idm(z, ident[:1].expand(3, -1)), rtol=1e-5, atol=1e-6)


def test_idm_scale_is_one_over_sqrt_L():
    torch.manual_seed(1)
    idm = IDM(channels=8, identity_dim=4, hidden=8)
    z, c = torch.randn(1, 8, 4, 4) * 3, torch.randn(1, 4)   # L = 16, d = 8
    got = idm(z, c)
    torch.testing.assert_close(got, _idm_reference(idm, z, c[0], scale=1 / math.sqrt(16)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, _idm_reference(idm, z, c[0], scale=1 / math.sqrt(8)), rtol=1e-3, atol=1e-3)


def test_patchify_order():
    """b c (h p1) (w p2) -> b (h w) (c p1 p2): channel slowest, then row in patch, then column."""
    y = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    tokens = patchify(y, 2)
    assert tokens.shape == (1, 6, 8)
    # token 1 = patch row 0, patch col 1: columns 2..3 of rows 0..1, channel 0 then channel 1
    assert tokens[0, 1].tolist() == [2, 3, 8, 9, 26, 27, 32, 33]
    assert tokens[0, 3].tolist() == [12, 13, 18, 19, 36, 37, 42, 43]  # patch row 1, col 0


def test_auxiliary_head_shapes():
    lb = {"stem_channels": 4, "stem_groups": 2, "patch_channels": 2, "patch_size": 2, "idm_dim": 4, "use_idm": True}
    head = AuxiliaryHead(channels=4, time_dim=4, token_dim=8, identity_dim=6, cfg=lb)
    assert head.depthwise_conv2.weight.shape == (4, 2, 3, 3)  # groups of 2 channels, as 512/256 officially
    out = head(torch.randn(3, 4, 4, 6), torch.randn(3, 4), torch.randn(1, 6))
    assert out.shape == (3, 6, 8)


def test_dual_head_reads_its_own_token():
    head = DualPredictionHead(num_labels=3, dim=4, hidden=5)
    t = torch.randn(2, 3, 4)
    det, reg = head(t)
    assert det.shape == reg.shape == (2, 3)
    assert ((reg >= 0) & (reg <= 1)).all()
    t2 = t.clone()
    t2[:, 1] += 1.0
    det2, _ = head(t2)
    assert torch.equal(det2[:, 0], det[:, 0]) and torch.equal(det2[:, 2], det[:, 2])
    assert not torch.equal(det2[:, 1], det[:, 1])


def test_sinusoidal_pe():
    pe = sinusoidal_pe(5, 8)[0]
    n, k = 3, 2
    assert math.isclose(pe[n, 2 * k].item(), math.sin(n * 10000 ** (-2 * k / 8)), rel_tol=1e-6)
    assert math.isclose(pe[n, 2 * k + 1].item(), math.cos(n * 10000 ** (-2 * k / 8)), rel_tol=1e-6)


def test_readout_hand_computed():
    # timesteps 0 and 2: weights 1/1 and 1/3 -> normalised 3/4 and 1/4 (exact in binary)
    r = LabelReadout(torch.tensor([0, 2]))
    assert r.weights == [0.75, 0.25]
    r.add(0, det=torch.tensor([[1.0, -2.0]]), reg=torch.tensor([[0.375, 0.125]]))
    r.add(1, det=torch.tensor([[5.0, 2.0]]), reg=torch.tensor([[0.875, 0.625]]))
    prob, intensity, rounded = r.result()
    # det: 0.75*1 + 0.25*5 = 2.0 ; 0.75*-2 + 0.25*2 = -1.0  (raw logits are averaged, then sigmoid)
    torch.testing.assert_close(prob, torch.sigmoid(torch.tensor([[2.0, -1.0]])))
    # reg: 0.75*0.375 + 0.25*0.875 = 0.5 -> 2.5 ; 0.75*0.125 + 0.25*0.625 = 0.25 -> 1.25
    assert intensity.tolist() == [[2.5, 1.25]]
    assert rounded.tolist() == [[2, 1]] and rounded.dtype == torch.int64  # 2.5 rounds half to even


def test_readout_weights_ddim30():
    """DDIM-30 of SD-1.5: t = 958 ... 1; the last step carries about 81 %, then about 4.6 % and 2.4 %."""
    sched = make_scheduler("ddim", configs.SD15_SCHEDULER)
    sched.set_timesteps(30)
    assert sched.timesteps[0].item() == 958 and sched.timesteps[-1].item() == 1
    w = LabelReadout(sched.timesteps).weights
    assert abs(sum(w) - 1) < 1e-12
    assert abs(w[-1] - 0.81) < 0.01 and abs(w[-2] - 0.046) < 0.002 and abs(w[-3] - 0.024) < 0.002

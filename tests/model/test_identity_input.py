"""What the identity encoder reads: the whole reference (official) or only the region the model redraws."""

from __future__ import annotations

import pytest
import torch

from mifa_pipeline.maugen import MAUGen
from mifa_pipeline.maugen.configs import tiny_config, validate
from mifa_pipeline.maugen.identity import mask_region


def _face_and_mask():
    face = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 6:38, 14:30] = 1  # a 32 x 16 box, off centre
    return face, mask


def test_mask_region_is_the_masks_bounding_square_with_grey_outside():
    face, mask = _face_and_mask()
    out = mask_region(face, mask)
    assert out.shape == (1, 3, 32, 32)                       # the box's long side, square
    torch.testing.assert_close(out[:, :, :, 8:24], face[:, :, 6:38, 14:30])  # box centred in the square
    assert torch.all(out[:, :, :, :8] == 0.5) and torch.all(out[:, :, :, 24:] == 0.5)


def test_mask_region_pads_where_the_square_leaves_the_image():
    face = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, 20, 20)
    mask[:, :, 0:16, 0:4] = 1                                 # at the edge: the 16 px square sticks out left
    out = mask_region(face, mask)
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out[:, :, :, 6:10], face[:, :, 0:16, 0:4])
    assert torch.all(out[:, :, :, :6] == 0.5)


def test_mask_region_brings_boxes_of_different_sizes_to_one_size():
    faces = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 0:32, 0:32] = 1                              # a 32 px box
    masks[1, :, 8:24, 8:24] = 1                              # a 16 px box, enlarged to 32
    out = mask_region(faces, masks)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out[0], faces[0, :, :32, :32])
    small = torch.nn.functional.interpolate(faces[1:, :, 8:24, 8:24], size=(32, 32), mode="bilinear",
                                            align_corners=False, antialias=True)
    torch.testing.assert_close(out[1:], small)


def test_mask_region_refuses_empty_or_misshaped_masks():
    face, mask = _face_and_mask()
    with pytest.raises(ValueError, match="empty"):
        mask_region(face, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"masks must be \[B,1,H,W\]"):
        mask_region(face, mask[:, :, :40])


def _model(identity_input: str) -> MAUGen:
    cfg = tiny_config(resolution=64)
    cfg["identity_encoder"]["input"] = identity_input
    return MAUGen.from_config(cfg, seed=0)


def test_mask_region_encoder_ignores_everything_outside_the_mask():
    face, mask = _face_and_mask()
    other = face.clone()
    other[:, :, :, 30:] = 1.0 - other[:, :, :, 30:]           # another background / clothing
    other[:, :, 40:] = 0.0             # below the mask
    masked = _model("mask_region")
    torch.testing.assert_close(masked.encode_identity(other, mask), masked.encode_identity(face, mask))
    inside = face.clone()
    inside[:, :, 10:20, 18:26] = 1.0 - inside[:, :, 10:20, 18:26]  # the face itself changes: so do the words
    assert not torch.allclose(masked.encode_identity(inside, mask), masked.encode_identity(face, mask))
    whole = _model("frame")                                    # the official input sees the whole frame
    assert not torch.allclose(whole.encode_identity(other, mask), whole.encode_identity(face, mask))


def test_mask_region_encoder_needs_the_masks():
    face, _ = _face_and_mask()
    with pytest.raises(ValueError, match="mask_region"):
        _model("mask_region").encode_identity(face)


def test_unknown_identity_input_is_refused():
    cfg = tiny_config()
    cfg["identity_encoder"]["input"] = "crop"
    with pytest.raises(ValueError, match=r"identity_encoder.input is 'crop'"):
        validate(cfg)

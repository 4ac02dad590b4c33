"""<ID>/<ID2> splice: whole input embedding replaced on the <ID> slot and the next one; nothing else changes."""

from __future__ import annotations

import pytest
import torch


def _plain_with_embeddings(text, ids, replace: dict[int, torch.Tensor]) -> torch.Tensor:
    """Reference computation: CLIP input embeddings, overwrite slots, run the stock encoder path by hand."""
    te = text.text_encoder
    emb = te.get_submodule(text._embeddings_path())(input_ids=ids).clone()
    for pos, vec in replace.items():
        emb[0, pos] = vec
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    enc = te.get_submodule(text._embeddings_path().replace("embeddings", "encoder"))
    hidden = enc(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    return te.get_submodule(text._embeddings_path().replace("embeddings", "final_layer_norm"))(hidden)


def test_no_id_token_means_plain_clip(tiny):
    text = tiny.text
    prompts = ["a photo of a smiling person", "raised brows"]
    ids = text.tokenize(prompts)
    plain = text.text_encoder(input_ids=ids).last_hidden_state
    identity = torch.randn(2, 2, tiny.token_dim)
    assert torch.equal(text.encode(prompts, identity), plain)
    assert torch.equal(text.encode(prompts), plain)


def test_splice_replaces_whole_embedding(tiny):
    text = tiny.text
    prompt = "a photo of <ID> <ID2> person"
    ids = text.tokenize([prompt])
    pos = ids[0].tolist().index(text.id_token)
    assert ids[0, pos + 1] == text.id2_token
    identity = torch.randn(1, 2, tiny.token_dim)
    got = text.encode([prompt], identity)
    want = _plain_with_embeddings(text, ids, {pos: identity[0, 0], pos + 1: identity[0, 1]})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = text.text_encoder(input_ids=ids).last_hidden_state
    assert not torch.allclose(got[0, pos:], plain[0, pos:])       # causal: slots from <ID> on change
    torch.testing.assert_close(got[0, :pos], plain[0, :pos])      # ... slots before it cannot


def test_next_slot_gets_id_last_even_without_id2(tiny):
    text = tiny.text
    prompt = "<ID> person"
    ids = text.tokenize([prompt])
    identity = torch.randn(1, 2, tiny.token_dim)
    want = _plain_with_embeddings(text, ids, {1: identity[0, 0], 2: identity[0, 1]})
    torch.testing.assert_close(text.encode([prompt], identity), want, rtol=1e-5, atol=1e-5)


def test_per_prompt_identity_and_broadcast(tiny):
    text = tiny.text
    prompts = ["<ID> <ID2> smiling", "no identity here", "<ID> <ID2> frowning"]
    ids = torch.randn(3, 2, tiny.token_dim)
    batched = text.encode(prompts, ids)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batched[i:i + 1], text.encode([p], ids[i:i + 1]), rtol=1e-5, atol=1e-5)
    shared = text.encode(prompts, ids[:1])
    torch.testing.assert_close(shared[2:], text.encode([prompts[2]], ids[:1]), rtol=1e-5, atol=1e-5)


def test_splice_errors(tiny):
    text = tiny.text
    identity = torch.randn(1, 2, tiny.token_dim)
    with pytest.raises(ValueError, match="no identity"):
        text.encode(["<ID> <ID2> person"])
    with pytest.raises(ValueError, match="must directly follow"):
        text.encode(["<ID2> person"], identity)
    with pytest.raises(ValueError, match="identity batch"):
        text.encode(["<ID> <ID2> a", "<ID> <ID2> b", "c"], torch.randn(2, 2, tiny.token_dim))
    # <ID> as the last token before truncation: the next slot is EOS, which receives id_last; force the
    # last slot itself with a short max_length to check the out-of-range guard.
    short = type(text)(text.tokenizer, text.text_encoder, max_length=4)
    with pytest.raises(ValueError, match="last token slot"):
        short.splice_positions(torch.tensor([[0, 1, 2, text.id_token]]), True)

"""MRL text side: CLIP tokenizer + text encoder with the ``<ID>`` / ``<ID2>`` identity splice.

Reference §2: when a prompt contains ``<ID>`` and an identity is given, the *whole* CLIP input embedding
(token + position) of the ``<ID>`` slot is replaced by id_first and the next slot by id_last; prompts
without ``<ID>`` are encoded exactly as plain CLIP. The splice is done by a forward hook on the embeddings
module, so the stock CLIP forward (causal mask, encoder, final LN) runs unchanged.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ID_TOKEN, ID2_TOKEN = "<ID>", "<ID2>"


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: 256 printable symbols, one per byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Write a byte-level CLIP BPE vocabulary (512 symbols + 2 merges + BOS/EOS = 516 ids) to ``folder``.

    Enough to tokenise any text offline (mostly one token per character); used by the tiny config and by
    random-weight benchmarks. Ids: 514 = <|startoftext|>, 515 = <|endoftext|>.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    merges = ["t h", "th e</w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}))
    return folder


def add_identity_tokens(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
    """Add ``<ID>``/``<ID2>`` as special tokens and grow the embedding table to match.

    The new rows are never read when the splice is used correctly (their slots are overwritten), so
    they are set to zero instead of the random rows of the official code (reference §2, §7 item 9).
    """
    if ID_TOKEN in tokenizer.get_vocab() and ID2_TOKEN in tokenizer.get_vocab():
        return
    tokenizer.add_special_tokens({"additional_special_tokens": [ID_TOKEN, ID2_TOKEN]})
    emb = text_encoder.get_input_embeddings()
    old = emb.weight.shape[0]
    if len(tokenizer) > old:
        new = nn.Embedding(len(tokenizer), emb.weight.shape[1], device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:old] = emb.weight
        text_encoder.set_input_embeddings(new)
        text_encoder.config.vocab_size = len(tokenizer)


def build_text_encoder(cfg: dict) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**cfg))


class TextSide(nn.Module):
    """Tokenizer + CLIP text encoder with the identity splice."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, max_length: int = 77):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        tokenizer.model_max_length = min(tokenizer.model_max_length, max_length)  # as in SD folders (77)
        add_identity_tokens(tokenizer, text_encoder)
        self.id_token = tokenizer.convert_tokens_to_ids(ID_TOKEN)
        self.id2_token = tokenizer.convert_tokens_to_ids(ID2_TOKEN)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        for prompt, ids in zip(prompts, self.tokenizer(list(prompts)).input_ids):
            if len(ids) > self.max_length:
                warnings.warn(f"prompt truncated to {self.max_length} CLIP tokens: {prompt[:60]!r}...", stacklevel=3)
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids  # on the CPU: splice positions are read without a device sync

    def splice_positions(self, ids: torch.Tensor, has_identity: bool) -> list[list[int]]:
        """Slots holding ``<ID>`` per prompt, with the official defects turned into errors (reference §7 item 9)."""
        out = []
        for b, row in enumerate(ids.tolist()):
            pos = [i for i, t in enumerate(row) if t == self.id_token]
            for i, t in enumerate(row):
                if t == self.id2_token and (i - 1) not in pos:
                    raise ValueError(f"prompt {b}: {ID2_TOKEN} must directly follow {ID_TOKEN} (slot {i})")
            if pos and not has_identity:
                raise ValueError(f"prompt {b} contains {ID_TOKEN} but no identity embedding was given")
            if pos and pos[-1] + 1 >= ids.shape[1]:
                raise ValueError(f"prompt {b}: {ID_TOKEN} in the last token slot leaves no room for id_last")
            out.append(pos)
        return out

    @torch.no_grad()
    def encode(self, prompts: list[str], identity: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings [B, 77, D] (last_hidden_state after the final LN).

        identity: None, [1, 2, D] (shared) or [B, 2, D] (per prompt); row 0 of the last axis-1 is id_first.
        """
        return self.forward_spliced(prompts, identity).last_hidden_state

    def forward_spliced(self, prompts: list[str], identity: torch.Tensor | None = None):
        """The text encoder's full output with the `<ID>` splice, with autograd (training uses it directly)."""
        ids = self.tokenize(prompts)
        positions = self.splice_positions(ids, identity is not None)
        ids = ids.to(self.text_encoder.device)
        if not any(positions):
            return self.text_encoder(input_ids=ids)
        if identity.shape[0] not in (1, len(prompts)):
            raise ValueError(f"identity batch {identity.shape[0]} does not match {len(prompts)} prompts")

        def splice(module, args, output):
            output = output.clone()
            ident = identity.to(device=output.device, dtype=output.dtype)
            for b, pos in enumerate(positions):
                src = ident[b if ident.shape[0] > 1 else 0]
                for p in pos:
                    output[b, p] = src[0]      # id_first replaces token + position embedding
                    output[b, p + 1] = src[1]  # id_last on the next slot
            return output

        handle = self.text_encoder.get_submodule(self._embeddings_path()).register_forward_hook(splice)
        try:
            return self.text_encoder(input_ids=ids)
        finally:
            handle.remove()

    @torch.no_grad()
    def pooled(self, texts: list[str]) -> torch.Tensor:
        """Pooled output (final-LN state at EOS) of plain prompts; the AU cue's language init (reference §2)."""
        return self.text_encoder(input_ids=self.tokenize(texts).to(self.text_encoder.device)).pooler_output

    def _embeddings_path(self) -> str:
        # transformers 5 puts `embeddings` on CLIPTextModel itself, 4.x under `text_model`.
        names = dict(self.text_encoder.named_modules())
        return "embeddings" if "embeddings" in names else "text_model.embeddings"

"""A word-level CLIP BPE vocabulary learnt from the training prompts (for text encoders trained from scratch).

The tiny byte-level tokenizer of ``maugen.text`` spends one token per character, so a MIFA prompt
("a close-up portrait photo of <ID> <ID2>, a person with ... the face shows strongly raised inner brows,
...") is cut after ~75 characters and the expression never reaches the text encoder. Here a standard BPE is
learnt (merge the most frequent adjacent pair until every word of the corpus is one symbol) on the CLIP
pre-tokenisation of the corpus; the files are ordinary CLIP ``vocab.json`` / ``merges.txt``, loaded by
``CLIPTokenizer`` like any other. Every corpus word becomes one token; unseen words still tokenise (into
sub-words or bytes). Ids 0..511 are the byte symbols (as in ``write_tiny_tokenizer``), then the merges,
then ``<|startoftext|>``, ``<|endoftext|>``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex

from mifa_pipeline.maugen.text import _byte_symbols

# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py).
_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_table() -> dict[int, str]:
    """GPT-2/CLIP bytes_to_unicode: printable bytes map to themselves, the others to chr(256 + n)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def pretokenize(text: str) -> list[str]:
    """Words as CLIP's BPE sees them: lower-cased, whitespace-collapsed, byte-to-unicode mapped."""
    table = _byte_table()
    text = " ".join(text.replace("<ID2>", " ").replace("<ID>", " ").split()).lower()
    return ["".join(table[b] for b in w.encode("utf-8")) for w in _PATTERN.findall(text)]


def learn_merges(texts: Iterable[str], max_merges: int = 20000) -> list[tuple[str, str]]:
    """BPE merges until every word of ``texts`` is a single symbol (or ``max_merges``); deterministic."""
    counts = Counter(w for t in texts for w in pretokenize(t))
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in counts}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for w, syms in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], _neg(kv[0])))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for w, syms in words.items():
            if len(syms) < 2:
                continue
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = tuple(out)
    return merges


def _neg(pair: tuple[str, str]) -> tuple:
    """Tie-break: the lexicographically smallest pair wins (max over the negated code points)."""
    return tuple(-ord(c) for c in pair[0] + "\0" + pair[1])


def write_word_tokenizer(folder: str | Path, texts: Iterable[str], max_merges: int = 20000) -> Path:
    """Learn merges on ``texts`` and write ``vocab.json`` + ``merges.txt`` to ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    merges = learn_merges(texts, max_merges)
    vocab = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            vocab.append(a + b)
            seen.add(a + b)
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def vocabulary_size(folder: str | Path) -> int:
    return len(json.loads((Path(folder) / "vocab.json").read_text()))

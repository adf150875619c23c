"""Stage cce-tokenizer: train a byte-level BPE on a byte-capped sample, tokenize every split once.

Outputs in ``paths.data``: ``tokenizer.json``, ``<split>.npy`` (uint16 token ids when the
vocabulary fits, else int32; documents joined by ``<|endoftext|>``), ``meta.json``.
Only the first ``data.tokenizer_sample_bytes`` of the train split (in corpus order) train the
merges, which keeps the stage to seconds; the whole corpus is then encoded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from core.data.text_corpus import iter_documents
from core.engine.config import entry_parser, parse_entry
from core.utils.io import atomic_open, atomic_write_json, atomic_write_text
from projects.cce import DEFAULT_PARAMS

EOS = "<|endoftext|>"
SPLITS = ("train", "val")  # the splits the training runs read (test stays unread)


def byte_capped(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The documents in order until their UTF-8 size reaches ``max_bytes`` (last one included)."""
    total = 0
    for doc in docs:
        if total >= max_bytes:
            return
        total += len(doc.encode("utf-8"))
        yield doc


def train_tokenizer(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE with ``vocab_size`` entries (fewer if the sample runs out)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode_documents(tok: Tokenizer, docs: Iterable[str], batch: int = 256) -> np.ndarray:
    """All documents' ids, each followed by the EOS id: ``(n_tokens,)`` uint16 or int32."""
    eos = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.int32
    chunks, pending = [], []
    for doc in docs:
        pending.append(doc)
        if len(pending) == batch:
            chunks += [np.array(e.ids + [eos], dtype=dtype) for e in tok.encode_batch(pending)]
            pending = []
    chunks += [np.array(e.ids + [eos], dtype=dtype) for e in tok.encode_batch(pending)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def build(data_cfg: dict, out_dir: str | Path, corpus_root: str | Path | None = None) -> dict:
    """Train the tokenizer and write ``tokenizer.json``, ``<split>.npy`` and ``meta.json``."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    sample = byte_capped(iter_documents("train", corpus_root), data_cfg["tokenizer_sample_bytes"])
    tok = train_tokenizer(sample, data_cfg["vocab_size"])
    atomic_write_text(out_dir / "tokenizer.json", tok.to_str())
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_sample_bytes": data_cfg["tokenizer_sample_bytes"],
        "tokenizer_train_s": round(time.perf_counter() - t0, 2),
        "tokens": {},
    }
    for split in SPLITS:
        ids = encode_documents(tok, iter_documents(split, corpus_root))
        with atomic_open(out_dir / f"{split}.npy", "wb") as f:
            np.save(f, ids)
        meta["tokens"][split] = int(ids.size)
    meta["total_s"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out_dir / "meta.json", meta)
    return meta


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (the engine's: ``--params``, ``--variant``, ``--set``, ...)."""
    return entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)


def main(argv: list[str] | None = None) -> dict:
    _, p, _ = parse_entry(build_parser(), argv)
    meta = build(p["data"], p["paths"]["data"], p["paths"]["corpus"])
    print(f"tokenizer: {meta}")
    return meta


if __name__ == "__main__":
    main()

"""What the loader and the chunker make of every dev-set document, as one digest per set.

A change to loading or chunking that is meant to leave every document as it was (a linear rewrite of a pattern,
a refactor) is shown to do so by running this under both trees and comparing the lines: equal digests mean the
same documents (id, title, content hash, format, metadata) and the same chunks (spans, heading paths, pages,
quotable sentences, token counts), so every retrieval figure on those sets is unchanged by construction.

    python benchmarks/corpus_digest.py                        # this tree
    (cd /path/to/other/checkout && python /path/to/benchmarks/corpus_digest.py)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the tree it is run from, so one script digests any checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def dev_sets(data: Path) -> dict[str, list[Path]]:
    return {
        "scifact": [data / "scifact" / "corpus.jsonl"],
        "squad-articles": sorted((data / "squad-articles" / "corpus").iterdir()),
        "multihop-rag": sorted((data / "multihop-rag" / "corpus").iterdir()),
        "financebench": sorted((data / "financebench" / "pdfs").iterdir()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from app.config import Settings
    from app.embedding import resolve_model_path
    from app.ingest.chunk import Chunker
    from app.ingest.load import load_upload

    settings = Settings()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.embedding_model))
    chunker = Chunker(tokenizer, settings.chunk_max_tokens, settings.chunk_overlap_tokens)
    print(f"tree {os.getcwd()}")
    for name, files in dev_sets(args.data).items():
        digest = hashlib.sha256()
        documents = chunks = 0
        started = time.perf_counter()
        for path in files:
            for doc in load_upload(path.name, None, path.read_bytes(), 1 << 30):
                documents += 1
                digest.update(repr((doc.external_id, doc.title, doc.content_hash, doc.format,
                                    sorted(doc.metadata.items()))).encode())
                for c in chunker.split(doc.content, kind=doc.format, title=doc.title):
                    chunks += 1
                    digest.update(repr((c.char_start, c.char_end, c.heading_path, c.page_start, c.page_end,
                                        c.sentences, c.token_count)).encode())
        print(f"{name:15s} {documents:6d} documents {chunks:6d} chunks  digest {digest.hexdigest()[:16]}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""Store-path profile: where a document's write goes, statement by statement (no model in the loop).

Grows a fresh collection through scale.py's store path (its synthetic documents of 1-3 real, recombined chunks,
written as the worker writes them) on one writer thread, after a warm-up of 2,000 chunks, and prints the time
per document of each statement and COPY (SQLAlchemy's cursor events; COPYs timed around their functions).

    python benchmarks/store_profile.py --documents 1000
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import event  # noqa: E402

from benchmarks import scale  # noqa: E402
from benchmarks.scale import (  # noqa: E402
    Synthesizer,
    base_material,
    chunker_key,
    postgres_server,
    scratch_database,
    store,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1000, help="about this many documents are timed")
    parser.add_argument("--base-documents", type=int, default=1500, help="real documents the chunks come from")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pgsage"))
    args = parser.parse_args(argv)
    scale.WRITERS = 1  # one writer: the statements' own cost, without a second backend beside them
    times: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(scratch_database(stack.enter_context(postgres_server())))
        settings, engine, factory, embedders, space, cid = scale.open_collection(stack, db_url, args.cache, 2)
        chunker = chunker_key(space.params or {})
        synth = Synthesizer(base_material(settings, embedders, args.cache, args.base_documents))

        @event.listens_for(engine, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            conn.info["t0"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            key = " ".join(statement.split())[:70]
            times[key] += time.perf_counter() - conn.info["t0"]
            counts[key] += 1

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    times[name] += time.perf_counter() - t
                    counts[name] += 1
            return wrapper

        store.insert_chunks = timed("insert_chunks (all of it)", store.insert_chunks)
        store.write_postings = timed("write_postings (all of it)", store.write_postings)
        scale.grow(factory, synth, space.id, chunker, cid, 0, 2000)  # warm-up
        times.clear()
        counts.clear()
        docs, chunks, seconds = scale.grow(factory, synth, space.id, chunker, cid, 100_000, args.documents * 2)
    print(f"{docs} documents, {chunks} chunks in {seconds:.1f} s: {chunks / seconds:.1f} chunks/s, "
          f"{1000 * seconds / docs:.2f} ms per document (one writer)")
    for key, value in sorted(times.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{1000 * value / docs:8.3f} ms/doc  {counts[key] / docs:5.2f} per doc  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

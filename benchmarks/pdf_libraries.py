"""PDF libraries compared on real filings (issue 15, point 1): which one extracts the text pgsage answers from best.

For each library of PGSAGE_PDF_LIBRARY (pypdf, pdfium, pdfplumber), in one run on ../shared/data/financebench:

1. extraction alone, in this process: every PDF of pdfs/ through the loader (app.ingest.load, with the same
   clean-up after each library: running headers and footers, hyphens), seconds per page and characters kept;
2. the service: a fresh `pgsage up` on the embedded default with that library (its own data directory, the
   parse time budget raised so a slow library is measured rather than refused), then `pgsage eval pdfs --qa
   questions-dev.jsonl --json`: evidence@1, evidence@5, document@1 over the dev questions (the eval stops if a
   document fails to ingest; that is recorded).

    python benchmarks/pdf_libraries.py                       # all three (about 20 minutes)
    python benchmarks/pdf_libraries.py --libraries pdfium    # one

Writes benchmarks/results/pdf_libraries.json and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "financebench"
PGSAGE = Path(sys.executable).with_name("pgsage")


def extraction(library: str, pdfs: list[Path]) -> dict[str, Any]:
    """Seconds per page and characters kept for every PDF, in this process; failures by file."""
    from app.errors import AppError
    from app.ingest.load import _load_pdf

    pages = chars = 0
    seconds = 0.0
    failed: dict[str, str] = {}
    for pdf in pdfs:
        data = pdf.read_bytes()
        t = time.perf_counter()
        try:
            _, text, meta = _load_pdf(data, pdf.name, 0, library)
        except AppError as exc:
            failed[pdf.name] = str(exc)
            continue
        finally:
            seconds += time.perf_counter() - t
        pages += meta["pages"]
        chars += len(text)
    return {"pages": pages, "characters": chars, "seconds": round(seconds, 2),
            "ms_per_page": round(1000 * seconds / max(pages, 1), 1), "failed": failed}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def service(library: str, data_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A fresh `pgsage up` on its own data directory and port, with this PDF library; yields its URL and the
    environment a client command needs (an admin key)."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PGSAGE_DATA_DIR": str(data_dir), "PGSAGE_PDF_LIBRARY": library,
           "PGSAGE_PARSE_SECONDS": "900", "PGSAGE_PARSE_MEMORY_MB": "4096"}
    env.pop("REDIS_URL", None)
    log = (data_dir.parent / f"{library}-up.log").open("w")
    proc = subprocess.Popen([str(PGSAGE), "up", "--port", str(port), "--data-dir", str(data_dir), "--no-demo"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgsage up did not start; see {log.name}")
            time.sleep(1)
        made = subprocess.run([str(PGSAGE), "keys", "create", "--name", "bench", "--role", "admin",
                               "--collection", "*"], env=env, capture_output=True, text=True, check=True)
        key = re.findall(r"pgs_\S+", made.stdout)[-1]
        yield url, {**env, "PGSAGE_API_KEY": key, "PGSAGE_URL": url}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def evaluate(library: str, work: Path) -> dict[str, Any]:
    """The dev questions through a fresh service with this library: the eval's JSON and its wall time (ingest of
    the folder included), or why the folder did not ingest."""
    data_dir = work / library
    with service(library, data_dir) as (_, env):
        t = time.perf_counter()
        done = subprocess.run([str(PGSAGE), "eval", str(DATA / "pdfs"), "--qa", str(DATA / "questions-dev.jsonl"),
                               "--json"], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if done.returncode != 0:  # the eval stops when a document does not ingest: record why
            return {"eval": {}, "eval_seconds": round(seconds, 1), "error": done.stderr[-3000:]}
        result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"eval": result, "eval_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    from app.ingest.load import PDF_LIBRARIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--libraries", nargs="+", choices=PDF_LIBRARIES, default=list(PDF_LIBRARIES))
    parser.add_argument("--no-service", action="store_true", help="Extraction timings only.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pdf_libraries.json")
    args = parser.parse_args(argv)

    from benchmarks.ingest_speed import machine_info

    pdfs = sorted((DATA / "pdfs").glob("*.pdf"))
    report: dict[str, Any] = {"benchmark": "pdf_libraries",
                              "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                              "machine": machine_info(), "pdfs": len(pdfs), "libraries": {}}
    work = Path(tempfile.mkdtemp(prefix="pgsage-pdf-libraries-"))
    try:
        for library in args.libraries:
            print(f"[{library}] extracting {len(pdfs)} PDFs ...", flush=True)
            entry: dict[str, Any] = {"extraction": extraction(library, pdfs)}
            print(f"[{library}] {entry['extraction']}", flush=True)
            if not args.no_service:
                print(f"[{library}] ingesting and asking through a fresh service ...", flush=True)
                entry.update(evaluate(library, work))
                print(f"[{library}] {entry['eval']} in {entry['eval_seconds']} s", flush=True)
            report["libraries"][library] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"{'library':<11} {'ms/page':>8} {'pages':>6} {'chars':>9} {'failed':>7}  evidence@1 evidence@5 document@1"
          "  eval s")
    for library, entry in report["libraries"].items():
        ex, ev = entry["extraction"], entry.get("eval", {})
        print(f"{library:<11} {ex['ms_per_page']:>8} {ex['pages']:>6} {ex['characters']:>9} "
              f"{len(ex['failed']) + ('error' in entry):>7}  "
              f"{ev.get('evidence@1', '-'):>10} {ev.get('evidence@5', '-'):>10} {ev.get('document@1', '-'):>10}"
              f"  {entry.get('eval_seconds', '-')}")
    print(f"result      {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

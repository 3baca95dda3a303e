"""Read replica: how far a streaming replica trails the primary, and what PGSAGE_READ_REPLICA_WAIT_MS buys.

A primary (embedded Postgres of its own) and a hot standby made from it by pg_basebackup, as in
tests/test_replica.py; the API and a real Celery worker write to the primary. Two phases, each for
--seconds: the service idle, and the service ingesting SciFact documents (the worker committing batches of
chunks, vectors and postings: the heaviest write the service makes). In each phase, in turns:

- replay lag: a commit on the primary, then the time until the replica has replayed its position;
- for each wait (0, 10, 50, 200 ms): app.db.replica.ReadReplica.session(), as a search calls it, on the
  primary's position at that moment: whether the read went to the replica or fell back to the primary,
  and the time the check added to the request.

    python benchmarks/replica_lag.py                 # 30 s per phase, 2,000 documents ingested
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from sqlalchemy import text  # noqa: E402

from app.config import Settings  # noqa: E402
from app.db.replica import ReadReplica  # noqa: E402
from app.db.session import make_engine, make_sessionmaker  # noqa: E402
from benchmarks.ingest_speed import DEFAULT_CORPUS, DEFAULT_REDIS, auth, machine_info, read_corpus, service  # noqa: E402
from tests.fixtures.services import OwnPostgres, Replica, migrate  # noqa: E402

WAITS_MS = (0, 10, 50, 200)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "replica_lag.json"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(primary_factory: Any, replicas: dict[int, ReadReplica], seconds: float) -> dict[str, Any]:
    lags: list[float] = []
    reads: dict[int, dict[str, Any]] = {w: {"replica": 0, "primary": 0, "added_ms": []} for w in replicas}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with primary_factory() as session:  # replay lag of one commit
            session.execute(text("SELECT pg_notify('pgsage_lag_probe', '')"))
            session.commit()
            at = session.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
        t = time.perf_counter()
        probe = replicas[max(replicas)].factory()
        replayed = text("SELECT pg_last_wal_replay_lsn() >= CAST(:at AS pg_lsn)")
        while not probe.execute(replayed, {"at": at}).scalar_one():
            probe.rollback()
            time.sleep(0.0005)
        lags.append((time.perf_counter() - t) * 1000)
        probe.close()
        for wait, replica in replicas.items():  # what a search's check does, at each wait
            with primary_factory() as session:
                t = time.perf_counter()
                got = replica.session(session)
                reads[wait]["added_ms"].append((time.perf_counter() - t) * 1000)
                reads[wait]["replica" if got is not None else "primary"] += 1
                if got is not None:
                    got.close()
        time.sleep(0.02)
    out: dict[str, Any] = {"lag_ms": {"samples": len(lags), "p50": round(statistics.median(lags), 2),
                                      "p95": round(_pct(lags, 0.95), 2), "max": round(max(lags), 2)}}
    for wait, r in reads.items():
        n = r["replica"] + r["primary"]
        out[f"wait_{wait}ms"] = {"checks": n, "replica_share": round(r["replica"] / n, 4),
                                 "added_ms_p50": round(statistics.median(r["added_ms"]), 2),
                                 "added_ms_p95": round(_pct(r["added_ms"], 0.95), 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS)
    result: dict[str, Any] = {"benchmark": "replica_lag", "machine": machine_info(), "waits_ms": list(WAITS_MS)}
    with tempfile.TemporaryDirectory(prefix="pgsage-replica-") as tmp, contextlib.ExitStack() as stack:
        primary = OwnPostgres(Path(tmp) / "primary")
        stack.callback(primary.close)
        migrate(primary.url)
        replica = Replica(primary, Path(tmp) / "replica")
        replica.start()
        stack.callback(replica.stop)
        svc = service(stack, "replica", redis_url, {"PGSAGE_DATABASE_READ_URL": replica.url}, database=primary.url)
        settings = Settings(database_url=primary.url)
        primary_factory = make_sessionmaker(make_engine(settings, pool_size=2))
        replica_factory = make_sessionmaker(make_engine(settings, pool_size=2, url=replica.url))
        replicas = {w: ReadReplica(replica_factory, max_wait_s=w / 1000, retry_after_s=10) for w in WAITS_MS}

        print(f"[idle] {args.seconds:.0f} s ...", flush=True)
        result["idle"] = measure(primary_factory, replicas, args.seconds)
        data = read_corpus(args.corpus, args.documents)
        with httpx.Client(base_url=svc.base, headers=auth(svc.key), timeout=120) as client:
            r = client.post("/v1/documents", files={"file": ("corpus.jsonl", data, "application/jsonl")},
                            data={"collection": "lag"})
            r.raise_for_status()
            job = r.json()["job_id"]
            while client.get(f"/v1/jobs/{job}").json()["indexed"] == 0:  # writes have begun
                time.sleep(0.2)
            print(f"[ingesting] {args.seconds:.0f} s ...", flush=True)
            result["ingesting"] = measure(primary_factory, replicas, args.seconds)
            state = client.get(f"/v1/jobs/{job}").json()
            result["ingesting"]["job_still_running"] = state["state"] in ("queued", "running")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'phase':<10} {'lag p50/p95 ms':>16} " + " ".join(f"{'wait ' + str(w) + ' ms: replica, +ms p95':>28}"
                                                            for w in WAITS_MS))
    for phase in ("idle", "ingesting"):
        p = result[phase]
        cells = [f"{p[f'wait_{w}ms']['replica_share']:.2f}, +{p[f'wait_{w}ms']['added_ms_p95']:.1f}" for w in WAITS_MS]
        lag = f"{p['lag_ms']['p50']:>7.2f}/{p['lag_ms']['p95']:<8.2f}"
        print(f"{phase:<10} {lag} " + " ".join(f"{c:>28}" for c in cells))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `pgsage` command: run the service (up, api, worker, beat, migrate) and use it (ingest, search, ask, eval...)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings

app = typer.Typer(
    help="pgsage: question answering over your own documents on Postgres + pgvector.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(__file__).resolve().parent / "samples"
DEMO_QUESTION = "What happens when the embedding model changes?"

UrlOpt = Annotated[str, typer.Option("--url", envvar="PGSAGE_URL", help="Where the pgsage API runs.")]
CollectionOpt = Annotated[str, typer.Option("--collection", "-c", help="Collection name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw JSON response.")]
ModeOpt = Annotated[str | None, typer.Option("--mode", help="hybrid, dense or lexical (default: the server's).")]
RerankOpt = Annotated[
    str | None, typer.Option("--rerank", help="none, prf or cross-encoder:<model> (default: the server's).")
]
DEFAULT_URL = "http://127.0.0.1:8000"


# ---------------------------------------------------------------- running the service


def _python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        # No model-loading progress bars in service logs.
        "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        **(extra or {}),
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _alembic_upgrade(url: str | None = None) -> None:
    from alembic.config import Config

    from alembic import command

    cfg = Config(str(ROOT / "alembic.ini"))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


@app.command()
def migrate() -> None:
    """Apply the database migrations (creates the vector extension on first run)."""
    _alembic_upgrade()
    typer.echo("database is at the latest migration")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default PGSAGE_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default PGSAGE_API_PORT).")] = None,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1,
) -> None:
    """Serve the HTTP API (uvicorn)."""
    import uvicorn

    settings = get_settings()
    host = host or settings.api_host
    port = port or settings.api_port
    uvicorn.run(
        "app.main:create_app", factory=True, host=host, port=port, workers=workers, log_level="info",
        proxy_headers=True, timeout_keep_alive=settings.api_keep_alive_seconds,
    )


def _celery_argv(kind: str, extra: list[str], *, quiet: bool = False) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", *(["--quiet"] if quiet else []), kind, *extra]


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="Worker processes (default PGSAGE_WORKER_CONCURRENCY).")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker that chunks and embeds documents."""
    n = concurrency or get_settings().worker_concurrency
    os.execve(
        sys.executable,
        _celery_argv("worker", ["--concurrency", str(n), "--loglevel", loglevel, "--without-gossip"]),
        _python_env(),
    )


@app.command()
def beat(loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO") -> None:
    """Run the Celery beat scheduler (periodic maintenance such as re-queueing stalled documents)."""
    schedule = get_settings().data_dir.resolve() / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    os.execve(
        sys.executable, _celery_argv("beat", ["--loglevel", loglevel, "--schedule", str(schedule)]), _python_env()
    )


# How `pgsage up` stops its worker: first a warm shutdown, in which a task about to finish does; then Celery's
# cold shutdown, which terminates the task still running and hands its message back to the broker (Redis or the
# file-system queue), so a stop takes seconds, not the task's time limit. Tasks are acked late and safe to run
# twice: the documents the task had not written are processed at the next start.
WORKER_WARM_SECONDS = 3.0
# After a cold shutdown the worker has handed its messages back, yet its exit can block: billiard's pool
# finalizer waits on a queue lock that the pool process it terminated may have held. It is killed then.
WORKER_COLD_SECONDS = 10.0
# The API and beat stop at once on SIGTERM (beat saves its schedule first); this bounds them, from the signal.
STOP_SECONDS = 15.0


def _exited(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        proc.wait(max(0.0, seconds))
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started in a session of its own, with what it started (a worker's pool processes)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Stop a worker sent SIGTERM (a warm shutdown): a cold shutdown after a short grace, then a kill."""
    if _exited(proc, WORKER_WARM_SECONDS):
        return
    proc.send_signal(signal.SIGQUIT)
    if not _exited(proc, WORKER_COLD_SECONDS):
        _kill_tree(proc)


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise typer.Exit(_fail(f"a pgsage process exited early (code {p.returncode}); see the log above"))
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise typer.Exit(_fail(f"the API did not become ready in {timeout:.0f}s"))


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="API port (default PGSAGE_API_PORT).")] = None,
    host: Annotated[str | None, typer.Option(help="API interface (default PGSAGE_API_HOST).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded database and queue live.")] = None,
    demo: Annotated[bool, typer.Option(help="Ingest the bundled docs and ask a question.")] = True,
    exit_after_demo: Annotated[bool, typer.Option(help="Stop everything after the demo (for scripts).")] = False,
) -> None:
    """Start everything on this machine: Postgres+pgvector (embedded unless DATABASE_URL), migrations,
    a Celery worker and the API; then show it answering."""
    env: dict[str, str] = {}
    if data_dir is not None:
        env["PGSAGE_DATA_DIR"] = str(data_dir.resolve())
        os.environ["PGSAGE_DATA_DIR"] = env["PGSAGE_DATA_DIR"]
        get_settings.cache_clear()
    settings = get_settings()
    host = host or settings.api_host
    port = port or settings.api_port
    embedded = settings.database_url is None
    if embedded:
        from app.embedded import embedded_database_url

        env["PGSAGE_DATABASE_URL"] = embedded_database_url(settings.data_dir)
        typer.echo(f"database: embedded PostgreSQL + pgvector under {settings.data_dir.resolve() / 'pg'}")
    else:
        typer.echo("database: PostgreSQL at DATABASE_URL")
    if settings.redis_url:
        typer.echo(f"broker:   Redis at {settings.redis_url}")
    else:
        typer.echo(f"broker:   file-system queue under {settings.broker_dir} (set REDIS_URL to use Redis)")
    _alembic_upgrade(env.get("PGSAGE_DATABASE_URL"))
    typer.echo("schema:   migrations applied")

    child_env = _python_env(env)
    if embedded and os.geteuid() == 0:
        # Celery warns at length about a worker running as root; on the embedded default (one machine, JSON-only
        # tasks) there is nothing to act on. Production runs the worker as its own user (see the Dockerfile).
        child_env["PYTHONWARNINGS"] = ",".join(filter(None, [child_env.get("PYTHONWARNINGS"),
                                                             "ignore:You're running the worker with superuser"]))
    # Each in a session of its own: a terminal's Ctrl-C reaches only this supervisor, which stops each process
    # once and in order (beat, sent the terminal's SIGINT and then this SIGTERM, was seen to hang), and which
    # can kill a process together with what it started.
    procs = [
        subprocess.Popen(
            _celery_argv(
                "worker",
                ["--concurrency", str(settings.worker_concurrency), "--loglevel", "WARNING", "--without-gossip"],
                quiet=True,
            ),
            env=child_env,
            start_new_session=True,
        ),
        subprocess.Popen(
            _celery_argv(
                "beat",
                ["--loglevel", "WARNING", "--schedule", str(settings.data_dir.resolve() / "celerybeat-schedule")],
                quiet=True,
            ),
            env=child_env,
            start_new_session=True,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:create_app",
                "--factory",
                "--host",
                host,
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--timeout-keep-alive",
                str(settings.api_keep_alive_seconds),
            ],
            env=child_env,
            start_new_session=True,
        ),
    ]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        deadline = time.monotonic() + STOP_SECONDS
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        _stop_worker(procs[0])  # the Celery worker
        for p in procs[1:]:
            if not _exited(p, deadline - time.monotonic()):
                _kill_tree(p)
        if embedded:
            from app.embedded import stop_embedded_database

            stop_embedded_database(settings.data_dir)
        typer.echo("pgsage stopped")

    def on_term(*_: object) -> None:
        if stopping:
            return  # a second Ctrl-C: the stop under way takes seconds, and it stops the database too
        stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, on_term)
    # A closed terminal: the processes above are in sessions of their own and would not hear of it.
    signal.signal(signal.SIGHUP, on_term)
    try:
        plural = "es" if settings.worker_concurrency > 1 else ""
        typer.echo(f"worker:   {settings.worker_concurrency} process{plural} and beat started "
                   "(loading the embedding model)")
        _wait_ready(url, procs)
        typer.echo(f"api:      {url}  (OpenAPI docs at {url}/docs, metrics at {url}/metrics)")
        typer.echo(f"console:  {url}/ui  (sign in with an API key)")
        _first_key_hint(env.get("PGSAGE_DATABASE_URL"), data_dir)
        if demo:
            _demo(url, env.get("PGSAGE_DATABASE_URL"))
        if exit_after_demo:
            return
        typer.echo("press Ctrl-C to stop")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        raise typer.Exit(_fail("a pgsage process exited; stopping"))
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def _demo(url: str, database: str | None) -> None:
    """Ingest the bundled docs and ask a question, with a key for 'docs' made for the demo and revoked after."""
    from app import keys

    files = sorted(SAMPLES.glob("*.md"))
    typer.echo(f"\ningesting {len(files)} bundled documents into collection 'docs'...")
    with _key_database(database) as factory:
        with factory.begin() as session:
            row, key = keys.create(session, "pgsage up demo", "write", ["docs"])
        try:
            with _client(url, key) as client:
                failures = _ingest_files(client, [(f, f.name) for f in files], "docs", {}, wait=True,
                                         progress=False)
                if failures:
                    raise typer.Exit(1)
                typer.echo(f"\n$ pgsage ask --collection docs {json.dumps(DEMO_QUESTION)}")
                _print_answer(_call(client, "POST", "/v1/ask", json={"question": DEMO_QUESTION, "collection": "docs"}))
        finally:
            with factory.begin() as session:
                keys.revoke(session, str(row["id"]))


# ---------------------------------------------------------------- talking to the service


def _fail(message: str) -> int:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return 1


def _client(url: str, key: str | None = None) -> httpx.Client:
    key = key or os.environ.get("PGSAGE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), timeout=httpx.Timeout(30.0, read=600.0), headers=headers)


# How long one CLI request may keep waiting out 429 and 503 answers (Retry-After) before it is an error.
PATIENCE_SECONDS = 300.0


def _call(client: httpx.Client, method: str, path: str, *, max_wait: float = PATIENCE_SECONDS, **kwargs: Any) -> Any:
    """One request's JSON answer; a refusal ends the command with its message.

    A 429 (this key's rate limit) or a 503 (database or queue briefly away) carrying Retry-After is waited out
    and retried, for up to max_wait seconds in all: a long `pgsage eval` or folder ingest goes on at the rate
    the service allows instead of failing at its first refusal."""
    waited = 0.0
    while True:
        try:
            response = client.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise typer.Exit(_fail(_not_answering(client))) from None
        except httpx.HTTPError as exc:
            raise typer.Exit(_fail(f"request to {client.base_url}{path} failed: {exc}")) from None
        pause = _retry_after(response)
        if pause is None or waited + pause > max_wait:
            break
        time.sleep(pause)
        waited += pause
    if response.status_code >= 400:
        raise typer.Exit(_fail(_refusal(response)))
    return response.json() if response.content else None


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before sending the request again, when the service says it may succeed then."""
    if response.status_code not in (429, 503):
        return None
    try:
        return max(float(response.headers["retry-after"]), 0.1)
    except (KeyError, ValueError):
        return None


def _not_answering(client: httpx.Client) -> str:
    return (f"pgsage is not answering at {client.base_url}: start it with `pgsage up`, "
            "or point --url / PGSAGE_URL at it")


def _detail_message(detail: Any) -> str:
    """The message of an error body's detail ({"message", "info"}, a string, or a list of field errors)."""
    message = detail.get("message") if isinstance(detail, dict) else detail
    return message if isinstance(message, str) else json.dumps(detail)


def _refusal(response: httpx.Response) -> str:
    """An error response as one line: its status and message."""
    try:
        message = _detail_message(response.json().get("detail"))
    except ValueError:
        message = response.text[:500]
    if response.status_code == 401:
        message += "; set PGSAGE_API_KEY to a key from `pgsage keys create`"
    return f"{response.status_code}: {message}"


def _expand(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    """Each supported file with its external id: its POSIX path relative to the folder given, or its name."""
    from app.ingest.load import TEXT_KINDS as SUPPORTED  # what the API loads, by extension

    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
            yield from ((p, p.relative_to(path).as_posix()) for p in found)
        elif path.is_file():
            yield path, path.name
        else:
            raise typer.Exit(_fail(f"{path} does not exist"))


def _distinct(files: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """The files once each; two different files that would share an id stop the run before any upload."""
    # Two uploads under one id replace each other while each job counts its document as indexed.
    seen: dict[str, Path] = {}
    out: list[tuple[Path, str]] = []
    for path, name in files:
        if name not in seen:
            seen[name] = path
            out.append((path, name))
        elif seen[name].resolve() != path.resolve():
            raise typer.Exit(_fail(
                f"{seen[name]} and {path} would both be stored as {name!r}; "
                "ingest the folder that holds both, or each into its own collection"
            ))
    return out


def _ingest_files(
    client: httpx.Client, files: list[tuple[Path, str]], collection: str, metadata: dict[str, Any], *,
    wait: bool, err: bool = False, progress: bool = True,
) -> int:
    """Upload the files (one job each); with wait, follow the jobs (a progress bar unless progress=False) and
    print the outcome. Returns the number of files the API refused."""
    from tqdm import tqdm

    jobs: list[str] = []
    rejected: list[tuple[Path, str]] = []
    for path, name in tqdm(files, desc="uploading", unit="file", disable=len(files) < 2 or not progress):
        with path.open("rb") as f:
            data = {"collection": collection, "path": name}
            if metadata:
                data["metadata"] = json.dumps(metadata)
            try:
                body = _call(client, "POST", "/v1/documents", files={"file": (path.name, f)}, data=data)
            except typer.Exit:
                rejected.append((path, "rejected (see the error above)"))
                continue
        jobs.append(body["job_id"])
        for warning in body.get("warnings") or []:  # accepted, but not all of it will be searchable
            typer.echo(f"warning: {warning}", err=True)
    if not wait or not jobs:
        for job in jobs:
            typer.echo(f"job {job}")
        return len(rejected)

    states: dict[str, dict[str, Any]] = {}
    with tqdm(total=0, desc="indexing", unit="doc", disable=not progress) as bar:
        while True:
            for job in jobs:
                if job not in states or states[job]["state"] in ("queued", "running"):
                    states[job] = _call(client, "GET", f"/v1/jobs/{job}")
            total = sum(s["total"] for s in states.values())
            finished = sum(s["done"] + s["failed"] for s in states.values())
            bar.total = total
            bar.n = finished
            bar.refresh()
            if all(s["state"] not in ("queued", "running") for s in states.values()):
                break
            time.sleep(1)
    indexed = sum(s["indexed"] for s in states.values())
    unchanged = sum(s["unchanged"] for s in states.values())
    failed = [e for s in states.values() for e in s["errors"]]
    typer.echo(
        f"{len(files)} files: {indexed} documents indexed, {unchanged} unchanged, "
        f"{len(failed)} failed, {len(rejected)} files rejected",
        err=err,
    )
    for failure in failed[:50]:
        typer.echo(f"  failed {failure['external_id']}: {failure['error']}", err=err)
    for path, why in rejected:
        typer.echo(f"  rejected {path}: {why}", err=err)
    return len(failed) + len(rejected)


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (txt, md, html, pdf, jsonl).")],
    collection: CollectionOpt = "default",
    metadata: Annotated[str | None, typer.Option(help="JSON object added to every document's metadata.")] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until the jobs finish.")] = True,
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Upload documents; the worker chunks and embeds them. Unchanged documents are skipped."""
    extra: dict[str, Any] = {}
    if metadata:
        try:
            extra = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise typer.Exit(_fail(f"--metadata is not JSON: {exc.msg}")) from None
        if not isinstance(extra, dict):
            raise typer.Exit(_fail("--metadata must be a JSON object"))
    files = _distinct(list(_expand(paths)))
    if not files:
        raise typer.Exit(_fail("no supported files found"))
    with _client(url) as client:
        failures = _ingest_files(client, files, collection, extra, wait=wait)
    raise typer.Exit(1 if failures else 0)


def _parse_filters(items: list[str]) -> dict[str, Any] | None:
    filters: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.Exit(_fail(f"--filter takes key=value, got {item!r}"))
        try:
            filters[key] = json.loads(value)
        except json.JSONDecodeError:
            filters[key] = value
    return filters or None


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to search for.")],
    k: Annotated[int, typer.Option("--k", "-k", help="How many chunks.")] = 5,
    collection: CollectionOpt = "default",
    filter_: Annotated[
        list[str] | None, typer.Option("--filter", help="Metadata filter key=value (repeatable).")
    ] = None,
    mode: ModeOpt = None,
    rerank: RerankOpt = None,
    group: Annotated[
        str | None, typer.Option(help="passage: the best passages (several per document); document: one per document.")
    ] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Show the passages that best match a query (or, with --group document, the best documents)."""
    body = {"query": query, "k": k, "collection": collection, "filters": _parse_filters(filter_ or []),
            "mode": mode, "rerank": rerank, "group": group}
    with _client(url) as client:
        result = _call(client, "POST", "/v1/search", json=body)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if not result["results"]:
        typer.echo("no results")
    for i, hit in enumerate(result["results"], start=1):
        snippet = " ".join(hit["text"].split())[:240]
        typer.secho(f"{i}. {hit['score']:.3f}  {_where(hit)}  ({hit['external_id']})", bold=True)
        typer.echo(f"   {snippet}")


def _where(hit: dict[str, Any]) -> str:
    """A result's place: its heading path (or title), and its pages."""
    where = " > ".join(hit.get("heading_path") or []) or hit.get("title") or hit["external_id"]
    first, last = hit.get("page_start"), hit.get("page_end")
    if first is not None:
        where += f", p. {first}" if last in (None, first) else f", pp. {first}-{last}"
    return str(where)


def _print_answer(result: dict[str, Any]) -> None:
    typer.echo(f"\n{result['answer']}\n")
    _print_citations(result["citations"])


def _print_citations(citations: list[dict[str, Any]]) -> None:
    for c in citations:
        typer.echo(
            f"  [{c['n']}] {_where(c)}  ({c['external_id']}, chunk {c['chunk_id']}, "
            f"score {c['score']:.3f})"
        )


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="Your question.")],
    k: Annotated[int, typer.Option("--k", "-k", help="How many chunks to read.")] = 5,
    collection: CollectionOpt = "default",
    mode: ModeOpt = None,
    rerank: RerankOpt = None,
    stream: Annotated[bool, typer.Option(
        "--stream", help="Print the answer as it is written (with --json: each event as a JSON line)."
    )] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Answer a question from the documents, citing the chunks used."""
    body = {"question": question, "k": k, "collection": collection, "mode": mode, "rerank": rerank}
    with _client(url) as client:
        if stream:
            _stream_answer(client, body, as_json=as_json)
            return
        result = _call(client, "POST", "/v1/ask", json=body)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_answer(result)


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(name, JSON data) of each Server-Sent Event in the lines of a response."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif not line.startswith(":"):  # a comment (keep-alive)
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def _stream_answer(client: httpx.Client, body: dict[str, Any], *, as_json: bool) -> None:
    """Prints a streamed answer as its tokens arrive, then its citations; an error event exits 1."""
    started = False
    try:
        with client.stream("POST", "/v1/ask", json={**body, "stream": True}) as response:
            if response.status_code >= 400:
                response.read()
                raise typer.Exit(_fail(_refusal(response)))
            for name, data in _sse_events(response.iter_lines()):
                if as_json:
                    typer.echo(json.dumps({"event": name, "data": data}))
                elif name == "token":
                    if not started:
                        typer.echo()
                        started = True
                    typer.echo(data["text"], nl=False)
                elif name == "done":
                    # A not-found answer comes with no tokens, only here.
                    typer.echo("\n" if started else f"\n{data['answer']}\n")
                    _print_citations(data["citations"])
                if name == "error":
                    if started:
                        typer.echo()  # end the partial answer's line
                    raise typer.Exit(_fail(f"{data.get('error')}: {_detail_message(data.get('detail'))}"))
                if name == "done":
                    return
    except httpx.ConnectError:
        raise typer.Exit(_fail(_not_answering(client))) from None
    except httpx.HTTPError as exc:
        raise typer.Exit(_fail(f"the answer stream from {client.base_url} broke: {exc}")) from None
    raise typer.Exit(_fail("the answer stream ended before its last event"))


@app.command()
def status(as_json: JsonOpt = False, url: UrlOpt = DEFAULT_URL) -> None:
    """Collections, documents, chunks, jobs and the active embedding model."""
    with _client(url) as client:
        result = _call(client, "GET", "/v1/status")
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    typer.echo(
        f"documents: {result['documents']}   chunks: {result['chunks']}   "
        f"jobs: {result['jobs']['total']} ({result['jobs']['running']} running)"
    )
    model = result["active_model"]
    if model:
        typer.echo(
            f"active model: {model['name']} (revision {model['revision']}, {model['dimension']} dims, "
            f"{model['pooling']} pooling{', normalised' if model['normalize'] else ''}; "
            f"{model['vectors']} chunk vectors)"
        )
    else:
        typer.echo("active model: none yet")
    configuration = result.get("configuration") or {}
    if configuration.get("state") not in (None, "active"):
        typer.echo(f"configured model: {configuration['state']}: {configuration['message']}")
    for c in result["collections"]:
        typer.echo(
            f"  {c['name']}: {c['documents']} documents ({c['indexed']} indexed, {c['queued']} queued, "
            f"{c['failed']} failed), {c['chunks']} chunks"
        )


def _print_reindex(state: dict[str, Any]) -> None:
    active = state["active_space"]
    typer.echo(
        f"active space: {active['id']} {active['name']} ({active['fingerprint']})" if active else "no active space"
    )
    _print_rollback_targets(state.get("rollback_targets", []))
    job = state["job"]
    if job is None:
        typer.echo("no re-index has run")
        return
    rate = f", {job['rate_per_s']} chunks/s" if job["rate_per_s"] else ""
    eta = f", about {job['eta_s']:.0f}s left" if job["eta_s"] is not None else ""
    typer.echo(
        f"re-index {job['id']}: {job['status']} ({job['reason']}), space {job['source']['id']} -> "
        f"{job['target']['id']} {job['target']['name']}: {job['done']}/{job['total']} chunks{rate}{eta}"
    )
    if job["error"]:
        typer.echo(f"  {job['error']}")


def _print_rollback_targets(targets: list[dict[str, Any]]) -> None:
    """The space a rollback can reach: only the one retired last has kept receiving writes."""
    if targets:
        typer.echo("a rollback reaches: " + ", ".join(f"space {t['id']} {t['name']}" for t in targets))
    else:
        typer.echo("a rollback reaches no space (none kept receiving writes)")


@app.command()
def reindex(
    status_: Annotated[bool, typer.Option("--status", help="Show progress and exit.")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel the running re-index.")] = False,
    rollback: Annotated[bool, typer.Option("--rollback", help="Switch back to the previous space.")] = False,
    wait: Annotated[bool, typer.Option(help="Show a progress bar until it finishes.")] = True,
    model: Annotated[str | None, typer.Option("--model", help="Re-index into this model (a name or a local "
                                              "folder) instead of the configured one.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="With --model: a label for its weights.")] = None,
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Re-embed every chunk with the configured model (or --model) beside the old vectors, then switch (or
    follow, cancel, roll back). A model change starts this by itself; the command does it on demand. After
    --model switches, that model serves queries until the configuration names a newer one; `pgsage status`
    shows the drift."""
    from tqdm import tqdm

    with _client(url) as client:
        if status_:
            _print_reindex(_call(client, "GET", "/v1/admin/reindex"))
            return
        if cancel:
            typer.echo(f"cancelled re-index {_call(client, 'POST', '/v1/admin/reindex/cancel')['cancelled']}")
            return
        if rollback:
            result = _call(client, "POST", "/v1/admin/reindex/rollback")
            typer.echo(f"rolled back: space {result['from_space']} -> {result['to_space']}")
            _print_rollback_targets(result["rollback_targets"])
            return
        if revision is not None and model is None:
            raise typer.Exit(_fail("--revision goes with --model"))
        body = {"model": model, "revision": revision} if model is not None else None
        started = _call(client, "POST", "/v1/admin/reindex", json=body)
        typer.echo(started["message"])
        if not wait or started["job_id"] is None:
            return
        with tqdm(total=0, desc="re-indexing", unit="chunk") as bar:
            while True:
                job = _call(client, "GET", "/v1/admin/reindex")["job"]
                bar.total, bar.n = job["total"], min(job["done"], job["total"])
                bar.refresh()
                if job["status"] not in ("pending", "running"):
                    break
                time.sleep(1)
        _print_reindex(_call(client, "GET", "/v1/admin/reindex"))
        if job["status"] != "succeeded":
            raise typer.Exit(1)


def _collection_name(prefix: str, folder: Path) -> str:
    """A collection named after a folder: its name's characters a collection name allows, others as '-'."""
    return prefix + "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in folder.resolve().name)


def _eval_qa(
    folder: Path, qa: Path, name: str, url: str, *, k: int, mode: str | None, rerank: str | None,
    search_options: dict[str, Any], max_questions: int | None, sample: int | None, seed: int, as_json: bool,
) -> None:
    """`pgsage eval DIR --qa FILE`: search and ask each question, scored on its gold answers."""
    from tqdm import tqdm

    from app.eval.qa import Passage, QuestionResult, load_questions, score, select

    if not folder.is_dir():
        raise typer.Exit(_fail(f"{folder} is not a folder of documents"))
    try:
        questions = select(load_questions(qa), max_questions=max_questions, sample=sample, seed=seed)
    except (OSError, ValueError) as exc:
        raise typer.Exit(_fail(f"{qa} is not a readable question file: {exc}")) from None
    if not questions:
        raise typer.Exit(_fail(f"{qa} has no questions to score"))
    files = list(_expand([folder]))
    if not files:
        raise typer.Exit(_fail(f"{folder} holds no supported files"))
    missing = sorted({q.document for q in questions} - {external_id for _, external_id in files})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise typer.Exit(_fail(f"{len(missing)} document(s) named in {qa} are not in {folder}: {shown}"))
    if any(v is not None for v in search_options.values()):
        typer.echo("note: the retrieval knobs apply to /v1/search only; /v1/ask takes mode and rerank", err=True)
    search_body = {"k": k, "collection": name, "group": "passage", "mode": mode, "rerank": rerank, **search_options}
    ask_body = {"k": k, "collection": name, "mode": mode, "rerank": rerank}
    results: list[QuestionResult] = []
    with _client(url) as client:
        have = next((c for c in _call(client, "GET", "/v1/status")["collections"] if c["name"] == name), None)
        if have is None or have["indexed"] < len(files):
            typer.echo(f"ingesting {len(files)} files of {folder} into collection {name!r}...", err=True)
            if _ingest_files(client, files, name, {}, wait=True, err=True):
                raise typer.Exit(_fail("the documents did not ingest cleanly; see above"))
        for question in tqdm(questions, desc="questions", unit="q", disable=as_json):
            started = time.perf_counter()
            found = _call(client, "POST", "/v1/search", json={**search_body, "query": question.question})
            search_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            answered = _call(client, "POST", "/v1/ask", json={**ask_body, "question": question.question})
            ask_ms = (time.perf_counter() - started) * 1000
            passages = [Passage(hit["external_id"], hit["text"]) for hit in found["results"]]
            results.append(QuestionResult(question, passages, answered["answer"], search_ms, ask_ms))
    scores = score(results, k)
    out: dict[str, Any] = {key: round(v, 1 if "latency" in key else 4) for key, v in scores.items()}
    out.update(questions=len(results), collection=name, k=k, mode=found["mode"], rerank=found["rerank"],
               answer_mode=answered["mode"])
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"{len(results)} questions on {name} (k {k}, mode {out['mode']}, rerank {out['rerank']})")
    for key in dict.fromkeys(("evidence@1", f"evidence@{k}", "passage_hit@1", f"passage_hit@{k}", "document@1",
                              "answer_holds")):
        if key in out:  # evidence only when the question file gives it
            typer.echo(f"  {key:<16}{out[key]:.4f}")
    typer.echo(f"  answer length   {out['mean_answer_words']:.1f} words on average ({out['answer_mode']})")
    for name in ("search", "ask"):
        p50, p95 = out[f"{name}_latency_ms_p50"], out[f"{name}_latency_ms_p95"]
        typer.echo(f"  {name + ' latency':<16}p50 {p50:.1f} ms, p95 {p95:.1f} ms")


@app.command(name="eval")
def eval_(
    folder: Annotated[
        Path, typer.Argument(help="A BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv); with --qa, "
                             "a folder of documents.")
    ],
    split: Annotated[str, typer.Option(help="The qrels split to score (qrels/SPLIT.tsv).")] = "test",
    collection: Annotated[
        str | None, typer.Option("--collection", "-c", help="Collection for the corpus (default: beir-FOLDER).")
    ] = None,
    mode: ModeOpt = None,
    rerank: RerankOpt = None,
    candidates: Annotated[int | None, typer.Option(help="Documents each retrieval leg brings in.")] = None,
    fusion: Annotated[str | None, typer.Option(help="zscore, convex or rrf.")] = None,
    dense_weight: Annotated[float | None, typer.Option(help="Share of the dense leg in fusion (0-1).")] = None,
    document_weight: Annotated[float | None, typer.Option(help="Weight of the document vector.")] = None,
    bm25_k1: Annotated[float | None, typer.Option("--bm25-k1", help="BM25 k1.")] = None,
    bm25_b: Annotated[float | None, typer.Option("--bm25-b", help="BM25 b.")] = None,
    rerank_depth: Annotated[int | None, typer.Option(help="Candidates the reranker reads.")] = None,
    prf_docs: Annotated[int | None, typer.Option(help="Feedback documents of the prf reranker.")] = None,
    prf_beta: Annotated[float | None, typer.Option(help="Weight of the feedback centroid (prf).")] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW ef_search.")] = None,
    passage_dense_weight: Annotated[
        float | None, typer.Option(help="Passage ranking: share of the dense leg beside BM25 (0-1).")] = None,
    passage_document_weight: Annotated[
        float | None, typer.Option(help="Passage ranking: weight of the passage's document.")] = None,
    passage_sentence_weight: Annotated[
        float | None, typer.Option(help="Passage ranking: weight of the passage's best sentence.")] = None,
    passage_title_weight: Annotated[
        float | None, typer.Option(help="Passage ranking: weight of the question's terms in the title.")] = None,
    lexical_depth: Annotated[
        int | None, typer.Option(help="Passage lexical leg: postings read per query term (0: all).")] = None,
    max_queries: Annotated[int | None, typer.Option(help="Score only the first N judged queries.")] = None,
    qa: Annotated[
        Path | None, typer.Option(help="Questions with gold answers (JSON Lines of id, question, answers, "
                                  "document): score passages and answers over the documents in FOLDER.")
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Passages searched and chunks read per question (--qa).")] = 5,
    max_questions: Annotated[int | None, typer.Option(help="Only the first N questions (--qa).")] = None,
    sample: Annotated[int | None, typer.Option(help="A random sample of N questions (--qa; see --seed).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample.")] = 0,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Score retrieval on a labelled BEIR set through the running service (ingesting the corpus if needed).

    Prints nDCG@10, Recall@10, Recall@100, MRR@10 and search latency p50/p95 (client-measured).

    With --qa (documents in FOLDER, collection qa-FOLDER): passage hit@1/@k, document@1, answer holds.
    """
    import statistics

    from app.eval.beir import load_qrels, load_queries
    from app.eval.metrics import evaluate

    knobs = {
        "candidates": candidates, "fusion": fusion, "dense_weight": dense_weight,
        "document_weight": document_weight, "bm25_k1": bm25_k1, "bm25_b": bm25_b,
        "rerank_depth": rerank_depth, "prf_docs": prf_docs, "prf_beta": prf_beta,
        "passage_dense_weight": passage_dense_weight, "passage_document_weight": passage_document_weight,
        "passage_sentence_weight": passage_sentence_weight, "passage_title_weight": passage_title_weight,
        "lexical_depth": lexical_depth,
    }
    retrieval = {key: value for key, value in knobs.items() if value is not None} or None
    if qa is not None:
        _eval_qa(folder, qa, collection or _collection_name("qa-", folder), url, k=k, mode=mode, rerank=rerank,
                 search_options={"ef_search": ef_search, "retrieval": retrieval}, max_questions=max_questions,
                 sample=sample, seed=seed, as_json=as_json)
        return

    corpus = folder / "corpus.jsonl"
    try:
        qrels = load_qrels(folder, split)
        queries = load_queries(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise typer.Exit(_fail(f"{folder} is not a readable BEIR folder: {exc}")) from None
    if not corpus.is_file():
        raise typer.Exit(_fail(f"{corpus} is missing"))
    name = collection or _collection_name("beir-", folder)
    ids = [q for q in qrels if q in queries][:max_queries]
    if not ids:
        raise typer.Exit(_fail(f"no query of {split!r} has both a text and labels"))
    # Documents are judged here, so results are documents (each shown by its best passage).
    body: dict[str, Any] = {"k": 100, "collection": name, "group": "document", "mode": mode, "rerank": rerank,
                            "ef_search": ef_search,
                            "retrieval": retrieval}
    with _client(url) as client:
        lines = sum(1 for line in corpus.open(encoding="utf-8") if line.strip())
        have = next((c for c in _call(client, "GET", "/v1/status")["collections"] if c["name"] == name), None)
        if have is None or have["indexed"] < lines:
            typer.echo(f"ingesting {corpus} into collection {name!r}...", err=True)
            if _ingest_files(client, [(corpus, corpus.name)], name, {}, wait=True, err=True):
                raise typer.Exit(_fail("the corpus did not ingest cleanly; see above"))
        rankings: dict[str, list[str]] = {}
        latencies: list[float] = []
        from tqdm import tqdm

        for qid in tqdm(ids, desc="queries", unit="q", disable=as_json):
            started = time.perf_counter()
            result = _call(client, "POST", "/v1/search", json={**body, "query": queries[qid]})
            latencies.append((time.perf_counter() - started) * 1000)
            rankings[qid] = [hit["external_id"] for hit in result["results"]]
    scores = evaluate(rankings, {q: qrels[q] for q in ids})
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    out = {
        "ndcg@10": round(scores["ndcg@10"], 4),
        "recall@10": round(scores["recall@10"], 4),
        "recall@100": round(scores["recall@100"], 4),
        "mrr@10": round(scores["mrr@10"], 4),
        "latency_ms_p50": round(cuts[49], 1),
        "latency_ms_p95": round(cuts[94], 1),
        "queries": len(ids),
        "collection": name,
        "split": split,
        "mode": result["mode"],
        "rerank": result["rerank"],
        "retrieval": body["retrieval"] or {},
    }
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"{split}: {len(ids)} queries on {name} (mode {out['mode']}, rerank {out['rerank']})")
    for key in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
        typer.echo(f"  {key:<11}{out[key]:.4f}")
    typer.echo(f"  latency    p50 {out['latency_ms_p50']:.1f} ms, p95 {out['latency_ms_p95']:.1f} ms")


# ---------------------------------------------------------------- API keys (on the database directly)

keys_app = typer.Typer(
    help="API keys: create, list, revoke. Works on the database directly (DATABASE_URL, or the embedded one).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@contextmanager
def _key_database(url: str | None = None) -> Iterator[sessionmaker[Session]]:
    """Sessions on the configured database, migrated; an embedded server started here is stopped after."""
    from app.db.session import database_url, make_engine, make_sessionmaker

    settings = get_settings()
    pgdata = settings.data_dir.resolve() / "pg"
    started_here = url is None and settings.database_url is None and not (pgdata / "postmaster.pid").exists()
    url = url or database_url(settings)
    _alembic_upgrade(url)
    engine = make_engine(settings.model_copy(update={"database_url": url}), pool_size=1)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()
        if started_here:
            from app.embedded import stop_embedded_database

            stop_embedded_database(settings.data_dir)


def _first_key_hint(url: str | None, data_dir: Path | None) -> None:
    from app import keys

    with _key_database(url) as factory, factory() as session:
        if keys.active_admins(session):
            return
    where = f"PGSAGE_DATA_DIR={data_dir} " if data_dir is not None else ""
    typer.echo(
        "key:      none yet; every /v1 call and the console need one. Create the first admin key (shown once):\n"
        f"            {where}pgsage keys create --name admin --role admin --collection '*'\n"
        "          then: export PGSAGE_API_KEY=<the key>"
    )


def _key_line(row: dict[str, Any]) -> str:
    used = row["last_used_at"].strftime("%Y-%m-%d %H:%M") if row["last_used_at"] else "never"
    state = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "active"
    return (
        f"{row['id']}  pgs_{row['prefix']}  {row['role']:<5}  {','.join(row['collections']):<24}  "
        f"{row['name']}  (last used {used}; {state})"
    )


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for.")],
    role: Annotated[str, typer.Option(help="read (search, ask, read), write (also ingest, delete) or admin.")] = "read",
    collection: Annotated[
        list[str], typer.Option("--collection", "-c", help="A collection it reaches (repeatable); '*' for all.")
    ] = ...,  # type: ignore[assignment]
    as_json: JsonOpt = False,
) -> None:
    """Create a key; it is printed once, only its hash is stored."""
    from app import keys
    from app.errors import AppError

    try:
        with _key_database() as factory, factory.begin() as session:
            row, key = keys.create(session, name, role, collection)
    except AppError as exc:
        raise typer.Exit(_fail(exc.message)) from None
    if as_json:
        typer.echo(json.dumps({**row, "key": key}, default=str))
        return
    typer.echo(_key_line(row))
    typer.echo(f"\n{key}\n\nThis is the only time the key is shown. Use it with: export PGSAGE_API_KEY={key}")


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The keys (id, prefix, role, collections, last use); never the keys themselves."""
    from app import keys

    with _key_database() as factory, factory() as session:
        rows = keys.listing(session, include_revoked=include_revoked)
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for row in rows:
        typer.echo(_key_line(row))
    if not rows:
        typer.echo("no keys")


@keys_app.command("revoke")
def keys_revoke(
    ident: Annotated[str, typer.Argument(help="The key's id, its pgs_ prefix, or the key itself.")],
) -> None:
    """Revoke a key; requests with it are refused from now on."""
    from app import keys
    from app.errors import AppError

    try:
        with _key_database() as factory, factory.begin() as session:
            row = keys.revoke(session, ident)
    except AppError as exc:
        raise typer.Exit(_fail(exc.message)) from None
    typer.echo(f"revoked {_key_line(row)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

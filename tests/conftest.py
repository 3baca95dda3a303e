"""Session fixtures: a migrated database, Redis, settings for them, a worker process, the API."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from app.config import Settings, get_settings
from tests.fixtures.helpers import make_key
from tests.fixtures.services import (
    WorkerProcess,
    migrate,
    postgres_server,
    redis_server,
    scratch_database,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with postgres_server() as server, scratch_database(server) as url:
        migrate(url)
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        if url is None:
            pytest.skip("no Redis: set REDIS_URL or run a Docker engine for testcontainers")
        yield url


@pytest.fixture(scope="session")
def service_env(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Environment shared by the in-process API and the worker subprocess."""
    env = {
        "PGSAGE_DATABASE_URL": database_url,
        "PGSAGE_REDIS_URL": redis_url,
        "PGSAGE_QUEUE_NAME": f"pgsage-test-{uuid.uuid4().hex[:8]}",
        "PGSAGE_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "PGSAGE_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        "PGSAGE_INGEST_BATCH_DOCUMENTS": "16",
        # Every request goes through the Redis rate limiter, with room for tests that fire fast;
        # test_access.py checks the limit itself with a tight one.
        "PGSAGE_RATE_LIMIT_PER_MINUTE": "600000",
        "PGSAGE_RATE_LIMIT_BURST": "10000",
        "PGSAGE_AUTH_FAILURES_PER_MINUTE": "600000",
        "PGSAGE_AUTH_FAILURES_BURST": "10000",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    yield {**os.environ, **env}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]) -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(service_env, tmp_path_factory.mktemp("worker") / "worker.log")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    """The in-process API, sending an admin key for every collection."""
    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {make_key(c, 'admin', ['*'])}"
        yield c


@pytest.fixture(scope="session")
def anonymous(client: TestClient) -> Iterator[TestClient]:
    """The same API with no key."""
    with TestClient(client.app) as c:
        yield c


@pytest.fixture
def collection() -> str:
    """A collection name of this test's own."""
    return f"t-{uuid.uuid4().hex[:10]}"

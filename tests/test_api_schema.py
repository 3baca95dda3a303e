"""schemathesis over every operation of the published OpenAPI schema, with a valid admin key.

The real API runs as a uvicorn process on a database of its own (so generated admin calls, such as a
rollback or a key revocation, cannot disturb other tests), with the real model and Redis. The
schemathesis command line then runs every phase (examples, coverage, fuzzing, stateful) with every
check: no 5xx, status codes, content types, headers and bodies as documented, schema-violating
requests refused and schema-valid ones accepted. tests/schemathesis.toml holds the one exception
(uploads are judged by their content). The run must pass and make at least 1,000 requests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.services import scratch_api

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).parent / "schemathesis.toml"
EXAMPLES = 150
SEED = 4
MIN_REQUESTS = 1000


@pytest.fixture(scope="module")
def api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A uvicorn process of the API on its own database; its URL and an admin key."""
    log = tmp_path_factory.mktemp("schemathesis") / "api.log"
    with scratch_api(service_env, log, "admin") as (base, key):
        # Something to find: a collection with a document in it.
        r = httpx.post(f"{base}/v1/documents", json={"text": "Tides follow the Moon.", "external_id": "tides"},
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 202, r.text
        yield base, key
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_schemathesis_finds_nothing_in_at_least_1000_requests(api: tuple[str, str], tmp_path: Path) -> None:
    base, key = api
    binary = Path(sys.executable).parent / "schemathesis"
    cmd = [str(binary), "--config-file", str(CONFIG), "run", f"{base}/openapi.json",
           "-H", f"Authorization: Bearer {key}", "--max-examples", str(EXAMPLES), "--checks", "all",
           "--seed", str(SEED), "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                       env={**os.environ, "NO_COLOR": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    ops = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", out)
    assert ops, out[-3000:]
    assert ops.group(1) == ops.group(2) == ops.group(3), ops.group(0)  # every operation tested
    assert int(ops.group(1)) >= 16
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m, out[-3000:]
    generated, passed = int(m.group(1)), int(m.group(2))
    assert generated == passed
    assert generated >= MIN_REQUESTS, out[-3000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in out, out[-3000:]

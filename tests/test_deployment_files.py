"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml, .env.example.

No services and no Docker engine needed: the files are parsed and checked against the code they
drive (the Typer CLI in app.cli and the Settings class in app.config).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"

SERVICES = {"postgres", "redis", "migrate", "api", "worker", "beat"}
APP_SERVICES = {"migrate", "api", "worker", "beat"}
# One-shot (migrate) and scheduler (beat) containers have nothing meaningful to probe.
NO_HEALTHCHECK = {"migrate", "beat"}
UNPREFIXED = {"DATABASE_URL", "REDIS_URL"}

ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
COMMENTED_ASSIGNMENT = re.compile(r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$")


# ---------------------------------------------------------------- helpers


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # resolves anchors and `<<` merges
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {k: (v if sep else None) for k, sep, v in pairs}
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _exec_form(args: str) -> list[str]:
    argv = json.loads(args) if args.startswith("[") else shlex.split(args)
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def _env_example_lines() -> list[str]:
    return ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()


def _env_example_keys() -> tuple[dict[str, str], set[str]]:
    """The active KEY=value assignments, and the keys only present as commented-out `# KEY=` lines."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in _env_example_lines():
        if m := ASSIGNMENT.match(line):
            active[m.group(1)] = m.group(2)
        elif m := COMMENTED_ASSIGNMENT.match(line):
            commented.add(m.group(1))
    return active, commented


def _settings_keys() -> dict[str, str]:
    """Each environment key Settings reads, mapped to its field name."""
    keys = {f"PGSAGE_{name.upper()}": name for name in Settings.model_fields}
    keys.update({"DATABASE_URL": "database_url", "REDIS_URL": "redis_url"})
    return keys


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No PGSAGE_*, DATABASE_URL or REDIS_URL from the calling environment."""
    for key in list(os.environ):
        if key.startswith("PGSAGE_") or key in UNPREFIXED:
            monkeypatch.delenv(key)
    return monkeypatch


# ---------------------------------------------------------------- (a) compose shape


def test_compose_has_the_services() -> None:
    services = _services()
    assert set(services) == SERVICES
    assert str(services["postgres"]["image"]).startswith("pgvector/pgvector:")
    assert str(services["redis"]["image"]).startswith("redis:")
    for name in APP_SERVICES:
        assert services[name].get("build") is not None or services[name].get("image"), name


def test_compose_healthchecks() -> None:
    services = _services()
    for name, service in services.items():
        if name in NO_HEALTHCHECK:
            continue
        check = service.get("healthcheck")
        assert check, f"service {name} has no healthcheck"
        assert not check.get("disable"), name
        assert check.get("test"), name
    assert "pg_isready" in " ".join(_argv(services["postgres"]["healthcheck"]["test"]))
    assert "ping" in _argv(services["redis"]["healthcheck"]["test"])
    api_check = " ".join(_argv(services["api"]["healthcheck"]["test"]))
    assert "urllib" in api_check
    assert "http://localhost:8000/readyz" in api_check


def test_compose_dependencies() -> None:
    services = _services()
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        for dep, spec in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            assert dep in services, f"{name} depends on unknown service {dep}"
            if spec.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy; it has no check"
    assert "8000:8000" in [str(p) for p in services["api"]["ports"]]


def test_compose_env_file_is_optional() -> None:
    for name in APP_SERVICES:
        env_files = _services()[name]["env_file"]
        assert {"path": ".env", "required": False} in env_files, name


def test_compose_urls_point_at_the_bundled_services() -> None:
    from sqlalchemy.engine import make_url

    services = _services()
    pg = _environment(services["postgres"])
    for name in APP_SERVICES:
        env = _environment(services[name])
        db = make_url(str(env["DATABASE_URL"]))
        assert (db.host, db.port, db.username, db.password, db.database) == (
            "postgres", 5432, pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
        ), name
        assert str(env["REDIS_URL"]).startswith("redis://redis:6379/"), name


# ---------------------------------------------------------------- (b) every `pgsage X` is a real subcommand


def _pgsage_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `pgsage`) for each pgsage call in compose commands and the Dockerfile CMD."""
    calls: list[tuple[str, list[str]]] = []
    for name, service in _services().items():
        if "command" in service:
            argv = _argv(service["command"])
            if argv and argv[0] == "pgsage":
                calls.append((f"compose service {name}", argv[1:]))
    for keyword, args in _dockerfile():
        if keyword in ("CMD", "ENTRYPOINT"):
            argv = _exec_form(args)
            if argv and argv[0] == "pgsage":
                calls.append((f"Dockerfile {keyword}", argv[1:]))
    return calls


def test_pgsage_calls_are_real_subcommands() -> None:
    import typer

    from app.cli import app

    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    calls = _pgsage_invocations()
    assert {where for where, _ in calls} >= {f"compose service {s}" for s in APP_SERVICES} | {"Dockerfile CMD"}
    for where, argv in calls:
        assert argv, f"{where}: `pgsage` without a subcommand"
        name, *rest = argv
        assert name in commands, f"{where}: `pgsage {name}` is not one of {sorted(commands)}"
        # The options must parse too (e.g. `api --host --port`); make_context does not run the command.
        commands[name].make_context(name, list(rest))


def test_console_script_is_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["pgsage"] == "app.cli:main"


# ---------------------------------------------------------------- (c) compose environment keys are settings


def test_compose_environment_is_read_by_settings() -> None:
    known = _settings_keys()
    for name in APP_SERVICES:
        env = _environment(_services()[name])
        assert {"DATABASE_URL", "REDIS_URL"} <= set(env), name
        unknown = set(env) - set(known)
        assert not unknown, f"service {name} sets keys Settings does not read: {sorted(unknown)}"


def test_compose_environment_validates(clean_env: pytest.MonkeyPatch) -> None:
    env = _environment(_services()["api"])
    for key, value in env.items():
        clean_env.setenv(key, value or "")
    settings = Settings(_env_file=None)
    assert settings.database_url == "postgresql+psycopg://pgsage:pgsage@postgres:5432/pgsage"
    assert settings.redis_url == "redis://redis:6379/0"


# ---------------------------------------------------------------- (d) .env.example matches Settings


def test_env_example_covers_settings_exactly() -> None:
    active, commented = _env_example_keys()
    present = set(active) | commented
    known = _settings_keys()
    unknown = present - set(known)
    assert not unknown, f".env.example has keys Settings does not read: {sorted(unknown)}"
    assert not set(active) & commented, "a key is both set and commented out"
    covered = {known[key] for key in present}
    missing = set(Settings.model_fields) - covered
    assert not missing, f"Settings fields missing from .env.example: {sorted(missing)}"
    for field in Settings.model_fields:
        spellings = [k for k in present if known[k] == field]
        assert len(spellings) == 1, f"{field} appears as {spellings}"


def test_env_example_every_assignment_is_documented() -> None:
    lines = _env_example_lines()
    for i, line in enumerate(lines):
        if ASSIGNMENT.match(line) or COMMENTED_ASSIGNMENT.match(line):
            before = lines[i - 1] if i else ""
            documented = before.startswith("#") and not COMMENTED_ASSIGNMENT.match(before)
            assert documented, f".env.example line {i + 1} ({line!r}) needs a comment line above it"


def test_env_example_sets_no_secret() -> None:
    active, _ = _env_example_keys()
    secrets = {f"PGSAGE_{n.upper()}" for n, f in Settings.model_fields.items() if "Secret" in str(f.annotation)}
    assert secrets, "expected at least one secret field (llm_api_key)"
    for key in secrets & set(active):
        assert active[key] == "", f"{key} must be left empty in .env.example"


# ---------------------------------------------------------------- (e) .env.example loads


def test_env_example_loads_as_dotenv(clean_env: pytest.MonkeyPatch) -> None:
    loaded = Settings(_env_file=ENV_EXAMPLE)
    assert loaded.model_dump() == Settings(_env_file=None).model_dump(), ".env.example must show the defaults"


def test_env_example_loads_as_compose_env_file(clean_env: pytest.MonkeyPatch) -> None:
    """docker compose passes every active line as an environment variable, empty values included."""
    defaults = Settings(_env_file=None).model_dump()
    active, _ = _env_example_keys()
    for key, value in active.items():
        clean_env.setenv(key, value)
    assert Settings(_env_file=None).model_dump() == defaults


# ---------------------------------------------------------------- (f) Dockerfile


def _dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for keyword, rest in _dockerfile():
        if keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value.strip("\"'")
    return args


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    args = _dockerfile_args()

    def expand(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text).replace('"', "")

    runs = [(i, expand(rest)) for i, (keyword, rest) in enumerate(_dockerfile()) if keyword == "RUN"]
    torch = [(i, rest) for i, rest in runs if re.search(r"pip install\b.*\btorch\b", rest)]
    project = [i for i, rest in runs if re.search(r"pip install\s+(?:-\S+\s+)*\.(?:\s|$)", rest)]
    assert torch, "no RUN installs torch"
    assert project, "no RUN installs the project (`pip install .`)"
    assert torch[0][0] < project[0], "torch must be installed before the project"
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch[0][1], "install the CPU build of torch"


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in _dockerfile():
        if keyword == "ENV":
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=value, got {token!r}"
                env[key] = value
    return env


def test_dockerfile_runtime() -> None:
    instructions = _dockerfile()
    assert instructions[0][0] == "FROM"
    assert instructions[0][1].startswith("python:3.11-slim")
    env = _dockerfile_env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(keyword == "EXPOSE" and "8000" in args.split() for keyword, args in instructions)
    entry = [_exec_form(a) for k, a in instructions if k == "ENTRYPOINT"]
    cmd = [_exec_form(a) for k, a in instructions if k == "CMD"]
    argv = (entry[-1] if entry else []) + (cmd[-1] if cmd else [])
    assert argv[:2] == ["pgsage", "api"]
    assert "0.0.0.0" in argv
    unknown = {k for k in env if k.startswith("PGSAGE_")} - set(_settings_keys())
    assert not unknown, f"the Dockerfile sets keys Settings does not read: {sorted(unknown)}"


def test_dockerignore_keeps_what_the_image_needs() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatch(p, pat) for p in prefixes) or fnmatch.fnmatch(parts[-1], pat):
                result = not negate
        return result

    # `pgsage migrate` needs alembic.ini and alembic/ in the image; the samples feed `pgsage up --demo`.
    for needed in ("pyproject.toml", "app/cli.py", "app/config.py", "app/samples/overview.md",
                   "workers/celery_app.py", "alembic.ini", "alembic/env.py"):
        assert not ignored(needed), f".dockerignore drops {needed}"
    for dropped in (".venv", ".git", ".env", ".pgsage", "tests", "app/__pycache__/x.pyc"):
        assert ignored(dropped), f".dockerignore keeps {dropped}"

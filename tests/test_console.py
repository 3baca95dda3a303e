"""The web console at /ui, driven in headless Chromium against a real API process and a real worker.

Each browser test leaves full-page screenshots in test-artifacts/console/. Nothing here waits on a clock:
Playwright's expect() retries until the page shows what is expected (indexing runs the real model on CPU,
hence the long timeouts).
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.fixtures.browser import browser, page, screenshot
from tests.fixtures.services import WorkerProcess, api_process

if TYPE_CHECKING:
    from playwright.sync_api import Page

__all__ = ["browser", "page"]  # fixtures

CORPUS = Path(__file__).parent / "data" / "corpus"
INDEXING = 120_000  # ms: the real embedding model on a shared 2-core CPU
SOON = 30_000


def expect(actual: Any, message: str | None = None) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(actual, message)


@pytest.fixture(scope="module")
def console(service_env: dict[str, str], worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[str]:
    """The API (and so the console) as a uvicorn process; the session's worker indexes what it is sent."""
    log = tmp_path_factory.mktemp("console") / "api.log"
    with api_process(service_env, log) as base:
        yield base
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def keyring(service_env: dict[str, str]) -> Iterator[Any]:
    """Sessions on the database the API process uses, to make and revoke real keys there."""
    from app.config import get_settings
    from app.db.session import make_engine, make_sessionmaker

    engine = make_engine(get_settings(), pool_size=1)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def make_key(keyring: Any) -> Callable[..., str]:
    """A real API key: make_key(role, collections, name)."""
    from app import keys
    from app.db.session import session_scope

    def make(role: str, collections: list[str], name: str | None = None) -> str:
        with session_scope(keyring) as session:
            _, key = keys.create(session, name or f"console {role}", role, collections)
        return key

    return make


@pytest.fixture(scope="module")
def seeded(console: str, make_key: Callable[..., str]) -> dict[str, str]:
    """Two collections indexed through the API: one to ask and browse, one to delete from."""
    names = {"ask": f"console-ask-{uuid.uuid4().hex[:6]}", "delete": f"console-del-{uuid.uuid4().hex[:6]}"}
    files = {"ask": ["volcanoes.md", "sourdough.md"], "delete": ["coffee.txt", "photosynthesis.txt"]}
    headers = {"Authorization": f"Bearer {make_key('write', ['*'])}"}
    jobs = []
    with httpx.Client(base_url=console, headers=headers, timeout=60) as http:
        for role, collection in names.items():
            for name in files[role]:
                r = http.post("/v1/documents", files={"file": (name, (CORPUS / name).read_bytes())},
                              data={"collection": collection, "path": name})
                assert r.status_code == 202, r.text
                jobs.append(r.json()["status_url"])
        deadline = time.monotonic() + INDEXING / 1000
        for url in jobs:
            while (job := http.get(url).json())["state"] in ("queued", "running"):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert job["state"] == "succeeded", job
    return names


def sign_in(page: Page, console: str, key: str) -> None:
    page.goto(f"{console}/")  # the service's front page is the console
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def test_console_files_are_public_with_a_strict_policy_and_no_api_operations(console: str) -> None:
    """Static files need no key, carry a self-only CSP and their content types; / redirects; none is in OpenAPI."""
    with httpx.Client(base_url=console) as http:
        front = http.get("/", follow_redirects=False)
        assert front.status_code in (302, 307)
        assert front.headers["location"] == "/ui"
        for path, media in [("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/static/app.js", "text/javascript"),
                            ("/ui/static/style.css", "text/css"), ("/ui/static/api.js", "text/javascript")]:
            r = http.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["content-type"].startswith(media), (path, r.headers["content-type"])
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp
            assert "unsafe" not in csp
            assert r.headers["x-content-type-options"] == "nosniff"
        assert "<script type=\"module\" src=\"/ui/static/app.js\">" in http.get("/ui").text
        for bad in ("/ui/static/../__init__.py", "/ui/static/%2e%2e%2f__init__.py", "/ui/static/nothing.js"):
            assert http.get(bad).status_code == 404, bad
        paths = http.get("/openapi.json").json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/ui")]
        assert http.get("/v1/me").status_code == 401  # the API itself still wants a key
        refused = http.post("/ui")
        assert (refused.status_code, refused.headers["allow"]) == (405, "GET, HEAD")


def test_upload_a_folder_two_files_index_and_the_broken_one_fails_with_its_reason(
    page: Page, console: str, make_key: Callable[..., str], tmp_path: Path
) -> None:
    collection = f"console-up-{uuid.uuid4().hex[:6]}"
    folder = tmp_path / "notes"
    (folder / "kitchen").mkdir(parents=True)
    shutil.copy(CORPUS / "volcanoes.md", folder / "volcanoes.md")
    shutil.copy(CORPUS / "sourdough.md", folder / "kitchen" / "sourdough.md")
    (folder / "broken.pdf").write_bytes(b"\x00\x17garbage, not a PDF at all\xff\xfe" * 20)

    sign_in(page, console, make_key("write", [collection], "console writer"))
    page.get_by_role("link", name="Documents").click()
    expect(page.locator("#upload-collection")).to_have_value(collection)  # the key's one collection
    page.locator("#upload-folder").set_input_files(folder)

    uploads = page.locator("#uploads")
    volcanoes = uploads.locator('li[data-path="volcanoes.md"]')
    sourdough = uploads.locator('li[data-path="kitchen/sourdough.md"]')  # the path inside the folder is kept
    broken = uploads.locator('li[data-path="broken.pdf"]')
    expect(broken).to_have_attribute("data-state", "failed", timeout=SOON)
    expect(broken.locator(".upload-detail")).to_contain_text("not a PDF")
    expect(volcanoes).to_have_attribute("data-state", "indexed", timeout=INDEXING)
    expect(sourdough).to_have_attribute("data-state", "indexed", timeout=INDEXING)
    expect(volcanoes.locator(".upload-state")).to_have_text("indexed")
    expect(volcanoes.locator("progress")).to_have_js_property("value", 1)

    # The list refreshes once the jobs settle: both documents, indexed, under their relative paths.
    rows = page.locator("#documents-rows tr")
    expect(rows).to_have_count(2, timeout=SOON)
    expect(page.locator('#documents-rows tr[data-external-id="kitchen/sourdough.md"]')).to_have_attribute(
        "data-status", "indexed")
    expect(page.locator('#documents-rows tr[data-external-id="volcanoes.md"] .badge')).to_have_text("indexed")
    screenshot(page, "upload-two-indexed-one-failed")


def test_ask_streams_an_answer_whose_citation_opens_the_passage(
    page: Page, console: str, make_key: Callable[..., str], seeded: dict[str, str]
) -> None:
    sign_in(page, console, make_key("read", [seeded["ask"]], "console reader"))
    expect(page.get_by_role("heading", name="Ask")).to_be_visible()
    expect(page.locator("#ask-collection")).to_have_value(seeded["ask"])
    page.get_by_label("Question").fill("Why do some volcanoes erupt explosively?")
    with page.expect_response("**/v1/ask") as answered:
        page.get_by_role("button", name="Ask", exact=True).click()
    assert answered.value.headers["content-type"].startswith("text/event-stream")

    answer = page.locator("#answer")
    expect(answer).to_have_attribute("data-done", "true", timeout=SOON)
    expect(answer).to_contain_text("magma")
    cite = answer.locator("button.cite").first
    expect(cite).to_be_visible()
    cite.click()
    passage = page.locator("#passage")
    expect(passage).to_be_visible()
    expect(page.locator("#passage-document")).to_have_text("volcanoes.md")
    expect(page.locator("#passage-text")).to_contain_text("silica-rich magma traps gas")
    expect(page.locator("#passage-heading")).to_contain_text("How volcanoes erupt")
    expect(page.locator("#passage-text mark")).not_to_have_count(0)  # the sentences the answer quotes
    screenshot(page, "ask-answer-with-open-citation")


def test_a_deleted_document_is_gone_from_search(
    page: Page, console: str, make_key: Callable[..., str], seeded: dict[str, str]
) -> None:
    collection = seeded["delete"]
    sign_in(page, console, make_key("write", [collection], "console deleter"))

    def search() -> Any:
        page.get_by_role("link", name="Search").click()
        expect(page.locator("#search-collection")).to_have_value(collection)
        page.get_by_label("Query").fill("espresso grind coffee")
        with page.expect_response("**/v1/search"):
            page.get_by_role("button", name="Search", exact=True).click()
        results = page.locator("#results")
        expect(results).to_have_attribute("data-done", "true")
        return results

    results = search()
    expect(results.locator('li[data-external-id="coffee.txt"]').first).to_be_visible()
    expect(results.locator("li").first).to_contain_text("similarity")
    screenshot(page, "search-before-delete")

    page.get_by_role("link", name="Documents").click()
    row = page.locator('#documents-rows tr[data-external-id="coffee.txt"]')
    row.get_by_role("button", name="Delete coffee.txt").click()
    row.get_by_role("button", name="Yes").click()
    expect(row).to_have_count(0)
    expect(page.locator("#documents-summary")).to_have_text("Deleted coffee.txt.")

    results = search()
    expect(results.locator("li").first).to_be_visible()  # the other document still answers
    expect(results.locator('li[data-external-id="coffee.txt"]')).to_have_count(0)
    screenshot(page, "search-after-delete")


def test_a_read_key_is_offered_no_upload_delete_or_admin(
    page: Page, console: str, make_key: Callable[..., str], seeded: dict[str, str]
) -> None:
    sign_in(page, console, make_key("read", ["*"], "console read-only"))
    expect(page.locator("#who")).to_contain_text("read")
    expect(page.get_by_role("link", name="Admin")).to_have_count(0)
    page.get_by_role("link", name="Documents").click()
    page.locator("#documents-collection").select_option(seeded["ask"])
    expect(page.locator("#documents-rows tr")).to_have_count(2)
    expect(page.locator('input[type="file"]')).to_have_count(0)
    expect(page.locator("#dropzone")).to_have_count(0)
    expect(page.get_by_role("button", name="Delete")).to_have_count(0)
    expect(page.get_by_role("heading", name="Upload")).to_have_count(0)
    screenshot(page, "read-key-documents")
    page.goto(f"{console}/ui#admin")  # not even by its address
    expect(page.get_by_role("heading", name="Ask")).to_be_visible()


def test_admin_creates_a_key_shown_once_revokes_it_and_it_is_refused(
    page: Page, console: str, make_key: Callable[..., str]
) -> None:
    sign_in(page, console, make_key("admin", ["*"], "console admin"))
    page.get_by_role("link", name="Admin").click()
    expect(page.locator("#active-space")).to_be_visible()  # the embedding space serving queries
    expect(page.locator("#models tr.active")).to_have_count(1)

    name = f"temporary {uuid.uuid4().hex[:6]}"
    page.get_by_label("Name").fill(name)
    page.get_by_label("Role").select_option("read")
    page.get_by_role("button", name="Create key").click()
    shown = page.locator("#new-key")
    expect(shown).to_have_value(re.compile(r"^pgs_"))
    key = shown.input_value()
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    row = page.locator(f'#keys tr[data-name="{name}"]')
    expect(row).to_have_count(1)
    screenshot(page, "admin-key-created")

    row.get_by_role("button", name=f"Revoke {name}").click()
    row.get_by_role("button", name="Yes").click()
    expect(row).to_have_count(0)  # revoked keys are listed only on request
    page.get_by_label("show revoked keys").check()
    expect(row).to_have_attribute("data-revoked", "true")
    page.get_by_role("link", name="Search").click()
    page.get_by_role("link", name="Admin").click()
    expect(page.locator("#keys tr").first).to_be_visible()
    expect(page.locator("#new-key")).to_have_count(0)  # shown once: gone when the page is left

    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("not valid, or has been revoked")
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    screenshot(page, "revoked-key-refused")


def test_a_key_revoked_while_signed_in_signs_out_with_the_reason(
    page: Page, console: str, make_key: Callable[..., str], keyring: Any, seeded: dict[str, str]
) -> None:
    from app import keys
    from app.db.session import session_scope

    key = make_key("read", [seeded["ask"]], "console soon revoked")
    sign_in(page, console, key)
    expect(page.locator("#ask-collection")).to_have_value(seeded["ask"])
    with session_scope(keyring) as session:
        keys.revoke(session, key)
    page.get_by_role("link", name="Documents").click()  # its next request meets a 401
    expect(page.locator("#signin-error")).to_have_text("the API key is not valid, or has been revoked")
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0  # the key is forgotten
    screenshot(page, "signed-out-by-401")

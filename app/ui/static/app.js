// The console's entry: signing in with a key, the pages the key may use, and a 401 signing out.

import { ApiError, call, forgetKey, onUnauthorized, storeKey, storedKey } from "./api.js";
import { h, replace } from "./dom.js";
import * as ask from "./ask.js";
import * as search from "./search.js";
import * as documents from "./documents.js";
import * as admin from "./admin.js";
import * as uploads from "./uploads.js";

const RANK = { read: 1, write: 2, admin: 3 };
const PAGES = [
  { id: "ask", title: "Ask", module: ask, allowed: () => true },
  { id: "search", title: "Search", module: search, allowed: () => true },
  { id: "documents", title: "Documents", module: documents, allowed: () => true },
  // Admin endpoints need an admin key for every collection; any other key would only meet 403s there.
  { id: "admin", title: "Admin", module: admin, allowed: (me) => me.role === "admin" && me.collections.includes("*") },
];

const root = document.getElementById("root");
let session = null; // {me, can(role), collection: the one chosen last, leave: the open page's clean-up}

function signInView(message) {
  const key = h("input", {
    id: "key", name: "key", type: "password", autocomplete: "off", required: true, spellcheck: "false",
    placeholder: "pgs_…",
  });
  const error = h("p", { class: "error", role: "alert", id: "signin-error" }, message ?? "");
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h(
    "form", { class: "signin", onsubmit: submit },
    h("h1", {}, "pgsage"),
    h("p", { class: "muted" }, "Sign in with an API key (from `pgsage keys create`). It is kept in this tab only."),
    h("label", { for: "key" }, "API key"),
    key,
    button,
    error,
  );
  async function submit(event) {
    event.preventDefault();
    const value = key.value.trim();
    if (!value) return;
    button.disabled = true;
    error.textContent = "";
    try {
      const me = await call("GET", "/v1/me", { key: value });
      storeKey(value);
      start(me);
    } catch (err) {
      error.textContent = err instanceof ApiError ? err.message : String(err);
    } finally {
      button.disabled = false;
    }
  }
  replace(root, form);
  key.focus();
}

function start(me) {
  session = {
    me,
    can: (role) => RANK[me.role] >= RANK[role],
    collection: null,
    leave: null,
  };
  uploads.reset();
  window.addEventListener("hashchange", route);
  route();
}

function signOut(message) {
  forgetKey();
  if (session?.leave) session.leave();
  session = null;
  uploads.reset();
  window.removeEventListener("hashchange", route);
  if (window.location.hash) history.replaceState(null, "", window.location.pathname);
  signInView(message);
}

function route() {
  if (!session) return;
  const pages = PAGES.filter((p) => p.allowed(session.me));
  const wanted = window.location.hash.replace(/^#/, "");
  const page = pages.find((p) => p.id === wanted) ?? pages[0];
  if (session.leave) session.leave();
  session.leave = null;
  const view = h("main", { id: "view", "aria-live": "polite" });
  const me = session.me;
  const reach = me.collections.includes("*") ? "all collections" : me.collections.join(", ");
  const header = h(
    "header", {},
    h("span", { class: "brand" }, "pgsage"),
    h("nav", { "aria-label": "Pages" }, pages.map((p) => h("a", {
      href: `#${p.id}`, "aria-current": p === page ? "page" : false,
    }, p.title))),
    h("span", { class: "who", id: "who" }, `${me.name} · ${me.role} · ${reach}`),
    h("button", { type: "button", id: "signout", onclick: () => signOut("Signed out.") }, "Sign out"),
  );
  replace(root, header, view);
  document.title = `${page.title} · pgsage`;
  session.leave = page.module.render(view, session) ?? null;
}

onUnauthorized((message) => signOut(message));

async function boot() {
  const key = storedKey();
  if (!key) {
    signInView();
    return;
  }
  try {
    start(await call("GET", "/v1/me"));
  } catch (err) {
    // A 401 has already signed out with its message; anything else (the service down) is shown.
    if (!(err instanceof ApiError && err.status === 401)) signInView(err.message ?? String(err));
  }
}

boot();

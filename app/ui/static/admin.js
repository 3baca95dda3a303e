// Admin (an admin key for all collections): embedding models, re-indexing, and API keys.

import { call } from "./api.js";
import { errorLine, showError } from "./common.js";
import { confirmButton, duration, h, num, replace, when } from "./dom.js";

const POLL_MS = 2000;

export function render(view, session) {
  const stops = [models(), keys(session)];
  replace(view, h("section", { class: "page admin" }, h("h1", {}, "Admin"), stops.map((s) => s.el)));
  return () => stops.forEach((s) => s.stop());
}

function models() {
  const error = errorLine("reindex-error");
  const configuration = h("p", { class: "muted", id: "configuration" });
  const table = h("tbody", { id: "models" });
  const progress = h("div", { class: "reindex", id: "reindex" });
  const message = h("p", { class: "notice", id: "reindex-message", role: "status" });
  const model = h("input", { id: "reindex-model", name: "model", placeholder: "the configured model" });
  const start = h("button", { type: "submit", id: "reindex-start" }, "Start re-index");
  let timer = null;
  let stopped = false;

  async function refresh() {
    clearTimeout(timer);
    try {
      const [status, reindex] = await Promise.all([call("GET", "/v1/status"), call("GET", "/v1/admin/reindex")]);
      if (stopped) return;
      error.textContent = "";
      const config = status.configuration ?? {};
      configuration.textContent = `Configured model: ${config.message ?? "—"} (state ${config.state ?? "—"}).`;
      replace(table, (status.models ?? []).map((m) => h("tr", { class: m.status === "active" ? "active" : "" },
        h("td", { class: "num" }, String(m.id)),
        h("td", {}, m.name),
        h("td", { class: "mono" }, m.revision ?? "—"),
        h("td", { class: "num" }, String(m.dimension)),
        h("td", {}, h("span", { class: `badge ${m.status}` }, m.status)),
        h("td", { class: "num" }, String(m.vectors)),
        h("td", {}, when(m.activated_at)))));
      drawJob(reindex);
      const open = reindex.job && (reindex.job.status === "running" || reindex.job.status === "pending");
      start.disabled = Boolean(open);
      if (open) timer = setTimeout(refresh, POLL_MS);
    } catch (err) {
      if (!stopped) showError(error, err);
    }
  }

  function drawJob({ active_space: active, job }) {
    const parts = [h("p", {}, "Active space: ",
      active ? h("strong", { id: "active-space" }, `${active.id} · ${active.name}`) : "none yet")];
    if (job) {
      const open = job.status === "running" || job.status === "pending";
      const fraction = job.total ? job.done / job.total : 0;
      parts.push(
        h("p", {}, `Re-index ${job.status}: space ${job.source.id} (${job.source.name}) → space ${job.target.id} `
          + `(${job.target.name})${job.reason ? `, ${job.reason}` : ""}`),
        h("progress", { id: "reindex-progress", max: job.total || 1, value: job.done,
          "aria-label": "Re-index progress" }),
        h("p", { class: "muted" },
          `${job.done} of ${job.total} chunks (${Math.floor(fraction * 100)}%) · `
          + `${job.rate_per_s ? `${num(job.rate_per_s, 1)} chunks/s` : "rate —"} · `
          + `${open ? `time left ${duration(job.eta_s)}` : `finished ${when(job.finished_at)}`}`),
        job.error ? h("p", { class: "error" }, job.error) : null,
        open ? confirmButton("Cancel re-index", "Cancel it?", () => act("POST", "/v1/admin/reindex/cancel",
          (r) => `Cancelled re-index ${r.cancelled}; the active space is unchanged.`)) : null,
      );
    }
    parts.push(" ", confirmButton("Roll back", "Switch back to the previous space?",
      () => act("POST", "/v1/admin/reindex/rollback", (r) => `Rolled back from space ${r.from_space} to ${r.to_space}.`)));
    replace(progress, parts);
  }

  async function act(method, path, say, json) {
    message.textContent = "";
    error.textContent = "";
    try {
      const out = await call(method, path, { json });
      message.textContent = say(out);
    } catch (err) {
      showError(error, err);
    }
    await refresh();
  }

  const form = h("form", {
    class: "inline", onsubmit: (e) => {
      e.preventDefault();
      const body = model.value.trim() ? { model: model.value.trim() } : {};
      act("POST", "/v1/admin/reindex", (r) => r.message, body);
    },
  }, h("label", { for: "reindex-model" }, "Model"), model, start);

  refresh();
  const el = h("section", { "aria-labelledby": "models-title" },
    h("h2", { id: "models-title" }, "Embedding models"),
    configuration,
    h("table", {}, h("thead", {}, h("tr", {},
      ["Space", "Model", "Revision", "Dimension", "Status", "Vectors", "Activated"].map((t) => h("th", { scope: "col" }, t)))),
    table),
    h("h2", {}, "Re-index"),
    progress, form, message, error);
  return { el, stop: () => { stopped = true; clearTimeout(timer); } };
}

function keys(session) {
  const error = errorLine("keys-error");
  const rows = h("tbody", { id: "keys" });
  const revoked = h("input", { type: "checkbox", id: "keys-revoked", onchange: () => refresh() });
  const name = h("input", { id: "key-name", name: "name", required: true, maxlength: 200 });
  const role = h("select", { id: "key-role", name: "role" },
    ["read", "write", "admin"].map((r) => h("option", { value: r }, r)));
  const collections = h("input", { id: "key-collections", name: "collections", value: "*", required: true,
    placeholder: "* or names, comma-separated" });
  const created = h("div", { id: "key-created", class: "key-once", hidden: true, role: "status" });

  async function refresh() {
    try {
      const list = await call("GET", "/v1/admin/keys", { query: { include_revoked: revoked.checked } });
      error.textContent = "";
      replace(rows, list.map(row));
      rows.dataset.loaded = "true";
    } catch (err) {
      showError(error, err);
    }
  }

  function row(k) {
    const self = k.id === session.me.id;
    return h("tr", { dataset: { id: k.id, name: k.name, revoked: k.revoked_at ? "true" : "false" } },
      h("td", { class: "mono" }, k.prefix),
      h("td", {}, k.name, self ? h("span", { class: "muted" }, " (this key)") : null),
      h("td", {}, k.role),
      h("td", {}, k.collections.join(", ")),
      h("td", {}, when(k.created_at)),
      h("td", {}, when(k.last_used_at)),
      h("td", {}, k.revoked_at ? `revoked ${when(k.revoked_at)}`
        // The API refuses to revoke the key making the request; it is not offered.
        : self ? "" : confirmButton("Revoke", "Revoke it?", () => revoke(k), { "aria-label": `Revoke ${k.name}` })));
  }

  async function revoke(k) {
    try {
      await call("DELETE", `/v1/admin/keys/${k.id}`);
    } catch (err) {
      showError(error, err);
    }
    await refresh();
  }

  async function create(event) {
    event.preventDefault();
    error.textContent = "";
    const body = {
      name: name.value.trim(),
      role: role.value,
      collections: collections.value.split(",").map((c) => c.trim()).filter(Boolean),
    };
    try {
      const k = await call("POST", "/v1/admin/keys", { json: body });
      showOnce(k);
      name.value = "";
      await refresh();
    } catch (err) {
      showError(error, err);
    }
  }

  function showOnce(k) {
    const value = h("input", { id: "new-key", readonly: true, value: k.key, spellcheck: "false",
      "aria-label": "The new key", size: Math.min(k.key.length, 60) });
    const copied = h("span", { class: "muted", role: "status" });
    const copy = h("button", {
      type: "button", id: "copy-key", onclick: async () => {
        try {
          await navigator.clipboard.writeText(k.key);
        } catch {
          value.select();
          document.execCommand("copy");
        }
        copied.textContent = "Copied.";
      },
    }, "Copy");
    replace(created,
      h("p", {}, h("strong", {}, `Key “${k.name}” (${k.role}, ${k.collections.join(", ")})`),
        ": copy it now, it is not shown again."),
      h("div", { class: "inline" }, value, copy, copied,
        h("button", { type: "button", onclick: () => { replace(created); created.hidden = true; } }, "Done")));
    created.hidden = false;
    value.select();
  }

  refresh();
  const el = h("section", { "aria-labelledby": "keys-title" },
    h("h2", { id: "keys-title" }, "API keys"),
    h("form", { class: "inline", id: "key-form", onsubmit: create },
      h("label", { for: "key-name" }, "Name"), name,
      h("label", { for: "key-role" }, "Role"), role,
      h("label", { for: "key-collections" }, "Collections"), collections,
      h("button", { type: "submit", id: "key-create" }, "Create key")),
    created, error,
    h("label", { class: "check" }, revoked, " show revoked keys"),
    h("table", {}, h("thead", {}, h("tr", {},
      ["Prefix", "Name", "Role", "Collections", "Created", "Last used", ""].map((t) => h("th", { scope: "col" }, t)))),
    rows));
  return { el, stop: () => {} };
}

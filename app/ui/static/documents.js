// Documents: browse (collection, status, text; keyset pages), delete, and upload files or folders.

import { call } from "./api.js";
import { collectionSelect, errorLine, showError } from "./common.js";
import { confirmButton, h, replace, when } from "./dom.js";
import * as uploads from "./uploads.js";

const PAGE = 50;

export function render(view, session) {
  const canWrite = session.can("write");
  const { select, ready } = collectionSelect(session, { id: "documents-collection", all: true, onchange: reload });
  const status = h("select", { id: "documents-status", name: "status", onchange: reload },
    h("option", { value: "" }, "any status"),
    h("option", { value: "queued" }, "queued"),
    h("option", { value: "indexed" }, "indexed"),
    h("option", { value: "failed" }, "failed"));
  const q = h("input", { id: "documents-q", name: "q", type: "search", placeholder: "Title or external id" });
  const error = errorLine("documents-error");
  const rows = h("tbody", { id: "documents-rows" });
  const summary = h("p", { class: "muted", id: "documents-summary" });
  const more = h("button", { type: "button", id: "documents-more", hidden: true, onclick: () => load(false) },
    "Next page");
  let cursor = null;
  let shown = 0;
  let loading = null;

  async function load(first) {
    const controller = new AbortController();
    loading?.abort();
    loading = controller;
    error.textContent = "";
    const query = { collection: select.value, status: status.value, q: q.value.trim(), limit: PAGE };
    if (!first) query.cursor = cursor;
    try {
      const page = await call("GET", "/v1/documents", { query, signal: controller.signal });
      if (loading !== controller) return;
      if (first) {
        replace(rows);
        shown = 0;
      }
      rows.append(...page.items.map(row));
      shown += page.items.length;
      cursor = page.next_cursor;
      more.hidden = !cursor;
      summary.textContent = shown ? `${shown} document${shown === 1 ? "" : "s"} shown${cursor ? ", more on the next page" : ""}`
        : "No documents match.";
      rows.dataset.loaded = "true";
    } catch (err) {
      showError(error, err);
    }
  }

  function reload() {
    cursor = null;
    return load(true);
  }

  function row(d) {
    const tr = h("tr", { dataset: { id: d.id, externalId: d.external_id, status: d.status } },
      h("td", {}, d.title ?? "—"),
      h("td", { class: "mono" }, d.external_id),
      h("td", {}, h("span", { class: `badge ${d.status}` }, d.status)),
      h("td", { class: "doc-error" }, d.error ?? ""),
      h("td", { class: "num" }, String(d.chunk_count)),
      h("td", {}, when(d.updated_at)),
      canWrite ? h("td", {}, confirmButton("Delete", "Delete?", () => remove(d, tr),
        { "aria-label": `Delete ${d.external_id}` })) : null);
    return tr;
  }

  async function remove(d, tr) {
    try {
      await call("DELETE", `/v1/documents/${d.id}`);
      tr.remove();
      shown -= 1;
      summary.textContent = `Deleted ${d.external_id}.`;
    } catch (err) {
      showError(error, err);
    }
  }

  const filters = h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); reload(); } },
    h("label", { for: "documents-collection" }, "Collection"), select,
    h("label", { for: "documents-status" }, "Status"), status,
    h("label", { for: "documents-q" }, "Text"), q,
    h("button", { type: "submit" }, "Filter"));
  const table = h("table", { class: "documents", id: "documents" },
    h("thead", {}, h("tr", {},
      ["Title", "External id", "Status", "Error", "Chunks", "Updated"].map((t) => h("th", { scope: "col" }, t)),
      canWrite ? h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Actions")) : null)),
    rows);

  let unsubscribe = null;
  let refresh = null;
  if (canWrite) {
    // When an upload settles, show its documents (once for a burst of them).
    unsubscribe = uploads.onSettled(() => {
      clearTimeout(refresh);
      refresh = setTimeout(reload, 300);
    });
  }
  replace(
    view,
    h("section", { class: "page documents" },
      h("h1", {}, "Documents"),
      canWrite ? uploadPanel(session, ready) : null,
      filters, error, summary, table, more),
  );
  ready.then(reload, (err) => showError(error, err));
  return () => {
    loading?.abort();
    clearTimeout(refresh);
    unsubscribe?.();
  };
}

function uploadPanel(session, ready) {
  const me = session.me;
  const all = me.collections.includes("*");
  // A key for all collections may create one by naming it; another key names one of its own.
  const names = h("datalist", { id: "upload-collections" });
  const collection = all
    ? h("input", { id: "upload-collection", name: "collection", list: "upload-collections", required: true,
      value: session.collection ?? "default", pattern: "[A-Za-z0-9_.\\-]{1,64}" })
    : h("select", { id: "upload-collection", name: "collection" },
      me.collections.map((c) => h("option", { value: c }, c)));
  if (!all && session.collection && me.collections.includes(session.collection)) collection.value = session.collection;
  ready.then((collections) => replace(names, collections.map((c) => h("option", { value: c.name }))), () => {});
  const error = errorLine("upload-error");

  function send(files) {
    error.textContent = "";
    const target = collection.value.trim();
    if (!target || (collection.checkValidity && !collection.checkValidity())) {
      error.textContent = "Name a collection: 1-64 letters, digits, '_', '.' or '-'.";
      return;
    }
    if (!files.length) {
      error.textContent = "No supported files there (txt, md, html, pdf, jsonl).";
      return;
    }
    session.collection = target;
    uploads.enqueue(files, target);
  }

  const filesInput = h("input", {
    id: "upload-files", class: "file-input", type: "file", multiple: true, accept: uploads.SUPPORTED.join(","),
    onchange: () => { send([...filesInput.files].map((file) => ({ file, path: file.name }))); filesInput.value = ""; },
  });
  const folderInput = h("input", {
    id: "upload-folder", class: "file-input", type: "file", webkitdirectory: true, multiple: true,
    onchange: () => { send(uploads.folderFiles(folderInput.files)); folderInput.value = ""; },
  });
  const zone = h("div", {
    class: "dropzone", id: "dropzone", tabindex: "-1",
    ondragover: (e) => { e.preventDefault(); zone.classList.add("over"); },
    ondragleave: () => zone.classList.remove("over"),
    ondrop: async (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      try {
        send(await uploads.droppedFiles(e.dataTransfer));
      } catch (err) {
        showError(error, err);
      }
    },
  }, "Drop files or folders here");

  return h("section", { class: "upload-panel", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "Upload"),
    h("div", { class: "upload-controls" },
      h("label", { for: "upload-collection" }, "Into collection"), collection, names,
      // The inputs sit inside their labels, visually hidden: the label is the button, and shows their focus.
      h("label", { class: "button" }, "Choose files…", filesInput),
      h("label", { class: "button" }, "Choose a folder…", folderInput),
      h("button", { type: "button", class: "secondary", onclick: () => uploads.clearFinished() }, "Clear finished")),
    zone,
    h("p", { class: "muted" }, "A folder's files keep their paths inside it as their external ids."),
    error,
    uploads.element());
}

// Pieces the pages share: the collection picker and error lines.

import { ApiError, call } from "./api.js";
import { h, replace } from "./dom.js";

/** A line for errors (role=alert, so it is read out). */
export function errorLine(id) {
  return h("p", { class: "error", role: "alert", id });
}

/** Show an error (an ApiError's status and message) in an errorLine; nothing for an aborted request. */
export function showError(line, err) {
  if (err?.name === "AbortError") return;
  if (err instanceof ApiError) {
    line.textContent = err.status ? `${err.status} ${err.code}: ${err.message}` : err.message;
  } else {
    line.textContent = String(err?.message ?? err);
    console.error(err);
  }
}

/**
 * A <select> of the collections the key reaches (GET /v1/collections), remembering the choice in the session.
 * With `all`, a first option "All collections" (value ""). Resolves once filled.
 */
export function collectionSelect(session, { id, all = false, onchange } = {}) {
  const select = h("select", {
    id, name: "collection",
    onchange: () => {
      if (select.value) session.collection = select.value;
      onchange?.(select.value);
    },
  });
  const ready = call("GET", "/v1/collections").then((collections) => {
    const options = [];
    if (all) options.push(h("option", { value: "" }, "All collections"));
    for (const c of collections) {
      options.push(h("option", { value: c.name }, `${c.name} (${c.indexed} indexed)`));
    }
    if (!collections.length && !all) options.push(h("option", { value: "", disabled: true }, "no collections yet"));
    replace(select, options);
    const names = collections.map((c) => c.name);
    if (session.collection && names.includes(session.collection)) select.value = session.collection;
    else if (!all && names.length) select.value = names.includes("default") ? "default" : names[0];
    return collections;
  });
  return { select, ready };
}

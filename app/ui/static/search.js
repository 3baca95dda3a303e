// Search: the best passages (or documents) for a query, with their score, similarity and text.

import { call } from "./api.js";
import { collectionSelect, errorLine, showError } from "./common.js";
import { h, num, pages, replace } from "./dom.js";

function choice(id, label, options) {
  return [
    h("label", { for: id }, label),
    h("select", { id, name: id }, options.map(([value, text]) => h("option", { value }, text))),
  ];
}

export function render(view, session) {
  const { select, ready } = collectionSelect(session, { id: "search-collection" });
  const query = h("input", { id: "query", name: "query", type: "search", required: true, placeholder: "Search…" });
  const [modeLabel, mode] = choice("search-mode", "Mode", [
    ["", "server default"], ["hybrid", "hybrid"], ["dense", "dense"], ["lexical", "lexical"],
  ]);
  const [groupLabel, group] = choice("search-group", "Results", [
    ["", "server default"], ["passage", "passages"], ["document", "documents (best passage each)"],
  ]);
  const [rerankLabel, rerank] = choice("search-rerank", "Rerank", [
    ["", "server default"], ["none", "none"], ["prf", "prf"],
  ]);
  const k = h("input", { id: "search-k", name: "k", type: "number", min: 1, value: "10" });
  const button = h("button", { type: "submit", id: "search-button" }, "Search");
  const error = errorLine("search-error");
  const summary = h("p", { class: "muted", id: "search-summary" });
  const results = h("ol", { class: "results", id: "results" });
  let controller = null;

  ready.catch((err) => showError(error, err));

  async function submit(event) {
    event.preventDefault();
    if (!query.value.trim() || !select.value) return;
    controller?.abort();
    controller = new AbortController();
    const body = { query: query.value, collection: select.value, k: Number(k.value) || 10 };
    if (mode.value) body.mode = mode.value;
    if (group.value) body.group = group.value;
    if (rerank.value) body.rerank = rerank.value;
    error.textContent = "";
    button.disabled = true;
    summary.textContent = "Searching…";
    try {
      const out = await call("POST", "/v1/search", { json: body, signal: controller.signal });
      const noun = out.group === "document" ? "document" : "passage";
      summary.textContent = `${out.results.length} ${noun}${out.results.length === 1 ? "" : "s"} · `
        + `${out.mode} · model ${out.model} · rerank ${out.rerank}`;
      replace(results, out.results.map(result));
      results.dataset.done = "true";
    } catch (err) {
      summary.textContent = "";
      showError(error, err);
    } finally {
      button.disabled = false;
    }
  }

  replace(
    view,
    h("section", { class: "page search" },
      h("h1", {}, "Search"),
      h("form", { class: "grid-form", onsubmit: submit },
        h("label", { for: "search-collection" }, "Collection"), select,
        h("label", { for: "query" }, "Query"), query,
        modeLabel, mode, groupLabel, group, rerankLabel, rerank,
        h("label", { for: "search-k" }, "How many"), k,
        h("div", { class: "span" }, button)),
      error, summary, results),
  );
  query.focus();
  return () => controller?.abort();
}

function result(r) {
  const heading = (r.heading_path ?? []).join(" › ");
  return h("li", { class: "result", dataset: { document: r.document_id, externalId: r.external_id } },
    h("div", { class: "result-head" },
      h("strong", {}, r.title ?? r.external_id),
      h("span", { class: "muted" }, [r.external_id, heading, pages(r.page_start, r.page_end)]
        .filter(Boolean).join(" · ")),
      h("span", { class: "scores" },
        `score ${num(r.score)} · similarity ${num(r.similarity)}`,
        r.rerank_score === null || r.rerank_score === undefined ? "" : ` · rerank ${num(r.rerank_score)}`)),
    h("p", { class: "result-text" }, r.text));
}

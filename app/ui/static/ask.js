// Ask: a question to a collection, the answer streamed as it is written, its citation marks opening passages.

import { describe, events } from "./api.js";
import { collectionSelect, errorLine, showError } from "./common.js";
import { h, num, pages, replace } from "./dom.js";

const MARK = /\[(\d+)\]/g;

export function render(view, session) {
  const { select, ready } = collectionSelect(session, { id: "ask-collection" });
  const question = h("textarea", {
    id: "question", name: "question", rows: 3, required: true, placeholder: "What would you like to know?",
  });
  const button = h("button", { type: "submit", id: "ask-button" }, "Ask");
  const error = errorLine("ask-error");
  const answer = h("p", { class: "answer", id: "answer" });
  const state = h("p", { class: "muted", id: "answer-state" });
  const sources = h("ol", { class: "sources", id: "sources" });
  const passage = h("aside", { class: "passage", id: "passage", hidden: true, "aria-label": "Cited passage" });
  let controller = null;
  let citations = new Map();
  let text = "";

  ready.catch((err) => showError(error, err));

  async function submit(event) {
    event.preventDefault();
    const q = question.value.trim();
    if (!q || !select.value) {
      error.textContent = select.value ? "" : "Choose a collection first (upload documents on the Documents page).";
      return;
    }
    controller?.abort();
    controller = new AbortController();
    const mine = controller;
    citations = new Map();
    text = "";
    error.textContent = "";
    replace(answer);
    replace(sources);
    passage.hidden = true;
    state.textContent = "Searching…";
    button.disabled = true;
    try {
      const body = { question: q, collection: select.value, stream: true };
      for await (const { event: name, data } of events("/v1/ask", body, { signal: mine.signal })) {
        if (mine !== controller) return;
        if (name === "citations") {
          remember(data.citations);
          state.textContent = "Writing…";
        } else if (name === "token") {
          text += data.text;
          draw();
        } else if (name === "done") {
          remember(data.citations);
          text = data.answer;
          draw();
          listSources(data.citations);
          state.textContent = data.mode === "none"
            ? "No passage was close enough to answer from."
            : `Answered (${data.mode}) from ${data.citations.length} passage${data.citations.length === 1 ? "" : "s"}.`;
          answer.dataset.done = "true";
        } else if (name === "error") {
          showError(error, { message: `${data.error}: ${describe(data.detail)}` });
          state.textContent = "The answer could not be completed.";
        }
      }
    } catch (err) {
      showError(error, err);
      if (err?.name !== "AbortError") state.textContent = "";
    } finally {
      if (mine === controller) button.disabled = false;
    }
  }

  function remember(list) {
    for (const c of list ?? []) citations.set(c.n, { ...citations.get(c.n), ...c });
  }

  // The whole answer is drawn again on each piece: a mark may arrive split over two pieces ("[" then "1]").
  function draw() {
    const parts = [];
    let at = 0;
    for (const m of text.matchAll(MARK)) {
      parts.push(text.slice(at, m.index));
      const n = Number(m[1]);
      parts.push(citations.has(n) ? citeButton(n) : m[0]);
      at = m.index + m[0].length;
    }
    parts.push(text.slice(at));
    replace(answer, parts);
  }

  function citeButton(n) {
    const c = citations.get(n);
    return h("button", {
      type: "button", class: "cite", dataset: { n: String(n) },
      title: c.title ?? c.external_id, "aria-label": `Source ${n}: ${c.title ?? c.external_id}`,
      onclick: () => open(n),
    }, `[${n}]`);
  }

  function listSources(list) {
    replace(sources, (list ?? []).map((c) => h("li", { value: c.n },
      h("button", { type: "button", class: "link", onclick: () => open(c.n) }, c.title ?? c.external_id),
      " ",
      h("span", { class: "muted" }, [c.external_id, pages(c.page_start, c.page_end)].filter(Boolean).join(" · ")),
    )));
  }

  function open(n) {
    const c = citations.get(n);
    if (!c) return;
    const heading = (c.heading_path ?? []).join(" › ");
    replace(
      passage,
      h("header", {},
        h("h2", { id: "passage-title" }, `[${n}] ${c.title ?? c.external_id}`),
        h("button", { type: "button", class: "close", "aria-label": "Close", onclick: () => { passage.hidden = true; } },
          "×")),
      h("dl", {},
        h("dt", {}, "Document"), h("dd", { id: "passage-document" }, c.external_id),
        heading ? [h("dt", {}, "Section"), h("dd", { id: "passage-heading" }, heading)] : null,
        pages(c.page_start, c.page_end) ? [h("dt", {}, "Pages"), h("dd", { id: "passage-pages" },
          pages(c.page_start, c.page_end))] : null,
        h("dt", {}, "Score"), h("dd", {}, num(c.score)),
      ),
      highlighted(c.text, c.quote),
    );
    passage.hidden = false;
    passage.scrollIntoView({ block: "nearest" });
  }

  replace(
    view,
    h("section", { class: "page ask" },
      h("h1", {}, "Ask"),
      h("form", { class: "stack", onsubmit: submit },
        h("label", { for: "ask-collection" }, "Collection"), select,
        h("label", { for: "question" }, "Question"), question,
        h("div", {}, button)),
      error,
      h("div", { class: "answer-layout" },
        h("div", {}, answer, state, sources),
        passage)),
  );
  question.focus();
  return () => controller?.abort();
}

/** The passage's text with the quoted sentences marked, all as text nodes. */
function highlighted(text, quote) {
  const body = h("blockquote", { class: "passage-text", id: "passage-text" });
  const pieces = (quote ?? "").split(/\s*…\s*|\n+/).map((s) => s.trim()).filter((s) => s.length > 3);
  let rest = text ?? "";
  for (const piece of pieces) {
    const at = rest.indexOf(piece);
    if (at < 0) continue;
    body.append(rest.slice(0, at), h("mark", {}, piece));
    rest = rest.slice(at + piece.length);
  }
  body.append(rest);
  return body;
}


// Building the page from data without ever parsing it as HTML: text goes in as text nodes.

/**
 * An element: h("button", {class: "x", onclick: fn, disabled: true}, "text", child, ...).
 * Attributes are set with setAttribute (or as properties for value/checked/disabled/hidden), "on*" keys add
 * listeners, strings become text nodes; null, undefined and false children are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "value" || name === "checked" || name === "disabled" || name === "hidden") {
      el[name] = value;
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, ...children);
  return el;
}

/** Add children (elements, strings as text, arrays flattened). */
export function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, ...children);
}

/** A timestamp from the API in the reader's own locale and time zone. */
export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

/** Seconds as "1 h 5 min", "3 min 20 s" or "12 s". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s >= 3600) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  if (s >= 60) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${s} s`;
}

/** "pages 3-4", "page 3" or null. */
export function pages(start, end) {
  if (start === null || start === undefined) return null;
  return end !== null && end !== undefined && end !== start ? `pages ${start}–${end}` : `page ${start}`;
}

/** A number with at most `digits` decimals. */
export function num(value, digits = 3) {
  return typeof value === "number" ? String(Number(value.toFixed(digits))) : "—";
}

/**
 * A button that asks once more before acting: the first click shows "Yes" and "No" in its place.
 * `act` is an async function; while it runs the buttons are disabled.
 */
export function confirmButton(label, question, act, attrs = {}) {
  const holder = h("span", { class: "confirm" });
  const start = h("button", { type: "button", class: "danger", ...attrs, onclick: ask }, label);
  function ask() {
    const yes = h("button", { type: "button", class: "danger", onclick: go }, "Yes");
    const no = h("button", { type: "button", onclick: reset }, "No");
    replace(holder, h("span", { class: "question" }, question), " ", yes, " ", no);
    yes.focus();
    async function go() {
      yes.disabled = true;
      no.disabled = true;
      try {
        await act();
      } finally {
        if (holder.isConnected) reset();
      }
    }
  }
  function reset() {
    replace(holder, start);
  }
  reset();
  return holder;
}

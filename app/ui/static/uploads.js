// Uploads: each file POSTed as multipart (file, collection, path), then its job polled until it settles.
// The list outlives page changes (polling goes on while another page is open) and ends with the session.

import { call } from "./api.js";
import { h } from "./dom.js";

const PARALLEL = 2;
const POLL_MS = 1000;
export const SUPPORTED = [".txt", ".text", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl", ".ndjson"];

let list = null;
let generation = 0;
let timers = new Set();
let waiting = [];
let running = 0;
const settled = new Set();

/** Forget every upload and stop polling (a new session, or signing out). */
export function reset() {
  generation += 1;
  for (const t of timers) clearTimeout(t);
  timers = new Set();
  waiting = [];
  running = 0;
  settled.clear();
  list = h("ul", { class: "uploads", id: "uploads", "aria-label": "Uploads" });
}

/** The list of uploads, to be placed on the Documents page. */
export function element() {
  if (!list) reset();
  return list;
}

const FINISHED = new Set(["indexed", "unchanged", "failed", "partial"]);

/** Remove the rows of uploads that have settled. */
export function clearFinished() {
  for (const row of [...element().children]) {
    if (FINISHED.has(row.dataset.state)) row.remove();
  }
}

/** Be told when an upload's job settles (to refresh the documents shown); returns the unsubscriber. */
export function onSettled(listener) {
  settled.add(listener);
  return () => settled.delete(listener);
}

/** Upload files ([{file, path}]) into a collection; each gets a row with a progress bar. */
export function enqueue(files, collection) {
  element();
  for (const { file, path } of files) {
    const row = new Row(path);
    list.prepend(row.el);
    waiting.push({ file, path, collection, row });
  }
  pump();
}

function pump() {
  const mine = generation;
  while (running < PARALLEL && waiting.length) {
    const item = waiting.shift();
    running += 1;
    upload(item).finally(() => {
      if (mine !== generation) return;
      running -= 1;
      pump();
    });
  }
}

async function upload({ file, path, collection, row }) {
  const mine = generation;
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("collection", collection);
  form.append("path", path);
  row.set("uploading", "uploading…");
  let accepted;
  try {
    accepted = await call("POST", "/v1/documents", { form });
  } catch (err) {
    if (mine !== generation) return;
    row.set("failed", "failed", err.status ? `${err.status} ${err.code}: ${err.message}` : err.message);
    notify();
    return;
  }
  if (mine !== generation) return;
  row.set("queued", `queued (${accepted.queued} of ${accepted.documents} to index)`);
  row.progress(0, accepted.documents || 1);
  poll(accepted.status_url, row, mine);
}

function poll(statusUrl, row, mine) {
  const timer = setTimeout(async () => {
    timers.delete(timer);
    if (mine !== generation) return;
    let job;
    try {
      job = await call("GET", statusUrl);
    } catch (err) {
      if (mine !== generation) return;
      if (err.status === 429 || err.status === 503 || err.status === 0) {
        row.note(`${err.message}; still trying`);
        poll(statusUrl, row, mine);
      } else {
        row.set("failed", "failed", err.message);
        notify();
      }
      return;
    }
    if (mine !== generation) return;
    row.progress(job.done + job.failed, job.total || 1);
    if (job.state === "queued" || job.state === "running") {
      row.set(job.state, `${job.state}: ${job.done + job.failed} of ${job.total}`);
      poll(statusUrl, row, mine);
      return;
    }
    await finish(job, row);
    notify();
  }, POLL_MS);
  timers.add(timer);
}

async function finish(job, row) {
  const reasons = [];
  for (const e of job.errors ?? []) {
    let reason = e.error;
    if (!reason) {
      // The job item has no message: the document's own error field may.
      try {
        reason = (await call("GET", `/v1/documents/${e.document_id}`)).error;
      } catch {
        reason = null;
      }
    }
    reasons.push(job.total > 1 ? `${e.external_id}: ${reason ?? "no reason given"}` : (reason ?? "no reason given"));
  }
  if (job.state === "failed") {
    row.set("failed", "failed", reasons.join("\n"));
  } else if (job.state === "completed_with_errors") {
    row.set("partial", `${job.indexed} indexed, ${job.unchanged} unchanged, ${job.failed} failed`, reasons.join("\n"));
  } else if (job.indexed === 0 && job.unchanged > 0) {
    row.set("unchanged", "unchanged (already indexed)");
  } else {
    row.set("indexed", job.total > 1 ? `indexed (${job.indexed} documents)` : "indexed");
  }
}

function notify() {
  for (const listener of settled) listener();
}

class Row {
  constructor(path) {
    this.bar = h("progress", { max: 1, "aria-label": `Progress of ${path}` });
    this.state = h("span", { class: "upload-state" });
    this.detail = h("p", { class: "upload-detail" });
    this.el = h("li", { class: "upload", dataset: { path, state: "waiting" } },
      h("span", { class: "upload-path" }, path), this.bar, this.state, this.detail);
    this.set("waiting", "waiting");
  }

  set(state, label, detail) {
    this.el.dataset.state = state;
    this.state.textContent = label;
    if (detail !== undefined) this.detail.textContent = detail;
    if (state === "uploading") this.bar.removeAttribute("value"); // indeterminate while it is sent
    if (state === "failed" && !this.bar.hasAttribute("value")) this.bar.value = 0;
  }

  progress(done, total) {
    this.bar.max = total;
    this.bar.value = done;
  }

  note(text) {
    this.detail.textContent = text;
  }
}

/** The files of a drop (files and folders, walked), each with its path relative to the folder dropped. */
export async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items]
    .filter((item) => item.kind === "file")
    .map((item) => item.webkitGetAsEntry?.())
    .filter(Boolean);
  if (!entries.length) return [...dataTransfer.files].map((file) => ({ file, path: file.name }));
  const out = [];
  for (const entry of entries) {
    if (entry.isDirectory) await walk(entry, "", out);
    else out.push({ file: await fileOf(entry), path: entry.name });
  }
  return out;
}

// Inside a dropped folder, paths are relative to it (as `pgsage ingest FOLDER` names them), and only
// the supported kinds of file are taken (a folder often holds others).
async function walk(directory, prefix, out) {
  const reader = directory.createReader();
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) break;
    for (const entry of batch) {
      const path = prefix ? `${prefix}/${entry.name}` : entry.name;
      if (entry.isDirectory) await walk(entry, path, out);
      else if (supported(entry.name)) out.push({ file: await fileOf(entry), path });
    }
  }
}

function fileOf(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

export function supported(name) {
  const dot = name.lastIndexOf(".");
  return dot >= 0 && SUPPORTED.includes(name.slice(dot).toLowerCase());
}

/** The files of a folder input: paths relative to the folder chosen, supported kinds only. */
export function folderFiles(fileList) {
  return [...fileList]
    .filter((file) => supported(file.name))
    .map((file) => ({ file, path: file.webkitRelativePath.split("/").slice(1).join("/") || file.name }));
}

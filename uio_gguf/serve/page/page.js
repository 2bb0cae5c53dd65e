// The page of `uio-gguf serve`: open a book, watch it compress, ask, see the sources (docs/serving.md).
// It uses only the server's public API. Every text from a book or an answer is set with textContent,
// never as HTML: a book holding <script> shows as text.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("uio-key") || "", model: null, book: null, messages: [], watching: null, answering: null };

// ----- the API ------------------------------------------------------------------------------------
class ApiError extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try { message = (await response.json()).error.message; } catch (_) { /* not an OpenAI-shaped error */ }
  if (response.status === 401) askForKey();
  throw new ApiError(message);
}

const json = async (path, options) => (await api(path, options)).json();

// Server-sent events from a fetch response (EventSource cannot send the API key): yields {event, data}.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

// ----- small helpers ------------------------------------------------------------------------------
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const count = (n) => Math.round(n).toLocaleString("en-US");
function size(bytes) {
  if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MB`;
  return `${Math.max(1, Math.round(bytes / 1024))} KB`;
}
function ago(seconds) {
  const s = Date.now() / 1000 - seconds;
  if (s < 90) return "just now";
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "time left: estimating";
  return seconds < 90 ? `${Math.ceil(seconds)} s left` : `${Math.round(seconds / 60)} min left`;
}
function bookMessage(text) { $("book-message").textContent = text || ""; }

// ----- books --------------------------------------------------------------------------------------
async function upload(body, name) {
  bookMessage("");
  try {
    const book = await json(`/v1/books?name=${encodeURIComponent(name)}`, {
      method: "POST", headers: { "Content-Type": "text/plain; charset=utf-8" }, body,
    });
    await follow(book);
  } catch (err) {
    if (err instanceof ApiError) bookMessage(err.message);
    else throw err;
  }
}

// A book is ready (open it), or compressing (watch, then open), or its memory was trimmed (compress again).
async function follow(book) {
  if (book.state === "not compressed" || book.state === "cancelled" || book.state === "failed") {
    book = await json(`/v1/books/${book.id}/open`, { method: "POST" });
  }
  if (book.state === "compressing") book = await watch(book);
  refreshBooks();
  if (book.state === "ready") select(book);
  else bookMessage(book.message || `the book is ${book.state}`);
}

// The progress box stays up after the job ends, with how it ended, until another job starts.
async function watch(book) {
  const job = { id: book.id };
  state.watching = job;
  $("job").hidden = false;
  $("job-cancel").hidden = false;
  $("job-name").textContent = book.first_line || book.name;
  showProgress(book);
  try {
    const response = await api(`/v1/books/${book.id}/events`);
    for await (const { event, data } of events(response)) {
      if (event !== "progress") continue;
      book = JSON.parse(data);
      showProgress(book);
    }
  } finally {
    if (state.watching === job) { state.watching = null; $("job-cancel").hidden = true; }
  }
  return book;
}

function showProgress(book) {
  $("job-state").textContent = book.state === "compressing" ? "Compressing" : `${book.state[0].toUpperCase()}${book.state.slice(1)}:`;
  const p = book.progress;
  const share = p.total ? p.done / p.total : 1;
  $("job-bar").value = share;
  const rate = p.tokens_per_second ? `${count(p.tokens_per_second)} tokens/s` : "starting";
  $("job-figures").textContent = `${Math.floor(share * 100)}% · ${count(p.done)} of ${count(p.total)} tokens · ${rate} · ${duration(p.seconds_left)}`;
}

async function refreshBooks() {
  let books;
  try { books = (await json("/v1/books")).data; } catch (err) { bookMessage(err.message); return; }
  const list = $("books");
  list.replaceChildren();
  $("no-books").hidden = books.length > 0;
  for (const book of books) {
    const button = el("button");
    button.type = "button";
    button.dataset.id = book.id;
    button.append(el("span", "first-line", book.first_line || book.name));
    const memory = book.state === "ready" ? size(book.size_bytes) : book.state;
    button.append(el("span", "muted", `${count(book.tokens)} tokens · ratio ${book.ratio} · ${memory} · ${ago(book.last_used)}`));
    button.addEventListener("click", () => follow(book).catch((err) => bookMessage(err.message)));
    const item = el("li");
    item.append(button);
    list.append(item);
  }
}

// A new book starts a new conversation.
function select(book) {
  state.book = book;
  state.messages = [];
  $("chat").replaceChildren();
  $("chat-title").textContent = `Ask about: ${book.first_line || book.name}`;
  $("question").disabled = $("ask").disabled = false;
  $("question").placeholder = "Ask a question about the book";
  $("question").focus();
}

// ----- asking -------------------------------------------------------------------------------------
async function ask(question) {
  const bookId = state.book.id;
  state.messages.push({ role: "user", content: question });
  $("chat").append(el("div", "turn user", question));
  const turn = el("div", "turn assistant");
  const text = el("span", "answer");
  turn.append(text);
  $("chat").append(turn);
  const controller = new AbortController();
  state.answering = controller;
  setAsking(true);
  let report = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, book: bookId, messages: state.messages, stream: true, temperature: 0, max_tokens: 256 }),
      signal: controller.signal,
    });
    for await (const { data } of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message);
      const delta = chunk.choices[0].delta.content;
      if (delta) text.textContent += delta;
      if (chunk.uio) report = chunk.uio;
    }
  } catch (err) {
    if (err.name === "AbortError") turn.append(el("span", "stopped", " [stopped]"));
    else { turn.classList.add("error"); text.textContent += err.message; }
  } finally {
    state.answering = null;
    setAsking(false);
  }
  if (state.book && state.book.id === bookId) state.messages.push({ role: "assistant", content: text.textContent });
  if (report) turn.append(sources(report));
}

function setAsking(busy) {
  $("ask").disabled = busy;
  $("stop").hidden = !busy;
}

// What the answer drew on: the memory figures, then each recalled passage with its place in the book.
function sources(report) {
  const box = el("div", "sources");
  const m = report.memory;
  const saved = m.full_attention_cells ? ` (${(m.full_attention_cells / m.cells).toFixed(1)}× fewer)` : "";
  box.append(el("div", "memory",
    `KV cache: ${count(m.cells)} cells used (${count(m.memory_cells)} memory slots); full attention would need ${count(m.full_attention_cells)}${saved}`));
  if (!report.sources.length) box.append(el("div", "memory", "No passage recalled: the answer came from the memory alone."));
  for (const source of report.sources) {
    const item = el("div", "source");
    const place = el("div", "place", `${Math.round(source.place * 100)}% into the book`);
    const bar = el("div", "bar");
    const marker = el("div", "marker");
    marker.style.left = `${source.place * 100}%`;
    marker.style.width = `${Math.max(0.5, (source.until - source.place) * 100)}%`;
    bar.append(marker);
    place.append(bar);
    item.append(place, highlighted(source.text, report.words));
    box.append(item);
  }
  return box;
}

// The passage as text nodes, the question's words in <mark> (built as nodes: the text is never parsed).
function highlighted(text, words) {
  const passage = el("div", "passage");
  const escaped = words.filter((w) => w).map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  if (!escaped.length) { passage.textContent = text; return passage; }
  const pattern = new RegExp(`\\b(${escaped.join("|")})\\b`, "gi");
  let at = 0;
  for (const match of text.matchAll(pattern)) {
    passage.append(document.createTextNode(text.slice(at, match.index)), el("mark", "", match[0]));
    at = match.index + match[0].length;
  }
  passage.append(document.createTextNode(text.slice(at)));
  return passage;
}

// ----- wiring -------------------------------------------------------------------------------------
function wire() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value;
    sessionStorage.setItem("uio-key", state.key);
    $("key-form").hidden = true;
    start();
  });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) upload(file, file.name);
    $("file").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) upload(file, file.name);
  });
  $("paste-open").addEventListener("click", () => upload($("paste").value, "the pasted text"));
  $("job-cancel").addEventListener("click", () => {
    if (state.watching) api(`/v1/books/${state.watching.id}/cancel`, { method: "POST" }).catch((err) => bookMessage(err.message));
  });
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question || !state.book || state.answering) return;
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("ask-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (state.answering) state.answering.abort(); });
}

async function start() {
  try {
    const models = await json("/v1/models");
    state.model = models.data[0].id;
    $("model").textContent = state.model;
  } catch (err) {
    bookMessage(err.message);
    return;
  }
  await refreshBooks();
}

wire();
start();

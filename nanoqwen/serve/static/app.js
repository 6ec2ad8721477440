// nanoqwen web page: chat and completion over the server's OpenAI-compatible endpoints.
// Text is streamed with fetch + ReadableStream (server-sent events); Stop aborts the fetch, which the
// server sees as a disconnect and stops generating.
"use strict";

const $ = (id) => document.getElementById(id);
// What survives a reload: everything the user typed or chose, as they left it. The settings (sampling, system
// prompt, mode, API key) are the browser's, in localStorage; the conversation, the text being written and what Clear
// took away (for Undo) are the tab's, in sessionStorage (see CONVERSATION_STORAGE). What the page reads from the
// server or says (the model, the status line) is read and said anew.
const KEY_STORAGE = "nanoqwen-api-key";
const SETTINGS_STORAGE = "nanoqwen-settings"; // + ":" + the model's id: each model keeps its own
// The settings kept across reloads (in this browser, for this server's address and model): those the user changed.
const SAVED_FIELDS = ["max-tokens", "temperature", "top-p", "top-k", "min-p", "repetition-penalty",
  "frequency-penalty", "presence-penalty", "seed", "stop-strings", "system", "thinking"];
// The conversation, kept across reloads in sessionStorage rather than localStorage: it belongs to the tab (two
// tabs hold two conversations, each its own) and ends with it, where the settings are the browser's.
const CONVERSATION_STORAGE = "nanoqwen-conversation";
// At most this many characters of it (about 1 MB as UTF-16, of the 5 MB or so a site gets): the oldest messages
// go first. Tests set window.nanoqwenSavedChars before the page loads, to make it small.
const SAVED_CHARS = window.nanoqwenSavedChars || 500_000;
// The text being written, the tab's too: the message box's (one box, both modes') and an open edit's, with its
// message's place in the saved conversation. Saved as typed, and gone once sent or cancelled.
const DRAFT_STORAGE = "nanoqwen-draft";
// What each mode's last Clear took away, the tab's too, as its conversation is: Undo brings it back after a reload,
// until the next send in that mode (see clearAll). At most SAVED_CHARS of each mode's.
const CLEARED_STORAGE = "nanoqwen-cleared";
// When the tab's storage is full (a huge draft, say), the conversation comes first, then the draft, then what Clear
// took away: a save refused drops the ones after it, one at a time, and tries again (see saveInTab); the draft and the
// cleared copy go in the room left (one that does not fit is not kept). A conversation that does not fit even so is
// not kept, rather than an older copy a reload would show as the current one. (The settings are in localStorage,
// whose room is apart.)
const PAGE_TITLE = document.title;
// A touch screen's keyboard has no Shift+Enter: there Enter starts a new line, and the Send button sends.
const touchScreen = matchMedia("(pointer: coarse)").matches;

const state = {
  model: null, // id from /v1/models
  context: null, // its context length, in tokens
  history: [], // chat messages so far: {role, content, box}, box the message on the page
  controller: null, // AbortController of the request in flight
  samplingDefaults: null, // the model's recommended sampling (the controls start there), for Reset settings
  applyingDefaults: false, // so the controls' input events tell the user's changes from those defaults
  thinkTags: null, // {model, open, close}: the ids of <think> and </think> for that model (see thinkTags)
  editing: null, // {box, form, sendButton}: the sent message being edited, and its editor
  savedFrom: 0, // how many of the oldest messages the saved conversation leaves out (see saveConversation)
  plainText: false, // whether the model is known to be trained on plain text alone (it never ends a turn)
  modeChosen: false, // whether the user picked a mode for the model shown (before it was known, say)
  // Each mode's place in the transcript box (which holds both modes' messages) as its reader left it: its scrollTop,
  // or null at its end (see showMode).
  places: {},
  cleared: {}, // mode -> {boxes, history}: the transcript that mode's last Clear took away, for Undo (see clearAll)
};

// -- server info ---------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  // fetch throws on a header character past U+00FF, which read as a server gone; the server's key is printable
  // ASCII (it refuses others), so such a key is wrong: sent percent-encoded, the server says so.
  if (key) h.Authorization = `Bearer ${/^[\x20-\x7e]*$/.test(key) ? key : encodeURIComponent(key)}`;
  return h;
}

function formatCount(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

// The header from /v1/models: the model and its size, or why there is none (no key, no server). `signal` may
// abort the request (a watch that waited too long).
async function loadModel(signal) {
  const dot = $("status-dot");
  // No model to show: why, in its place, without the last one's name (as tooltip), size or context beside it.
  const problem = (text) => {
    dot.className = "status-dot error";
    document.title = PAGE_TITLE;
    $("model-name").textContent = text;
    $("model-name").title = "";
    $("model-size").hidden = $("model-context").hidden = true;
  };
  try {
    const res = await fetch("/v1/models", { headers: headers(), signal });
    if (res.status === 401) {
      problem($("api-key").value.trim()
        ? "API key refused (see Server settings)" : "API key needed (see Server settings)");
      return;
    }
    const card = (await res.json()).data[0];
    const newContext = (card.context_length || null) !== state.context;
    const previous = state.model;
    state.model = card.id;
    state.context = card.context_length || null;
    dot.className = "status-dot ok";
    document.title = `${card.id} · ${PAGE_TITLE}`; // the tab says which server's model it talks to
    $("model-name").textContent = card.id;
    $("model-name").title = card.id;
    if (card.parameters) {
      $("model-size").textContent = `${formatCount(card.parameters)} parameters`;
      $("model-size").title = `${card.parameters.toLocaleString()} parameters`;
      $("model-size").hidden = false;
    }
    if (card.context_length) {
      // "context 1,024" alone left a newcomer to guess its unit, and what it holds (the unit gives way on a phone).
      const unit = Object.assign(document.createElement("span"), { className: "unit", textContent: " tokens" });
      $("model-context").replaceChildren(`context ${card.context_length.toLocaleString()}`, unit);
      $("model-context").title = "The most tokens the model reads at once: the conversation (or the prompt) "
        + "and the reply together";
      $("model-context").hidden = false;
    }
    // Models whose chat template can skip thinking (official Qwen3) get the switch.
    $("thinking-field").hidden = !card.thinking_switch;
    // A model trained on plain text never learned to end a turn: its chat replies run on to Max tokens. Chat mode
    // says so; the mode it opens in is restoreSettings'.
    state.plainText = card.trained_on_plain_text === true;
    $("plain-text-note").hidden = !state.plainText;
    // The settings this model's were left at, else its recommended sampling: once the model is known, and again
    // when the server serves another (restarted), whose settings are its own.
    if (card.id !== previous) {
      state.samplingDefaults = card.sampling_defaults || null;
      if (previous !== null) { // another model: a mode picked for the one before is saved for it, not this one's
        state.modeChosen = false;
        showPageDefaults();
      }
      restoreSettings();
      applySamplingDefaults();
    }
    const max = $("max-tokens"); // fitted to a new context only: a watch must not undo what the user typed
    if (newContext && card.context_length && Number(max.value) > card.context_length) {
      max.value = card.context_length;
    }
  } catch (err) {
    problem("server unreachable");
  }
}

// The header follows the server between sends too (stopped, back, or serving another model): it is read every
// WATCH_MS while the tab is in view, and at once when the tab comes back into view or the window gets focus.
// One read at a time, none while a reply streams (the stream tells); a server that takes WATCH_TIMEOUT_MS to
// answer counts as unreachable. Tests set window.nanoqwenWatchMs before the page loads, to shorten the wait.
const WATCH_MS = window.nanoqwenWatchMs || 12_000;
const WATCH_TIMEOUT_MS = 10_000;
let watching = false;

async function watchServer() {
  if (watching || state.controller || document.visibilityState !== "visible") return;
  watching = true;
  try {
    await loadModel(AbortSignal.timeout(WATCH_TIMEOUT_MS));
  } finally {
    watching = false;
  }
}

// -- settings ------------------------------------------------------------------------------
// The browser's localStorage (or sessionStorage), or null where site data is blocked (reading it throws then):
// the page works as before, without memory.
function storage(kind = "localStorage") {
  try {
    return window[kind];
  } catch (err) {
    return null;
  }
}

function settingsKey() {
  return `${SETTINGS_STORAGE}:${state.model}`;
}

function savedSettings() {
  try {
    const saved = JSON.parse(storage()?.getItem(settingsKey()) || "{}");
    return saved && typeof saved === "object" ? saved : {};
  } catch (err) { // unreadable (edited by hand): start from the defaults
    return {};
  }
}

function saveSetting(name, value) { // before the model is known, the field is only marked (see restoreSettings)
  if (!state.model) return;
  const saved = savedSettings();
  saved[name] = value;
  try {
    storage()?.setItem(settingsKey(), JSON.stringify(saved));
  } catch (err) { /* storage full: the page works as before, without memory */ }
}

function fieldValue(id) {
  return $(id).type === "checkbox" ? $(id).checked : $(id).value;
}

function setField(id, value) { // as the page sets it: not a change of the user's, not saved
  if ($(id).type === "checkbox") $(id).checked = Boolean(value);
  // A whole number in a fractional field keeps its point ("1.0", as the page's own defaults show it).
  else if (Number.isInteger(value) && $(id).step.includes(".")) $(id).value = value.toFixed(1);
  else $(id).value = String(value);
  state.applyingDefaults = true;
  $(id).dispatchEvent(new Event("input")); // a slider's number follows
  state.applyingDefaults = false;
}

function restoreSettings() { // once the model is known; a field changed before then wins, and is saved now
  const saved = savedSettings();
  for (const id of SAVED_FIELDS) {
    if ($(id).dataset.touched) saveSetting(id, fieldValue(id));
    else if (id in saved) {
      setField(id, saved[id]);
      $(id).dataset.touched = "true";
    }
  }
  if (["chat", "completion"].includes(saved.mode)) {
    if (saved.mode !== mode()) $(`mode-${saved.mode}`).click();
  } else if (!state.modeChosen && !state.controller) { // no choice of the user's: the model's own mode, Completion
    // for plain text (not mid-send: a send met the new model, and its turn, shown in its mode, is still streaming)
    showMode(state.plainText ? "completion" : "chat");
  }
}

function applySamplingDefaults() { // the checkpoint's recommended sampling, where the user set none
  const defaults = state.samplingDefaults;
  if (!defaults) return;
  // min_p: a server whose card names none samples without it (0), as OpenAI's API and vLLM do
  for (const [id, value] of [["temperature", defaults.temperature], ["top-p", defaults.top_p],
    ["top-k", defaults.top_k], ["min-p", defaults.min_p ?? 0], ["repetition-penalty", defaults.repetition_penalty]]) {
    if (!$(id).dataset.touched) setField(id, value);
  }
}

function showPageDefaults() { // every setting as the page starts, none changed by the user
  for (const id of SAVED_FIELDS) {
    delete $(id).dataset.touched;
    setField(id, $(id).type === "checkbox" ? $(id).defaultChecked : $(id).defaultValue);
  }
}

function resetSettings() { // every setting back to the page's and the checkpoint's defaults; transcripts stay
  storage()?.removeItem(settingsKey());
  showPageDefaults();
  applySamplingDefaults();
  showStatus("");
}

function mode() {
  return $("mode-chat").checked ? "chat" : "completion";
}

function showMode(name) { // as the page sets it: not a choice of the user's, not saved
  // Another mode's transcript opens where it was left, else at its end (at the other's scrollTop it showed a long
  // conversation from near its top).
  const leaving = document.body.dataset.mode;
  if (leaving !== name) state.places[leaving] = atBottom() ? null : $("transcript").scrollTop;
  $(`mode-${name}`).checked = true;
  document.body.dataset.mode = mode();
  $("prompt").setAttribute("aria-label", name === "chat" ? "Message" : "Text to continue");
  showEmptyHint();
  if (leaving === name) return;
  const place = state.places[name] ?? null;
  if (place === null) scrollDown();
  else $("transcript").scrollTop = place;
}

// A setting the user must see to, given focus: on a narrow screen the folded settings open first (a field
// hidden in them could not take focus).
function focusSetting(input) {
  $("settings-toggle").setAttribute("aria-expanded", "true");
  input.focus();
}

class FieldError extends Error {}

// What the status line was given to say of each setting that stopped a send (see refuse).
const refusals = new WeakMap();

// A setting that stops a send: marked (aria-invalid, which style.css shows in red) and given focus; returns `message`,
// why, for the status line. The mark and that line go once the setting is changed (see accept).
function refuse(input, message) {
  input.setAttribute("aria-invalid", "true");
  refusals.set(input, message);
  focusSetting(input);
  return message;
}

// A setting changed by the user, or by Reset settings, or a key a send went through with: no longer marked, nor its
// refusal said (the field stayed red, and the status line said "Max tokens must be ..." beside the 5 typed since, until
// the next send).
function accept(input) {
  if (input.getAttribute("aria-invalid") !== "true") return;
  input.removeAttribute("aria-invalid");
  if ($("stats").textContent === refusals.get(input)) showStatus("");
}

// A number field's value as typed ("1e3" is 1000), or a FieldError saying what it must be: a value the
// field cannot hold is never swapped for another one behind the user's back.
function numberField(id, { integer = false, optional = false } = {}) {
  const input = $(id);
  const raw = input.value.trim(); // "" too when the browser could not read what was typed (badInput)
  input.removeAttribute("aria-invalid"); // a page-set value (see loadModel's max tokens) sends no input event
  if (raw === "" && optional && !input.validity.badInput) return undefined;
  const value = Number(raw);
  const { min, max } = input;
  if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))
      || (min !== "" && value < Number(min)) || (max !== "" && value > Number(max))) {
    const label = input.closest("label").querySelector("span").firstChild.textContent.trim();
    const range = [min !== "" ? `>= ${min}` : "", max !== "" ? `<= ${max}` : ""].filter(Boolean).join(" and ");
    throw new FieldError(refuse(input,
      `${label} must be ${integer ? "a whole number" : "a number"}${range ? ` ${range}` : ""}`));
  }
  return value;
}

// The stop strings box: one per line, where \n, \t, \r and \\ stand for a newline, a tab, a carriage return and a
// backslash, as in --stop (so a stop can be the end of a line, a Windows one too); more than the API's 4 is an
// error, not a silent cut.
function stopStrings() {
  const box = $("stop-strings");
  box.removeAttribute("aria-invalid");
  const unescape = (line) => line.replace(/\\(n|t|r|\\)/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c]);
  const stops = box.value.split("\n").filter((line) => line.length > 0).map(unescape);
  if (stops.length > 4) {
    throw new FieldError(refuse(box, `Stop strings: at most 4, one per line (${stops.length} given)`));
  }
  return stops;
}

function samplingBody() {
  const body = {
    max_tokens: numberField("max-tokens", { integer: true }),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    top_k: numberField("top-k", { integer: true }),
    min_p: numberField("min-p"),
    repetition_penalty: numberField("repetition-penalty"),
    frequency_penalty: numberField("frequency-penalty"),
    presence_penalty: numberField("presence-penalty"),
  };
  const seed = numberField("seed", { integer: true, optional: true });
  if (seed !== undefined) body.seed = seed;
  const stops = stopStrings();
  if (stops.length) body.stop = stops;
  if (state.model) body.model = state.model;
  return body;
}

// -- streaming -----------------------------------------------------------------------------
// POST with stream: true and call onText(text) for every piece and onUsage(usage) for every chunk's count of
// the tokens so far (vLLM's continuous_usage_stats: known after a stop too); resolves to {finish, usage}.
async function streamCompletion(path, body, onText, signal, onUsage = () => {}) {
  const res = await fetch(path, {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({
      ...body, stream: true, stream_options: { include_usage: true, continuous_usage_stats: true },
    }),
    signal,
  });
  if (!res.ok) { // an Error with the API's message, and the status and error code to act on
    let error = {};
    try { error = (await res.json()).error || {}; } catch (_) { /* not JSON */ }
    throw Object.assign(new Error(error.message || `${res.status} ${res.statusText}`),
      { status: res.status, code: error.code });
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const result = { finish: null, usage: null };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return result;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return result;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) onUsage(chunk.usage);
        if (chunk.usage && !chunk.choices?.length) result.usage = chunk.usage; // the request's, after its choices
        for (const choice of chunk.choices || []) {
          const text = choice.delta ? choice.delta.content : choice.text;
          if (text) onText(text);
          if (choice.finish_reason) result.finish = choice.finish_reason;
        }
      }
    }
  }
}

// -- transcript ----------------------------------------------------------------------------
// What each message on the page is made of, to save the conversation: its box -> {kind, label, text, prompt,
// notes, inThinking}, the text as it came (a reply's <think> part is shown apart); inThinking: a reply whose
// prompt opened the thinking (see showReply).
const records = new WeakMap();

// A message: kind "user" or "assistant" (chat), or "completion" (its prompt, then the text generated). Each mode
// keeps its own transcript: switching shows the other one (CSS hides the other mode's messages).
function addMessage(kind, label, text = "", prompt = "", inThinking = false) {
  $("empty-hint").hidden = true;
  const box = document.createElement("div");
  box.className = `message ${kind} ${kind === "completion" ? "completion" : "chat"}-only`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = label;
  const content = document.createElement("div");
  content.className = "content";
  if (kind === "completion") {
    const promptText = document.createElement("span");
    promptText.className = "prompt-text";
    promptText.textContent = prompt;
    const generated = document.createElement("span");
    generated.className = "generated";
    content.append(promptText, generated);
  }
  box.append(role, content);
  // On the role line: a message's button to change it (see startEdit), a reply's to copy it (see copyReply).
  const [name, title, act] = kind === "user"
    ? ["edit", "Change this message and send it again: the turns after it are dropped and the reply regenerated",
      () => startEdit(box)]
    : ["copy", kind === "assistant" ? "Copy the reply (without its thinking, if it has an answer)"
      : "Copy the prompt and its continuation", () => copyReply(box)];
  const button = Object.assign(document.createElement("button"), {
    type: "button", className: `ghost ${name}`, textContent: name === "edit" ? "Edit" : "Copy", title,
  });
  button.addEventListener("click", act);
  box.append(button);
  $("transcript").append(box);
  records.set(box, { kind, label, text, prompt, notes: [], inThinking });
  showText(box, text);
  return box;
}

// Each message's button named apart for screen readers, by its message's number as shown: "Edit message 2", "Copy
// reply 3", "Copy completion 1" (all alike, "Edit" and "Copy", a list of the page's buttons could not tell them apart).
// Named again whenever messages come or go (see init): sent, restored, cleared, brought back, or a failed turn gone;
// and when an edit opens, its Send named for its message ("Send edited message 2").
const BUTTON_NAMES = { user: "Edit message", assistant: "Copy reply", completion: "Copy completion" };

function nameMessageButtons() {
  const counts = {};
  for (const box of $("transcript").querySelectorAll(".message:not([hidden])")) { // (hidden: being replaced)
    const { kind } = records.get(box);
    counts[kind] = (counts[kind] ?? 0) + 1;
    const button = box.querySelector("button.edit, button.copy");
    button.dataset.name = `${BUTTON_NAMES[kind]} ${counts[kind]}`;
    // Not while Copy says what it did ("Copied"): that is its name meanwhile (see copyReply).
    if (button.dataset.name.startsWith(button.textContent)) button.setAttribute("aria-label", button.dataset.name);
    // An open edit's Send names its message too: named "Send", it read as the message box's Send.
    if (state.editing?.box === box) {
      state.editing.sendButton.setAttribute("aria-label", `Send edited message ${counts[kind]}`);
    }
  }
}

// A message's text so far (a reply streams in), on the page and in what is saved. `reading`: the reader has
// scrolled up from the end of the transcript (see showReply).
function showText(box, text, reading = false) {
  const record = records.get(box);
  record.text = text;
  if (record.kind === "completion") box.querySelector(".generated").textContent = text;
  else showReply(box.querySelector(".content"), text, record.kind === "assistant", reading, record.inThinking);
}

// A thinking model's reply (official Qwen3) opens with <think>...</think>: that part is shown apart, dimmed,
// and folded once the answer begins (a click opens it again), unless the reader is `reading` up the transcript
// then (folded under them, it took their place away); the answer streams below it. The 2507 thinking
// models' template opens the <think> in the prompt, so their reply only closes it: what comes before the
// </think> is the thinking (as their template reads it back). `inThinking`: the prompt was seen to end inside
// the thinking (see opensThinking), so it is from the first token on, a reply cut or stopped before its
// </think> included; else (not known) it is shown apart once the </think> arrives. An empty thinking (none
// yet, a reply stopped before its first token, or "/no_think" in a message) is not shown. Other replies, and completions, are plain text.
function showReply(out, reply, chat, reading = false, inThinking = false) {
  const parts = chat ? thinkingParts(reply, inThinking) : null;
  if (!parts) {
    out.replaceChildren(...withCodeBlocks(reply));
    return;
  }
  let thinking = out.querySelector("details.thinking");
  if (!thinking) {
    thinking = document.createElement("details");
    thinking.className = "thinking";
    thinking.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const text = document.createElement("div");
    text.className = "thinking-text";
    thinking.append(summary, text);
    const answer = document.createElement("div");
    answer.className = "answer";
    out.replaceChildren(thinking, answer);
  }
  thinking.querySelector(".thinking-text").textContent = parts[1].trim();
  thinking.hidden = !parts[1].trim(); // none yet, or none at all
  if (parts[2] && !thinking.dataset.folded) { // once: a reader who opens it again keeps it open
    thinking.open = reading;
    thinking.dataset.folded = "true";
  }
  out.querySelector(".answer").replaceChildren(...withCodeBlocks(parts[3].replace(/^\s+/, "")));
}

// A chat reply's [whole, thinking, "</think>" or "", answer] where it thinks first (see showReply), else null.
function thinkingParts(reply, inThinking) {
  const opened = !/^\s*<think>/.test(reply) && (inThinking || reply.includes("</think>")) ? `<think>${reply}` : reply;
  return /^\s*<think>([\s\S]*?)(<\/think>|$)([\s\S]*)$/.exec(opened);
}

// Text as typed, with each fenced block of code (a line of ``` or ~~~ to the next) set in a monospace box, its fences
// kept: the page's text stays the model's, spaces and all, for a reader who copies it. As in Markdown, a block is
// closed by a fence of its own character, at least as long: one of ```` holds a block of ``` (Markdown shown as
// typed).
function withCodeBlocks(text) {
  const nodes = [];
  const codeBlock = (code) => Object.assign(document.createElement("code"),
    { className: "code-block", textContent: code });
  let prose = "";
  let code = null; // the open block's text so far
  let fence = ""; // its opening fence's backticks or tildes
  for (const line of text.split(/(?<=\n)/)) { // each line with its newline
    // (a line "```x```" is inline code, as Markdown reads it: a fence of backticks has none after it)
    const opening = code === null && /^ {0,3}(`{3,}(?=[^`]*$)|~{3,})/.exec(line);
    if (opening) {
      if (prose) nodes.push(document.createTextNode(prose));
      prose = "";
      code = line;
      fence = opening[1];
    } else if (code === null) prose += line;
    else {
      code += line;
      const closing = /^ {0,3}(`{3,}|~{3,})\s*$/.exec(line);
      if (closing && closing[1][0] === fence[0] && closing[1].length >= fence.length) {
        nodes.push(codeBlock(code));
        code = null;
      }
    }
  }
  if (code !== null) nodes.push(codeBlock(code)); // still streaming, or never closed
  else if (prose) nodes.push(document.createTextNode(prose));
  return nodes;
}

// A reply's text to the clipboard: a chat reply's answer (its thinking left out; the thinking where there is no
// answer, as in a reply cut while it thinks), a completion's prompt and text. An empty reply leaves the clipboard as
// it is (it was emptied, "Copied" said).
async function copyReply(box) {
  const { kind, text, prompt, inThinking } = records.get(box);
  const parts = kind === "assistant" ? thinkingParts(text, inThinking) : null;
  const reply = kind === "completion" ? prompt + text
    : parts ? parts[3].replace(/^\s+/, "") || parts[1].trim() : text;
  const copied = reply ? await copyText(reply) : null;
  const button = box.querySelector("button.copy");
  button.textContent = copied ? "Copied" : copied === null ? "Nothing to copy" : "Copy failed";
  button.removeAttribute("aria-label"); // what it says is its name meanwhile, for a screen reader to hear
  setTimeout(() => {
    button.textContent = "Copy";
    button.setAttribute("aria-label", button.dataset.name);
  }, 1500);
  if (copied === false) showStatus("Could not copy to the clipboard: select the text and copy it by hand", true);
}

async function copyText(text) { // whether it was copied
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (_) {
    // navigator.clipboard is there on https or localhost only: a page served to the network (--host 0.0.0.0)
    // copies with the older command, from a box made for it (the focus put back after).
    const focused = document.activeElement;
    const area = Object.assign(document.createElement("textarea"), { value: text, readOnly: true });
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    focused?.focus();
    return copied;
  }
}

function scrollDown() {
  const t = $("transcript");
  t.scrollTop = t.scrollHeight;
}

// Streamed text keeps the view at the bottom only if it was there: a reader who scrolled up stays put.
function atBottom() {
  const t = $("transcript");
  return t.scrollHeight - t.scrollTop - t.clientHeight < 48;
}

function showEmptyHint() {
  $("empty-hint").hidden = Boolean($("transcript").querySelector(`.message.${mode()}-only`));
}

function showStatus(text, error = false) {
  $("stats").textContent = text;
  $("stats").classList.toggle("error", error);
}

// The status line while a reply is generated (it showed the last reply's figures, as if this one's): "generating…",
// then `figures` so far beside it. They change at every frame: the status line is a live region, so they are hidden
// from screen readers, which hear "generating…" once, and the reply's own figures when it ends.
function showProgress(figures = "") {
  let shown = $("stats").querySelector(".progress");
  if (!shown) {
    showStatus("generating…");
    shown = Object.assign(document.createElement("span"), { className: "progress" });
    shown.setAttribute("aria-hidden", "true");
    $("stats").append(shown);
  }
  shown.textContent = figures && ` ${figures}`;
}

function note(box, text, cls = "note") {
  const el = document.createElement("div");
  el.className = cls;
  el.textContent = text;
  box.append(el);
  records.get(box).notes.push([text, cls]);
}

function markDropped(box) { // still shown, no longer seen by the model
  box.classList.add("dropped");
  box.title = "dropped from the conversation to fit the model's context";
}

// The messages fitHistory dropped for a send that never happened (it failed, or a regenerate or an edit ended with
// no text): the model sees them again, as the page shows the conversation as it was (they stayed dropped).
function bringBack(messages) {
  state.history.unshift(...messages);
  for (const { box } of messages) {
    box.classList.remove("dropped");
    box.removeAttribute("title");
  }
}

// `value` under `key` in the tab's storage; where it is full, the keys of `givingWay` are dropped, one at a time, until
// it fits (see DRAFT_STORAGE). One that does not fit even so is not kept, rather than an older one. Whether it is kept.
function saveInTab(key, value, givingWay = []) {
  const tab = storage("sessionStorage");
  for (const dropped of [null, ...givingWay]) {
    try {
      if (dropped) tab?.removeItem(dropped);
      tab?.setItem(key, value);
      return true;
    } catch (err) { /* full: the next one gives way */ }
  }
  tab?.removeItem(key);
  return false;
}

// Messages on the page (in or out of the transcript), as saved: at most SAVED_CHARS of JSON, the oldest messages (a
// message with its reply) left out first. Returns {saved, left}, left: how many were left out.
function savedMessages(boxes) {
  const saved = boxes.map((box) => {
    const { kind, label, text, prompt, notes, inThinking } = records.get(box);
    return { kind, label, text, prompt, notes, inThinking, dropped: box.classList.contains("dropped") };
  });
  let size = JSON.stringify(saved).length;
  let left = 0;
  while (size > SAVED_CHARS && saved.length) {
    for (const message of saved.splice(0, saved[0].kind === "user" ? 2 : 1)) {
      size -= JSON.stringify(message).length + 1; // and its comma
      left += 1;
    }
  }
  return { saved, left };
}

// Saved messages on the page again, at the transcript's end; those of the chat the model sees are pushed to `history`.
function restoreMessages(saved, history) {
  return saved.map(({ kind, label, text, prompt, dropped, notes, inThinking }) => {
    const box = addMessage(kind, label, text, prompt, Boolean(inThinking));
    for (const [noteText, cls] of notes) note(box, noteText, cls);
    if (dropped) markDropped(box);
    else if (kind !== "completion") history.push({ role: kind, content: text, box });
    return box;
  });
}

// Saved when a turn ends (stopped too: see beforeunload) or a transcript is cleared, not for every token.
function saveConversation() {
  const { saved, left } = savedMessages([...$("transcript").querySelectorAll(".message")]);
  const kept = saveInTab(CONVERSATION_STORAGE, JSON.stringify(saved), [CLEARED_STORAGE, DRAFT_STORAGE]);
  state.savedFrom = kept ? left : Infinity;
  saveDraft(); // an open edit's message may have moved in what is saved, or left it
}

function restoreConversation() {
  try {
    restoreMessages(JSON.parse(storage("sessionStorage")?.getItem(CONVERSATION_STORAGE) || "[]"), state.history);
  } catch (err) { // unreadable (edited by hand): start afresh
    for (const box of $("transcript").querySelectorAll(".message")) box.remove();
    state.history = [];
  }
  showEmptyHint();
}

// Saved when a Clear, its Undo or the next send in its mode changes what Undo brings back.
function saveCleared() {
  const saved = {};
  for (const [shown, { boxes }] of Object.entries(state.cleared)) saved[shown] = savedMessages(boxes).saved;
  if (Object.keys(saved).length) saveInTab(CLEARED_STORAGE, JSON.stringify(saved));
  else storage("sessionStorage")?.removeItem(CLEARED_STORAGE);
}

// After restoreConversation: what each mode's last Clear took away, out of the transcript, for its Undo.
function restoreCleared() {
  const shown = new Set($("transcript").querySelectorAll(".message")); // the conversation's
  try {
    const saved = JSON.parse(storage("sessionStorage")?.getItem(CLEARED_STORAGE) || "{}");
    for (const cleared of ["chat", "completion"]) {
      if (!saved?.[cleared]?.length) continue;
      const history = [];
      const boxes = restoreMessages(saved[cleared], history);
      state.cleared[cleared] = { boxes, history: cleared === "chat" ? history : null };
    }
  } catch (err) { // unreadable (edited by hand): nothing to undo
    state.cleared = {};
  }
  for (const box of $("transcript").querySelectorAll(".message")) if (!shown.has(box)) box.remove();
  showUndo();
  showEmptyHint();
}

// Saved as typed, and when the page changes the text (a send empties the box) or opens or closes an editor.
function saveDraft() {
  const draft = {};
  if ($("prompt").value) draft.message = $("prompt").value;
  if (state.editing) { // named by its place in the saved conversation: out of it, the edit is not kept
    const at = [...$("transcript").querySelectorAll(".message")].indexOf(state.editing.box) - state.savedFrom;
    if (at >= 0) draft.edit = { at, text: state.editing.form.querySelector("textarea").value };
  }
  if (Object.keys(draft).length) saveInTab(DRAFT_STORAGE, JSON.stringify(draft), [CLEARED_STORAGE]);
  else storage("sessionStorage")?.removeItem(DRAFT_STORAGE);
}

// After restoreConversation: the message box's text, and an open edit, if its message is still there.
function restoreDraft() {
  let draft;
  try {
    draft = JSON.parse(storage("sessionStorage")?.getItem(DRAFT_STORAGE) || "{}") ?? {};
  } catch (err) { // unreadable (edited by hand): none
    draft = {};
  }
  if (typeof draft.message === "string") $("prompt").value = draft.message;
  const box = Number.isInteger(draft.edit?.at) ? $("transcript").querySelectorAll(".message")[draft.edit.at] : null;
  if (box && records.get(box).kind === "user" && typeof draft.edit.text === "string") {
    startEdit(box, draft.edit.text, false);
  }
  saveDraft(); // as restored: an edit whose message is gone is forgotten
}

// The message box's text as the page sets it (emptied by a send, or given back by one that failed).
function setPrompt(text) {
  $("prompt").value = text;
  saveDraft();
}

function setBusy(busy) {
  // Send or Regenerate pressed, and about to be disabled or hidden
  const sending = busy && [$("send"), regenerateButton].includes(document.activeElement);
  document.body.dataset.busy = String(busy);
  $("transcript").setAttribute("aria-busy", String(busy)); // screen readers read a reply once it is whole
  $("send").disabled = busy;
  if (state.editing) state.editing.sendButton.disabled = busy;
  $("stop").disabled = !busy;
  $("clear").disabled = busy;
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.disabled = busy;
  // A disabled Send dropped the focus to the body (a screen reader starts again from the top): it goes to Stop,
  // the button that acts now. (Once the reply ends, send() gives it to the message box.)
  if (sending) $("stop").focus();
}

// -- send ----------------------------------------------------------------------------------
// POST /tokenize: {count, max_model_len, tokens} from the server (null if it cannot say). Under the send's
// signal: Stop, or a reload (beforeunload stops), ends the count at once and the send ends as stopped, its
// turn saved; a reload while the count was out lost the turn.
async function tokenize(request) {
  try {
    const res = await fetch("/tokenize", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller?.signal,
    });
    return res.ok ? await res.json() : null;
  } catch (_) {
    return null;
  }
}

// How many tokens `messages` take (and their ids) and the context.
function countTokens(messages, body) {
  return tokenize({ messages: wire(messages), chat_template_kwargs: body.chat_template_kwargs });
}

// The ids "<think>" and "</think>" encode to for the model served, asked once for each model (again after a
// failure); null if the server cannot say.
async function thinkTags() {
  if (state.thinkTags?.model !== state.model) {
    const [open, close] = await Promise.all(["<think>", "</think>"].map((tag) => tokenize({ prompt: tag })));
    if (!open?.tokens?.length || !close?.tokens?.length) return null;
    state.thinkTags = { model: state.model, open: open.tokens, close: close.tokens };
  }
  return state.thinkTags;
}

function lastIndexOfIds(ids, part) {
  for (let at = ids.length - part.length; at >= 0; at -= 1) {
    if (part.every((id, k) => ids[at + k] === id)) return at;
  }
  return -1;
}

// Whether a chat prompt (its ids) ends inside a thinking block the template opened, as the 2507 thinking
// models' does ("<|im_start|>assistant\n<think>\n"): a "<think>" with at most two ids after it (its newline),
// and no "</think>" after it. (Official Qwen3's with thinking off ends "<think>\n\n</think>\n\n": closed.)
async function opensThinking(prompt) {
  if (!prompt?.length) return false;
  const tags = await thinkTags();
  if (!tags) return false;
  const opened = lastIndexOfIds(prompt, tags.open);
  return opened >= 0 && opened >= prompt.length - tags.open.length - 2 && lastIndexOfIds(prompt, tags.close) < opened;
}

// Messages as the API takes them (the history's also name their place on the page, and a reply's is sent as
// repliedContent says).
function wire(messages) {
  return messages.map(({ role, content, box }) => ({
    role, content: role === "assistant" && box ? repliedContent(content, box) : content,
  }));
}

// A reply as the history sends it back: as it came (a template that thinks drops a finished reply's thinking
// itself), but one cut before its </think> (Stop, Max tokens) has no answer, and goes as an empty one, its thinking
// dropped as a finished reply's is: sent whole, the next prompt showed an open thinking block as that turn's
// answer. Only where the template thinks (it has the switch, or opened the reply's thinking), as `nanoqwen chat`
// does: ChatML gets a reply as it came.
function repliedContent(content, box) {
  const { inThinking } = records.get(box);
  if (!inThinking && $("thinking-field").hidden) return content;
  const parts = thinkingParts(content, inThinking);
  return parts && !parts[2] ? "" : content;
}

// Drop the fewest oldest turns (a message and its reply each) for the conversation to leave room for a reply of
// max_tokens (at most half the context), as `nanoqwen chat` does; returns how many turns were dropped, their
// messages (see bringBack), and the ids of the prompt left (null if the server cannot say). A message too long even
// alone drops nothing: the server refuses it, and the history stays for the next one. Each count is a /tokenize of
// the whole conversation, so the turns to drop are found by galloping (1, 2, 4, ...) then bisecting: a message that
// pushes out hundreds of short turns asked hundreds of times before its reply began.
async function fitHistory(lead, text, body) {
  const user = { role: "user", content: text };
  const fits = (fit) => fit.count <= fit.max_model_len
    - Math.max(1, Math.min(body.max_tokens, Math.floor(fit.max_model_len / 2)));
  const firstKept = (turns) => Math.min(2 * turns, state.history.length);
  const counted = new Map(); // turns dropped -> the count then (null if the server cannot say)
  const count = async (turns) => {
    if (!counted.has(turns)) {
      counted.set(turns, await countTokens([...lead, ...state.history.slice(firstKept(turns)), user], body));
    }
    return counted.get(turns);
  };
  const whole = await count(0);
  const kept = { turns: 0, messages: [], prompt: whole?.tokens ?? null };
  if (!whole || fits(whole) || !state.history.length) return kept;
  const most = Math.ceil(state.history.length / 2); // dropping that many leaves the message alone
  let tooFew = 0;
  let enough = 1;
  while (enough < most && (await count(enough)) && !fits(counted.get(enough))) {
    tooFew = enough;
    enough = Math.min(2 * enough, most);
  }
  const last = await count(enough);
  if (!last || (!fits(last) && last.count > last.max_model_len)) return kept;
  while (fits(last) && enough - tooFew > 1) { // (the message alone, not fitting, leaves the reply the rest)
    const middle = Math.floor((tooFew + enough) / 2);
    const fit = await count(middle);
    if (!fit) return kept;
    if (fits(fit)) enough = middle;
    else tooFew = middle;
  }
  const messages = state.history.splice(0, firstKept(enough));
  for (const { box } of messages) markDropped(box);
  return { turns: enough, messages, prompt: counted.get(enough).tokens ?? null };
}

// What the status line says to a send of an empty box (none is sent), until something is typed (see typed).
const NOTHING_TO_SEND = {
  chat: "Nothing to send: type a message first",
  completion: "Nothing to continue: type the start of a text first",
};

// The message box or an edit's, typed in: saved, and what was said of it empty is no longer so.
function typed() {
  saveDraft();
  if (Object.values(NOTHING_TO_SEND).includes($("stats").textContent)) showStatus("");
}

// Sends the message in the box; or, `again` ({from, text, edited}: see regenerate and sendEdit), `text` in place of
// the history's message at `from`, for a new reply in place of its own: the turns after it are dropped. An edit
// that comes to nothing (failed, or stopped before the first token) is open again, to send again or cancel.
async function send(again = null) {
  const text = again ? again.text : $("prompt").value;
  if (state.controller) return;
  if (!text.trim()) { // Completion sent an empty prompt (the model rambled from nothing), Chat ignored it unsaid
    showStatus(NOTHING_TO_SEND[mode()], true);
    if (!again) $("prompt").focus(); // (an edit's box has the focus)
    return;
  }
  let sampling;
  try {
    sampling = samplingBody();
  } catch (err) {
    if (!(err instanceof FieldError)) throw err;
    showStatus(err.message, true); // nothing is sent; the message stays in the box
    return;
  }
  state.controller = new AbortController();
  setBusy(true);
  showProgress();
  if (state.cleared[mode()]) { // a new conversation begins: what Clear took away is gone for good
    delete state.cleared[mode()];
    showUndo();
    saveCleared();
  }
  // The message and what follows it leave the history, once nothing stops the send; the message stays where it
  // is (with the new text) and the turns after it are hidden, to come back if the send ends with no text.
  const replaced = again ? state.history.splice(again.from) : [];
  for (const { box: later } of replaced.slice(1)) later.hidden = true;
  if (again) showText(replaced[0].box, text);
  let path, body, box;
  let dropped = []; // the history's oldest messages, dropped to fit this one (see fitHistory)
  const turn = []; // the boxes this send adds to the transcript
  const chat = mode() === "chat"; // (the mode switch is disabled while a reply streams)
  if (chat) {
    const system = $("system").value.trim();
    const lead = system ? [{ role: "system", content: system }] : [];
    const userBox = again ? replaced[0].box : addMessage("user", "You", text);
    box = addMessage("assistant", state.model || "model");
    if (again) userBox.after(box); // in its old reply's place, not after the other mode's messages
    turn.push(...(again ? [] : [userBox]), box);
    path = "/v1/chat/completions";
    body = sampling;
    if (!$("thinking-field").hidden && !$("thinking").checked) {
      body.chat_template_kwargs = { enable_thinking: false };
    }
    if (!again) setPrompt(""); // (what is typed there meanwhile is the next message's)
    const fit = await fitHistory(lead, text, body);
    dropped = fit.messages;
    if (fit.turns) {
      note(box, `${fit.turns === 1 ? "the oldest turn was" : `the ${fit.turns} oldest turns were`} dropped `
        + "to fit the model's context");
    }
    records.get(box).inThinking = await opensThinking(fit.prompt);
    showText(box, "");
    body.messages = wire([...lead, ...state.history, { role: "user", content: text }]);
    state.history.push({ role: "user", content: text, box: userBox });
  } else {
    box = addMessage("completion", "Completion", "", text);
    turn.push(box);
    path = "/v1/completions";
    body = { ...sampling, prompt: text };
    setPrompt("");
  }
  box.querySelector(".content").classList.add("streaming");
  scrollDown();

  let restored = false;
  // A regenerate or an edit that ends with no text (failed, or stopped before its first token): the message as
  // it was and the turns after it come back, in the history too.
  const restore = () => {
    state.history.pop(); // the message, pushed again with this send
    box.remove();
    showText(replaced[0].box, replaced[0].content);
    for (const { box: later } of replaced) later.hidden = false;
    state.history.push(...replaced);
    bringBack(dropped);
    restored = true;
  };

  const started = performance.now();
  let firstAt = null;
  let pieces = 0;
  let generated = null; // the tokens generated by the latest chunk received, as the server counts them
  let reply = "";
  let status = "";
  let failed = false;
  // " · N tok/s · first token S s" for `tokens` received by now
  const timing = (tokens) => {
    const ended = performance.now();
    const seconds = (ended - (firstAt ?? started)) / 1000;
    // A busy browser may take in a fast model's whole stream in one read: timed from that read, the rate
    // was absurd (70,000 tok/s). Under 0.1 s, the whole request is timed instead, first token included.
    const perSecond = seconds >= 0.1 ? (tokens - 1) / seconds : tokens / ((ended - started) / 1000);
    const rate = tokens >= 5 && ended > started ? ` · ${perSecond.toFixed(1)} tok/s` : "";
    return rate + (firstAt !== null ? ` · first token ${((firstAt - started) / 1000).toFixed(2)} s` : "");
  };
  // "N tokens · ..." received by now: the server's count by the last chunk received; without one (a server that
  // sends none), the pieces received count the tokens, one a piece, but for text held back (part of a character, or
  // of a possible stop string) that came with a later token's piece.
  const received = () => {
    const tokens = generated ?? pieces;
    return `${generated === null ? "about " : ""}${tokens} token${tokens === 1 ? "" : "s"}${timing(tokens)}`;
  };
  // The reply is drawn once a frame, not once a piece: laying out a long reply anew for every token
  // starves the page as it grows (the Stop button with it, on a busy machine).
  let frame = null;
  const draw = () => {
    frame = null;
    const follow = atBottom();
    showText(box, reply, !follow);
    if (follow) scrollDown();
    showProgress(received());
  };
  const request = () => streamCompletion(path, body, (piece) => {
    if (firstAt === null) firstAt = performance.now();
    pieces += 1;
    reply += piece;
    if (frame === null) frame = requestAnimationFrame(draw);
  }, state.controller.signal, (usage) => { generated = usage.completion_tokens; });
  try {
    let result;
    try {
      result = await request();
    } catch (err) {
      // Restarted with another model, the server refuses the name the page still asks for (before any text):
      // the page reads the new one (the header shows it) and sends again, once.
      if (err.code !== "model_not_found") throw err;
      await loadModel();
      if (!state.model || state.model === body.model) throw err;
      body.model = state.model;
      if (chat) box.querySelector(".role").textContent = records.get(box).label = state.model;
      result = await request();
    }
    // The server took the key (restarted without one, say): a 401's mark on it goes, though it was not edited.
    accept($("api-key"));
    const tokens = result.usage ? result.usage.completion_tokens : pieces;
    // A reply that filled the context ends as "length" too, short of max tokens: say which limit it was.
    const full = result.finish === "length" && result.usage && state.context
      && result.usage.prompt_tokens + result.usage.completion_tokens >= state.context;
    status = `${tokens} token${tokens === 1 ? "" : "s"}${timing(tokens)} · finish: ${result.finish ?? "?"}`
      + (full ? " (the model's context is full)" : "");
    // A reply cut before its </think> showed thinking and no answer, and nothing on it said why (the status line
    // goes with the next send): a note does, saved with it, as Stop's does.
    const parts = chat && result.finish === "length" ? thinkingParts(reply, records.get(box).inThinking) : null;
    if (parts && !parts[2]) {
      note(box, full ? "the model's context filled while it was thinking, before its answer"
        : "Max tokens ran out while the model was thinking, before its answer: raise Max tokens, then Regenerate");
    }
    if (!$("status-dot").classList.contains("ok")) loadModel(); // the server is back: the header says so again
  } catch (err) {
    if (err.name === "AbortError") {
      status = pieces ? `stopped · ${received()}` : "stopped before the first token";
      if (again && !reply) restore();
      else note(box, "stopped");
    } else {
      failed = true;
      let message = err.message;
      if (err instanceof TypeError) { // fetch itself failed: no answer, or the connection dropped
        message = "lost the connection to the server (is `nanoqwen serve` still running?)";
      } else if (err.status === 401) {
        message = refuse($("api-key"), $("api-key").value.trim()
          ? "the server refused this API key: check it under Server, below the sampling settings"
          : "this server needs an API key: enter it under Server, below the sampling settings");
      }
      status = message; // in the status line too, which screen readers read out ("error" alone said nothing)
      if (reply) note(box, message, "error"); // what arrived stays, with why it ended
      else {
        // Nothing came back: the turn never happened. Its text goes back to the box, to send again rather than
        // type again, so the turn leaves the transcript (kept, a resend showed the message twice) and why it
        // failed is said in the status line, as for a setting that stops a send.
        if (again) restore(); // the message box is left as it is
        else {
          if (chat) {
            state.history.pop();
            bringBack(dropped);
          }
          for (const el of turn) el.remove();
          if (!$("prompt").value) setPrompt(text);
        }
        showEmptyHint();
      }
      loadModel(); // the header shows the server's state again (unreachable, key needed, or fine)
    }
  } finally {
    if (frame !== null) { // what arrived since the last frame is on the page before the status line
      cancelAnimationFrame(frame);
      draw();
    }
    if (chat && !restored && (reply || !failed)) { // a turn that happened (finished, stopped or cut) keeps its reply
      state.history.push({ role: "assistant", content: reply, box });
      for (const { box: later } of replaced.slice(1)) later.remove(); // the turns it replaced
    }
    box.querySelector(".content").classList.remove("streaming");
    state.controller = null;
    saveConversation();
    setBusy(false);
    const follow = atBottom(); // a reader at the end sees the Regenerate button below the reply too
    showRegenerate();
    if (follow) scrollDown();
    showStatus(status, failed);
    // The next message is typed in the box: the focus goes back there from Stop or Send (now disabled), or from
    // nowhere, but stays where the user (or a refused key) put it meanwhile: the rest of what was typed in the
    // system prompt, say, went into the message box. Text picked out meanwhile (to copy) stays picked out.
    const focused = document.activeElement;
    const refocus = [$("stop"), $("send")].includes(focused)
        || ([document.body, null].includes(focused) && getSelection().isCollapsed);
    if (restored && again.edited) startEdit(replaced[0].box, text, refocus);
    else if (refocus) $("prompt").focus();
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// The last reply again: it leaves the transcript and the history, and its message is sent again, with the
// settings as they are now.
function regenerate() {
  const from = state.history.length - 2;
  const last = state.history.slice(from);
  if (mode() === "chat" && last.length === 2 && last[0].role === "user" && last[1].role === "assistant") {
    send({ from, text: last[0].content });
  }
}

// A sent message, edited in place: its text (or `draft`) in a box with Send and Cancel (Escape) in place of the
// message. Sent, the turns after it are dropped and the reply regenerated (see send); cancelled, the message is as
// it was. One at a time.
function startEdit(box, draft = records.get(box).text, focus = true) {
  if (state.controller) return;
  cancelEdit();
  const form = Object.assign(document.createElement("form"), { className: "editor" });
  const text = Object.assign(document.createElement("textarea"), { value: draft, rows: 1 });
  text.setAttribute("aria-label", "Edit message");
  const sendButton = Object.assign(document.createElement("button"), {
    type: "submit", className: "primary", textContent: "Send",
  });
  const cancel = Object.assign(document.createElement("button"), {
    type: "button", className: "ghost", textContent: "Cancel", title: "Keep the message as it was (Escape)",
  });
  const actions = Object.assign(document.createElement("div"), { className: "actions" });
  actions.append(sendButton, cancel);
  form.append(text, actions);
  box.querySelector(".content").after(form);
  box.classList.add("editing");
  state.editing = { box, form, sendButton };
  nameMessageButtons();
  form.addEventListener("submit", (e) => { e.preventDefault(); sendEdit(); });
  cancel.addEventListener("click", () => cancelEdit(true));
  text.addEventListener("input", typed);
  text.addEventListener("keydown", (e) => {
    if (e.isComposing) return;
    if (e.key === "Enter" && !e.shiftKey && !touchScreen) { e.preventDefault(); sendEdit(); }
    // Escape stops a reply streaming first (see init); with none, it cancels the edit.
    if (e.key === "Escape" && !state.controller) { e.preventDefault(); cancelEdit(true); }
  });
  if (focus) {
    text.focus();
    text.setSelectionRange(text.value.length, text.value.length);
  }
  saveDraft();
}

// Closes the editor, the message as it was; `refocus`: the focus goes back to the message's Edit button.
function cancelEdit(refocus = false) {
  const editing = state.editing;
  if (!editing) return;
  state.editing = null;
  editing.form.remove();
  editing.box.classList.remove("editing");
  saveDraft();
  if (refocus) editing.box.querySelector("button.edit").focus();
}

function sendEdit() {
  if (state.controller) return; // another reply streams (its Send is disabled): the edit waits, as typed
  const { box, form } = state.editing;
  const text = form.querySelector("textarea").value;
  const from = state.history.findIndex((message) => message.box === box);
  if (from < 0) { // dropped to fit the context since the edit began: the model no longer sees it to replace
    cancelEdit();
    if (!$("prompt").value) setPrompt(text);
    showStatus("That message was dropped to fit the model's context: send the new text as a new message", true);
    return;
  }
  const hadFocus = form.contains(document.activeElement);
  send({ from, text, edited: true });
  // The send has started (it sets its controller at once), unless a setting or an empty text stopped it: then the
  // editor stays, to correct and send again.
  if (!state.controller) return;
  cancelEdit();
  if (hadFocus) $("stop").focus(); // the button that acts now, as after Send (the editor's focus went with it)
}

// The last reply of the chat gets the one Regenerate button (hidden while a reply streams), while the model
// sees it: a turn whose send failed left no reply.
const regenerateButton = Object.assign(document.createElement("button"), {
  type: "button", className: "ghost regenerate", textContent: "Regenerate",
  title: "Drop this reply and send the conversation again for a new one (with the settings as they are now)",
});

function showRegenerate() {
  const last = state.history.at(-1);
  const boxes = $("transcript").querySelectorAll(".message.chat-only");
  if (last?.role === "assistant" && last.box === boxes[boxes.length - 1]) last.box.append(regenerateButton);
  else regenerateButton.remove();
}

// The transcript of the mode shown, here and as saved. It can come back (Undo, under the message box) until the next
// send in that mode, a reload of the tab between (see CLEARED_STORAGE): one click lost a whole conversation. An empty
// transcript cleared again leaves Undo as it was.
function clearAll() {
  const shown = mode();
  const boxes = [...$("transcript").querySelectorAll(`.message.${shown}-only`)];
  if (boxes.length) {
    if (shown === "chat") cancelEdit();
    state.cleared[shown] = { boxes, history: shown === "chat" ? state.history : null };
    if (shown === "chat") state.history = [];
    for (const el of boxes) el.remove();
    showTranscriptChanged();
  }
  showStatus("");
}

function undoClear() {
  const { boxes, history } = state.cleared[mode()];
  delete state.cleared[mode()];
  $("transcript").append(...boxes);
  if (mode() === "chat") state.history = history;
  showTranscriptChanged();
  scrollDown();
  $("prompt").focus(); // the Undo button is gone: the focus would fall to the page's body
}

function showTranscriptChanged() { // after Clear or Undo
  showUndo();
  showRegenerate();
  saveConversation();
  saveCleared(); // after the conversation, which comes first in a full storage (see DRAFT_STORAGE)
  showEmptyHint();
}

// Undo shows in each mode whose Clear it can undo (a Clear in one mode keeps the other's: each has its own).
function showUndo() {
  const modes = Object.keys(state.cleared);
  $("cleared").hidden = !modes.length;
  $("cleared").className = modes.length === 1 ? `${modes[0]}-only` : "";
}

// -- wiring --------------------------------------------------------------------------------
function init() {
  const key = storage()?.getItem(KEY_STORAGE);
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("input", () => { // as typed: a reload before the box was left lost it
    try {
      storage()?.setItem(KEY_STORAGE, $("api-key").value.trim());
    } catch (err) { /* storage full: the page works as before, without memory */ }
  });
  $("api-key").addEventListener("change", () => loadModel()); // once left: the server is asked with it
  for (const id of SAVED_FIELDS) { // touched: see loadModel's defaults
    $(id).addEventListener($(id).type === "checkbox" ? "change" : "input", () => {
      if (state.applyingDefaults) return;
      $(id).dataset.touched = "true";
      saveSetting(id, fieldValue(id));
    });
  }
  for (const input of $("settings-body").querySelectorAll("input, textarea")) {
    input.addEventListener("input", () => accept(input)); // Reset settings' values come as input events too
  }
  $("reset-settings").addEventListener("click", resetSettings);
  $("settings-toggle").addEventListener("click", () => {
    const toggle = $("settings-toggle");
    toggle.setAttribute("aria-expanded", String(toggle.getAttribute("aria-expanded") !== "true"));
  });
  for (const [input, output] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
    const sync = () => { $(output).textContent = Number($(input).value).toFixed(2); };
    $(input).addEventListener("input", sync);
    sync();
  }
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      state.modeChosen = true;
      showMode(mode());
      saveSetting("mode", mode());
      showStatus("");
    });
  }
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("input", typed);
  if (touchScreen) $("prompt").placeholder = "Type here";
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !touchScreen) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  // Escape stops a reply as Stop does, wherever the focus is (on Stop after Send, in a setting, nowhere).
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller && !e.isComposing) {
      e.preventDefault();
      stop();
    }
  });
  regenerateButton.addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearAll);
  $("undo-clear").addEventListener("click", undoClear);
  document.body.dataset.mode = mode();
  setBusy(false);
  new MutationObserver(nameMessageButtons).observe($("transcript"), { childList: true });
  restoreConversation();
  restoreCleared();
  restoreDraft();
  showRegenerate();
  scrollDown(); // a conversation restored opens at its end, the latest reply in view (it showed its top)
  // Leaving the page (a reload) ends a reply streaming: it is stopped here, and so saved as stopped. Not later, at
  // pagehide: by then the browser has dropped the fetch, which read as a lost connection.
  window.addEventListener("beforeunload", stop);
  loadModel();
  setInterval(watchServer, WATCH_MS);
  document.addEventListener("visibilitychange", watchServer);
  window.addEventListener("focus", watchServer);
  $("prompt").focus();
}

init();

// MGM web demo: the page keeps the conversation and streams answers from POST /api/chat (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, history: [], busy: false };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.style.display = message ? "block" : "none";
}

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.appendChild(body);
  $("chat").appendChild(el);
  $("chat").scrollTop = $("chat").scrollHeight;
  return el;
}

function addMeta(el, text) {
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = text;
  el.appendChild(meta);
  return meta;
}

function newChat() {
  state.history = [];
  $("chat").replaceChildren();
  showError("");
}

async function checkHealth() {
  try {
    const h = await (await fetch("/api/health")).json();
    $("status").textContent = h.ready ? `ready: ${h.model} at ${h.triton_url}` : `not ready: ${h.error}`;
    $("status").className = h.ready ? "" : "bad";
  } catch (e) {
    $("status").textContent = `the demo server is not answering (${e})`;
    $("status").className = "bad";
  }
}

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  newChat();
  state.image = null;
  $("preview").style.display = "none";
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data URL; the server checks that it decodes
    $("preview").src = reader.result;
    $("preview").style.display = "block";
  };
  reader.onerror = () => showError(`cannot read ${file.name}`);
  reader.readAsDataURL(file);
});

$("clear").addEventListener("click", newChat);

$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("ask").requestSubmit();
  }
});

$("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (state.busy) return;
  const question = $("question").value;
  if (!question.trim()) { showError("type a question first"); return; }
  showError("");
  state.busy = true;
  $("send").disabled = true;
  addMessage("user", question);
  const answerEl = addMessage("assistant", "");
  answerEl.dataset.state = "streaming";
  answerEl.dataset.chunks = "0";
  const body = {
    question,
    images: state.image ? [state.image] : [],
    history: state.history,
    ocr: $("ocr").checked,
    gen: $("gen").checked,
    temperature: $("temperature").value,
    top_p: $("top_p").value,
    max_tokens: $("max_tokens").value,
  };
  try {
    await streamChat(body, answerEl);
    $("question").value = "";
  } catch (e) {
    answerEl.dataset.state = "error";
    const text = answerEl.querySelector(".text");
    if (!text.textContent) text.textContent = "(no answer)";
    showError(String(e.message || e));
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
});

async function streamChat(body, answerEl) {
  const resp = await fetch("/api/chat", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!resp.ok) {
    let message = `HTTP ${resp.status}`;
    try { message = (await resp.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const text = answerEl.querySelector(".text");
  let sent = body.question;
  let finished = false;
  const handlers = {
    question: (d) => { sent = d.question; if (d.ocr) addMeta(answerEl, `OCR tokens: ${d.ocr}`); },
    delta: (d) => {
      text.textContent += d.text;
      answerEl.dataset.chunks = String(Number(answerEl.dataset.chunks) + 1);
      $("chat").scrollTop = $("chat").scrollHeight;
    },
    done: (d) => {
      finished = true;
      text.textContent = d.text;
      answerEl.dataset.state = "done";
      addMeta(answerEl, `${d.output_tokens} tokens, first token ${Math.round(d.ttft_ms)} ms, ` +
                        `total ${(d.latency_s * 1000).toFixed(0)} ms`);
      state.history.push([sent, d.text.trim()]);
      if (d.gen) showGeneration(answerEl, d.gen);
    },
    error: (d) => { finished = true; throw new Error(d.message); },
  };
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (handlers[name] && data) handlers[name](JSON.parse(data));
    }
    if (done) break;
  }
  if (!finished) throw new Error("the answer stopped before it was complete");
}

function showGeneration(answerEl, gen) {
  if (gen.prompt) addMeta(answerEl, `Image prompt: ${gen.prompt}`);
  if (gen.image) {
    const img = document.createElement("img");
    img.src = gen.image;
    img.alt = gen.prompt || "generated image";
    answerEl.appendChild(img);
  }
  if (gen.note) addMeta(answerEl, gen.note);
}

checkHealth();

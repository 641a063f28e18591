// llmstream browser client (protocol llmstream.v1, docs/protocol.md). No external fetches:
// it talks only to the gateway that served it. Request ids, received text and the last seq
// are kept in sessionStorage so a reload (or a dropped socket) resumes every stream.
// With "SSE" ticked, a submit is an OpenAI chat completion streamed over fetch (docs/openai.md)
// instead; it resumes from its last event id (Last-Event-ID) after a reload or a drop. Cancel
// still goes over the WebSocket.
"use strict";
(function () {
  const STORE = "llmstream.requests";
  const SIGNED = "llmstream.signedIn";
  const SSE = "llmstream.sse";
  const $ = (id) => document.getElementById(id);
  let ws = null;
  let backoff = 250;
  let refs = 0;
  const pending = {};           // client_ref -> {prompt, sentAt}
  const reqs = load();          // request_id -> state
  let saveTimer = null;
  // The page's Content-Security-Policy allows no inline handlers: listeners are added here.
  $("model").addEventListener("input", (e) => { e.target.dataset.touched = "1"; });

  function load() {
    try { return JSON.parse(sessionStorage.getItem(STORE) || "{}"); } catch (e) { return {}; }
  }
  function saveNow() {
    if (saveTimer) { clearTimeout(saveTimer); saveTimer = null; }
    sessionStorage.setItem(STORE, JSON.stringify(reqs));
  }
  function save() {  // at most every 100 ms while tokens stream
    if (saveTimer) return;
    saveTimer = setTimeout(saveNow, 100);
  }
  // A reload or a closed tab within 100 ms of the last save must not lose what it held.
  window.addEventListener("pagehide", saveNow);
  function setConn(text) { $("conn").textContent = text; }

  function showSignedIn(yes) {
    $("signin").hidden = yes;
    $("submit").hidden = !yes;
    $("signout").hidden = !yes;
  }

  function panel(rid) {
    let el = document.querySelector(`[data-request-id="${rid}"]`);
    if (el) return el;
    const r = reqs[rid];
    el = document.createElement("article");
    el.className = "panel";
    el.dataset.requestId = rid;
    el.dataset.testid = "panel";
    el.setAttribute("data-testid", "panel");
    el.innerHTML =
      '<div class="head"><code class="rid"></code><span class="status" data-testid="status"></span>' +
      '<button class="cancel" data-testid="cancel">Cancel</button></div>' +
      '<div class="prompt meta"></div>' +
      '<div class="meta">TTFT <span class="ttft" data-testid="ttft">–</span> ms · ' +
      '<span class="tps" data-testid="tps">–</span> tok/s · seq <span class="seq">0</span></div>' +
      '<pre class="text" data-testid="text"></pre>';
    el.querySelector(".rid").textContent = rid;
    el.querySelector(".prompt").textContent = r.prompt || "";
    el.querySelector(".cancel").addEventListener("click", () => {
      send({ type: "cancel", request_id: rid });
    });
    $("panels").prepend(el);
    render(rid);
    return el;
  }

  function render(rid) {
    const r = reqs[rid];
    const el = panel(rid);
    el.querySelector(".text").textContent = r.text;
    el.querySelector(".seq").textContent = String(r.lastSeq);
    const st = el.querySelector(".status");
    st.textContent = r.status;
    st.className = "status status-" + (r.status === "stop" || r.status === "length" ? "done" : r.status);
    if (r.ttft != null) el.querySelector(".ttft").textContent = String(Math.round(r.ttft));
    if (r.tps != null) el.querySelector(".tps").textContent = r.tps.toFixed(1);
    el.querySelector(".cancel").disabled = !!r.done;
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(obj)); return true; }
    return false;
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    setConn("connecting…");
    const sock = new WebSocket(`${proto}//${location.host}/ws`);
    ws = sock;
    let opened = false;
    sock.onopen = () => {
      opened = true;
      backoff = 250;
      setConn("connected");
      showSignedIn(true);
      sessionStorage.setItem(SIGNED, "1");
      for (const [rid, r] of Object.entries(reqs)) {
        if (!r.done && !r.sse) send({ type: "resume", request_id: rid, after_seq: r.lastSeq });
      }
    };
    sock.onmessage = (ev) => onFrame(JSON.parse(ev.data));
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      if (!opened && !sessionStorage.getItem(SIGNED)) { setConn("signed out"); showSignedIn(false); return; }
      if (ev.code === 4401 || (!opened && backoff > 4000)) {
        sessionStorage.removeItem(SIGNED);
        setConn("signed out");
        showSignedIn(false);
        return;
      }
      setConn(`reconnecting (${ev.code})…`);
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 8000);
    };
  }

  function onFrame(f) {
    const rid = f.request_id;
    if (f.type === "hello") {
      // Take several tokens of a request per frame when the gateway offers it.
      if ((f.capabilities || []).includes("tokens")) send({ type: "hello", capabilities: ["tokens"] });
      // Preselect the deployment's model unless the user already chose one.
      const model = document.getElementById("model");
      if (f.default_model && !model.dataset.touched) model.value = f.default_model;
    } else if (f.type === "accepted") {
      const p = pending[f.client_ref];
      if (!reqs[rid]) reqs[rid] = newRequest(p ? p.prompt : "", p ? p.sentAt : null);
      delete pending[f.client_ref];
      panel(rid);
      save();
    } else if (f.type === "token" || f.type === "tokens") {
      const r = reqs[rid];
      if (!r || f.seq <= r.lastSeq) return;
      // `tokens`: texts[i] has seq f.seq - texts.length + 1 + i; keep only the new ones.
      const texts = f.type === "tokens" ? f.texts : [f.text];
      const fresh = texts.slice(Math.max(0, texts.length - (f.seq - r.lastSeq))).join("");
      const now = performance.now();
      if (r.firstAt == null) {
        r.firstAt = now;
        if (r.sentAt != null && r.ttft == null) r.ttft = now - r.sentAt;
      }
      r.text += fresh;
      r.lastSeq = f.seq;
      r.status = "streaming";
      const secs = (now - r.firstAt) / 1000;
      if (secs > 0.05) r.tps = (r.lastSeq - 1) / secs;
      render(rid);
      save();
    } else if (f.type === "done") {
      const r = reqs[rid];
      if (!r) return;
      r.done = true;
      r.status = f.finish_reason;
      if (f.metrics && f.metrics.ttft_ms != null) r.ttft = f.metrics.ttft_ms;
      if (f.metrics && f.metrics.tokens_per_s != null) r.tps = f.metrics.tokens_per_s;
      render(rid);
      save();
    } else if (f.type === "error") {
      const msg = `${f.code}: ${f.message}` + (f.retry_after_ms ? ` (retry in ${f.retry_after_ms} ms)` : "");
      if (rid && reqs[rid]) {
        if (f.code === "not_found") { reqs[rid].done = true; }
        if ((f.code === "overloaded" || f.code === "internal") && !reqs[rid].done) {
          // A resume that could not run now: ask again (from what we have) a bit later.
          setTimeout(() => {
            const r = reqs[rid];
            if (r && !r.done) send({ type: "resume", request_id: rid, after_seq: r.lastSeq });
          }, f.retry_after_ms || 1000);
        }
        reqs[rid].status = f.code;
        render(rid);
        save();
      } else {
        $("submit-error").textContent = msg;
      }
      if (f.client_ref) delete pending[f.client_ref];
    }
  }

  // ---- Server-Sent Events (the OpenAI-compatible API) ----------------------------------

  function newRequest(prompt, sentAt) {
    return { prompt, text: "", lastSeq: 0, status: "queued", done: false, sentAt,
      firstAt: null, ttft: null, tps: null };
  }

  async function sseSubmit(prompt, body) {
    const sentAt = performance.now();
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!resp.ok) {
      const err = (await resp.json().catch(() => ({}))).error || {};
      $("submit-error").textContent = `${resp.status} ${err.code || ""}: ${err.message || ""}`;
      return;
    }
    const rid = resp.headers.get("X-Request-Id");
    reqs[rid] = { ...newRequest(prompt, sentAt), sse: true, lastEventId: null };
    panel(rid);
    save();
    await sseRead(rid, resp);
  }

  async function sseResume(rid) {
    const r = reqs[rid];
    const headers = r.lastEventId ? { "Last-Event-ID": r.lastEventId } : {};
    try {
      const resp = await fetch(`/v1/chat/completions/${encodeURIComponent(rid)}/stream`,
        { credentials: "same-origin", headers });
      if (resp.status === 404) { r.done = true; r.status = "not_found"; render(rid); save(); return; }
      if (resp.ok) await sseRead(rid, resp);
    } catch (e) { /* dropped: try again below */ }
    if (!r.done) setTimeout(() => sseResume(rid), 1000);
  }

  async function sseRead(rid, resp) {
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          onSseEvent(rid, buf.slice(0, end));
          buf = buf.slice(end + 2);
        }
      }
    } catch (e) { /* the connection dropped */ }
    // Ended without its last event (a slow reader cut off, a replica gone): resume.
    if (!reqs[rid].done) setTimeout(() => sseResume(rid), 250);
  }

  function onSseEvent(rid, block) {
    const r = reqs[rid];
    let id = null, data = "";
    for (const line of block.split("\n")) {  // ": keep-alive" comment lines are skipped
      if (line.startsWith("id: ")) id = line.slice(4);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (!data || data === "[DONE]") return;
    const obj = JSON.parse(data);
    if (id) r.lastEventId = id;
    const choice = (obj.choices || [])[0];
    if (obj.error) {
      r.done = true;
      r.status = obj.error.code || "error";
    } else if (choice && choice.delta && choice.delta.content) {
      const now = performance.now();
      if (r.firstAt == null) {
        r.firstAt = now;
        if (r.sentAt != null && r.ttft == null) r.ttft = now - r.sentAt;
      }
      r.text += choice.delta.content;
      r.lastSeq = parseInt(id.slice(id.lastIndexOf(":") + 1), 10);
      r.status = "streaming";
      const secs = (now - r.firstAt) / 1000;
      if (secs > 0.05) r.tps = (r.lastSeq - 1) / secs;
    } else if (choice && choice.finish_reason) {
      r.done = true;
      r.status = choice.finish_reason;
    }
    render(rid);
    save();
  }

  $("use-sse").checked = sessionStorage.getItem(SSE) === "1";
  $("use-sse").addEventListener("change", (e) => {
    sessionStorage.setItem(SSE, e.target.checked ? "1" : "0");
  });

  $("signin").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("signin-error").textContent = "";
    const key = $("apikey").value.trim();
    const resp = await fetch("/v1/sessions", {
      method: "POST", headers: { Authorization: "Bearer " + key }, credentials: "same-origin",
    });
    $("apikey").value = "";
    if (!resp.ok) { $("signin-error").textContent = "Sign-in failed (" + resp.status + ")"; return; }
    sessionStorage.setItem(SIGNED, "1");
    connect();
  });

  $("signout").addEventListener("click", async () => {
    await fetch("/v1/sessions", { method: "DELETE", credentials: "same-origin" });
    sessionStorage.removeItem(SIGNED);
    const sock = ws; ws = null;
    if (sock) sock.close();
    showSignedIn(false);
    setConn("signed out");
  });

  $("submit").addEventListener("submit", (e) => {
    e.preventDefault();
    $("submit-error").textContent = "";
    const ref = "r" + Date.now().toString(36) + "-" + (refs++);
    const prompt = $("prompt").value;
    // A chat turn, so the model server applies the model's chat template (instruct models
    // answer the question instead of continuing the text).
    const body = { model: $("model").value, messages: [{ role: "user", content: prompt }],
      max_tokens: parseInt($("max_tokens").value, 10) || 64,
      temperature: Math.min(2, Math.max(0, parseFloat($("temperature").value) || 0)) };
    if ($("use-sse").checked) { sseSubmit(prompt, { ...body, stream: true }); return; }
    pending[ref] = { prompt, sentAt: performance.now() };
    const ok = send({ type: "submit", client_ref: ref, ...body });
    if (!ok) $("submit-error").textContent = "not connected";
  });

  for (const [rid, r] of Object.entries(reqs)) {
    panel(rid);
    if (r.sse && !r.done) sseResume(rid);
  }
  if (sessionStorage.getItem(SIGNED)) connect(); else showSignedIn(false);
})();

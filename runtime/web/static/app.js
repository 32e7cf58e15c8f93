// X-Portrait live: the page. Camera frames go to the server as JPEG over one WebSocket; animated
// frames come back with the page's own timestamp, so latency is measured here, on one clock.
// Flow control: at most `maxInFlight` frames are unanswered at once (the server says how many);
// the server answers every frame it keeps, and an answer for frame n settles every earlier frame
// (those were dropped by the server: the latest frame wins). Protocol: runtime/web/protocol.py.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null, session: null, seq: 0, pending: new Map(), maxInFlight: 2, captureSide: 480,
  limits: {}, latencies: [], arrivals: [], received: 0, sent: 0, dropped: 0, noFace: 0, stray: 0,
  paused: false, stream: null,
};
const grab = document.createElement("canvas");

function wsUrl() {
  const url = new URL("ws", location.href);  // relative: works behind a proxy under any path
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  if (token) url.searchParams.set("token", token);
  return url.href;
}

function pack(header, payload) {
  const head = new TextEncoder().encode(JSON.stringify(header));
  const len = new Uint8Array(4);
  new DataView(len.buffer).setUint32(0, head.length, true);
  return new Blob([len, head, payload]);
}

function unpack(buffer) {
  const n = new DataView(buffer).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
  return [header, new Uint8Array(buffer, 4 + n)];
}

function setText(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  if (cls !== undefined) el.className = cls;
}

function connect() {
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onText(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = (ev) => {
    state.ws = null;
    if (!$("status").classList.contains("error")) {
      setText("status", `disconnected (${ev.code}${ev.reason ? ": " + ev.reason : ""}); reload to start again`,
              "error");
    }
  };
}

function onText(m) {
  switch (m.type) {
    case "hello":
      state.session = m.session;
      state.maxInFlight = m.max_in_flight;
      state.captureSide = m.capture_side;
      state.limits = m.limits;
      setText("session-id", m.session);
      fillSelect("steps", m.options.steps, m.steps);
      fillSelect("window", m.options.window, m.window);
      if (m.random_weights) {
        $("banner").hidden = false;
        $("banner").textContent = "Random weights: the server has no checkpoint, so the animation is noise.";
      }
      setText("status", `connected: ${m.resolution} px, ${m.steps} step${m.steps > 1 ? "s" : ""}, window ${m.window}`, "ok");
      startCamera();
      break;
    case "busy":
      setText("status", m.message, "error");
      break;
    case "closed":
      setText("status", `session closed: ${m.reason}`, "error");
      break;
    case "skip":
      settle(m.seq);
      if (m.reason.startsWith("no face")) {
        state.noFace += 1;
        setText("hud-noface", `no face yet (${state.noFace})`);
      } else {
        setText("hud-noface", m.reason);
      }
      break;
    case "source":
      setText("source-status", m.ok ? "source updated" : `rejected: ${m.message}`, m.ok ? "ok" : "error");
      break;
    case "reset":
      setText("config-status", "temporal cache reset", "ok");
      break;
    case "config":
      state.maxInFlight = m.max_in_flight;
      setText("config-status", `now ${m.steps} steps, window ${m.window}`, "ok");
      break;
    case "error":
      setText("config-status", m.message, "error");
      break;
  }
}

function fillSelect(id, values, current) {
  const sel = $(id);
  sel.replaceChildren(...values.map((v) => new Option(String(v), String(v), v === current, v === current)));
  sel.disabled = values.length < 2;
}

// An answer for `seq` settles it and every earlier frame still pending (dropped by the server).
function settle(seq) {
  for (const k of [...state.pending.keys()]) {
    if (k < seq) { state.pending.delete(k); state.dropped += 1; }
  }
  state.pending.delete(seq);
}

function onFrame(buffer) {
  const [h, jpeg] = unpack(buffer);
  if (h.session !== state.session) { state.stray += 1; setText("stray-frames", String(state.stray)); return; }
  const now = performance.now();
  settle(h.seq);
  state.received += 1;
  push(state.latencies, now - h.t, 30);
  push(state.arrivals, now, 30);
  createImageBitmap(new Blob([jpeg], { type: "image/jpeg" })).then((bmp) => {
    const out = $("output");
    out.getContext("2d").drawImage(bmp, 0, 0, out.width, out.height);
    bmp.close();
  });
  setText("hud-noface", h.face ? "" : "no face: holding the last crop");
  setText("server-ms", `${h.server_ms.toFixed(0)} ms (${Object.entries(h.stages)
    .map(([k, v]) => `${k} ${v.toFixed(0)}`).join(", ")})`);
  drawHud();
}

function push(list, value, n) {
  list.push(value);
  if (list.length > n) list.shift();
}

function median(list) {
  const s = [...list].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function drawHud() {
  const a = state.arrivals;
  const fps = a.length > 1 ? (a.length - 1) * 1000 / (a[a.length - 1] - a[0]) : 0;
  setText("hud-fps", `${fps.toFixed(1)} FPS`);
  setText("hud-latency", `latency ${median(state.latencies).toFixed(0)} ms`);
  setText("hud-dropped", `dropped ${state.dropped}`);
  setText("frames-received", String(state.received));
}

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setText("status", "no camera API here: open the page over https:// or http://localhost (a secure context)",
            "error");
    return;
  }
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (e) {
    setText("status", `camera unavailable: ${e.message}`, "error");
    return;
  }
  $("camera").srcObject = state.stream;
  captureLoop();
}

// A timer, not requestAnimationFrame: a tab in the background keeps sending (slower), not stops.
async function captureLoop() {
  const video = $("camera");
  for (;;) {
    await new Promise((r) => setTimeout(r, 30));
    const ws = state.ws;
    if (!ws) return;
    if (state.paused || ws.readyState !== WebSocket.OPEN || !video.videoWidth) continue;
    expireStale();
    if (state.pending.size >= state.maxInFlight) continue;
    const t = performance.now();
    const scale = Math.min(1, state.captureSide / Math.max(video.videoWidth, video.videoHeight));
    grab.width = Math.round(video.videoWidth * scale);
    grab.height = Math.round(video.videoHeight * scale);
    grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
    const jpeg = await new Promise((r) => grab.toBlob(r, "image/jpeg", 0.8));
    if (!jpeg || jpeg.size > state.limits.frame_bytes) continue;
    const seq = ++state.seq;
    state.pending.set(seq, t);
    ws.send(pack({ kind: "frame", seq, t }, jpeg));
    state.sent += 1;
    setText("frames-sent", String(state.sent));
  }
}

// A frame unanswered for 10 s (a lost answer) must not hold a flow-control slot forever.
function expireStale() {
  const now = performance.now();
  for (const [seq, t] of state.pending) {
    if (now - t > 10000) { state.pending.delete(seq); state.dropped += 1; }
  }
}

function sendJson(m) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(m));
}

$("source-file").addEventListener("change", () => {
  const file = $("source-file").files[0];
  if (!file || !state.ws) return;
  if (file.size > state.limits.upload_bytes) {
    setText("source-status", `too large: ${file.size} bytes (limit ${state.limits.upload_bytes})`, "error");
    return;
  }
  setText("source-status", "uploading…", "");
  state.ws.send(pack({ kind: "source" }, file));
});
$("reset").addEventListener("click", () => sendJson({ type: "reset" }));
for (const id of ["steps", "window"]) {
  $(id).addEventListener("change", () => sendJson({
    type: "config", steps: Number($("steps").value), window: Number($("window").value) }));
}
$("camera-toggle").addEventListener("click", () => {
  state.paused = !state.paused;
  $("camera-toggle").textContent = state.paused ? "Resume camera" : "Pause camera";
});

connect();

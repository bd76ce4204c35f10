// Shared by the review and explorer pages: JSON calls, HTML escaping, and a video player that stays inside
// one span of its file (looping), with speed control and frame stepping.
"use strict";

async function api(path, options) {
  const resp = await fetch(path, Object.assign({ headers: { "Content-Type": "application/json" } }, options || {}));
  let body = null;
  try { body = await resp.json(); } catch (e) { body = { error: `HTTP ${resp.status}` }; }
  if (!resp.ok) {
    const err = new Error((body && (body.error || body.detail)) || `HTTP ${resp.status}`);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function esc(s) {
  return String(s == null ? "" : s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function fmt(x, digits) {
  return x == null ? "–" : Number(x).toFixed(digits == null ? 2 : digits);
}

// A <video> looping over [start, end] seconds of its source. The check runs on every animation frame (and on
// timeupdate as a fallback), so playback leaves the span by at most one frame before it is sent back.
class SpanPlayer {
  constructor(video, opts) {
    this.video = video;
    this.start = 0;
    this.end = null;
    this.fps = 25;
    this.loops = 0;
    this.onFrame = (opts && opts.onFrame) || null;
    this._raf = null;
    const tick = () => { this._check(); this._raf = requestAnimationFrame(tick); };
    video.addEventListener("timeupdate", () => this._check());
    video.addEventListener("seeked", () => { if (this.onFrame) this.onFrame(video.currentTime); });
    video.addEventListener("loadedmetadata", () => {
      if (this.end == null || this.end > video.duration) this.end = video.duration;
      if (video.currentTime < this.start || video.currentTime > this.end) video.currentTime = this.start;
    });
    this._raf = requestAnimationFrame(tick);
  }
  load(src, start, end, fps) {
    this.start = Math.max(0, Number(start) || 0);
    this.end = end == null ? null : Number(end);
    this.fps = Number(fps) || 25;
    this.loops = 0;
    this.video.loop = false;
    // the media fragment makes the first request start at the span, before loadedmetadata runs
    this.video.src = `${src}#t=${this.start.toFixed(3)}`;
    this.video.load();
  }
  _check() {
    const v = this.video;
    if (this.end != null && (v.currentTime >= this.end - 1e-3 || v.ended)) {
      v.currentTime = this.start;
      this.loops += 1;
      if (v.ended || v.paused && !v.dataset.userPaused) v.play().catch(() => {});
    } else if (v.currentTime < this.start - 1e-3) {
      v.currentTime = this.start;
    }
    if (this.onFrame) this.onFrame(v.currentTime);
  }
  toggle() {
    const v = this.video;
    if (v.paused) { delete v.dataset.userPaused; v.play().catch(() => {}); }
    else { v.dataset.userPaused = "1"; v.pause(); }
  }
  step(frames) {
    const v = this.video;
    v.dataset.userPaused = "1";
    v.pause();
    const dt = frames / this.fps;
    let t = v.currentTime + dt;
    const last = (this.end == null ? v.duration : this.end) - 1 / this.fps;
    if (t > last) t = this.start;
    if (t < this.start) t = Math.max(this.start, last);
    v.currentTime = t;
  }
  speed(rate) {
    this.video.playbackRate = rate;
  }
}

const SPEEDS = [0.1, 0.25, 0.5, 1, 1.5, 2];

function playerControls(container, player) {
  container.innerHTML = `
    <button type="button" data-act="toggle" title="play / pause (space)">play / pause</button>
    <button type="button" data-act="back" title="one frame back (,)">◀ frame</button>
    <button type="button" data-act="fwd" title="one frame forward (.)">frame ▶</button>
    <label>speed <select data-act="speed">${SPEEDS.map(s => `<option value="${s}" ${s === 1 ? "selected" : ""}>${s}×</option>`).join("")}</select></label>
    <span class="time"></span>`;
  container.querySelector("[data-act=toggle]").onclick = () => player.toggle();
  container.querySelector("[data-act=back]").onclick = () => player.step(-1);
  container.querySelector("[data-act=fwd]").onclick = () => player.step(1);
  const sel = container.querySelector("[data-act=speed]");
  sel.onchange = () => player.speed(Number(sel.value));
  const time = container.querySelector(".time");
  player.video.addEventListener("timeupdate", () => {
    const t = player.video.currentTime - player.start;
    const span = (player.end == null ? player.video.duration : player.end) - player.start;
    time.textContent = `${fmt(t)} / ${fmt(span)} s (frame ${Math.round(t * player.fps)})`;
  });
  return {
    faster() { const i = SPEEDS.indexOf(Number(sel.value)); if (i < SPEEDS.length - 1) { sel.value = SPEEDS[i + 1]; sel.onchange(); } },
    slower() { const i = SPEEDS.indexOf(Number(sel.value)); if (i > 0) { sel.value = SPEEDS[i - 1]; sel.onchange(); } },
  };
}

// A filter <select>: 'all' plus one option per value with its count, keeping the current choice.
function fill(select, counts) {
  const keep = select.value;
  select.innerHTML = '<option value="">all</option>' + Object.entries(counts).map(([k, n]) => `<option value="${esc(k)}">${esc(k)} (${n})</option>`).join("");
  select.value = keep;
}

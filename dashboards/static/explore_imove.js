// iMOVE-IT explorer: every detected instance, how far it got through the stages, and its track drawn over
// the video (the box of the latest track point at or before the playing time, from the track table).
"use strict";

const $ = id => document.getElementById(id);
const video = $("video"), canvas = $("overlay");
const state = { instance: null, points: [], width: 0, height: 0 };
// what the overlay drew last, read by the browser tests: source pixels and canvas pixels
window.overlayState = { t: null, box_px: null, box_canvas: null, frame_index: null };

function draw(t) {
  const w = video.clientWidth, h = video.clientHeight;
  if (!w || !h || !state.width) return;
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  let p = null;
  for (const q of state.points) { if (q.t_s <= t + 1e-3) p = q; else break; }
  if (!p || !p.visible || !p.box_xyxy_px) { window.overlayState = { t, box_px: null, box_canvas: null, frame_index: p ? p.frame_index : null }; return; }
  const sx = w / state.width, sy = h / state.height;
  const [x1, y1, x2, y2] = p.box_xyxy_px;
  const box = [x1 * sx, y1 * sy, x2 * sx, y2 * sy];
  ctx.lineWidth = 3;
  ctx.strokeStyle = "rgb(255, 0, 255)";
  ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  ctx.fillStyle = "rgb(255, 0, 255)";
  ctx.font = "14px sans-serif";
  ctx.fillText(state.instance.summary.label || "", box[0] + 2, Math.max(14, box[1] - 4));
  window.overlayState = { t, box_px: p.box_xyxy_px, box_canvas: box, frame_index: p.frame_index };
}

const player = new SpanPlayer(video, { onFrame: draw });
playerControls($("controls"), player);

// The server sends the instances a page at a time (a large root has millions); "show more" appends the next.
const HEADER = "<tr><th>instance</th><th>label</th><th>status</th><th>reason</th></tr>";
let shown = 0;

async function list(append = false) {
  const params = new URLSearchParams();
  if ($("f-status").value) params.set("status", $("f-status").value);
  if ($("f-reason").value) params.set("reason", $("f-reason").value);
  params.set("offset", String(append ? shown : 0));
  const data = await api(`/api/imove/instances?${params}`);
  fill($("f-status"), data.facets.status);
  fill($("f-reason"), data.facets.reason);
  const rows = data.instances.map(r =>
    `<tr data-id="${esc(r.instance_id)}"><td>${esc(r.instance_id.slice(0, 12))}</td><td>${esc(r.label)}</td><td>${esc(r.status)}</td><td title="${esc(r.reason || "")}">${esc(r.error || "")}</td></tr>`).join("");
  if (append) $("instances").insertAdjacentHTML("beforeend", rows);
  else $("instances").innerHTML = HEADER + rows;
  shown = (append ? shown : 0) + data.instances.length;
  $("shown").textContent = `${shown} of ${data.total}`;
  $("more").hidden = shown >= data.total;
  document.querySelectorAll("#instances tr[data-id]").forEach(tr => { tr.onclick = () => open(tr.dataset.id); });
  document.body.dataset.count = String(shown);
  document.body.dataset.total = String(data.total);
}

async function open(iid) {
  const d = await api(`/api/imove/instances/${encodeURIComponent(iid)}`);
  state.instance = d;
  state.points = (d.track && d.track.points) || [];
  state.width = (d.track && d.track.width) || d.summary.width;
  state.height = (d.track && d.track.height) || d.summary.height;
  document.querySelectorAll("#instances tr").forEach(tr => tr.classList.toggle("sel", tr.dataset.id === iid));
  $("hint").hidden = true;
  $("instance").hidden = false;
  const s = d.summary, tf = d.trackfilter || {}, cap = d.caption || {}, chk = d.check || {};
  const row = (k, v) => `<dt>${esc(k)}</dt><dd>${v}</dd>`;
  $("facts").innerHTML = [
    row("instance", esc(s.instance_id)), row("label (tag)", esc(s.label)), row("stage status", esc(s.status)),
    row("reason", esc(s.error || "–")), row("first-frame tags (RAM++)", esc((s.clip_tags || []).join(", ") || "–")),
    row("tag score", fmt(s.tag_score, 3)), row("detection score", fmt(s.detection_score, 3)),
    row("CLIP score (detection)", fmt(s.clip_score, 3)),
    row("CLIP score (track, mean)", fmt(tf.mean_clip_score, 3) + (tf.kept === false ? " — dropped" : "")),
    row("track", d.track ? `${d.track.num_visible}/${d.track.num_frames} frames visible` : "–"),
    row("static caption", esc(cap.static_caption || "–")), row("dynamic caption", esc(cap.dynamic_caption || "–")),
    row("motion interval", cap.t1_s == null ? "–" : `${fmt(cap.t1_s)} – ${fmt(cap.t2_s)} s`),
    row("checker", chk.instance_id ? `${chk.accepted ? "accepted" : "rejected"}: ${esc(chk.reason || "")}` : "–"),
  ].join("");
  $("samples").innerHTML = d.samples.length ? d.samples.map(x => `<h4>${esc(x.task)}</h4><pre class="sample">` +
    x.conversations.map(c => `${esc(c.from)}: ${esc(c.value)}`).join("\n") + "</pre>").join("") : "<p>no samples</p>";
  player.load(d.video_url, s.start_s, s.end_s, s.fps);
  document.body.dataset.instance = iid;
}

$("f-status").onchange = () => list();
$("f-reason").onchange = () => list();
$("more").onclick = () => list(true);
window.addEventListener("resize", () => draw(video.currentTime));
list().then(() => {
  const want = new URLSearchParams(location.search).get("instance");
  if (want) open(want);
});

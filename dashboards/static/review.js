// The review page: one pending question at a time; accept / reject / edit; the next one comes up at once.
"use strict";

const $ = id => document.getElementById(id);
const state = { q: null, busy: false, fixed: null };
const player = new SpanPlayer($("video"));
const speedKeys = playerControls($("controls"), player);
const LETTERS = ["A", "B", "C", "D"];

const reviewerBox = $("reviewer");
reviewerBox.value = new URLSearchParams(location.search).get("reviewer") || localStorage.getItem("motionforge.reviewer") || "";
reviewerBox.addEventListener("change", () => { localStorage.setItem("motionforge.reviewer", reviewerBox.value.trim()); if (!state.q) nextQuestion(); });
const reviewer = () => reviewerBox.value.trim();

function say(text, kind) {
  const m = $("message");
  m.textContent = text || "";
  m.className = "message " + (kind || "");
}

async function nextQuestion(after) {
  if (!reviewer()) { say("Enter your reviewer id (top right) to start.", "warn"); reviewerBox.focus(); return; }
  const params = new URLSearchParams({ reviewer: reviewer() });
  if (after) params.set("after", after);
  const { question_id, held_by_others } = await api(`/api/review/next?${params}`);
  if (!question_id) {
    state.q = null;
    $("question-view").hidden = true;
    player.video.removeAttribute("src");
    say(held_by_others ? `Nothing left for you: the last ${held_by_others} question(s) are open with other reviewers.`
                       : "Nothing left to review. Thank you!", "ok");
    document.body.dataset.state = "done";
    return refreshProgress();
  }
  await show(question_id);
}

async function show(qid) {
  const q = await api(`/api/review/questions/${encodeURIComponent(qid)}`);
  state.q = q;
  document.body.dataset.question = q.question_id;
  $("question-view").hidden = false;
  $("category").textContent = `${q.category || "?"} · ${q.category_name || "unknown category"}`;
  $("qid").textContent = q.question_id;
  $("conflict").hidden = !q.conflict;
  $("span").textContent = `clip ${fmt(q.start_s)}–${fmt(q.end_s)} s of ${q.clip_path.split("/").pop()} · ${fmt(q.fps, 0)} fps`;
  $("question").textContent = q.question;
  $("options").innerHTML = LETTERS.map(l =>
    `<li class="${l === q.answer ? "proposed" : ""}" data-letter="${l}">${esc(q.options[l])}${l === q.answer ? ' <span class="pill">proposed answer</span>' : ""}</li>`).join("");
  $("judges").innerHTML = "<tr><th>judge</th><th>model</th><th>answer</th><th>correct</th><th>reply</th></tr>" +
    (q.judges.length ? q.judges.map(j => `<tr><td>${esc(j.judge)}</td><td>${esc(j.model)}</td><td>${esc(j.answer || "–")}</td>` +
      `<td>${j.correct == null ? "–" : j.correct ? "yes" : "no"}</td><td class="raw">${esc(j.raw_reply || j.error || "")}</td></tr>`).join("")
      : '<tr><td colspan="5">no judge verdicts</td></tr>') +
    (q.ffilter ? `<tr><td colspan="5">${q.ffilter.n_correct} of ${q.ffilter.n_judges} judges right from the first frame alone</td></tr>` : "");
  $("history").innerHTML = q.history.length ? "<h3>Decisions so far</h3><ul>" + q.history.map(d =>
    `<li><b>${esc(d.reviewer)}</b>: ${esc(d.decision)}${d.reason ? " — " + esc(d.reason) : ""} <small>${esc(d.decided_at || "")}</small></li>`).join("") + "</ul>" : "";
  hideForms();
  say(q.reviewable ? "" : "This question is not in the review queue (ffilter dropped it).", q.reviewable ? "" : "warn");
  player.load(q.video_url, q.start_s, q.end_s, q.fps);
  $("first-frame").src = q.first_frame_url;
}

function hideForms() {
  $("reject-form").hidden = true;
  $("edit-form").hidden = true;
  $("actions").hidden = false;
}

async function submit(body) {
  if (state.busy || !state.q) return;
  state.busy = true;
  const qid = state.q.question_id;
  try {
    const d = await api("/api/review/decisions", { method: "POST", body: JSON.stringify(Object.assign({ question_id: qid, reviewer: reviewer() }, body)) });
    say(`${d.decision} recorded for ${qid.slice(0, 8)} by ${d.reviewer}`, "ok");
    const keep = $("message").textContent;
    if (state.fixed) { await show(qid); } else { await nextQuestion(qid); }
    if (state.q) say(keep, "ok");
    refreshProgress();
  } catch (e) {
    say(`Not recorded: ${e.message}`, "error");
  } finally {
    state.busy = false;
  }
}

function startReject() {
  $("actions").hidden = true;
  $("reject-form").hidden = false;
  $("reject-reason").value = "";
  $("reject-reason").focus();
}

function startEdit() {
  const q = state.q;
  $("actions").hidden = true;
  $("edit-form").hidden = false;
  $("edit-question").value = q.question;
  $("edit-options").innerHTML = LETTERS.map(l => `<label>${l} <input data-letter="${l}" size="50" value="${esc(q.options[l])}"></label>`).join("");
  $("edit-answer").value = q.answer;
  $("edit-category").innerHTML = Object.entries(q.categories).map(([c, n]) => `<option value="${c}">${c} · ${esc(n)}</option>`).join("");
  $("edit-category").value = q.category;
  $("edit-reason").value = "";
  $("edit-question").focus();
}

$("accept").onclick = () => submit({ decision: "accept" });
$("reject").onclick = startReject;
$("edit").onclick = startEdit;
$("skip").onclick = () => state.q && nextQuestion(state.q.question_id);
$("reject-form").onsubmit = ev => {
  ev.preventDefault();
  const reason = $("reject-reason").value.trim();
  if (!reason) { say("A rejection needs a reason.", "error"); $("reject-reason").focus(); return; }
  submit({ decision: "reject", reason });
};
$("edit-form").onsubmit = ev => {
  ev.preventDefault();
  const options = {};
  document.querySelectorAll("#edit-options input").forEach(i => { options[i.dataset.letter] = i.value; });
  submit({ decision: "edit", question: $("edit-question").value, options, answer: $("edit-answer").value,
           category: $("edit-category").value, reason: $("edit-reason").value.trim() });
};
document.querySelectorAll("form .cancel").forEach(b => { b.onclick = hideForms; });

document.addEventListener("keydown", ev => {
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
  if (ev.key === "Escape") { hideForms(); document.activeElement.blur(); return; }
  if (typing) {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !$("edit-form").hidden) { ev.preventDefault(); $("edit-form").requestSubmit(); }
    return;
  }
  if (!state.q || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const act = { a: () => submit({ decision: "accept" }), r: startReject, e: startEdit, s: () => nextQuestion(state.q.question_id),
                " ": () => player.toggle(), ",": () => player.step(-1), ".": () => player.step(1),
                "[": () => speedKeys.slower(), "]": () => speedKeys.faster() }[ev.key];
  if (act && $("actions").hidden === false) { ev.preventDefault(); act(); }
});

async function refreshProgress() {
  const p = await api("/api/review/progress");
  const pct = p.total ? Math.round(100 * p.reviewed / p.total) : 100;
  $("progress").innerHTML = `
    <h3>Progress</h3>
    <p id="progress-total"><b>${p.reviewed}</b> / ${p.total} reviewed (${pct}%) · accepted ${p.decisions.accept}, rejected ${p.decisions.reject}, edited ${p.decisions.edit}</p>
    <div class="bar"><div style="width:${pct}%"></div></div>
    <table class="grid"><tr><th>reviewer</th><th>reviewed</th><th>accept</th><th>reject</th><th>edit</th></tr>
      ${Object.entries(p.by_reviewer).map(([r, c]) => `<tr><td>${esc(r)}</td><td>${c.reviewed}</td><td>${c.accept}</td><td>${c.reject}</td><td>${c.edit}</td></tr>`).join("") || '<tr><td colspan="5">nobody yet</td></tr>'}</table>
    <table class="grid"><tr><th>category</th><th>reviewed / total</th></tr>
      ${Object.entries(p.by_category).map(([c, n]) => `<tr><td>${esc(c)}</td><td>${n.reviewed} / ${n.total}</td></tr>`).join("")}</table>
    <h3>Conflicts (${p.conflicts.length})</h3>
    <ul id="conflicts">${p.conflicts.map(c => `<li><a href="/review/${encodeURIComponent(c.question_id)}">${esc(c.question_id.slice(0, 8))}</a> (${esc(c.category)}): ` +
      c.decisions.map(d => `${esc(d.reviewer)} ${esc(d.decision)}`).join(" vs ") + "</li>").join("")}</ul>`;
}

(async () => {
  const m = location.pathname.match(/^\/review\/([^/]+)$/);
  try {
    if (m) { state.fixed = decodeURIComponent(m[1]); await show(state.fixed); }
    else await nextQuestion();
  } catch (e) {
    say(e.message, "error");
  }
  refreshProgress();
  setInterval(() => refreshProgress().catch(() => {}), 15000);
})();

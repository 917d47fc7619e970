"""The live view's one page: a little script that polls ``/api/state`` every few seconds
and rebuilds the jobs, the running jobs' rounds and curves, and the sites, as text nodes
(no markup from data ever reaches ``innerHTML``). Script and style carry the response's
nonce, which the Content-Security-Policy header names: nothing else may run."""

from __future__ import annotations

import html

__all__ = ["POLL_SECONDS", "live_page"]

POLL_SECONDS = 2.0

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d232b; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 24px 48px; background: #fff;
       min-height: 100vh; }
h1 { font-size: 22px; margin: 8px 0 2px; } h2 { font-size: 17px; margin: 22px 0 6px;
     border-bottom: 1px solid #e3e6ea; padding-bottom: 3px; }
.sub { color: #5b6570; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
th, td { border: 1px solid #e3e6ea; padding: 3px 8px; text-align: left; }
th { background: #f1f3f5; }
.state { font-weight: 600; border-radius: 3px; padding: 0 5px; }
.running { background: #dbeafe; } .finished { background: #dcfce7; }
.failed { background: #fee2e2; } .aborted { background: #fde68a; } .submitted { background: #eee; }
.job { border: 1px solid #e3e6ea; border-radius: 4px; padding: 8px 12px; margin: 10px 0; }
.round { font-size: 16px; font-weight: 600; }
img.curves { max-width: 100%; display: block; margin-top: 6px; }
#status { float: right; font-size: 12px; color: #5b6570; }
"""

_SCRIPT = """
"use strict";
const POLL_MS = %(poll_ms)d;
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function table(headers, rows) {
  const t = el("table"), head = el("tr");
  headers.forEach(h => head.appendChild(el("th", h)));
  t.appendChild(head);
  rows.forEach(r => { const tr = el("tr"); r.forEach(c => tr.appendChild(
    c instanceof Node ? (() => { const td = el("td"); td.appendChild(c); return td; })()
                      : el("td", c))); t.appendChild(tr); });
  return t;
}
function ago(s) { return s === null || s === undefined ? "-" : s < 1 ? "now" :
  s < 120 ? Math.round(s) + " s ago" : Math.round(s / 60) + " min ago"; }
function when(t) { return t ? new Date(t * 1000).toLocaleString() : "-"; }
function render(state) {
  document.getElementById("server").textContent =
    "server " + state.server + " · project " + state.project;
  const jobs = document.getElementById("jobs");
  jobs.replaceChildren(table(["job", "name", "state", "rounds", "submitted", "error"],
    state.jobs.slice().reverse().map(j => [j.job_id, j.name, el("span", j.state,
      "state " + j.state), j.round_done === null || j.round_done === undefined ? "-" :
      (j.round_done + 1) + " / " + j.num_rounds, when(j.submitted_at),
      (j.error || "").split("\\n")[0].slice(0, 120)])));
  const running = document.getElementById("running");
  const live = state.jobs.filter(j => j.state === "running");
  if (!live.length) running.replaceChildren(el("p", "No job is running.", "sub"));
  else running.replaceChildren(...live.map(j => {
    const box = el("div", null, "job"); box.dataset.job = j.job_id;
    const done = j.round_done === null || j.round_done === undefined ? 0 : j.round_done + 1;
    const current = Math.min(done + 1, j.num_rounds);
    const line = el("div", null, "round");
    const number = el("span", current); number.className = "current-round";
    number.dataset.job = j.job_id;
    line.append(j.name + " (" + j.job_id + "): round ", number, " of " + j.num_rounds +
      " · " + done + " done");
    box.appendChild(line);
    const progress = state.progress[j.job_id] || {};
    box.appendChild(table(["site", "state", "task", "round", "last seen"],
      Object.keys(progress).sort().map(s => { const p = progress[s];
        return [s, p.gone ? "gone: " + p.gone.split("\\n")[0] : p.state, p.task || "-",
                p.round === null || p.round === undefined ? "-" : p.round + 1,
                ago(p.seen_s_ago)]; })));
    const img = el("img", null, "curves"); img.alt = "metrics of " + j.job_id;
    img.id = "curves-" + j.job_id;
    const src = "/api/curves/" + encodeURIComponent(j.job_id) + ".svg?r=" + done;
    img.src = src;
    if (done > 0) box.appendChild(img);
    return box; }));
  const sites = document.getElementById("sites");
  const names = Object.keys(state.sites).sort();
  sites.replaceChildren(names.length ? table(["site", "last seen", "job", "working on"],
    names.map(s => { const e = state.sites[s];
      return [s, ago(e.seen_s_ago), e.job || (e.polling ? "waiting for a job" : "-"),
              e.task ? e.task + (e.round === null || e.round === undefined ? "" :
              " round " + (e.round + 1)) + " (" + e.state + ")" : "-"]; }))
    : el("p", "No site has connected yet.", "sub"));
  document.getElementById("status").textContent = "updated " +
    new Date().toLocaleTimeString();
}
async function poll() {
  try {
    const reply = await fetch("/api/state", {cache: "no-store", credentials: "same-origin"});
    if (reply.ok) render(await reply.json());
    else document.getElementById("status").textContent = "server said " + reply.status;
  } catch (err) {
    document.getElementById("status").textContent = "cannot reach the server: " + err;
  }
  setTimeout(poll, POLL_MS);
}
poll();
"""


def live_page(nonce: str, title: str) -> str:
    """The page, its script and style bound to ``nonce``."""
    script = _SCRIPT % {"poll_ms": int(POLL_SECONDS * 1000)}
    safe = html.escape(title)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{safe}</title><style nonce='{nonce}'>{_STYLE}</style></head><body><main>"
        f"<span id='status'>loading</span><h1>{safe}</h1><div class='sub' id='server'></div>"
        "<h2>Running</h2><div id='running'></div>"
        "<h2>Sites</h2><div id='sites'></div>"
        "<h2>Jobs</h2><div id='jobs'></div>"
        f"</main><script nonce='{nonce}'>{script}</script></body></html>"
    )

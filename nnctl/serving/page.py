"""The page at ``GET /``: drop or pick an image, see the top-k classes with bars, and the model's info.

One HTML document with its style and script inline: no build step, nothing fetched from elsewhere (no
CDN, no font); it talks to the same server's /info and /predict. With ``--token`` it asks for the token
once (kept for the tab's session only) and sends it as ``Authorization: Bearer``.
"""

from __future__ import annotations

TOP_K = 5

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nnctl serve</title>
<style>
  :root { --ink: #1d2330; --soft: #5b6475; --line: #d9dde5; --bar: #3b6fd8; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
         background: var(--bg); }
  main { max-width: 860px; margin: 0 auto; padding: 24px 20px 40px; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  .sub { color: var(--soft); margin: 0 0 20px; }
  .grid { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
  @media (max-width: 700px) { .grid { grid-template-columns: 1fr; } }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px; }
  #drop { border: 2px dashed var(--line); border-radius: 10px; padding: 22px; text-align: center; cursor: pointer;
          color: var(--soft); min-height: 190px; display: flex; flex-direction: column; align-items: center;
          justify-content: center; gap: 10px; }
  #drop.over { border-color: var(--bar); background: #eef3fd; }
  #preview { max-width: 160px; max-height: 160px; image-rendering: pixelated; display: none;
             border: 1px solid var(--line); }
  .row { display: grid; grid-template-columns: 7.5em 1fr 4.5em; gap: 10px; align-items: center; margin: 7px 0; }
  .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-weight: 600; }
  .track { background: #eceff4; border-radius: 4px; height: 14px; overflow: hidden; }
  .fill { background: var(--bar); height: 100%; }
  .prob { text-align: right; font-variant-numeric: tabular-nums; }
  #status { color: var(--soft); min-height: 1.4em; margin: 8px 0 0; }
  #status.error { color: #b3261e; }
  dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 12px; margin: 0; font-size: 14px; }
  dt { color: var(--soft); } dd { margin: 0; word-break: break-word; }
  #tokenbox { display: none; margin-bottom: 14px; }
  input[type=password] { padding: 6px 8px; border: 1px solid var(--line); border-radius: 6px; width: 260px; }
  button { padding: 6px 12px; border: 1px solid var(--bar); background: var(--bar); color: #fff; border-radius: 6px; }
  h2 { font-size: 15px; margin: 0 0 10px; }
</style>
</head>
<body>
<main>
  <h1 id="title">nnctl serve</h1>
  <p class="sub" id="subtitle">a trained model, served</p>
  <div id="tokenbox" class="card">
    <label>This server needs a token: <input type="password" id="token" autocomplete="off"></label>
    <button id="tokenbtn" type="button">use it</button>
  </div>
  <div class="grid">
    <section class="card">
      <h2>Try an image</h2>
      <label id="drop" for="file">
        <img id="preview" alt="the image sent">
        <span id="droptext">drop an image here, or click to pick one</span>
        <input type="file" id="file" accept="image/*" hidden>
      </label>
      <p id="status"></p>
    </section>
    <section class="card">
      <h2>Top classes</h2>
      <div id="results"><p class="sub">no image yet</p></div>
    </section>
  </div>
  <section class="card" style="margin-top: 18px">
    <h2>Model</h2>
    <dl id="info"></dl>
  </section>
</main>
<script>
"use strict";
const TOP_K = __TOP_K__;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("nnctl-token") || "";

function headers() { return token ? {"Authorization": "Bearer " + token} : {}; }
function say(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
function cell(text) { const d = document.createElement("dd"); d.textContent = text; return d; }

async function call(path, options) {
  const r = await fetch(path, Object.assign({headers: headers()}, options || {}));
  if (r.status === 401) { $("tokenbox").style.display = "block"; throw new Error("a token is needed"); }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) { throw new Error(body.detail || ("HTTP " + r.status)); }
  return body;
}

async function loadInfo() {
  try {
    const i = await call("/info");
    $("title").textContent = i.name || "nnctl serve";
    $("subtitle").textContent = i.task + " on " + i.device + ", nnctl " + i.nnctl + ", torch " + i.torch;
    const rows = [["input", JSON.stringify(i.input_shape)],
                  ["classes", i.classes ? i.classes.join(", ") : "by index"],
                  ["colour", i.preprocessing.color_mode || "-"],
                  ["resize", i.preprocessing.resize ? JSON.stringify(i.preprocessing.resize) : "-"],
                  ["scale", String(i.preprocessing.image_scale) + " (images)"],
                  ["batching", "up to " + i.batching.max_batch + " within " + i.batching.max_wait_ms + " ms"]];
    const dl = $("info"); dl.textContent = "";
    for (const [k, v] of rows) { const t = document.createElement("dt"); t.textContent = k; dl.append(t, cell(v)); }
  } catch (e) { say(e.message, true); }
}

function show(row) {
  const box = $("results"); box.textContent = "";
  if (row.error) { say(row.input + ": " + row.error, true); return; }
  const items = row.classes ? row.names.map((n, j) => [n, row.probabilities[j]])
                            : row.values.map((v, j) => [String(j), v]);
  for (const [name, p] of items) {
    const r = document.createElement("div"); r.className = "row";
    const n = document.createElement("span"); n.className = "name"; n.textContent = name;
    const t = document.createElement("div"); t.className = "track";
    const f = document.createElement("div"); f.className = "fill";
    f.style.width = (Math.max(0, Math.min(1, p)) * 100).toFixed(1) + "%"; t.append(f);
    const v = document.createElement("span"); v.className = "prob"; v.textContent = p.toFixed(4);
    r.append(n, t, v); box.append(r);
  }
}

async function send(file) {
  $("preview").src = URL.createObjectURL(file); $("preview").style.display = "block";
  $("droptext").textContent = file.name;
  say("predicting ...");
  const form = new FormData(); form.append("files", file, file.name);
  const t0 = performance.now();
  try {
    const body = await call("/predict?top_k=" + TOP_K, {method: "POST", body: form});
    show(body.predictions[0]);
    if (!body.predictions[0].error) { say("answered in " + (performance.now() - t0).toFixed(0) + " ms"); }
  } catch (e) { say(e.message, true); }
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) send(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]);
});
$("tokenbtn").addEventListener("click", () => {
  token = $("token").value.trim(); sessionStorage.setItem("nnctl-token", token);
  $("tokenbox").style.display = "none"; say(""); loadInfo();
});
loadInfo();
</script>
</body>
</html>
""".replace("__TOP_K__", str(TOP_K))

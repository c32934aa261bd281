// Strata console UI: plain JavaScript over the JSON API (/api/v1, see openapi.json).
// Each route renders into #view. A render may await the API; only the newest render may
// replace the view (renderGeneration), so a slow redraw of one page never overwrites the
// page the user went to meanwhile.
"use strict";

const view = document.getElementById("view");
let renderGeneration = 0;
let refreshTimer = null;
let currentTenant = null;

// --- helpers ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class ApiError extends Error {}

async function api(method, path, body) {
  let answer;
  try {
    answer = await fetch("/api/v1" + path, {
      method, headers: body ? {"Content-Type": "application/json"} : {},
      body: body ? JSON.stringify(body) : undefined});
  } catch (err) {
    throw new ApiError("the console does not answer (" + err.message + ")");
  }
  if (answer.status === 401) {
    location.href = "/login";
    throw new ApiError("not logged in");
  }
  const data = await answer.json().catch(() => null);
  if (!answer.ok) throw new ApiError((data && data.error) || answer.statusText);
  return data;
}

function showMessage(text, kind = "error") {
  const box = el("div", {class: "message " + kind, role: "alert"}, text,
                 el("button", {class: "link", onclick: () => box.remove()}, "dismiss"));
  document.getElementById("messages").append(box);
  if (kind !== "error") setTimeout(() => box.remove(), 6000);
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

// --- jobs: long operations with live progress ------------------------------------------
const activity = document.getElementById("activity");

function trackJob(job, onDone) {
  const lines = el("pre", {class: "progress"});
  const head = el("div", {class: "job-title"}, job.title);
  const box = el("div", {class: "job running", "data-job": job.id}, head, lines);
  activity.prepend(box);
  const poll = async () => {
    let current;
    try {
      current = await api("GET", "/jobs/" + job.id);
    } catch (err) {
      setTimeout(poll, 2000);
      return;
    }
    lines.textContent = current.progress.join("\n");
    lines.scrollTop = lines.scrollHeight;  // the newest line in view
    if (current.state === "running") {
      setTimeout(poll, 500);
      return;
    }
    box.className = "job " + current.state;
    if (current.state === "failed") {
      showMessage(job.title + " failed: " + current.error);
    } else {
      showMessage(job.title + ": done", "info");
    }
    setTimeout(() => box.remove(), current.state === "failed" ? 20000 : 8000);
    if (onDone) onDone(current);
  };
  poll();
}

async function startJob(method, path, body, onDone) {
  try {
    const job = await api(method, path, body);
    trackJob(job, onDone);
  } catch (err) {
    showMessage(err.message);
  }
}

// --- routing ---------------------------------------------------------------------------
const routes = {tenants: renderTenants, branches: renderBranches, sql: renderSql,
                metrics: renderMetrics, jobs: renderJobs};

function currentPage() {
  const name = location.hash.replace(/^#\/?/, "").split("/")[0];
  return routes[name] ? name : "tenants";
}

// After a job: redraw the branch tree if it is still what the user looks at (never
// another page, which may hold the user's input).
function redrawBranches() {
  if (currentPage() === "branches") route();
}

async function route() {
  const generation = ++renderGeneration;
  clearInterval(refreshTimer);
  refreshTimer = null;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = currentPage();
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.nav === name);
  }
  await draw(generation, () => routes[name](parts.slice(1), generation));
}

// Render a page with `build` (async, returns a node) and show it, unless a newer render
// started meanwhile.
async function draw(generation, build) {
  let node;
  try {
    node = await build();
  } catch (err) {
    node = el("p", {class: "error"}, err.message);
  }
  if (generation !== renderGeneration || node === null) return false;
  view.replaceChildren(node);
  return true;
}

function refreshEvery(ms, generation, redraw) {
  if (generation !== renderGeneration) return;
  clearInterval(refreshTimer);
  refreshTimer = setInterval(() => {
    if (generation === renderGeneration && !document.querySelector("dialog[open]")) redraw();
  }, ms);
}

// --- tenants ---------------------------------------------------------------------------
async function renderTenants() {
  const tenants = await api("GET", "/tenants");
  return el("section", {"data-page": "tenants"},
    el("div", {class: "page-head"},
      el("h1", {}, "Tenants"),
      el("button", {id: "new-tenant", onclick: createTenant}, "New tenant")),
    el("table", {class: "grid"},
      el("thead", {}, el("tr", {}, el("th", {}, "name"), el("th", {}, "tenant id"),
                                   el("th", {}, "branches"))),
      el("tbody", {}, tenants.map((t) => el("tr", {},
        el("td", {}, el("a", {href: "#/branches/" + encodeURIComponent(t.name)}, t.name),
           t.default ? el("span", {class: "badge"}, "default") : null),
        el("td", {}, el("code", {}, t.tenant_id)),
        el("td", {}, t.branches.join(", ")))))));
}

function createTenant() {
  const name = window.prompt("Name of the new tenant (it gets a main branch):");
  if (!name) return;
  startJob("POST", "/tenants", {name}, () => {
    if (currentPage() === "tenants") route();
  });
}

// --- branches: the tree ----------------------------------------------------------------
async function tenantName(parts) {
  if (parts[0]) return parts[0];
  if (currentTenant) return currentTenant;
  const tenants = await api("GET", "/tenants");
  const found = tenants.find((t) => t.default) || tenants[0];
  if (!found) throw new ApiError("the environment has no tenant");
  return found.name;
}

async function renderBranches(parts, generation) {
  const tenant = await tenantName(parts);
  currentTenant = tenant;
  const tree = await api("GET", "/tenants/" + encodeURIComponent(tenant) + "/branches");
  refreshEvery(5000, generation, () => draw(generation, async () => {
    const again = await api("GET", "/tenants/" + encodeURIComponent(tenant) + "/branches");
    return branchPage(again);
  }));
  return branchPage(tree);
}

function branchPage(tree) {
  const byParent = new Map();
  for (const row of tree.branches) {
    const key = row.parent_timeline_id || "";
    if (!byParent.has(key)) byParent.set(key, []);
    byParent.get(key).push(row);
  }
  for (const kids of byParent.values()) {
    kids.sort((a, b) => lsnValue(a.branch_lsn) - lsnValue(b.branch_lsn)
                        || String(a.branch).localeCompare(String(b.branch)));
  }
  const named = tree.branches.filter((b) => b.branch).map((b) => b.branch);
  const build = (parentId) => {
    const kids = byParent.get(parentId) || [];
    if (!kids.length) return null;
    return el("ul", {class: "tree"}, kids.map((row) =>
      el("li", {"data-branch": row.branch || ""}, branchNode(tree, row, named),
         build(row.timeline_id))));
  };
  return el("section", {"data-page": "branches"},
    el("div", {class: "page-head"},
      el("h1", {}, "Branches of tenant ", el("span", {id: "tenant-name"}, tree.name)),
      el("button", {id: "new-branch", onclick: () => openBranchDialog(tree, named, "main")},
         "New branch")),
    build("") || el("p", {class: "muted"}, "no timelines"));
}

function lsnValue(text) {
  if (!text) return 0;
  const [hi, lo] = text.split("/");
  return parseInt(hi, 16) * 4294967296 + parseInt(lo, 16);
}

function branchNode(tree, row, named) {
  const name = row.branch || "(unnamed " + row.timeline_id.slice(0, 8) + ")";
  const point = row.branch_lsn
    ? el("span", {class: "point"}, "from ", el("strong", {}, row.parent || "?"), " @ ",
         el("code", {}, row.branch_lsn))
    : el("span", {class: "point"}, "root");
  const made = row.created_at
    ? el("span", {class: "muted", title: "how the branch was made"},
         " · " + (row.point && row.point !== "head" ? row.point + ", " : "") + "made " +
         row.created_at.replace("T", " ").replace("+00:00", " UTC"))
    : null;
  const hasChildren = row.children.length > 0;
  const actions = row.branch ? el("span", {class: "actions"},
    el("button", {class: "small", "data-action": "branch",
                  onclick: () => openBranchDialog(tree, named, row.branch)}, "Branch"),
    el("button", {class: "small", "data-action": "restore",
                  onclick: () => openRestoreDialog(tree, row.branch)}, "Restore"),
    el("button", {class: "small danger", "data-action": "delete", disabled: hasChildren,
                  title: hasChildren ? "has child branches: delete them first" : null,
                  onclick: () => openDeleteDialog(tree, row.branch)}, "Delete")) : null;
  return el("div", {class: "node", "data-branch": row.branch || "", "data-timeline": row.timeline_id},
    el("div", {class: "node-head"},
      el("span", {class: "branch-name"}, name), " ", point, made, actions),
    el("div", {class: "node-facts"},
      el("span", {}, "timeline ", el("code", {}, row.timeline_id)),
      el("span", {}, "last LSN ", el("code", {}, row.last_record_lsn)),
      el("span", {}, "size " + bytes(row.logical_size)),
      row.state !== "Active" ? el("span", {class: "error"}, row.state) : null),
    el("div", {class: "endpoints"},
      row.endpoints.map((ep) => endpointRow(ep)),
      row.branch && !row.endpoints.some((ep) => ep.mode === "primary")
        ? el("button", {class: "small", "data-action": "create-endpoint",
                        onclick: () => createEndpoint(row.branch)}, "Create endpoint")
        : null));
}

function endpointRow(ep) {
  const running = ep.state === "running";
  const stopped = ep.state === "stopped" || ep.state === "died";
  const copy = ep.connstr ? el("button", {class: "small", "data-action": "copy",
    onclick: () => copyText(ep.connstr)}, "Copy") : null;
  return el("div", {class: "endpoint", "data-endpoint": ep.name},
    el("span", {class: "ep-name"}, ep.name),
    el("span", {class: "badge state-" + ep.state.split(" ")[0], "data-state": ep.state}, ep.state),
    el("span", {class: "muted"}, ep.mode + (ep.lsn ? " @ " + ep.lsn : "")),
    ep.connstr ? el("code", {class: "connstr"}, ep.connstr) : null, copy,
    running ? el("button", {class: "small", "data-action": "stop",
      onclick: () => startJob("POST", "/endpoints/" + encodeURIComponent(ep.name) + "/stop",
                              {}, redrawBranches)}, "Stop") : null,
    stopped ? el("button", {class: "small", "data-action": "start",
      onclick: () => startJob("POST", "/endpoints/" + encodeURIComponent(ep.name) + "/start",
                              {}, redrawBranches)}, "Start") : null,
    stopped ? el("button", {class: "small danger", "data-action": "delete-endpoint",
      onclick: () => deleteEndpoint(ep.name)}, "Delete") : null);
}

async function deleteEndpoint(name) {
  if (!window.confirm("Delete endpoint " + name + " and its saved settings?")) return;
  try {
    await api("DELETE", "/endpoints/" + encodeURIComponent(name));
    showMessage("deleted endpoint " + name, "info");
    redrawBranches();
  } catch (err) {
    showMessage(err.message);
  }
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    showMessage("copied " + text, "info");
  } catch (err) {
    window.prompt("Copy the connection string:", text);
  }
}

async function createEndpoint(branch) {
  try {
    const endpoints = await api("GET", "/endpoints");
    let name = branch;
    for (let i = 2; endpoints.some((e) => e.name === name); i++) name = branch + "-" + i;
    await api("POST", "/endpoints", {name, branch, tenant: currentTenant});
    showMessage("created endpoint " + name, "info");
    redrawBranches();
  } catch (err) {
    showMessage(err.message);
  }
}

// --- dialogs ---------------------------------------------------------------------------
const branchDialog = document.getElementById("branch-dialog");
const branchAt = document.getElementById("branch-at");

function openBranchDialog(tree, named, parent) {
  const select = document.getElementById("branch-parent");
  select.replaceChildren(...named.map((n) => el("option", {value: n, selected: n === parent}, n)));
  document.getElementById("branch-name").value = "";
  branchDialog.querySelector("input[value=now]").checked = true;
  branchAt.value = "";
  branchAt.disabled = true;
  branchDialog.dataset.tenant = tree.name;
  branchDialog.showModal();
}

for (const radio of branchDialog.querySelectorAll("input[name=point]")) {
  radio.addEventListener("change", () => {
    branchAt.disabled = radio.value === "now" && radio.checked;
    branchAt.required = !branchAt.disabled;
  });
}

branchDialog.addEventListener("close", () => {
  if (branchDialog.returnValue !== "create") return;
  const point = branchDialog.querySelector("input[name=point]:checked").value;
  const body = {name: document.getElementById("branch-name").value.trim(),
                parent: document.getElementById("branch-parent").value,
                at: point === "now" ? "now" : branchAt.value.trim()};
  startJob("POST", "/tenants/" + encodeURIComponent(branchDialog.dataset.tenant) + "/branches",
           body, redrawBranches);
});

const restoreDialog = document.getElementById("restore-dialog");
const restoreConfirm = document.getElementById("restore-confirm");
restoreConfirm.addEventListener("change", () => {
  document.getElementById("restore-submit").disabled = !restoreConfirm.checked;
});

function openRestoreDialog(tree, branch) {
  document.getElementById("restore-branch").textContent = branch;
  for (const node of restoreDialog.querySelectorAll(".restore-name")) node.textContent = branch;
  document.getElementById("restore-at").value = "";
  restoreConfirm.checked = false;
  document.getElementById("restore-submit").disabled = true;
  restoreDialog.dataset.tenant = tree.name;
  restoreDialog.dataset.branch = branch;
  restoreDialog.showModal();
}

restoreDialog.addEventListener("close", () => {
  if (restoreDialog.returnValue !== "restore" || !restoreConfirm.checked) return;
  const {tenant, branch} = restoreDialog.dataset;
  startJob("POST", "/tenants/" + encodeURIComponent(tenant) + "/branches/" +
           encodeURIComponent(branch) + "/restore",
           {timestamp: document.getElementById("restore-at").value.trim()}, redrawBranches);
});

const deleteDialog = document.getElementById("delete-dialog");

function openDeleteDialog(tree, branch) {
  document.getElementById("delete-branch").textContent = branch;
  deleteDialog.dataset.tenant = tree.name;
  deleteDialog.dataset.branch = branch;
  deleteDialog.showModal();
}

deleteDialog.addEventListener("close", () => {
  if (deleteDialog.returnValue !== "delete") return;
  const {tenant, branch} = deleteDialog.dataset;
  startJob("DELETE", "/tenants/" + encodeURIComponent(tenant) + "/branches/" +
           encodeURIComponent(branch), null, redrawBranches);
});

// --- SQL -------------------------------------------------------------------------------
async function renderSql(parts) {
  const endpoints = (await api("GET", "/endpoints")).filter((e) => e.state === "running");
  const chosen = parts[0] || (endpoints[0] && endpoints[0].name);
  const select = el("select", {id: "sql-endpoint"},
    endpoints.map((e) => el("option", {value: e.name, selected: e.name === chosen},
                            e.name + " (" + e.branch + ")")));
  const query = el("textarea", {id: "sql-query", rows: 6, spellcheck: "false"},
                   "select now()");
  const result = el("div", {id: "sql-result"});
  const run = async () => {
    result.replaceChildren(el("p", {class: "muted"}, "running ..."));
    try {
      const answer = await api("POST", "/endpoints/" + encodeURIComponent(select.value) + "/sql",
                               {query: query.value});
      result.replaceChildren(resultTable(answer));
    } catch (err) {
      result.replaceChildren(el("p", {class: "error", id: "sql-error"}, err.message));
    }
  };
  return el("section", {"data-page": "sql"},
    el("h1", {}, "SQL"),
    endpoints.length ? null : el("p", {class: "muted"}, "no endpoint is running; start one on the Branches page"),
    el("p", {class: "muted"}, "Runs one statement in a read-only transaction as the endpoint's application role; at most 1000 rows."),
    el("label", {}, "Endpoint ", select),
    query,
    el("div", {}, el("button", {id: "sql-run", onclick: run, disabled: !endpoints.length}, "Run")),
    result);
}

function resultTable(answer) {
  const table = el("table", {class: "grid", id: "sql-table"},
    el("thead", {}, el("tr", {}, answer.columns.map((c) => el("th", {}, c)))),
    el("tbody", {}, answer.rows.map((row) =>
      el("tr", {}, row.map((v) => el("td", {}, v === null ? "NULL" : typeof v === "object" ? JSON.stringify(v) : String(v)))))));
  return el("div", {},
    el("p", {class: "muted", id: "sql-status"}, answer.status + " · " + answer.rows.length +
       " row(s)" + (answer.truncated ? " (truncated)" : "") + " · " +
       (answer.elapsed_s * 1000).toFixed(1) + " ms"),
    table);
}

// --- metrics ---------------------------------------------------------------------------
async function renderMetrics(parts, generation) {
  const page = await metricsPage();
  refreshEvery(10000, generation, () => draw(generation, metricsPage));
  return page;
}

async function metricsPage() {
  const data = await api("GET", "/metrics?window_s=3600");
  const samples = data.samples;
  const rate = (key) => {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1], b = samples[i];
      if (a[key] === null || b[key] === null || b.at <= a.at) continue;
      const v = (b[key] - a[key]) / (b.at - a.at);
      if (v >= 0) out.push([b.at, v]);
    }
    return out;
  };
  const gauge = (key) => samples.filter((s) => s[key] !== null).map((s) => [s.at, s[key]]);
  const endpoints = new Set(samples.flatMap((s) => Object.keys(s.connections)));
  const connections = [...endpoints].map((name) => ({name, points:
    samples.filter((s) => name in s.connections).map((s) => [s.at, s.connections[name]])}));
  return el("section", {"data-page": "metrics"},
    el("h1", {}, "Metrics (last hour)"),
    el("p", {class: "muted"}, samples.length + " samples, one every " + data.interval_s +
       " s, scraped from the services' /metrics"),
    el("div", {class: "charts"},
      chart("WAL ingested", [{name: "bytes/s", points: rate("wal_ingested_bytes")}], bytes),
      chart("Commit LSN vs ingested", [
        {name: "commit − ingested (bytes)", points: gauge("commit_lag_bytes")},
        {name: "received, not applied (bytes)", points: gauge("ingest_lag_bytes")}], bytes),
      chart("GetPage rate", [{name: "requests/s", points: rate("getpage_requests")}],
            (v) => v.toFixed(1)),
      chart("Layer files", [{name: "layers", points: gauge("layers")}], (v) => v.toFixed(0)),
      chart("Layer bytes on disk", [{name: "bytes", points: gauge("layer_bytes")}], bytes),
      chart("Endpoint connections", connections, (v) => v.toFixed(0))));
}

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];

function chart(title, series, format) {
  const W = 420, H = 160, L = 64, R = 8, T = 8, B = 22;
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  const all = series.flatMap((s) => s.points);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("rect", {x: L, y: T, width: W - L - R, height: H - T - B, class: "plot"});
  if (all.length) {
    const now = Date.now() / 1000;
    const t0 = now - 3600;
    const maxV = Math.max(...all.map((p) => p[1]), 1e-9);
    const x = (t) => L + (W - L - R) * Math.max(0, (t - t0)) / 3600;
    const y = (v) => T + (H - T - B) * (1 - v / maxV);
    add("text", {x: L - 4, y: T + 10, class: "axis", "text-anchor": "end"}, format(maxV));
    add("text", {x: L - 4, y: H - B, class: "axis", "text-anchor": "end"}, format(0));
    add("text", {x: L, y: H - 6, class: "axis"}, "-60 min");
    add("text", {x: W - R, y: H - 6, class: "axis", "text-anchor": "end"}, "now");
    series.forEach((s, i) => {
      if (!s.points.length) return;
      add("polyline", {fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 1.5,
                       points: s.points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ")});
    });
  } else {
    add("text", {x: W / 2, y: H / 2, class: "axis", "text-anchor": "middle"}, "no samples yet");
  }
  const legend = el("div", {class: "legend"}, series.map((s, i) => el("span", {},
    el("i", {style: "background:" + COLORS[i % COLORS.length]}), s.name + (s.points.length
      ? ": " + format(s.points[s.points.length - 1][1]) : ""))));
  return el("figure", {class: "chart-box", "data-chart": title}, el("figcaption", {}, title), svg, legend);
}

// --- activity --------------------------------------------------------------------------
async function renderJobs(parts, generation) {
  const page = await jobsPage();
  refreshEvery(2000, generation, () => draw(generation, jobsPage));
  return page;
}

async function jobsPage() {
  const jobs = (await api("GET", "/jobs")).reverse();
  return el("section", {"data-page": "jobs"},
    el("h1", {}, "Activity"),
    jobs.length ? null : el("p", {class: "muted"}, "no operations since the console started"),
    jobs.map((j) => el("div", {class: "job " + j.state},
      el("div", {class: "job-title"}, j.title + " — " + j.state +
         (j.ended_at ? " in " + (j.ended_at - j.started_at).toFixed(1) + " s" : "")),
      j.error ? el("p", {class: "error"}, j.error) : null,
      el("pre", {class: "progress"}, j.progress.join("\n")))));
}

// --- start -----------------------------------------------------------------------------
document.getElementById("logout").addEventListener("click", async () => {
  await api("POST", "/logout").catch(() => null);
  location.href = "/login";
});
window.addEventListener("hashchange", route);
route();

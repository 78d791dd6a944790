// The console's pages: the job list with the new-job form, one job's page, and the viewer page.
// Plain DOM code, no framework. Every value from the server goes in as text (textContent), never as HTML.

const body = document.body;
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const SECTIONS = ["preset", "frames", "sfm", "train", "export", "compute", "notify"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

async function api(path, { method = "GET", json } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: json === undefined ? undefined : JSON.stringify(json) });
  const data = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
  if (res.status === 401) window.location = `/login?next=${encodeURIComponent(location.pathname)}`;
  if (!res.ok) throw Object.assign(new Error(data.error || res.statusText), { hint: data.hint, status: res.status });
  return data;
}

const fmt = {
  seconds(s) {
    if (s == null) return "";
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  },
  cost: (c) => (c == null ? "" : `$${c < 0.01 ? c.toFixed(4) : c.toFixed(2)}`),
  num: (x, d = 2) => (x == null ? "" : Number(x).toFixed(d)),
  time: (iso) => (iso ? new Date(iso).toLocaleString() : ""),
};
const badge = (state) => h("span", { class: `state state-${state.toLowerCase()}`, "data-state": state }, state);
const problemBox = (err) => h("div", { class: "problem", role: "alert" }, h("strong", {}, err.message), err.hint ? h("p", {}, err.hint) : null);

// ------------------------------------------------------------------ the job form, built from the JSON Schema

function resolve(schema, node) {
  if (node.$ref) return { ...schema.$defs[node.$ref.split("/").pop()], ...node, $ref: undefined };
  if (node.anyOf) {
    const inner = node.anyOf.find((n) => n.type !== "null");
    return { ...resolve(schema, inner), ...node, anyOf: undefined, optional: true };
  }
  return node;
}

function field(schema, name, node) {
  const spec = resolve(schema, node);
  const label = (spec.title || name).replace(/^./, (c) => c.toUpperCase());
  const help = spec.description || "";
  const dflt = spec.default === undefined || spec.default === null ? "" : `default: ${JSON.stringify(spec.default)}`;
  let input;
  if (spec.type === "array" && spec.items && spec.items.enum) {
    input = h("span", { class: "choices", "data-field": name, "data-kind": "choices" },
      spec.items.enum.map((v) => h("label", {}, h("input", { type: "checkbox", value: v }), ` ${v}`)));
  } else if (spec.type === "array") {
    input = h("input", { type: "text", "data-field": name, "data-kind": "list", placeholder: "comma-separated" });
  } else if (spec.enum || spec.type === "boolean") {
    const values = spec.enum || [true, false];
    input = h("select", { "data-field": name, "data-kind": spec.type === "boolean" ? "boolean" : "enum" },
      h("option", { value: "" }, dflt ? `(${dflt})` : "(default)"),
      values.map((v) => h("option", { value: String(v) }, String(v))));
  } else if (spec.type === "integer" || spec.type === "number") {
    input = h("input", {
      type: "number", "data-field": name, "data-kind": spec.type, placeholder: dflt,
      min: spec.minimum ?? spec.exclusiveMinimum, max: spec.maximum ?? spec.exclusiveMaximum,
      step: spec.type === "integer" ? 1 : "any",
    });
  } else {
    input = h("input", { type: "text", "data-field": name, "data-kind": "text", placeholder: dflt, pattern: spec.pattern });
  }
  return h("label", { class: "field", title: help }, h("span", { class: "name" }, label), input, help ? h("small", {}, help) : null);
}

function settingsForm(schema, values = {}) {
  const wrap = h("div", { class: "settings" });
  for (const section of SECTIONS) {
    const node = resolve(schema, schema.properties[section]);
    if (node.type === "object") {
      const open = section === "notify";
      const fields = Object.entries(node.properties).map(([k, v]) => field(schema, `${section}.${k}`, v));
      wrap.append(h("details", { open, "data-section": section }, h("summary", {}, node.title.replace(/Config$/, "") + ` (${section})`), fields));
    } else {
      wrap.append(field(schema, section, schema.properties[section]));
    }
  }
  fill(wrap, values);
  return wrap;
}

function fill(form, values) {
  for (const el of form.querySelectorAll("[data-field]")) {
    const path = el.dataset.field.split(".");
    const value = path.reduce((o, k) => (o == null ? undefined : o[k]), values);
    if (value === undefined || value === null) continue;
    if (el.dataset.kind === "choices") el.querySelectorAll("input").forEach((c) => (c.checked = value.includes(c.value)));
    else if (el.dataset.kind === "list") el.value = value.join(", ");
    else el.value = String(value);
  }
}

// Only what the user set goes to the server, so the preset and the defaults fill in the rest.
function readSettings(form) {
  const out = {};
  for (const el of form.querySelectorAll("[data-field]")) {
    let value;
    const kind = el.dataset.kind;
    if (kind === "choices") {
      const on = [...el.querySelectorAll("input:checked")].map((c) => c.value);
      if (on.length) value = on;
    } else if (el.value.trim() !== "") {
      const raw = el.value.trim();
      value = kind === "integer" || kind === "number" ? Number(raw)
        : kind === "boolean" ? raw === "true"
        : kind === "list" ? raw.split(",").map((s) => s.trim()).filter(Boolean) : raw;
    }
    if (value === undefined) continue;
    const path = el.dataset.field.split(".");
    let node = out;
    for (const k of path.slice(0, -1)) node = node[k] ??= {};
    node[path.at(-1)] = value;
  }
  return out;
}

// ------------------------------------------------------------------ uploads: start, PUT the parts, complete

async function upload(files, onProgress) {
  const plan = await api("/api/uploads", { method: "POST", json: { files: files.map((f) => ({ name: f.name, size: f.size })) } });
  const total = files.reduce((s, f) => s + f.size, 0);
  let sent = 0;
  for (const [i, file] of files.entries()) {
    const { key, upload_id, part_size, urls } = plan.files[i];
    const parts = [];
    const queue = urls.map((url, n) => ({ url, n }));
    const worker = async () => {
      for (let job = queue.shift(); job; job = queue.shift()) {
        const chunk = file.slice(job.n * part_size, (job.n + 1) * part_size);
        const res = await fetch(job.url, { method: "PUT", body: chunk });
        if (!res.ok) throw new Error(`Uploading part ${job.n + 1} of ${file.name} failed (${res.status}).`);
        parts.push({ part: job.n + 1, etag: res.headers.get("ETag") });
        sent += chunk.size;
        onProgress(sent / total);
      }
    };
    await Promise.all([1, 2, 3, 4].map(worker));
    await api("/api/uploads/complete", { method: "POST", json: { key, upload_id, parts } });
  }
  return plan.input;
}

// ------------------------------------------------------------------ pages

async function jobsPage(main) {
  const schema = await api("/api/schema");
  const settings = settingsForm(schema);
  const files = h("input", { type: "file", id: "media", multiple: true, accept: body.dataset.media }); // the suffixes the worker reads
  const name = h("input", { type: "text", id: "job-name", placeholder: "from the file name" });
  const bar = h("progress", { id: "upload-progress", max: 1, value: 0, hidden: true });
  const message = h("div", { id: "form-message" });
  const submit = h("button", { type: "submit", id: "submit-job" }, "Upload and start");
  const form = h("form", { id: "new-job", class: "card" },
    h("h2", {}, "New job"),
    h("label", { class: "field" }, h("span", { class: "name" }, "Video, .zip or images"), files),
    h("label", { class: "field" }, h("span", { class: "name" }, "Name"), name),
    settings, h("div", { class: "actions" }, submit, bar), message);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    message.replaceChildren();
    const chosen = [...files.files];
    if (!chosen.length) return message.append(problemBox({ message: "Choose a video, a .zip of images or images first." }));
    submit.disabled = true;
    try {
      const wanted = readSettings(settings);
      await api("/api/jobs/check", { method: "POST", json: { settings: wanted } }); // before any byte is sent
      bar.hidden = false;
      const input = await upload(chosen, (f) => (bar.value = f));
      const job = await api("/api/jobs", { method: "POST", json: { input, settings: wanted, name: name.value.trim() || chosen[0].name } });
      window.location = job.url;
    } catch (err) {
      message.append(problemBox(err));
      submit.disabled = false;
    }
  });

  const rows = h("tbody");
  const table = h("table", { id: "jobs", class: "card" },
    h("thead", {}, h("tr", {}, ["Job", "State", "Stage", "Time", "Est. cost", "PSNR", ""].map((c) => h("th", {}, c)))), rows);
  main.append(h("section", { class: "jobs" }, h("h2", {}, "Jobs"), table), form);
  const refresh = async () => {
    const { jobs } = await api("/api/jobs");
    rows.replaceChildren(...jobs.map((j) => h("tr", { "data-job": j.id },
      h("td", {}, h("a", { href: `/jobs/${j.id}` }, j.id)), h("td", {}, badge(j.state)), h("td", {}, j.stage || ""),
      h("td", {}, fmt.seconds(j.seconds)), h("td", {}, fmt.cost(j.estimated_cost_usd)), h("td", {}, fmt.num(j.psnr)),
      h("td", {}, j.state === "SUCCEEDED" ? h("a", { href: `/jobs/${j.id}/view` }, "view") : j.error || ""))));
    if (!jobs.length) rows.append(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No jobs yet: upload a capture below.")));
  };
  await refresh();
  setInterval(() => refresh().catch(() => {}), 2000);
}

async function jobPage(main, id) {
  const schema = await api("/api/schema");
  const view = h("div", { id: "job-view" });
  main.append(h("p", {}, h("a", { href: "/" }, "← all jobs")), view);
  // made once and moved into each new rendering, so a click never lands on a replaced button
  const cancel = h("button", { id: "cancel-job", type: "button", onclick: async () => {
    cancel.disabled = true;
    try { await api(`/api/jobs/${id}/cancel`, { method: "POST" }); } catch (err) { view.prepend(problemBox(err)); }
  } }, "Cancel");
  const render = (job) => {
    const open = new Set([...view.querySelectorAll("details[open][id]")].map((d) => d.id));
    cancel.disabled = job.cancel_requested;
    cancel.textContent = job.cancel_requested ? "Cancelling…" : "Cancel";
    const parts = [];
    parts.push(h("div", { class: "card head" },
      h("h2", {}, job.id, " ", badge(job.state)),
      h("dl", {},
        h("dt", {}, "Stage"), h("dd", { id: "job-stage" }, job.stage || "—"),
        h("dt", {}, "Backend"), h("dd", {}, job.backend || "—"),
        h("dt", {}, "Time"), h("dd", {}, fmt.seconds(job.seconds)),
        h("dt", {}, "Est. cost"), h("dd", {}, fmt.cost(job.estimated_cost_usd) || "—"),
        h("dt", {}, "Input"), h("dd", {}, job.input || "—")),
      job.progress ? h("div", { class: "progress" }, h("progress", { max: 1, value: job.progress.fraction }),
        h("span", {}, ` ${job.progress.stage}: ${job.progress.note}`)) : null,
      TERMINAL.has(job.state) ? null : cancel));
    if (job.error) {
      parts.push(h("div", { class: "card problem", id: "job-error" }, h("h3", {}, `Failed in ${job.error.stage || "?"}`),
        h("p", {}, job.error.message), job.error.advice ? h("p", {}, h("strong", {}, "What to try: "), job.error.advice) : null));
    }
    if (job.metrics) {
      const m = job.metrics;
      parts.push(h("div", { class: "card", id: "job-metrics" }, h("h3", {}, "Result"),
        h("dl", {}, h("dt", {}, "PSNR"), h("dd", { id: "metric-psnr" }, `${fmt.num(m.psnr)} dB`), h("dt", {}, "SSIM"), h("dd", {}, fmt.num(m.ssim, 3)),
          h("dt", {}, "Gaussians"), h("dd", {}, (m.gaussians || 0).toLocaleString()),
          ...Object.entries(m.stages || {}).flatMap(([s, v]) => [h("dt", {}, `${s} stage`), h("dd", {}, fmt.seconds(v.seconds))])),
        h("p", { class: "links" }, h("a", { href: `/jobs/${id}/view`, id: "open-viewer", class: "button" }, "Open in the viewer"),
          ...Object.entries(job.files).filter(([n]) => n.startsWith("splat.")).map(([n, url]) => h("a", { href: url, download: n }, n)),
          job.files["report.html"] ? h("a", { href: job.files["report.html"] }, "report") : null),
        h("div", { class: "previews" }, job.previews.map((src) => h("img", { src, alt: "held-out view: render beside photo", loading: "lazy" })))));
    }
    parts.push(h("div", { class: "card" }, h("h3", {}, "History"), h("table", { id: "job-history" },
      h("tbody", {}, job.history.map((e) => h("tr", {}, h("td", {}, fmt.time(e.at)), h("td", {}, badge(e.state)),
        h("td", {}, e.stage || ""), h("td", {}, e.note || "")))))));
    if (job.attempts.length) {
      parts.push(h("div", { class: "card" }, h("h3", {}, "Attempts"), h("table", {}, h("tbody", {},
        job.attempts.map((a) => h("tr", {}, h("td", {}, a.backend), h("td", {}, a.stage), h("td", {}, a.name || a.number),
          h("td", {}, a.bacalhau_id || a.training_job || ""), h("td", {}, a.state)))))));
    }
    if (job.log) parts.push(h("details", { class: "card", id: "job-log-box" }, h("summary", {}, "Log (last lines)"), h("pre", { id: "job-log" }, job.log)));
    if (TERMINAL.has(job.state) && job.settings) parts.push(resubmitCard(schema, job));
    view.replaceChildren(...parts);
    for (const d of view.querySelectorAll("details[id]")) if (open.has(d.id)) d.open = true;
  };
  const resubmitCard = (schema, job) => {
    const form = settingsForm(schema, job.settings);
    const message = h("div");
    return h("details", { class: "card", id: "resubmit" },
      h("summary", {}, "Resubmit with changed settings"),
      h("p", {}, "Stages whose settings and inputs are unchanged are reused, not run again."),
      h("form", { onsubmit: async (ev) => {
        ev.preventDefault();
        try {
          const next = await api(`/api/jobs/${id}/resubmit`, { method: "POST", json: { settings: readSettings(form) } });
          window.location = next.url;
        } catch (err) { message.replaceChildren(problemBox(err)); }
      } }, form, h("button", { type: "submit", id: "resubmit-job" }, "Resubmit"), message));
  };
  // poll until the job ends; re-render only when something shown has changed
  let last = null;
  for (;;) {
    const job = await api(`/api/jobs/${id}`).catch((err) => {
      if (err.status === 404) throw err; // no such job: say so (main() shows it); other blips: try again
      return null;
    });
    if (job) {
      const key = JSON.stringify([job.state, job.stage, job.cancel_requested, job.history.length, job.attempts,
        job.progress, job.log?.length, Math.round(job.seconds / 5)]);
      if (key !== last) render(job);
      last = key;
      if (TERMINAL.has(job.state)) break;
    }
    await new Promise((r) => setTimeout(r, 1500));
  }
}

async function viewerPage(main, id) {
  const job = await api(`/api/jobs/${id}`);
  const pick = ["splat.spz", "splat.splat", "splat.ply"].find((n) => job.files[n]);
  if (!pick) return main.append(problemBox({ message: `Job ${id} has no splat to show (${job.state}).` }));
  main.classList.add("full");
  main.append(h("div", { class: "viewer-bar" }, h("a", { href: `/jobs/${id}` }, `← ${id}`),
    h("span", {}, "drag to orbit · scroll to zoom · right-drag to pan"),
    ...Object.entries(job.files).filter(([n]) => n.startsWith("splat.")).map(([n, url]) => h("a", { href: url, download: n }, n))),
    h("div", { id: "viewer", "data-splat": job.files[pick], "data-cameras": job.files["cameras.json"] }));
  await import("/static/dist/viewer.js");
}

async function main() {
  const mainEl = document.getElementById("main");
  const logout = document.getElementById("logout");
  if (body.dataset.login) logout.addEventListener("click", async () => { await fetch("/logout", { method: "POST", headers: { "X-CSRF-Token": csrf } }); window.location = "/login"; });
  else logout.remove();
  const page = { jobs: jobsPage, job: jobPage, viewer: viewerPage }[body.dataset.page];
  try {
    await page(mainEl, body.dataset.job);
  } catch (err) {
    mainEl.append(problemBox(err));
  }
}

main();

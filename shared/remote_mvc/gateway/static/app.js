// remote-mvc live page: one EventSource per shown model, resumed exactly after any drop.
// No build step, no dependencies. Credentials stay in this page's memory (never stored, never in a URL).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const view = { model: null, revision: -1, epoch: null, values: {}, schema: {}, source: null, retry: 500,
                 timer: null, resumed: false };
  let auth = null; // {header, identity, role}

  function setState(state, text) {
    const el = $("state");
    el.className = "state " + state;
    el.textContent = text || state;
    document.body.dataset.state = state;
  }

  function fmt(v) { return typeof v === "string" ? JSON.stringify(v) : String(v); }

  function renderValues(changed) {
    const body = $("fields").tBodies[0];
    for (const [field, value] of Object.entries(view.values)) {
      let row = body.querySelector(`tr[data-field="${CSS.escape(field)}"]`);
      if (!row) {
        row = document.createElement("tr");
        row.dataset.field = field;
        row.innerHTML = "<td class=field></td><td class=value></td>";
        row.cells[0].textContent = field;
        body.appendChild(row);
      }
      row.cells[1].textContent = fmt(value);
      if (changed && changed.includes(field)) {
        row.classList.remove("changed");
        void row.offsetWidth; // restart the highlight animation
        row.classList.add("changed");
      }
    }
    $("revision").textContent = view.revision;
    document.body.dataset.revision = view.revision;
    $("epoch").textContent = "epoch " + view.epoch;
  }

  function addHistory(text, cls) {
    const li = document.createElement("li");
    li.textContent = text;
    if (cls) li.className = cls;
    const list = $("history");
    list.insertBefore(li, list.firstChild);
    while (list.children.length > 50) list.removeChild(list.lastChild);
  }

  function onSnapshot(msg) {
    const data = JSON.parse(msg.data);
    const changed = Object.keys(data.values).filter((k) => view.revision >= 0 && view.values[k] !== data.values[k]);
    Object.assign(view, { revision: data.revision, epoch: data.epoch, values: data.values });
    renderValues(changed);
    addHistory(`snapshot at revision ${data.revision} (${data.reason})`, "snapshot");
    setState(data.reason === "initial" && !view.resumed ? "live" : "resynced",
             data.reason === "initial" && !view.resumed ? "live" : `resynced (${data.reason})`);
  }

  function onChange(msg) {
    const data = JSON.parse(msg.data);
    Object.assign(view, { revision: data.revision, epoch: data.epoch, values: data.values });
    const fields = Object.keys(data.changes);
    renderValues(fields);
    const who = data.via ? `${data.identity} via ${data.via}` : data.identity;
    const what = fields.map((f) => `${f}: ${fmt(data.changes[f].old)} → ${fmt(data.changes[f].new)}`).join(", ");
    addHistory(`#${data.revision}  ${new Date(data.time * 1000).toLocaleTimeString()}  ${who}  ${what}`);
    if (document.body.dataset.state !== "live") setState("live");
  }

  function connect() {
    clearTimeout(view.timer);
    const params = new URLSearchParams();
    if (view.revision >= 0) { params.set("since", view.revision); params.set("epoch", view.epoch); }
    const url = `/models/${encodeURIComponent(view.model)}/events` + (params.toString() ? "?" + params : "");
    const source = new EventSource(url);
    view.source = source;
    source.addEventListener("snapshot", onSnapshot);
    source.addEventListener("change", onChange);
    source.onopen = () => {
      view.retry = 500;
      // "live" only once the page holds the model's state: a first connection waits for its snapshot
      if (view.resumed) setState("live", "live (resumed)");
      else if (view.revision >= 0) setState("live");
      else setState("connecting", "syncing");
    };
    source.onerror = () => {
      // our own reconnect: the URL carries the revision and epoch we hold, for an exact resume
      source.close();
      if (view.source !== source) return;
      view.resumed = view.revision >= 0;
      setState("reconnecting");
      view.timer = setTimeout(connect, view.retry);
      view.retry = Math.min(view.retry * 2, 5000);
    };
  }

  async function loadSchema() {
    try {
      const reply = await fetch(`/models/${encodeURIComponent(view.model)}`);
      if (reply.ok) { view.schema = (await reply.json()).schema || {}; renderInputs(); }
    } catch (e) { /* the stream shows the state; the form fills in on the next switch */ }
  }

  function show(model) {
    if (view.source) { const s = view.source; view.source = null; s.close(); }
    Object.assign(view, { model, revision: -1, epoch: null, values: {}, schema: {}, retry: 500, resumed: false });
    $("model-name").textContent = model;
    $("fields").tBodies[0].innerHTML = "";
    $("history").innerHTML = "";
    $("inputs").innerHTML = "";
    for (const b of $("tabs").children) b.classList.toggle("active", b.dataset.model === model);
    if (location.hash.slice(1) !== model) history.replaceState(null, "", "#" + model);
    setState("connecting");
    connect();
    loadSchema();
  }

  function renderInputs() {
    const box = $("inputs");
    box.innerHTML = "";
    for (const [field, spec] of Object.entries(view.schema)) {
      const label = document.createElement("label");
      label.textContent = `${field} (${spec.type})`;
      const input = document.createElement("input");
      input.name = field;
      input.dataset.type = spec.type;
      input.placeholder = "unchanged";
      if (spec.type === "int" || spec.type === "float") { input.inputMode = "decimal"; }
      label.appendChild(input);
      box.appendChild(label);
    }
  }

  function parse(type, text) {
    if (type === "int") { if (!/^-?\d+$/.test(text.trim())) throw new Error(`not an integer: ${text}`); return parseInt(text, 10); }
    if (type === "float") { const v = Number(text); if (text.trim() === "" || Number.isNaN(v)) throw new Error(`not a number: ${text}`); return v; }
    if (type === "bool") { if (!/^(true|false)$/i.test(text.trim())) throw new Error("want true or false"); return /^true$/i.test(text.trim()); }
    return text;
  }

  function result(text, error) {
    $("result").textContent = text;
    $("result").className = "meta" + (error ? " error" : "");
  }

  async function signIn(ev) {
    ev.preventDefault();
    const identity = $("identity").value, secret = $("secret").value;
    const header = "Basic " + btoa(unescape(encodeURIComponent(identity + ":" + secret)));
    try {
      const reply = await fetch("/whoami", { headers: { Authorization: header, "X-Requested-With": "remote-mvc" } });
      const body = await reply.json();
      $("secret").value = "";
      if (!reply.ok) { result(`sign-in refused: ${body.message}`, true); return; }
      auth = { header, identity: body.identity, role: body.role };
      $("who").textContent = body.identity;
      $("role").textContent = body.role;
      $("signin").hidden = true;
      $("signed-in").hidden = false;
      result("");
    } catch (e) { result(`sign-in failed: ${e.message}`, true); }
  }

  async function modify(ev) {
    ev.preventDefault();
    const changes = {};
    try {
      for (const input of $("inputs").querySelectorAll("input")) {
        if (input.value !== "") changes[input.name] = parse(input.dataset.type, input.value);
      }
    } catch (e) { result(e.message, true); return; }
    if (!Object.keys(changes).length) { result("nothing to change: fill in a field", true); return; }
    const body = { changes, request_id: crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) };
    if ($("expect").checked) body.expected_revision = view.revision;
    try {
      const reply = await fetch(`/models/${encodeURIComponent(view.model)}`, {
        method: "POST", body: JSON.stringify(body),
        headers: { Authorization: auth.header, "Content-Type": "application/json", "X-Requested-With": "remote-mvc" } });
      const answer = await reply.json();
      if (reply.ok) {
        result(`applied: revision ${answer.revision}`);
        for (const input of $("inputs").querySelectorAll("input")) input.value = "";
      } else {
        result(`refused (${reply.status} ${answer.error}): ${answer.message}`, true);
      }
    } catch (e) { result(`failed: ${e.message}`, true); }
  }

  async function start() {
    $("signin").addEventListener("submit", signIn);
    $("modify").addEventListener("submit", modify);
    $("signout").addEventListener("click", () => {
      auth = null; $("signin").hidden = false; $("signed-in").hidden = true; result("signed out");
    });
    let models = [];
    while (!models.length) {
      try { models = (await (await fetch("/models")).json()).models.map((m) => m.model); }
      catch (e) { setState("reconnecting"); await new Promise((r) => setTimeout(r, 1000)); }
    }
    for (const model of models) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.model = model;
      b.textContent = model.replace(/^remote_mvc\./, "");
      b.addEventListener("click", () => show(model));
      $("tabs").appendChild(b);
    }
    const wanted = decodeURIComponent(location.hash.slice(1));
    show(models.includes(wanted) ? wanted : models[0]);
  }

  start();
})();

// merlin-dp console: one page, no build step, talking only to the controller's public API
// (the same documented endpoints the SDK and scripts use). Views: #/ lists every model
// endpoint with its live numbers; #/models/<project>/<model> shows one model's charts, its
// route history and, for a token that may write, the controls that change its rule.
"use strict";

(() => {
  const TOKEN_KEY = "merlin-dp.console.token";
  const API_ROOT = new URL("../", location.href); // the page is served at <controller>/ui/
  const REFRESH_MS = 2000;
  const VERSIONS_REFRESH_MS = 5000;
  const WINDOW_SECONDS = 900; // what the controller keeps
  const MIN_SPAN_SECONDS = 60;
  const LOG_LINES = 20;
  // Okabe-Ito: tells versions apart for most kinds of colour blindness too.
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000"];

  const $ = (sel, root = document) => root.querySelector(sel);
  const main = $("#main");

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    who: null, // /v1/whoami's answer
    view: null, // the view on screen: {closed, abort, timers, ...}
  };

  // ---------------------------------------------------------------- helpers

  /** h("tag.class", {attr: value}, ...children): DOM without a framework. */
  function h(spec, attrs, ...children) {
    const [tag, ...classes] = spec.split(".");
    const el = document.createElement(tag);
    if (classes.length) el.className = classes.join(" ");
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "style" && typeof value === "object") {
        for (const [k, v] of Object.entries(value)) el.style.setProperty(k, v);
      } else {
        el.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  /**
   * Makes `old` look like `fresh` in place. Periodic refreshes go through this rather
   * than replacing nodes, so keyboard focus, a scroll position or an open <details> stay
   * where the person left them. Handlers are delegated (data-action), never attached to
   * rendered nodes, so nothing stale survives a morph.
   */
  function morph(old, fresh) {
    if (old.nodeType !== fresh.nodeType || old.nodeName !== fresh.nodeName
        || (old.nodeType === 1 && old.getAttribute("data-key") !== fresh.getAttribute("data-key"))) {
      old.replaceWith(fresh);
      return;
    }
    if (old.nodeType === 3) {
      if (old.nodeValue !== fresh.nodeValue) old.nodeValue = fresh.nodeValue;
      return;
    }
    if (old.nodeType !== 1) return;
    for (const { name } of [...old.attributes]) {
      if (name === "open" && old.nodeName === "DETAILS") continue; // the person's choice
      if (!fresh.hasAttribute(name)) old.removeAttribute(name);
    }
    for (const { name, value } of [...fresh.attributes]) {
      if (name === "open" && old.nodeName === "DETAILS") continue;
      if (old.getAttribute(name) !== value) old.setAttribute(name, value);
    }
    if (old.hasAttribute("data-own")) return; // children filled by their own code
    const a = [...old.childNodes];
    const b = [...fresh.childNodes];
    for (let i = 0; i < b.length; i++) {
      if (i < a.length) morph(a[i], b[i]);
      else old.append(b[i]);
    }
    for (let i = b.length; i < a.length; i++) a[i].remove();
  }

  function morphChildren(container, ...children) {
    const fresh = h(container.nodeName.toLowerCase(), {}, ...children);
    for (const { name, value } of [...container.attributes]) fresh.setAttribute(name, value);
    morph(container, fresh);
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const byVersion = (a, b) => String(a).localeCompare(String(b), undefined, { numeric: true });

  function fmtRate(v) {
    if (v === null || v === undefined) return "—";
    return v < 10 ? v.toFixed(1) : String(Math.round(v));
  }
  function fmtShare(v) { // a share 0..1 as a percentage
    if (v === null || v === undefined) return "—";
    const pct = v * 100;
    return (pct === 0 || pct >= 10 ? pct.toFixed(1) : pct.toFixed(2)) + "%";
  }
  function fmtPercent(v) { // already a percentage
    if (v === null || v === undefined) return "—";
    return (Number.isInteger(v) ? String(v) : v.toFixed(1)) + "%";
  }
  function fmtMs(v) {
    if (v === null || v === undefined) return "—";
    return (v < 10 ? v.toFixed(1) : String(Math.round(v))) + " ms";
  }
  function fmtTime(unixSeconds) {
    if (!unixSeconds) return "—";
    return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
  }
  function fmtDateTime(unixSeconds) { // the time alone for today
    if (!unixSeconds) return "—";
    const d = new Date(unixSeconds * 1000);
    const time = d.toLocaleTimeString([], { hour12: false });
    if (d.toDateString() === new Date().toDateString()) return time;
    return d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
  }
  function fmtClock(unixSeconds, seconds) {
    const d = new Date(unixSeconds * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return `${two(d.getHours())}:${two(d.getMinutes())}` + (seconds ? `:${two(d.getSeconds())}` : "");
  }
  function lastValue(values) {
    for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null && values[i] !== undefined) return values[i];
    return null;
  }
  function fmtReplicas(ready, desired) {
    return desired === null || desired === undefined ? `${ready}` : `${ready} / ${desired}`;
  }

  function colorOf(versions, version) {
    const i = versions.indexOf(version);
    return PALETTE[(i < 0 ? versions.length : i) % PALETTE.length];
  }

  function describeRule(rule) {
    if (!rule) return "no rule";
    const parts = [rule.destinations.filter((d) => d.weight > 0)
      .map((d) => `${d.version}: ${d.weight}%`).join(", ") || "no weights"];
    if (rule.mirror) parts.push(`mirror ${rule.mirror.percent}% to ${rule.mirror.version}`);
    if (rule.match && rule.match.length) {
      parts.push(`${rule.match.length} header match${rule.match.length > 1 ? "es" : ""}`);
    }
    if (rule.sticky) parts.push(`sticky on ${rule.sticky.header ? "header " + rule.sticky.header : "cookie " + rule.sticky.cookie}`);
    return parts.join(" · ");
  }

  function canWrite(project) {
    const who = state.who;
    return Boolean(who && who.access === "write"
      && (who.projects.includes("*") || who.projects.includes(project)));
  }

  // ---------------------------------------------------------------- the API

  class ApiError extends Error {
    constructor(status, code, message, fields) {
      super(message);
      this.status = status;
      this.code = code;
      this.fields = fields || [];
    }
    /** What the person reads: the controller's message, with each field's reason. */
    get text() {
      if (this.status === 412) {
        return "Someone else changed this rule; reload to see it, then try again. (" + this.message + ")";
      }
      const fields = this.fields.map((f) => `${f.path}: ${f.message}`);
      return [this.message, ...fields].join(" — ");
    }
  }

  function authHeaders(token = state.token) {
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function api(method, path, { body, ifMatch, signal, token } = {}) {
    const headers = { Accept: "application/json", ...authHeaders(token ?? state.token) };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (ifMatch !== undefined && ifMatch !== null) headers["If-Match"] = `"${ifMatch}"`;
    let res;
    try {
      res = await fetch(new URL(path.replace(/^\//, ""), API_ROOT), {
        method, headers, signal, cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "unreachable", `cannot reach the controller at ${API_ROOT.origin}`);
    }
    let data = null;
    const text = await res.text();
    if (text) {
      try { data = JSON.parse(text); } catch { data = null; }
    }
    if (!res.ok) {
      const e = (data && data.error) || {};
      const err = new ApiError(res.status, e.code || String(res.status),
        e.message || `${res.status} ${res.statusText}`, e.fields);
      if (res.status === 401 && token === undefined) signedOut(err);
      throw err;
    }
    return { data, etag: res.headers.get("ETag") };
  }

  const modelPath = (p, m) => `/v1/projects/${encodeURIComponent(p)}/models/${encodeURIComponent(m)}`;

  // ---------------------------------------------------------------- access

  const whoami = $("#whoami");
  const tokenForm = $("#token-form");
  const tokenInput = $("#token");
  const changeToken = $("#change-token");
  const authMessage = $("#auth-message");

  function showAuthMessage(text) {
    authMessage.textContent = text || "";
    authMessage.hidden = !text;
  }

  function renderAuth() {
    const who = state.who;
    if (who) {
      const scope = who.projects.includes("*") ? "all projects" : `projects ${who.projects.join(", ")}`;
      whoami.textContent = `${who.name} · ${who.access === "write" ? "read and write" : "read only"} · ${scope}`;
      tokenForm.hidden = true;
      // With no tokens on the controller there is nothing to change.
      changeToken.hidden = !state.token && who.name === "anonymous";
    } else {
      whoami.textContent = "Not signed in";
      tokenForm.hidden = false;
      changeToken.hidden = true;
    }
    $("#forget-token").hidden = !state.token;
  }

  async function signIn(token) {
    let answer;
    try {
      answer = await api("GET", "/v1/whoami", { token });
    } catch (err) {
      state.who = null;
      closeView();
      if (err.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        state.token = "";
        showAuthMessage(token
          ? `The controller refused this token (${err.message}). Check it, or ask for a new one.`
          : "This controller needs a token: enter it above.");
      } else {
        showAuthMessage(`Cannot sign in: ${err.text}`);
      }
      renderAuth();
      main.replaceChildren(h("p.muted", { "data-testid": "signed-out" },
        "Nothing to show until the controller accepts a token."));
      if (err.status === 401) tokenInput.focus();
      return;
    }
    state.token = token;
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    state.who = answer.data;
    showAuthMessage("");
    renderAuth();
    route();
  }

  function signedOut(err) {
    // A token revoked or expired while the page was open.
    if (!state.who) return;
    state.who = null;
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    closeView();
    showAuthMessage(`The controller no longer accepts this token (${err.message}). Enter one again.`);
    renderAuth();
    main.replaceChildren(h("p.muted", { "data-testid": "signed-out" },
      "Nothing to show until the controller accepts a token."));
  }

  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    signIn(tokenInput.value.trim());
    tokenInput.value = "";
  });
  $("#forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenInput.value = "";
    signIn("");
  });
  changeToken.addEventListener("click", () => {
    tokenForm.hidden = false;
    $("#forget-token").hidden = !state.token;
    changeToken.hidden = true;
    tokenInput.focus();
  });

  // ---------------------------------------------------------------- confirmation

  const dialog = $("#confirm");

  /** A modal in the page (keyboard: Tab between the buttons, Esc cancels). */
  function confirmAction(title, body, confirmLabel = "Confirm") {
    $("#confirm-title").textContent = title;
    $("#confirm-body").textContent = body;
    $("[data-testid=confirm-ok]", dialog).textContent = confirmLabel;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
    });
  }

  // ---------------------------------------------------------------- views and routing

  function closeView() {
    const view = state.view;
    if (!view) return;
    view.closed = true;
    view.abort.abort();
    for (const t of view.timers) clearTimeout(t);
    for (const c of view.cleanups) c();
    state.view = null;
  }

  function newView(name) {
    closeView();
    const view = { name, closed: false, abort: new AbortController(), timers: [], cleanups: [] };
    state.view = view;
    return view;
  }

  /** Runs `fn` now and every `ms` after it finished, until the view closes. */
  function poll(view, ms, fn) {
    const tick = async () => {
      if (view.closed) return;
      try {
        await fn();
      } catch (err) {
        if (err.name !== "AbortError" && !view.closed && view.onError) view.onError(err);
      }
      if (!view.closed) view.timers.push(setTimeout(tick, ms));
    };
    tick();
  }

  function route() {
    if (!state.who) return;
    const match = location.hash.match(/^#\/models\/([a-z0-9-]+)\/([a-z0-9-]+)\/?$/);
    if (match) modelView(match[1], match[2]);
    else overviewView();
  }
  window.addEventListener("hashchange", () => {
    route();
    main.focus({ preventScroll: true });
  });

  // ---------------------------------------------------------------- the models list

  function splitBar(model, versions) {
    const served = model.versions.filter((v) => v.weight > 0);
    return h("div.split", {
      role: "img", "data-testid": "split",
      "aria-label": "Split: " + (served.map((v) => `version ${v.version} ${v.weight}%`).join(", ") || "none"),
    }, served.map((v) => h("span.split-part", {
      style: { width: `${v.weight}%`, background: colorOf(versions, v.version) },
      title: `version ${v.version}: ${v.weight}%`,
    }, v.weight >= 12 ? `${v.version}: ${v.weight}%` : "")));
  }

  function statusBadge(status) {
    return h(`span.badge.status-${status}`, { "data-testid": "status" }, status);
  }

  /** The live table: one row group per model, one row per version. */
  function liveTable(models, { link = true, caption, modelRow = true }) {
    const head = h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, "Version"),
      h("th", { scope: "col" }, "Status"),
      h("th.num", { scope: "col" }, "Weight"),
      h("th.num", { scope: "col" }, "Mirrored"),
      h("th.num", { scope: "col" }, "req/s"),
      h("th.num", { scope: "col" }, "Errors"),
      h("th.num", { scope: "col" }, "p50"),
      h("th.num", { scope: "col" }, "p99"),
      h("th.num", { scope: "col", title: "Share of compared mirrored answers that matched" }, "Shadow agreement"),
      h("th.num", { scope: "col", title: "Ready / desired" }, "Replicas")));
    const groups = models.map((model) => {
      const key = `${model.project}/${model.model}`;
      const versions = model.versions.map((v) => v.version).sort(byVersion);
      const title = link
        ? h("a", { href: `#/models/${model.project}/${model.model}`, "data-testid": "model-link" }, key)
        : h("span", {}, key);
      const facts = [model.protocol, model.revision === null ? "no rule" : `revision ${model.revision}`];
      if (model.rollout_phase) facts.push(`rollout: ${model.rollout_phase}`);
      return h("tbody", { "data-testid": "overview-model", "data-model": key, "data-key": key },
        modelRow && h("tr.model-row", {},
          h("th", { scope: "rowgroup", colspan: 10 },
            h("div.model-head", {},
              h("span.model-name", {}, title),
              h("span.muted", {}, facts.join(" · ")),
              model.url ? h("code.url", {}, model.url) : null,
              splitBar(model, versions)))),
        model.versions.slice().sort((a, b) => byVersion(a.version, b.version)).map((v) =>
          h("tr", { "data-testid": "overview-version", "data-model": key, "data-version": v.version, "data-key": v.version },
            h("th", { scope: "row" },
              h("span.swatch", { style: { background: colorOf(versions, v.version) }, "aria-hidden": "true" }),
              `version ${v.version}`),
            h("td", {}, statusBadge(v.status), v.message
              ? h("span.status-message", { title: v.message }, v.message.length > 90 ? v.message.slice(0, 89) + "…" : v.message)
              : null),
            h("td.num", { "data-testid": "weight" }, `${v.weight}%`),
            h("td.num", { "data-testid": "mirrored" }, v.mirrored_percent ? fmtPercent(v.mirrored_percent) : "—"),
            h("td.num", { "data-testid": "rps" }, fmtRate(v.rps)),
            h("td.num", { "data-testid": "error-rate" }, fmtShare(v.error_rate)),
            h("td.num", { "data-testid": "p50" }, fmtMs(v.p50_ms)),
            h("td.num", { "data-testid": "p99" }, fmtMs(v.p99_ms)),
            h("td.num", { "data-testid": "shadow-agreement" }, fmtShare(v.shadow_agreement)),
            h("td.num", { "data-testid": "replicas" }, fmtReplicas(v.ready_replicas, v.desired_replicas)))));
    });
    return h("table.live", { "data-testid": "live-table" },
      caption ? h("caption", {}, caption) : null, head, groups);
  }

  function overviewView() {
    const view = newView("overview");
    const status = h("p.message", { role: "status", "data-testid": "overview-status" });
    const body = h("div", { "data-testid": "models" }, h("p.muted", {}, "Loading…"));
    main.replaceChildren(
      h("div.page-head", {},
        h("h1", {}, "Models"),
        h("p.muted", {}, "Every model endpoint, its versions and their last seconds of traffic; refreshed every 2 s.")),
      status, body);
    view.onError = (err) => { status.textContent = `Could not refresh: ${err.text || err.message}`; status.className = "message error"; };
    poll(view, REFRESH_MS, async () => {
      const { data } = await api("GET", "/v1/overview", { signal: view.abort.signal });
      if (view.closed) return;
      status.textContent = "";
      status.className = "message";
      if (!data.models.length) {
        morphChildren(body, h("div.empty", { "data-testid": "no-models" },
          h("p", {}, "No model endpoints yet."),
          h("p.muted", {}, "Deploy a version and route to it, e.g. ",
            h("code", {}, "merlin-dp deploy fraud/scorer/1 --command '…' --wait 60"), " then ",
            h("code", {}, "merlin-dp route fraud/scorer --weights 1=100"), ".")));
        return;
      }
      const models = data.models.slice().sort((a, b) =>
        `${a.project}/${a.model}`.localeCompare(`${b.project}/${b.model}`));
      morphChildren(body, liveTable(models, {
        caption: `Rates over the last ${data.window_seconds} s`,
      }));
    });
  }

  // ---------------------------------------------------------------- one model

  function modelView(project, model) {
    const view = newView("model");
    const key = `${project}/${model}`;
    const writable = canWrite(project);
    const m = {
      project, model, key, writable,
      endpoint: null, // the last ModelEndpoint read
      versions: [], // VersionEndpoint[]
      summary: null, // this model's ModelSummary from /v1/overview
      historyRevision: null,
      series: new Series(),
    };
    view.model = m;

    const el = {
      title: h("h1", { "data-testid": "model-title" }, key),
      facts: h("p.muted", { "data-testid": "model-facts" }),
      status: h("p.message", { role: "status", "data-testid": "model-status" }),
      live: h("div", { "data-testid": "model-live" }),
      charts: h("div.charts", { "data-testid": "charts" }),
      events: h("div", { "data-testid": "scale-events" }),
      controls: writable ? h("div", { "data-testid": "controls", "data-own": "" }) : null,
      history: h("div", { "data-testid": "history" }),
      rollout: h("div", { "data-testid": "rollout" }),
      versions: h("div", { "data-testid": "versions" }),
    };
    m.el = el;

    main.replaceChildren(
      h("div.page-head", {},
        h("p.crumbs", {}, h("a", { href: "#/" }, "← All models")),
        el.title, el.facts),
      el.status,
      h("section.card", { "aria-labelledby": "live-h" },
        h("h2", { id: "live-h" }, "Now"), el.live),
      h("div.model-grid", {},
        h("div.col-main", {},
          h("section.card.charts-card", { "aria-labelledby": "charts-h" },
            h("h2", { id: "charts-h" }, "Last 15 minutes"),
            el.charts,
            h("h3", {}, "Autoscaler decisions"),
            el.events),
          h("section.card.versions-card", { "aria-labelledby": "versions-h" },
            h("h2", { id: "versions-h" }, "Version endpoints"), el.versions)),
        h("div.col-side", {},
          writable ? h("section.card", { "aria-labelledby": "controls-h" },
            h("h2", { id: "controls-h" }, "Traffic"), el.controls) : null,
          h("section.card", { "aria-labelledby": "rollout-h" },
            h("h2", { id: "rollout-h" }, "Rollout"), el.rollout),
          h("section.card", { "aria-labelledby": "history-h" },
            h("h2", { id: "history-h" }, "Route history"), el.history))));

    view.onError = (err) => setStatus(el.status, `Could not refresh: ${err.text || err.message}`, "error");

    const charts = new Charts(el.charts, m);
    view.cleanups.push(() => charts.destroy());
    m.charts = charts;
    if (writable) m.editor = new RuleEditor(el.controls, m, view);

    poll(view, REFRESH_MS, async () => {
      const signal = view.abort.signal;
      const [endpoint, overview] = await Promise.all([
        api("GET", modelPath(project, model) + "/endpoint", { signal }).catch(notFoundAsNull),
        api("GET", "/v1/overview", { signal }),
      ]);
      m.window = overview.data.window_seconds;
      m.summary = overview.data.models.find((s) => s.project === project && s.model === model) || null;
      // The overview names the rollout's phase: no need to ask (and be told 404) without one.
      const rollout = m.summary && m.summary.rollout_phase
        ? await api("GET", modelPath(project, model) + "/endpoint/rollout", { signal }).catch(notFoundAsNull)
        : null;
      if (view.closed) return;
      setStatus(el.status, "");
      m.endpoint = endpoint && endpoint.data;
      renderModelHead(m);
      renderRollout(m, rollout && rollout.data);
      if (m.editor) m.editor.update();
      const revision = m.endpoint ? m.endpoint.revision : null;
      if (revision !== m.historyRevision) {
        const history = m.endpoint
          ? (await api("GET", modelPath(project, model) + "/endpoint/history", { signal })).data.history
          : [];
        if (view.closed) return;
        m.historyRevision = revision;
        renderHistory(m, history);
      }
    });
    poll(view, VERSIONS_REFRESH_MS, async () => {
      const { data } = await api("GET", modelPath(project, model) + "/versions", { signal: view.abort.signal });
      if (view.closed) return;
      m.versions = data.versions;
      if (m.editor) m.editor.update();
      await renderVersions(m, view);
    });
    streamSeries(view, m);
  }

  function notFoundAsNull(err) {
    if (err.status === 404) return null;
    throw err;
  }

  function setStatus(el, text, kind = "") {
    el.textContent = text;
    el.className = `message ${kind}`.trim();
  }

  function renderModelHead(m) {
    const e = m.endpoint;
    const facts = e
      ? [e.protocol, `revision ${e.revision}`, describeRule(e.rule)]
      : ["no model endpoint: nothing routes to these versions yet"];
    morphChildren(m.el.facts, facts.join(" · "), e && e.url ? [" · ", h("code.url", {}, e.url)] : null);
    if (m.summary) {
      const versions = m.summary.versions.map((v) => v.version).sort(byVersion);
      morphChildren(m.el.live, h("div.live-split", {}, h("span.muted", {}, "Split"), splitBar(m.summary, versions),
        m.summary.rollout_phase ? h("span.muted", {}, `rollout: ${m.summary.rollout_phase.replace("_", " ")}`) : null),
      liveTable([m.summary], { link: false, modelRow: false, caption: `Rates over the last ${m.window} s` }));
    } else {
      morphChildren(m.el.live, h("p.muted", {}, "No live numbers for this model (no model endpoint)."));
    }
  }

  // ---------------------------------------------------------------- rule controls

  /**
   * The weights, mirror, switch and rollback controls (only rendered for a token that may
   * write). The weights and mirror forms remember the revision they were filled from and
   * send it as If-Match: two people editing at once can't silently overwrite each other.
   * A form the person has started editing is not refilled by the 2 s refresh.
   */
  class RuleEditor {
    constructor(root, m, view) {
      this.root = root;
      this.m = m;
      this.view = view;
      this.shape = null; // versions offered, and whether there is a rule
      this.weightsBase = null; // revision the weights form was filled from
      this.mirrorBase = null;
      this.weightsDirty = false;
      this.mirrorDirty = false;
      this.busy = false;
      root.addEventListener("input", (event) => this.onInput(event));
      root.addEventListener("submit", (event) => this.onSubmit(event));
      root.addEventListener("click", (event) => this.onClick(event));
    }

    /** Versions a rule may send traffic to: running or serving, of the endpoint's protocol. */
    candidates() {
      const e = this.m.endpoint;
      const names = new Set(e ? e.rule.destinations.map((d) => d.version) : []);
      for (const v of this.m.versions) {
        if ((v.status === "running" || v.status === "serving")
            && (!e || v.spec.protocol === e.protocol)) names.add(v.version);
      }
      return [...names].sort(byVersion);
    }

    update() {
      const e = this.m.endpoint;
      const versions = this.candidates();
      const shape = JSON.stringify([versions, Boolean(e)]);
      if (shape !== this.shape) {
        this.shape = shape;
        this.build(versions);
        this.weightsDirty = this.mirrorDirty = false;
      }
      if (!e) return;
      if (!this.weightsDirty && this.weightsBase !== e.revision) this.fillWeights();
      if (!this.mirrorDirty && this.mirrorBase !== e.revision) this.fillMirror();
      const stale = [];
      if (this.weightsDirty && this.weightsBase !== e.revision) stale.push("weights");
      if (this.mirrorDirty && this.mirrorBase !== e.revision) stale.push("mirror");
      const note = $("[data-testid=stale-note]", this.root);
      note.hidden = !stale.length;
      note.textContent = stale.length
        ? `The rule changed to revision ${e.revision} while you were editing the ${stale.join(" and ")}; applying will be refused. Reload to start from it.`
        : "";
    }

    build(versions) {
      const e = this.m.endpoint;
      if (!e) {
        this.root.replaceChildren(h("p.muted", {}, "This model has no model endpoint yet: route to a version with ",
          h("code", {}, `merlin-dp route ${this.m.key} --weights 1=100`), "."));
        return;
      }
      const color = (v) => colorOf(versions, v);
      const weights = h("form.editor", { "data-testid": "weights-form", "aria-labelledby": "weights-h", novalidate: true },
        h("h3", { id: "weights-h" }, "Weights"),
        h("div.weights", {}, versions.map((v) => h("div.field", {},
          h("label", { for: `weight-${v}` },
            h("span.swatch", { style: { background: color(v) }, "aria-hidden": "true" }), `Version ${v}`),
          h("span.input-unit", {},
            h("input", { id: `weight-${v}`, type: "number", min: 0, max: 100, step: 1, inputmode: "numeric",
              required: true, "data-testid": "weight-input", "data-version": v, "aria-describedby": "weights-sum" }),
            h("span.unit", { "aria-hidden": "true" }, "%"))))),
        h("p.sum", { id: "weights-sum", "data-testid": "weights-sum", "aria-live": "polite" }),
        h("div.actions", {},
          h("button.primary", { type: "submit", "data-testid": "apply-weights" }, "Apply weights"),
          h("button", { type: "button", "data-action": "reload-rule", "data-testid": "reload-rule" }, "Reload")));

      const mirror = h("form.editor", { "data-testid": "mirror-form", "aria-labelledby": "mirror-h", novalidate: true },
        h("h3", { id: "mirror-h" }, "Shadow (mirror)"),
        h("div.row", {},
          h("div.field", {},
            h("label", { for: "mirror-version" }, "Copy requests to"),
            h("select", { id: "mirror-version", "data-testid": "mirror-version" },
              h("option", { value: "" }, "off"),
              versions.map((v) => h("option", { value: v }, `version ${v}`)))),
          h("div.field", {},
            h("label", { for: "mirror-percent" }, "Share copied"),
            h("span.input-unit", {},
              h("input", { id: "mirror-percent", type: "number", min: 0.01, max: 100, step: "any",
                inputmode: "decimal", "data-testid": "mirror-percent" }),
              h("span.unit", { "aria-hidden": "true" }, "%")))),
        h("div.actions", {}, h("button.primary", { type: "submit", "data-testid": "apply-mirror" }, "Apply mirror")));

      const switchForm = h("form.editor", { "data-testid": "switch-form", "aria-labelledby": "switch-h" },
        h("h3", { id: "switch-h" }, "Blue-green"),
        h("div.row", {},
          h("div.field", {},
            h("label", { for: "switch-to" }, "Send all traffic to"),
            h("select", { id: "switch-to", "data-testid": "switch-to" },
              versions.map((v) => h("option", { value: v }, `version ${v}`))))),
        h("div.actions", {},
          h("button.primary", { type: "submit", "data-testid": "switch" }, "Switch"),
          h("button", { type: "button", "data-action": "rollback", "data-testid": "rollback" }, "Roll back to the previous rule")));

      this.root.replaceChildren(
        h("p.message", { role: "status", "data-testid": "traffic-message" }),
        h("p.message.warn", { "data-testid": "stale-note", hidden: true }),
        weights, mirror, switchForm);
      this.weightsBase = this.mirrorBase = null;
    }

    fillWeights() {
      const e = this.m.endpoint;
      const weights = Object.fromEntries(e.rule.destinations.map((d) => [d.version, d.weight]));
      for (const input of this.root.querySelectorAll("[data-testid=weight-input]")) {
        input.value = String(weights[input.dataset.version] ?? 0);
      }
      this.weightsBase = e.revision;
      this.weightsDirty = false;
      this.showSum();
      // The switch offers the version carrying the least traffic (90/10's canary).
      const sw = $("#switch-to", this.root);
      const byWeight = [...sw.options].map((o) => o.value)
        .sort((a, b) => (weights[a] ?? 0) - (weights[b] ?? 0));
      if (byWeight.length && document.activeElement !== sw) sw.value = byWeight[0];
    }

    fillMirror() {
      const rule = this.m.endpoint.rule;
      $("#mirror-version", this.root).value = rule.mirror ? rule.mirror.version : "";
      $("#mirror-percent", this.root).value = rule.mirror ? String(rule.mirror.percent) : "";
      this.mirrorBase = this.m.endpoint.revision;
      this.mirrorDirty = false;
    }

    readWeights() {
      const out = [];
      for (const input of this.root.querySelectorAll("[data-testid=weight-input]")) {
        const text = input.value.trim();
        const value = Number(text);
        out.push({ version: input.dataset.version, text, value,
          ok: text !== "" && Number.isInteger(value) && value >= 0 && value <= 100 });
      }
      return out;
    }

    showSum() {
      const weights = this.readWeights();
      const sum = weights.reduce((s, w) => s + (w.ok ? w.value : 0), 0);
      const bad = weights.filter((w) => !w.ok);
      const el = $("[data-testid=weights-sum]", this.root);
      if (bad.length) {
        el.textContent = `Version ${bad.map((w) => w.version).join(", ")}: a whole number from 0 to 100.`;
        el.className = "sum bad";
      } else if (sum !== 100) {
        el.textContent = `Sum ${sum}%: the weights must add up to 100.`;
        el.className = "sum bad";
      } else {
        el.textContent = "Sum 100%.";
        el.className = "sum ok";
      }
      for (const w of weights) {
        $(`#weight-${CSS.escape(w.version)}`, this.root).setAttribute("aria-invalid", String(!w.ok || sum !== 100));
      }
      return { weights, ok: !bad.length && sum === 100 };
    }

    onInput(event) {
      const form = event.target.closest("form");
      if (!form) return;
      if (form.dataset.testid === "weights-form") {
        this.weightsDirty = true;
        this.showSum();
      } else if (form.dataset.testid === "mirror-form") {
        this.mirrorDirty = true;
      }
      this.update();
    }

    message(text, kind = "") {
      setStatus($("[data-testid=traffic-message]", this.root), text, kind);
    }

    async onSubmit(event) {
      event.preventDefault();
      if (this.busy || !this.m.endpoint) return;
      const form = event.target;
      const name = form.dataset.testid;
      if (name === "weights-form") await this.applyWeights();
      else if (name === "mirror-form") await this.applyMirror();
      else if (name === "switch-form") await this.applySwitch();
    }

    async onClick(event) {
      const button = event.target.closest("[data-action]");
      if (!button) return;
      if (button.dataset.action === "reload-rule") {
        this.weightsDirty = this.mirrorDirty = false;
        this.weightsBase = this.mirrorBase = null;
        this.message("");
        await refreshEndpoint(this.m, this.view);
      } else if (button.dataset.action === "rollback") {
        await rollbackTo(this.m, this.view, null);
      }
    }

    async applyWeights() {
      const { weights, ok } = this.showSum();
      if (!ok) {
        this.message("Not applied: the weights must be whole numbers adding up to 100.", "error");
        $("[data-testid=weight-input]", this.root).focus();
        return;
      }
      const e = this.m.endpoint;
      const destinations = weights.filter((w) => w.value > 0).map((w) => ({ version: w.version, weight: w.value }));
      const split = destinations.map((d) => `version ${d.version} ${d.weight}%`).join(", ");
      const base = this.weightsBase;
      if (!(await confirmAction(`Set ${this.m.key}'s split?`,
        `${split}. Replaces revision ${base}'s weights (${describeRule(e.rule)}); match, sticky and mirror stay as they are.`,
        "Apply weights"))) return;
      await this.send(() => api("PUT", modelPath(this.m.project, this.m.model) + "/endpoint", {
        body: { rule: { ...e.rule, destinations }, protocol: e.protocol }, ifMatch: base,
      }), "Weights applied");
    }

    async applyMirror() {
      const version = $("#mirror-version", this.root).value;
      const input = $("#mirror-percent", this.root);
      const e = this.m.endpoint;
      let mirror = null;
      if (version) {
        const percent = Number(input.value);
        if (input.value.trim() === "" || !(percent > 0 && percent <= 100)) {
          this.message("Not applied: the share copied is a percentage above 0, at most 100.", "error");
          input.focus();
          return;
        }
        mirror = { version, percent };
        if (e.rule.mirror && e.rule.mirror.relative_tolerance !== undefined) {
          mirror.relative_tolerance = e.rule.mirror.relative_tolerance;
        }
      }
      const base = this.mirrorBase;
      const what = mirror ? `Copy ${mirror.percent}% of requests to version ${version} and compare its answers` : "Stop mirroring";
      if (!(await confirmAction(`Change ${this.m.key}'s shadow?`, `${what}. No caller sees the copies' answers.`,
        mirror ? "Apply mirror" : "Stop mirroring"))) return;
      await this.send(() => api("PUT", modelPath(this.m.project, this.m.model) + "/endpoint", {
        body: { rule: { ...e.rule, mirror }, protocol: e.protocol }, ifMatch: base,
      }), mirror ? "Mirror applied" : "Mirror off");
    }

    async applySwitch() {
      const to = $("#switch-to", this.root).value;
      const e = this.m.endpoint;
      if (!to) return;
      if (!(await confirmAction(`Switch ${this.m.key}?`,
        `All traffic goes to version ${to} (from ${describeRule(e.rule)}), in one revision. A rollback returns to this rule.`,
        `Switch to version ${to}`))) return;
      await this.send(() => api("POST", modelPath(this.m.project, this.m.model) + "/endpoint:switch", {
        body: { to_version: to }, ifMatch: e.revision,
      }), `Switched to version ${to}`);
    }

    async send(call, done) {
      this.busy = true;
      try {
        const { data } = await call();
        this.m.endpoint = data;
        this.weightsDirty = this.mirrorDirty = false;
        this.update();
        this.message(`${done}: revision ${data.revision} (${describeRule(data.rule)}).`, "ok");
        renderModelHead(this.m);
      } catch (err) {
        if (err.name === "AbortError") return;
        this.message(`Not applied: ${err.text}`, "error");
      } finally {
        this.busy = false;
      }
    }
  }

  async function refreshEndpoint(m, view) {
    const answer = await api("GET", modelPath(m.project, m.model) + "/endpoint", { signal: view.abort.signal })
      .catch(notFoundAsNull);
    m.endpoint = answer && answer.data;
    renderModelHead(m);
    if (m.editor) m.editor.update();
  }

  /** Rollback to a revision of the history, or (null) to the previous rule. */
  async function rollbackTo(m, view, revision) {
    const e = m.endpoint;
    if (!e) return;
    const target = revision === null ? "the previous rule" : `revision ${revision}'s rule`;
    const entry = revision === null ? null : (m.history || []).find((r) => r.revision === revision);
    const body = `${m.key} goes back to ${target}${entry ? ` (${describeRule(entry.rule)})` : ""}, as a new revision. Now: revision ${e.revision} (${describeRule(e.rule)}).`;
    if (!(await confirmAction(`Roll back ${m.key}?`, body, "Roll back"))) return;
    const out = m.el.historyMessage || (m.editor && $("[data-testid=traffic-message]", m.editor.root));
    try {
      const { data } = await api("POST", modelPath(m.project, m.model) + "/endpoint:rollback", {
        body: revision === null ? {} : { to_revision: revision }, ifMatch: e.revision,
      });
      m.endpoint = data;
      renderModelHead(m);
      if (m.editor) {
        m.editor.weightsDirty = m.editor.mirrorDirty = false;
        m.editor.update();
      }
      if (out) setStatus(out, `Rolled back: revision ${data.revision} (${describeRule(data.rule)}).`, "ok");
    } catch (err) {
      if (err.name === "AbortError") return;
      if (out) setStatus(out, `Not rolled back: ${err.text}`, "error");
    }
  }

  // ---------------------------------------------------------------- history

  function renderHistory(m, history) {
    m.history = history;
    const current = m.endpoint ? m.endpoint.revision : null;
    if (!m.el.historyMessage) {
      m.el.historyMessage = h("p.message", { role: "status", "data-testid": "history-message" });
      m.el.historyList = h("div", {});
      m.el.history.replaceChildren(m.el.historyMessage, m.el.historyList);
      if (m.writable) {
        m.el.history.addEventListener("click", (event) => {
          const button = event.target.closest("[data-action=rollback-to]");
          if (button) rollbackTo(m, state.view, Number(button.dataset.revision));
        });
      }
    }
    if (!history.length) {
      morphChildren(m.el.historyList, h("p.muted", {}, "No rules yet."));
      return;
    }
    const rows = history.slice().reverse().map((r) => h("tr", {
      "data-testid": "history-row", "data-revision": r.revision, "data-key": String(r.revision),
      class: r.revision === current ? "current" : null,
    },
      h("th.num", { scope: "row" }, String(r.revision)),
      h("td", {}, h("time", { datetime: new Date(r.at * 1000).toISOString() }, fmtDateTime(r.at)),
        h("span.muted", {}, ` · ${r.by}`)),
      h("td", { "data-testid": "history-rule" }, describeRule(r.rule)),
      h("td", {}, r.revision === current
        ? h("span.badge.current-badge", {}, "current")
        : m.writable
          ? h("button.small", { type: "button", "data-action": "rollback-to", "data-revision": r.revision,
            "data-testid": "history-rollback", "aria-label": `Roll back to revision ${r.revision}` }, "Roll back")
          : null)));
    morphChildren(m.el.historyList, h("table.history", {},
      h("caption.visually-hidden", {}, "Rules of this model endpoint, newest first"),
      h("thead", {}, h("tr", {},
        h("th.num", { scope: "col" }, "Rev."),
        h("th", { scope: "col" }, "When · who"),
        h("th", { scope: "col" }, "Rule"),
        h("th", { scope: "col" }, h("span.visually-hidden", {}, "Action")))),
      h("tbody", {}, rows)));
  }

  // ---------------------------------------------------------------- rollout

  function renderRollout(m, r) {
    const root = m.el.rollout;
    if (!r) {
      morphChildren(root, h("p.muted", { "data-testid": "no-rollout" }, "No rollout on this model. Start one with ",
        h("code", {}, `merlin-dp rollout start ${m.key} VERSION`), "."));
      return;
    }
    if (!m.rolloutWired) {
      m.rolloutWired = true;
      root.addEventListener("click", (event) => {
        const button = event.target.closest("[data-action^=rollout-]");
        if (button) rolloutAction(m, button.dataset.action.slice("rollout-".length));
      });
    }
    const active = r.phase === "shadow" || r.phase === "canary";
    const steps = r.plan.steps;
    const step = r.phase === "shadow" ? "shadow" : r.step >= 0 ? `step ${r.step + 1} of ${steps.length} (${steps[r.step]}%)` : "—";
    const tests = r.tests.length ? h("div.table-scroll", { tabindex: 0, "aria-label": "Rollout tests" }, h("table.tests", { "data-testid": "rollout-tests" },
      h("caption", {}, "Tests as they stand"),
      h("thead", {}, h("tr", {},
        ["Test", "Baseline", "Candidate", "Margin", "Verdict"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, r.tests.map((t) => h("tr", { "data-key": t.metric },
        h("th", { scope: "row" }, t.metric.replace("_", " "), h("br"), h("span.muted", {}, `${t.samples} samples`)),
        h("td.num", {}, fmtShare(t.baseline)),
        h("td.num", {}, fmtShare(t.candidate)),
        h("td.num", {}, fmtShare(t.margin)),
        h("td", {}, h(`span.badge.verdict-${t.verdict}`, {}, t.verdict))))))) : null;
    const ev = r.phase === "shadow" ? r.shadow : r.live;
    const evidence = h("p.muted", { "data-testid": "rollout-evidence" },
      `Answers counted: baseline ${ev.baseline.answered} (${ev.baseline.errors} errors), candidate ${ev.candidate.answered} (${ev.candidate.errors} errors)`,
      ev.compared ? `; shadow pairs compared ${ev.compared}, differed ${ev.differed}` : "", ".");
    const decisions = r.decisions.slice(-12).reverse().map((d) => h("li", { "data-key": `${d.at}` },
      h("time", { datetime: new Date(d.at * 1000).toISOString() }, fmtTime(d.at)), " ",
      h("strong", {}, d.action), ` → ${d.weight}%: `, d.reason));
    const buttons = m.writable && active ? h("div.actions", {},
      r.paused
        ? h("button", { type: "button", "data-action": "rollout-resume", "data-testid": "rollout-resume" }, "Resume")
        : h("button", { type: "button", "data-action": "rollout-pause", "data-testid": "rollout-pause" }, "Pause"),
      h("button.danger", { type: "button", "data-action": "rollout-abort", "data-testid": "rollout-abort" }, "Abort")) : null;
    morphChildren(root,
      h("p.message", { role: "status", "data-testid": "rollout-message" }),
      h("dl.facts", {},
        h("dt", {}, "Versions"), h("dd", {}, `${r.baseline} → ${r.candidate}`),
        h("dt", {}, "Phase"), h("dd", { "data-testid": "rollout-phase" }, r.phase.replace("_", " "), active && r.paused ? " (paused)" : ""),
        h("dt", {}, "Step"), h("dd", { "data-testid": "rollout-step" }, step),
        h("dt", {}, "Candidate weight"), h("dd", { "data-testid": "rollout-weight" }, `${r.weight}%`),
        r.message ? [h("dt", {}, "Now"), h("dd", {}, r.message)] : null),
      evidence, tests, buttons,
      decisions.length ? [h("h3", {}, "Decisions, newest first"), h("ul.decisions", { "data-testid": "rollout-decisions" }, decisions)] : null);
  }

  async function rolloutAction(m, action) {
    const words = {
      pause: ["Pause the rollout?", "The split stays where it is and the tests stop counting until you resume."],
      resume: ["Resume the rollout?", "Counting starts again from now."],
      abort: ["Abort the rollout?", "Traffic goes back to the rule from before the rollout, and the rollout ends."],
    }[action];
    if (!(await confirmAction(`${words[0]}`, `${m.key}: ${words[1]}`, action[0].toUpperCase() + action.slice(1)))) return;
    const out = $("[data-testid=rollout-message]", m.el.rollout);
    try {
      const { data } = await api("POST", modelPath(m.project, m.model) + `/endpoint/rollout:${action}`, {});
      renderRollout(m, data);
      const live = data.phase === "shadow" || data.phase === "canary";
      setStatus($("[data-testid=rollout-message]", m.el.rollout), `Rollout ${data.phase.replace("_", " ")}${live && data.paused ? " (paused)" : ""}.`, "ok");
    } catch (err) {
      if (out) setStatus(out, `Not done: ${err.text}`, "error");
    }
  }

  // ---------------------------------------------------------------- version endpoints

  async function renderVersions(m, view) {
    const root = m.el.versions;
    if (!m.versions.length) {
      morphChildren(root, h("p.muted", {}, "No version endpoints."));
      return;
    }
    const ordered = m.versions.slice().sort((a, b) => byVersion(a.version, b.version));
    const names = ordered.map((v) => v.version);
    morphChildren(root, ordered.map((v) => h("article.version", {
      "data-testid": "version-card", "data-version": v.version, "data-key": v.version,
    },
      h("h3", {},
        h("span.swatch", { style: { background: colorOf(names, v.version) }, "aria-hidden": "true" }),
        `Version ${v.version} `, statusBadge(v.status)),
      h("dl.facts", {},
        h("dt", {}, "Type"), h("dd", {}, `${v.spec.type} · ${v.spec.protocol} · generation ${v.generation}`),
        h("dt", {}, "Replicas"), h("dd", { "data-testid": "version-replicas" },
          v.replicas.length ? `${v.replicas.length} ready: ${v.replicas.join(", ")}` : "none ready"),
        v.url ? [h("dt", {}, "URL"), h("dd", {}, h("code.url", {}, v.url))] : null),
      v.message ? h("p.version-message", { "data-testid": "version-message" }, v.message) : null,
      h("details.logs", { "data-testid": "version-logs", "data-version": v.version },
        h("summary", {}, `Last ${LOG_LINES} log lines`),
        h("div.log-body", { "data-own": "", "data-version": v.version }, h("p.muted", {}, "Loading…"))))));
    // Logs only for what the person opened (or the first time for all, so they're ready).
    for (const details of root.querySelectorAll("details.logs")) {
      const body = $(".log-body", details);
      if (!details.open && body.dataset.loaded) continue;
      const version = details.dataset.version;
      try {
        const { data } = await api("GET", modelPath(m.project, m.model) + `/versions/${encodeURIComponent(version)}/logs?lines=${LOG_LINES}`,
          { signal: view.abort.signal });
        body.replaceChildren(...(data.logs.length ? data.logs.map((log) => h("figure.log", {},
          h("figcaption", {}, log.name),
          h("pre", { tabindex: 0, "aria-label": `log ${log.name}` }, log.lines.join("\n") || "(empty)")))
          : [h("p.muted", {}, "No log files.")]));
      } catch (err) {
        if (err.name === "AbortError") return;
        body.replaceChildren(h("p.muted", {}, err.text));
      }
      body.dataset.loaded = "1";
    }
    if (!m.logsWired) {
      m.logsWired = true;
      root.addEventListener("toggle", (event) => {
        if (event.target.matches("details.logs") && event.target.open) renderVersions(m, view);
      }, true);
    }
  }

  // ---------------------------------------------------------------- time series

  /** The last 15 minutes of one model, per version and second, merged from the stream. */
  class Series {
    constructor() {
      this.points = new Map(); // version -> Map(second -> SeriesPoint)
      this.events = [];
      this.until = 0;
      this.signals = true; // false: the controller reads no gateway signals
      this.changed = false;
    }

    merge(msg) {
      this.until = Math.max(this.until, msg.until || 0);
      if (msg.signals !== undefined) this.signals = msg.signals;
      for (const v of msg.versions || []) {
        let map = this.points.get(v.version);
        if (!map) this.points.set(v.version, (map = new Map()));
        for (const p of v.points) map.set(p.second, p);
      }
      const seen = new Set(this.events.map((e) => `${e.at}/${e.version}/${e.to_replicas}`));
      for (const e of msg.events || []) {
        if (!seen.has(`${e.at}/${e.version}/${e.to_replicas}`)) this.events.push(e);
      }
      this.events.sort((a, b) => a.at - b.at);
      const oldest = this.until - WINDOW_SECONDS;
      for (const map of this.points.values()) {
        for (const second of map.keys()) if (second <= oldest) map.delete(second);
      }
      this.events = this.events.filter((e) => e.at > oldest);
      this.changed = true;
    }

    versions() {
      return [...this.points.keys()].sort(byVersion);
    }

    span() {
      const seconds = this.seconds();
      const n = seconds.length;
      return n >= 120 ? `the last ${Math.round(n / 60)} minutes` : `the last ${n} seconds`;
    }

    /**
     * Every second from the oldest point the controller has (15 minutes at most, a minute at
     * least) to the newest, so the charts scroll evenly and a young controller's first
     * minutes aren't a sliver at the right edge.
     */
    seconds() {
      const until = this.until || Math.floor(Date.now() / 1000) - 1;
      let first = until - MIN_SPAN_SECONDS + 1;
      for (const map of this.points.values()) {
        for (const second of map.keys()) if (second < first) first = second;
      }
      first = Math.max(first, until - WINDOW_SECONDS + 1);
      const xs = [];
      for (let s = first; s <= until; s++) xs.push(s);
      return xs;
    }

    /** One version's `field` at each of `xs`; null where the controller has no point. */
    column(version, field, xs) {
      const map = this.points.get(version) || new Map();
      return xs.map((s) => {
        const p = map.get(s);
        const v = p === undefined ? null : field(p);
        return v === undefined ? null : v;
      });
    }
  }

  async function streamSeries(view, m) {
    const decoder = new TextDecoder();
    let since = null;
    const setStreamNote = (text) => {
      const note = $("[data-testid=stream-note]", m.el.charts);
      if (note) note.textContent = text;
    };
    while (!view.closed) {
      try {
        const query = since === null ? "watch=1" : `since=${since}&watch=1`;
        const res = await fetch(new URL(modelPath(m.project, m.model).slice(1) + `/series?${query}`, API_ROOT), {
          headers: { Accept: "application/x-ndjson", ...authHeaders() }, signal: view.abort.signal, cache: "no-store",
        });
        if (res.status === 401) {
          signedOut(new ApiError(401, "unauthorized", "a valid bearer token is required"));
          return;
        }
        if (!res.ok) {
          let message = `${res.status} ${res.statusText}`;
          try { message = (await res.json()).error.message; } catch { /* not JSON */ }
          throw new Error(message);
        }
        setStreamNote("Live.");
        const reader = res.body.getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let newline;
          while ((newline = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, newline).trim();
            buffer = buffer.slice(newline + 1);
            if (!line) continue; // heartbeat
            const msg = JSON.parse(line);
            m.series.merge(msg);
            if (msg.until) since = msg.until;
            setStreamNote(`Live, to ${fmtTime(m.series.until)}: ${m.series.span()} (the controller keeps 15 minutes).`
              + (m.series.signals === false
                ? " This controller reads no gateway signals (start it with --gateway-admin or --redis-signals):"
                  + " requests, latency and errors stay at zero; replicas are its own."
                : ""));
          }
        }
        setStreamNote("The stream ended; reconnecting…");
      } catch (err) {
        if (view.closed || err.name === "AbortError") return;
        setStreamNote(`The stream broke (${err.message}); reconnecting…`);
      }
      await sleep(2000);
    }
  }

  /** Four uPlot charts over the same 15 minutes, redrawn at most once a second. */
  class Charts {
    constructor(root, m) {
      this.root = root;
      this.m = m;
      this.plots = [];
      this.versionsKey = null;
      this.observer = new ResizeObserver(() => this.resize());
      root.replaceChildren(h("p.muted", { "data-testid": "stream-note" }, "Connecting…"),
        h("div.chart-grid", {}));
      this.grid = $(".chart-grid", root);
      this.timer = setInterval(() => this.draw(), 1000);
      this.observer.observe(root);
    }

    destroy() {
      clearInterval(this.timer);
      this.observer.disconnect();
      for (const p of this.plots) p.plot.destroy();
      this.plots = [];
    }

    specs(versions) {
      const color = (v) => colorOf(versions, v);
      const solid = (v, label, field, extra = {}) => ({ version: v, field, label: `${v}${label}`, stroke: color(v), width: 2, ...extra });
      const dashed = (v, label, field, extra = {}) => solid(v, label, field, { width: 1.5, dash: [6, 4], ...extra });
      const stepped = uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined;
      return [
        { id: "rps", title: "Requests per second",
          series: versions.map((v) => solid(v, "", (p) => p.requests)) },
        { id: "latency", title: "Latency: p50 (solid), p99 (dashed), ms",
          series: versions.flatMap((v) => [solid(v, " p50", (p) => p.p50_ms), dashed(v, " p99", (p) => p.p99_ms)]) },
        { id: "errors", title: "Errors per second",
          series: versions.map((v) => solid(v, "", (p) => p.errors)) },
        { id: "replicas", title: "Replicas: ready (solid), desired (dashed)", events: true,
          series: versions.flatMap((v) => [
            solid(v, " ready", (p) => p.ready, { paths: stepped }),
            dashed(v, " desired", (p) => p.desired, { paths: stepped }),
          ]) },
      ];
    }

    build(versions) {
      for (const p of this.plots) p.plot.destroy();
      this.plots = [];
      this.grid.replaceChildren();
      if (typeof uPlot === "undefined") {
        this.grid.append(h("p.message.error", {}, "The charting library did not load."));
        return;
      }
      const width = this.chartWidth();
      for (const spec of this.specs(versions)) {
        const holder = h("div.chart");
        const summary = h("p.visually-hidden");
        const figure = h("figure.chart-figure", { "data-testid": `chart-${spec.id}` },
          h("figcaption", {}, spec.title), holder, summary);
        this.grid.append(figure);
        const events = () => (spec.events ? this.m.series.events : []);
        const floor = spec.id === "replicas" ? 2 : 1;
        const plot = new uPlot({
          width, height: 170,
          scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max || 0, floor) * 1.1] } },
          axes: [
            { stroke: "#555", grid: { stroke: "#eee" }, ticks: { stroke: "#ddd" }, space: 70,
              values: (u, splits) => splits.map((v) => fmtClock(v, u.scales.x.max - u.scales.x.min < 600)) },
            { stroke: "#555", grid: { stroke: "#eee" }, ticks: { stroke: "#ddd" }, size: 52,
              values: (u, splits) => splits.map((v) => (v >= 1000 ? `${(v / 1000).toFixed(1)}k` : `${+v.toFixed(2)}`)) },
          ],
          legend: { live: true },
          cursor: { drag: { x: false, y: false } },
          // Off the chart, the legend reads the latest values; hovering, the cursor's.
          series: [{ label: "time", value: (u, v, sidx, idx) => (idx === null ? "latest" : fmtTime(v)) },
            ...spec.series.map(({ field, version, ...opts }) => ({
              ...opts,
              value: (u, v, sidx, idx) => {
                const shown = idx === null ? lastValue(u.data[sidx]) : v;
                return shown === null || shown === undefined ? "—" : `${+shown.toFixed(2)}`;
              },
            }))],
          plugins: [eventsPlugin(events)],
        }, this.data(spec), holder);
        this.plots.push({ plot, spec, summary });
      }
    }

    data(spec) {
      const xs = this.m.series.seconds();
      return [xs, ...spec.series.map((s) => this.m.series.column(s.version, s.field, xs))];
    }

    chartWidth() {
      const one = this.grid.clientWidth || this.root.clientWidth || 600;
      const twoUp = one >= 760; // two columns of charts when each gets 370 px or more
      return Math.max(260, Math.floor(twoUp ? (one - 16) / 2 : one) - 4);
    }

    resize() {
      const width = this.chartWidth();
      for (const p of this.plots) if (p.plot.width !== width) p.plot.setSize({ width, height: 170 });
    }

    draw() {
      const series = this.m.series;
      const versions = series.versions();
      const key = JSON.stringify(versions);
      if (key !== this.versionsKey) {
        this.versionsKey = key;
        this.build(versions);
        series.changed = false;
      } else if (series.changed) {
        series.changed = false;
        for (const p of this.plots) p.plot.setData(this.data(p.spec));
      } else {
        return;
      }
      this.summarize(versions);
      this.renderEvents(versions);
    }

    /** The charts' latest values in words, for screen readers. */
    summarize(versions) {
      const s = this.m.series;
      const last = (v) => {
        const map = s.points.get(v);
        return map ? map.get(s.until) : undefined;
      };
      for (const p of this.plots) {
        const parts = versions.map((v) => {
          const point = last(v);
          if (!point) return `version ${v}: no data`;
          if (p.spec.id === "rps") return `version ${v}: ${point.requests} req/s`;
          if (p.spec.id === "latency") return `version ${v}: p50 ${fmtMs(point.p50_ms)}, p99 ${fmtMs(point.p99_ms)}`;
          if (p.spec.id === "errors") return `version ${v}: ${point.errors} errors/s`;
          return `version ${v}: ${fmtReplicas(point.ready, point.desired)} replicas`;
        });
        p.summary.textContent = `${p.spec.title}, at ${fmtTime(s.until)}: ${parts.join("; ")}.`;
      }
    }

    renderEvents(versions) {
      const events = this.m.series.events.slice().reverse();
      const root = this.m.el.events;
      if (!events.length) {
        morphChildren(root, h("p.muted", {}, "No scaling in the last 15 minutes."));
        return;
      }
      morphChildren(root, h("ul.events", { tabindex: 0, "aria-label": "Autoscaler decisions, newest first" }, events.slice(0, 30).map((e) => h("li", {
        "data-testid": "scale-event", "data-key": `${e.at}/${e.version}`,
      },
        h("span.swatch", { style: { background: colorOf(versions, e.version) }, "aria-hidden": "true" }),
        h("time", { datetime: new Date(e.at * 1000).toISOString() }, fmtTime(e.at)),
        ` version ${e.version}: ${e.from_replicas} → ${e.to_replicas}`,
        e.cold_start ? h("span.badge.cold", { "data-testid": "cold-start" }, "cold start") : null,
        h("span.reason", {}, ` — ${e.reason}`)))));
    }
  }

  /** Vertical lines where the autoscaler changed a version's replicas (cold starts dashed, red). */
  function eventsPlugin(getEvents) {
    return {
      hooks: {
        draw: [(u) => {
          const events = getEvents();
          if (!events.length) return;
          const { ctx } = u;
          const { left, top, width, height } = u.bbox;
          ctx.save();
          ctx.lineWidth = Math.max(1, uPlot.pxRatio);
          for (const e of events) {
            const x = Math.round(u.valToPos(e.at, "x", true));
            if (x < left || x > left + width) continue;
            ctx.strokeStyle = e.cold_start ? "#D55E00" : "#666";
            ctx.setLineDash(e.cold_start ? [4 * uPlot.pxRatio, 3 * uPlot.pxRatio] : []);
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
          }
          ctx.restore();
        }],
      },
    };
  }

  // ---------------------------------------------------------------- start

  // The page holds no data: it asks who the token is, then shows what that token may see.
  if (document.readyState === "loading") {
    window.addEventListener("DOMContentLoaded", () => signIn(state.token));
  } else {
    signIn(state.token); // deferred scripts run once the document is parsed
  }
})();

// The ops dashboard's script: reads the ops service's own routes and draws the page.
//
// Rules kept everywhere below:
// * Every value from the service is inserted as text (textContent, createTextNode,
//   setAttribute on data-/title attributes) and never parsed as markup: DLQ entries hold
//   whatever a producer or an exception put in them.
// * The admin token lives in sessionStorage (this tab only, gone when it closes) and is
//   sent as a bearer token to /admin/reliability/* only. A token the service refuses
//   (401/403) is not sent again until another one is typed: every refusal counts
//   against this client's failure budget (the service throttles with 429).
// * Open routes (/health/*) are read without a token, so the page shows breakers,
//   degradation, workers and DLQ totals to anyone who can reach the service.
"use strict";

(() => {
  const TOKEN_KEY = "reliable-ops-admin-token";
  const ADMIN = "/admin/reliability";
  const query = new URLSearchParams(window.location.search);
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  // ?refresh=<seconds> and ?page_size=<n> override the defaults (5 s, 50 entries).
  const INTERVAL_S = clamp(Number(query.get("refresh")) || 5, 1, 3600);
  const PAGE_SIZE = clamp(Math.floor(Number(query.get("page_size")) || 50), 1, 500);

  const state = {
    offset: 0,
    filter: { failure_class: "", task: "", fingerprint: "" },
    busy: false,
    again: false,
    timer: null,
    refused: null, // the ApiError that refused the current token, if any
    groupCounts: new Map(), // fingerprint -> entries, from the last groups read
    throttledUntil: 0,
  };

  // -- small DOM helpers (text only) ---------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function cell(value, className) {
    const td = el("td", undefined, className);
    if (value instanceof Node) td.appendChild(value);
    else td.textContent = value === undefined || value === null ? "–" : String(value);
    return td;
  }

  function fill(table, rows, emptyText) {
    const body = table.tBodies[0];
    if (!rows.length) {
      const td = el("td", emptyText, "empty");
      td.colSpan = table.tHead.rows[0].cells.length;
      const tr = el("tr");
      tr.appendChild(td);
      body.replaceChildren(tr);
      return;
    }
    body.replaceChildren(...rows);
  }

  function row(cells) {
    const tr = el("tr");
    for (const c of cells) tr.appendChild(c instanceof HTMLTableCellElement ? c : cell(c));
    return tr;
  }

  function button(label, onClick, title) {
    const b = el("button", label);
    b.type = "button";
    if (title) b.title = title;
    b.addEventListener("click", () => onClick(b));
    return b;
  }

  // -- formatting ----------------------------------------------------------------------

  const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`);
  const num = (v) => (v === null || v === undefined ? "–" : String(v));
  function when(seconds) {
    if (!seconds) return "–";
    return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }
  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 120) return `${Math.round(seconds)} s`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
    return `${(seconds / 86400).toFixed(1)} d`;
  }
  const clock = (d) => d.toTimeString().slice(0, 8);

  // -- the API ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail, retryAfter) {
      super(detail);
      this.status = status;
      this.detail = detail;
      this.retryAfter = retryAfter;
    }
    get auth() {
      return this.status === 401 || this.status === 403 || this.status === 429;
    }
    describe() {
      const names = {
        0: "ops service unreachable",
        401: "401 Unauthorized",
        403: "403 Forbidden",
        404: "404 Not found",
        409: "409 Refused",
        422: "422 Invalid",
        429: "429 Too many failed authentications",
        503: "503 State store unavailable",
      };
      const head = names[this.status] || `${this.status} Error`;
      const wait = this.retryAfter ? ` (retry after ${this.retryAfter} s)` : "";
      return `${head}: ${this.detail}${wait}`;
    }
  }

  function detailOf(body) {
    if (!body || body.detail === undefined) return "";
    const d = body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    return JSON.stringify(d);
  }

  const token = () => window.sessionStorage.getItem(TOKEN_KEY) || "";

  async function api(path, { method = "GET", body, admin = false } = {}) {
    const headers = { Accept: "application/json" };
    if (admin) headers.Authorization = `Bearer ${token()}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (err) {
      throw new ApiError(0, String(err.message || err));
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      throw new ApiError(
        response.status,
        detailOf(data) || response.statusText,
        response.headers.get("Retry-After"),
      );
    }
    return data;
  }

  const adminUsable = () =>
    Boolean(token()) && !state.refused && Date.now() >= state.throttledUntil;

  function adminFailed(err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
      state.refused = err;
    } else if (err instanceof ApiError && err.status === 429) {
      state.throttledUntil = Date.now() + 1000 * (Number(err.retryAfter) || 60);
    }
  }

  // -- messages -------------------------------------------------------------------------

  function banner(text) {
    const b = $("banner");
    b.textContent = text || "";
    b.hidden = !text;
  }

  function notice(text, isError) {
    const n = $("notice");
    n.textContent = text || "";
    n.className = isError ? "error" : "";
    n.hidden = !text;
  }

  function showAuthState() {
    const s = $("auth-state");
    document.body.classList.toggle("has-token", adminUsable());
    if (!token()) s.textContent = "no token: health only";
    else if (state.refused) s.textContent = `token refused (${state.refused.status})`;
    else if (Date.now() < state.throttledUntil) s.textContent = "throttled (429)";
    else s.textContent = "admin token in use";
    s.className = state.refused ? "bad" : "";
  }

  // -- sections ---------------------------------------------------------------------------

  function drawDegradation(d) {
    const level = $("degradation-level");
    level.textContent = d.level;
    level.className = `level level-${String(d.level).toLowerCase()}`;
    $("degradation-reason").textContent = d.reason
      ? `— ${d.reason}`
      : d.evaluated_at
        ? `— the rules' level, evaluated ${when(d.evaluated_at)}`
        : "— no evaluation recorded yet (beat runs the degradation rules)";
    const o = d.override;
    $("degradation-override").textContent =
      o && o.active
        ? `override ${o.level} by ${o.by}: ${o.reason} (expires ${when(o.expires)})` +
          (d.computed ? `; rules say ${d.computed}` : "")
        : d.computed
          ? `set by the degradation rules (computed ${d.computed})`
          : "";
  }

  function drawBreakers(list) {
    const rows = list.map((b) => {
      const state_ = cell(b.state, `state state-${b.state}`);
      const reset = button("Reset", (btn) => breakerAction(b.name, "reset", btn), "close it now");
      reset.className = "needs-token-action";
      reset.disabled = !adminUsable();
      const tr = row([
        b.name,
        state_,
        b.mode,
        pct(b.failure_rate),
        num(b.window_calls),
        num(b.failure_count),
        b.state !== "closed" && b.open_until ? when(b.open_until) : "–",
        cell(reset),
      ]);
      tr.dataset.breaker = b.name;
      return tr;
    });
    fill($("breakers"), rows, "no circuit breakers configured");
  }

  function drawLimits(list) {
    const rows = list.map((l) => {
      const tr = row([
        l.name,
        l.kind,
        l.per,
        l.kind === "gcra" ? `${l.rate}/s` : l.kind === "concurrency" ? "–" : `${l.max_requests} per ${l.window_seconds} s`,
        l.kind === "gcra" ? num(l.burst) : l.kind === "concurrency" ? num(l.limit) : num(l.max_requests),
        l.available === null ? "per scope" : num(l.available),
        l.changed_at_runtime ? "yes" : "no",
      ]);
      tr.dataset.limit = l.name;
      return tr;
    });
    fill($("limits"), rows, "no rate limits configured");
  }

  function drawWorkers(list) {
    const rows = list.map((w) =>
      row([
        w.id,
        w.node,
        w.host,
        w.pid,
        when(w.started),
        cell(w.alive ? "alive" : "expired", w.alive ? "state-closed" : "state-open"),
      ]),
    );
    fill($("workers"), rows, "no worker has registered");
  }

  function drawDlqTotals(summary) {
    $("dlq-total").textContent = `${summary.total} ${summary.total === 1 ? "entry" : "entries"}`;
    const classes = Object.entries(summary.by_class || {})
      .map(([k, v]) => `${k} ${v}`)
      .join(", ");
    $("dlq-classes").textContent = summary.total
      ? `${classes}; oldest ${age(summary.oldest_age_seconds)} old`
      : "empty";
  }

  function drawGroups(groups, canAct) {
    state.groupCounts = new Map(groups.map((g) => [g.fingerprint, g.count]));
    const rows = groups.map((g) => {
      const show = button("Show", () => {
        state.filter = { failure_class: "", task: "", fingerprint: g.fingerprint };
        state.offset = 0;
        syncFilterForm();
        refresh();
      });
      const retry = button(
        "Retry all",
        (btn) => retryGroup(g, btn),
        `redrive every entry with fingerprint ${g.fingerprint}`,
      );
      retry.disabled = !canAct;
      const actions = el("span", undefined, "actions");
      actions.append(show, retry);
      const tasks = Object.entries(g.tasks || {})
        .map(([k, v]) => `${k} (${v})`)
        .join(", ");
      const tr = row([cell(g.fingerprint, "mono"), cell(g.label, "message"), g.count, tasks, cell(actions)]);
      tr.dataset.fingerprint = g.fingerprint;
      return tr;
    });
    fill($("dlq-groups"), rows, "the DLQ is empty");
  }

  function drawEntries(page) {
    const rows = page.entries.map((e) => {
      const retry = button("Retry", (btn) => retryEntry(e.id, btn), "redrive this entry");
      const error = [e.exception_type, e.exception_message || e.reason].filter(Boolean).join(": ");
      const tr = row([
        when(e.last_failure_at),
        e.task_name,
        e.failure_class,
        cell(error, "message"),
        e.attempts,
        e.redrive_count,
        cell(e.id, "mono"),
        cell(retry),
      ]);
      tr.dataset.entryId = e.id;
      tr.title = `task id ${e.task_id}`;
      return tr;
    });
    const filtered = Object.values(state.filter).some(Boolean);
    fill($("dlq-entries"), rows, filtered ? "no entry matches the filter" : "the DLQ is empty");
    const first = page.entries.length ? page.offset + 1 : 0;
    const last = page.offset + page.entries.length;
    // A fingerprint alone: its group says how many match (other filters would need a scan).
    const f = state.filter;
    const known = f.fingerprint && !f.task && !f.failure_class ? state.groupCounts.get(f.fingerprint) : undefined;
    $("page-info").textContent =
      `entries ${first} to ${last}` +
      (!filtered ? ` of ${page.total}` : known !== undefined ? ` of ${known} with fingerprint ${f.fingerprint}` : " matching the filter");
    $("page-prev").disabled = page.offset === 0;
    $("page-next").disabled = !page.has_more;
  }

  function entriesNeedToken() {
    fill($("dlq-entries"), [], "the entry list needs an admin token");
    $("page-info").textContent = "";
    $("page-prev").disabled = true;
    $("page-next").disabled = true;
  }

  // -- charts: inline SVG, drawn here (no library, no markup strings) --------------------

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  // series: [{kind: "line"|"bar", values: [number|null], label, format}]
  function chart(container, times, series, { min = 0, max } = {}) {
    const W = 360, H = 150, L = 40, R = 8, T = 10, B = 22;
    const all = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
    const top = max !== undefined ? max : Math.max(1, ...all);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart-svg" });
    root.appendChild(svg("title", {}, series.map((s) => s.label).join(", ")));
    // One slot per report, the point or bar at its middle (bars stay inside the frame).
    const slot = (W - L - R) / Math.max(1, times.length);
    const x = (i) => L + slot * (i + 0.5);
    const y = (v) => T + (H - T - B) * (1 - (v - min) / (top - min || 1));
    root.appendChild(svg("line", { x1: L, y1: y(min), x2: W - R, y2: y(min), class: "axis" }));
    root.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: y(min), class: "axis" }));
    const fmt = series[0].format || num;
    root.appendChild(svg("text", { x: L - 4, y: T + 4, class: "tick", "text-anchor": "end" }, fmt(top)));
    root.appendChild(svg("text", { x: L - 4, y: y(min), class: "tick", "text-anchor": "end" }, fmt(min)));
    if (times.length) {
      const first = clock(times[0]).slice(0, 5);
      const last = clock(times[times.length - 1]).slice(0, 5);
      root.appendChild(svg("text", { x: x(0), y: H - 6, class: "tick", "text-anchor": "middle" }, first));
      if (times.length > 1) {
        root.appendChild(svg("text", { x: x(times.length - 1), y: H - 6, class: "tick", "text-anchor": "middle" }, last));
      }
    }
    if (!times.length) {
      root.appendChild(svg("text", { x: W / 2, y: H / 2, class: "tick", "text-anchor": "middle" }, "no reports yet"));
    }
    const barWidth = Math.max(2, Math.min(16, slot - 2));
    series.forEach((s, index) => {
      const group = svg("g", { class: `series series-${index} ${s.kind}`, "data-label": s.label });
      let path = "";
      let penDown = false; // a missing value lifts the pen: the line has a gap there
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) {
          penDown = false;
          return;
        }
        const tip = `${clock(times[i]).slice(0, 5)} ${s.label}: ${(s.format || num)(v)}`;
        if (s.kind === "bar") {
          const bar = svg("rect", { x: x(i) - barWidth / 2, y: y(v), width: barWidth, height: y(min) - y(v), class: "bar" });
          bar.appendChild(svg("title", {}, tip));
          group.appendChild(bar);
        } else {
          path += `${penDown ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
          penDown = true;
          const dot = svg("circle", { cx: x(i), cy: y(v), r: 2.5, class: "point" });
          dot.appendChild(svg("title", {}, tip));
          group.appendChild(dot);
        }
      });
      if (s.kind === "line" && path) {
        group.insertBefore(svg("path", { d: path, class: "line" }), group.firstChild);
      }
      root.appendChild(group);
    });
    container.replaceChildren(root);
  }

  function drawReports(reports) {
    const ordered = reports.slice().reverse(); // oldest first, left to right
    const times = ordered.map((r) => new Date(r.start));
    const totals = ordered.map((r) => r.totals || {});
    chart($("chart-success"), times, [
      { kind: "line", label: "success rate", values: totals.map((t) => t.success_rate ?? null), format: pct },
    ], { min: 0, max: 1 });
    chart($("chart-retries"), times, [
      { kind: "bar", label: "retries", values: totals.map((t) => t.retried ?? 0) },
    ]);
    chart($("chart-dlq"), times, [
      { kind: "bar", label: "DLQ inflow", values: ordered.map((r) => (r.dlq ? r.dlq.inflow : null)) },
      { kind: "line", label: "DLQ size", values: ordered.map((r) => (r.dlq ? r.dlq.size : null)) },
    ]);
    const latest = reports[0];
    if (!latest) {
      $("report-summary").textContent = "no hourly report yet (beat's report job writes one each hour)";
      return;
    }
    const t = latest.totals || {};
    const dlq = latest.dlq || {};
    $("report-summary").textContent =
      `latest hourly report ${latest.start} – ${latest.end} (generated ${latest.generated_at}): ` +
      `${num(t.received)} received, ${num(t.succeeded)} succeeded, ${num(t.retried)} retries, ` +
      `${num(t.dead_lettered)} dead-lettered, success rate ${pct(t.success_rate)}; ` +
      `DLQ inflow ${num(dlq.inflow)}, outflow ${num(dlq.outflow)}, size ${num(dlq.size)}` +
      (latest.anomalies && latest.anomalies.length ? `; ${latest.anomalies.length} anomalies` : "");
  }

  // -- actions -------------------------------------------------------------------------------

  async function act(what, call, btn) {
    if (btn) btn.disabled = true;
    try {
      const result = await call();
      notice(what(result));
    } catch (err) {
      if (err instanceof ApiError) {
        adminFailed(err);
        notice(err.describe(), true);
      } else {
        notice(String(err), true);
      }
    }
    refresh();
  }

  function breakerAction(name, action, btn) {
    act(
      (snap) => `breaker ${name}: ${action} done, now ${snap.state}`,
      () => api(`${ADMIN}/circuit-breakers/${encodeURIComponent(name)}/${action}`, { method: "POST", admin: true }),
      btn,
    );
  }

  function retryEntry(id, btn) {
    act(
      (r) => `entry ${r.entry_id} redriven as task ${r.task_id}`,
      () => api(`${ADMIN}/dlq/${encodeURIComponent(id)}/retry`, { method: "POST", admin: true }),
      btn,
    );
  }

  function retryGroup(group, btn) {
    const ok = window.confirm(`Redrive all ${group.count} entries with fingerprint ${group.fingerprint}?`);
    if (!ok) return;
    act(
      (r) => `fingerprint ${group.fingerprint}: ${r.redriven.length} redriven, ${r.refused.length} refused`,
      () => api(`${ADMIN}/dlq/retry`, { method: "POST", admin: true, body: { fingerprint: group.fingerprint } }),
      btn,
    );
  }

  // -- refresh --------------------------------------------------------------------------------

  function dlqQuery() {
    const q = new URLSearchParams({ offset: String(state.offset), limit: String(PAGE_SIZE) });
    for (const [k, v] of Object.entries(state.filter)) if (v) q.set(k, v);
    return `${ADMIN}/dlq?${q}`;
  }

  async function refreshAdmin(errors) {
    try {
      drawLimits((await api(`${ADMIN}/rate-limits`, { admin: true })).rate_limits);
    } catch (err) {
      // The first admin call of a round is the token's probe: refused, the others wait.
      if (err instanceof ApiError && err.auth) {
        adminFailed(err);
        errors.push(err.describe());
        return false;
      }
      errors.push(`rate limits: ${err.describe ? err.describe() : err}`);
    }
    const tasks = [
      api(`${ADMIN}/dlq/groups`, { admin: true }).then((s) => drawGroups(s.groups, true)),
      api(dlqQuery(), { admin: true }).then(async (page) => {
        if (!page.entries.length && state.offset > 0) {
          // Entries left while we paged: step back to the last page that has some.
          state.offset = Math.max(0, state.offset - PAGE_SIZE);
          page = await api(dlqQuery(), { admin: true });
        }
        drawEntries(page);
      }),
      api(`${ADMIN}/reports/hour/recent?count=48`, { admin: true }).then((r) => drawReports(r.reports)),
    ];
    const names = ["DLQ groups", "DLQ entries", "reports"];
    (await Promise.allSettled(tasks)).forEach((outcome, i) => {
      if (outcome.status === "rejected") {
        const err = outcome.reason;
        if (err instanceof ApiError) adminFailed(err);
        errors.push(`${names[i]}: ${err instanceof ApiError ? err.describe() : err}`);
      }
    });
    return true;
  }

  async function refresh() {
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    clearTimeout(state.timer);
    const errors = [];
    try {
      try {
        const detailed = await api("/health/detailed");
        drawDegradation(detailed.degradation);
        drawBreakers(detailed.circuit_breakers);
        drawWorkers(detailed.workers);
        drawDlqTotals(detailed.dlq);
      } catch (err) {
        errors.push(`health: ${err instanceof ApiError ? err.describe() : err}`);
      }
      if (adminUsable()) {
        await refreshAdmin(errors);
      }
      if (!adminUsable()) {
        fill($("limits"), [], "needs an admin token");
        entriesNeedToken();
        chart($("chart-success"), [], [{ kind: "line", label: "success rate", values: [] }]);
        chart($("chart-retries"), [], [{ kind: "bar", label: "retries", values: [] }]);
        chart($("chart-dlq"), [], [{ kind: "bar", label: "DLQ inflow", values: [] }]);
        $("report-summary").textContent = "";
        try {
          drawGroups((await api("/health/dlq")).groups, false);
        } catch (err) {
          errors.push(`DLQ groups: ${err instanceof ApiError ? err.describe() : err}`);
        }
      }
      if (state.refused) errors.unshift(`admin token refused — ${state.refused.describe()}`);
      banner(errors.join("\n"));
      showAuthState();
      $("updated").textContent = clock(new Date());
      $("updated").dateTime = new Date().toISOString();
    } finally {
      state.busy = false;
      if (state.again) {
        state.again = false;
        refresh();
      } else if ($("auto").checked) {
        state.timer = setTimeout(refresh, INTERVAL_S * 1000);
      }
    }
  }

  // -- wiring -----------------------------------------------------------------------------------

  function syncFilterForm() {
    $("f-class").value = state.filter.failure_class;
    $("f-task").value = state.filter.task;
    $("f-fingerprint").value = state.filter.fingerprint;
  }

  function start() {
    $("interval").textContent = String(INTERVAL_S);
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      if (value) window.sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      state.refused = null;
      state.throttledUntil = 0;
      notice("");
      refresh();
    });
    $("token-clear").addEventListener("click", () => {
      window.sessionStorage.removeItem(TOKEN_KEY);
      state.refused = null;
      notice("");
      refresh();
    });
    $("refresh-now").addEventListener("click", () => refresh());
    $("auto").addEventListener("change", () => {
      clearTimeout(state.timer);
      if ($("auto").checked) refresh();
    });
    $("dlq-filter").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const fp = $("f-fingerprint").value.trim();
      if (fp && !/^[0-9a-f]{12}$/.test(fp)) {
        notice("a fingerprint is 12 hex digits", true);
        return;
      }
      state.filter = { failure_class: $("f-class").value, task: $("f-task").value.trim(), fingerprint: fp };
      state.offset = 0;
      refresh();
    });
    $("f-clear").addEventListener("click", () => {
      state.filter = { failure_class: "", task: "", fingerprint: "" };
      state.offset = 0;
      syncFilterForm();
      refresh();
    });
    $("page-prev").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - PAGE_SIZE);
      refresh();
    });
    $("page-next").addEventListener("click", () => {
      state.offset += PAGE_SIZE;
      refresh();
    });
    refresh();
  }

  document.addEventListener("DOMContentLoaded", start);
})();

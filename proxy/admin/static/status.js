// infermon status page. Plain JavaScript, no libraries, nothing from the network but this admin port.
// Every URL is relative to the page, so it works at / and /status, behind kubectl port-forward and
// behind a path prefix. Values are written as text (textContent), never as markup.
"use strict";

(() => {
  const REFRESH_MS = 3000;
  // a fetch that has not answered by then is given up (a stalled port-forward must not stop the refresh)
  const FETCH_TIMEOUT_MS = 8000;
  const SVG = "http://www.w3.org/2000/svg";
  const failures = new Map(); // endpoint -> why its last fetch failed
  const lastGood = new Map(); // endpoint -> its last answer: a failed fetch redraws it, marked stale
  let endpoints = null; // the admin port's JSON index: which capabilities are on
  let driftVariant = null; // the variant the drift panel shows (null: the report's own)
  const colors = new Map(); // variant -> colour index, stable first

  // -- small helpers -------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else node.setAttribute(k, String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") node.textContent = String(v);
      else node.setAttribute(k, String(v));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function replace(container, ...nodes) {
    container.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
  }

  function panelBody(id) {
    return document.querySelector(`#${id} .body`);
  }

  function off(text) {
    return el("p", { class: "off", text });
  }

  function isNum(v) {
    return typeof v === "number" && Number.isFinite(v);
  }

  function fmt(v, digits = 3) {
    if (!isNum(v)) return v === null || v === undefined ? "–" : String(v);
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e6 || a < 1e-3) return v.toExponential(1);
    if (Number.isInteger(v)) return String(v);
    return String(Number(v.toPrecision(digits)));
  }

  function fmtSeconds(v) {
    if (!isNum(v)) return "–";
    if (v < 1) return `${fmt(v * 1000)} ms`;
    return `${fmt(v)} s`;
  }

  function fmtPct(v) {
    return isNum(v) ? `${fmt(v * 100)}%` : "–";
  }

  function fmtBytes(v) {
    if (!isNum(v)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return `${fmt(v)} ${units[i]}`;
  }

  function colorOf(variant) {
    if (!colors.has(variant)) colors.set(variant, colors.size % 6);
    return colors.get(variant);
  }

  function badge(result) {
    const r = String(result || "none").toLowerCase();
    return el("span", { class: `badge ${r}`, text: r });
  }

  // A fetch that never throws: the JSON, or (the reason kept for the stale marker) the last good one, or null.
  async function getJSON(path) {
    try {
      const resp = await fetch(path, {
        cache: "no-store", headers: { Accept: "application/json" }, signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
      });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const data = await resp.json();
      failures.delete(path);
      lastGood.set(path, data);
      return data;
    } catch (err) {
      failures.set(path, err && err.message ? err.message : String(err));
      return lastGood.has(path) ? lastGood.get(path) : null;
    }
  }

  function has(path) {
    return endpoints !== null && endpoints.includes(path);
  }

  // -- line charts ---------------------------------------------------------------------------------

  // series: [{variant, dash, values}], t: Unix seconds; values may hold nulls (gaps)
  function lineChart(container, t, series, yFormat) {
    const width = Math.max(200, container.clientWidth || 400);
    const height = Math.max(80, container.clientHeight || 130);
    const left = 48, right = 8, top = 6, bottom = 16;
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    let max = 0;
    let points = 0;
    for (const s of series) for (const v of s.values) if (isNum(v)) { max = Math.max(max, v); points += 1; }
    container.dataset.points = String(points);
    if (!points || t.length < 1) {
      root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty", text: "no requests yet" }));
      replace(container, root);
      return;
    }
    if (max <= 0) max = 1;
    max = niceCeil(max);
    const t0 = t[0], t1 = t[t.length - 1];
    const span = Math.max(t1 - t0, 1);
    const x = (ts) => left + ((ts - t0) / span) * (width - left - right);
    const y = (v) => top + (1 - v / max) * (height - top - bottom);
    for (const frac of [0, 0.5, 1]) {
      const yy = y(max * frac);
      root.append(svg("line", { x1: left, x2: width - right, y1: yy, y2: yy, class: "axis" }));
      root.append(svg("text", { x: left - 4, y: yy + 3, "text-anchor": "end", text: yFormat(max * frac) }));
    }
    root.append(svg("text", { x: left, y: height - 3, text: `-${ago(span)}` }));
    root.append(svg("text", { x: width - right, y: height - 3, "text-anchor": "end", text: "now" }));
    for (const s of series) {
      let d = "";
      let pen = false;
      s.values.forEach((v, i) => {
        if (!isNum(v)) { pen = false; return; }
        d += `${pen ? "L" : "M"}${x(t[i]).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      });
      if (d) {
        root.append(svg("path", { d, class: `line s${colorOf(s.variant)}${s.dash ? ` d${s.dash}` : ""}` }));
      }
      // a lone point between gaps draws nothing as a path: mark it
      s.values.forEach((v, i) => {
        const alone = isNum(v) && !isNum(s.values[i - 1]) && !isNum(s.values[i + 1]);
        if (alone) root.append(svg("circle", { cx: x(t[i]), cy: y(v), r: 1.8, class: `f${colorOf(s.variant)}` }));
      });
    }
    replace(container, root);
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function ago(seconds) {
    if (seconds >= 120) return `${Math.round(seconds / 60)}m`;
    return `${Math.round(seconds)}s`;
  }

  // -- panels --------------------------------------------------------------------------------------

  function renderOverview(ts) {
    const rate = document.getElementById("chart-rate");
    const latency = document.getElementById("chart-latency");
    const errors = document.getElementById("chart-errors");
    const legend = document.getElementById("legend");
    if (!ts) {
      for (const c of [rate, latency, errors]) replace(c, off(has("/timeseries") ? "no data" : "off"));
      replace(legend);
      return;
    }
    const names = Object.keys(ts.variants);
    names.forEach(colorOf);
    lineChart(rate, ts.t, names.map((v) => ({ variant: v, values: ts.variants[v].rate })), (v) => fmt(v));
    const lat = [];
    for (const v of names) {
      lat.push({ variant: v, values: ts.variants[v].p50 });
      lat.push({ variant: v, dash: 1, values: ts.variants[v].p90 });
      lat.push({ variant: v, dash: 2, values: ts.variants[v].p99 });
    }
    lineChart(latency, ts.t, lat, fmtSeconds);
    lineChart(errors, ts.t, names.map((v) => ({ variant: v, values: ts.variants[v].error_rate })), fmtPct);
    const items = names.map((v) => {
      const now = (ts.summary.variants || {})[v] || {};
      const swatch = svg("svg", { width: 14, height: 8 }, svg("line", { x1: 0, x2: 14, y1: 4, y2: 4, class: `line s${colorOf(v)}` }));
      return el("span", { "data-variant": v }, swatch, el("b", { text: v }), " ",
        el("span", { class: "now", text: `${fmt(now.rate)} req/s · p50 ${fmtSeconds(now.p50)} · p99 ${fmtSeconds(now.p99)} · errors ${fmtPct(now.error_rate)}` }));
    });
    replace(legend, ...items);
    document.getElementById("overview-hint").textContent =
      `last ${ago(ts.history_seconds)}, a point every ${fmt(ts.interval_seconds)} s; legend: the last ${fmt(ts.summary.seconds)} s`;
    const all = ts.summary.all;
    const summary = document.getElementById("summary");
    if (all) {
      replace(summary,
        kv("rate", `${fmt(all.rate)} req/s`), kv("p50", fmtSeconds(all.p50)), kv("p99", fmtSeconds(all.p99)),
        kv("errors", fmtPct(all.error_rate)));
    }
  }

  function kv(k, v) {
    return el("span", { class: "kv" }, el("span", { class: "k", text: k }), el("span", { class: "v", text: v }));
  }

  const CHECK_FIGURES = {
    errors: [["rate", fmtPct], ["baseline_rate", fmtPct], ["p_value", fmt]],
    latency: [["median_s", fmtSeconds], ["baseline_median_s", fmtSeconds], ["effect", fmt], ["p_value", fmt]],
    predictions: [["distance", fmt], ["threshold", fmt], ["p_value", fmt]],
    drift: [["share", fmtPct], ["baseline_share", fmtPct], ["drifted_features", (v) => (v || []).join(", ") || "none"]],
  };

  function checkFigures(name, check) {
    const wanted = CHECK_FIGURES[name];
    const parts = [];
    if (wanted) {
      for (const [key, f] of wanted) if (key in check) parts.push(`${key} ${f(check[key])}`);
    } else {
      for (const [key, value] of Object.entries(check)) {
        if (isNum(value) && key !== "outcome" && parts.length < 4) parts.push(`${key} ${fmt(value)}`);
      }
    }
    return parts.join(" · ");
  }

  function renderCanary(report, split) {
    const body = panelBody("canary");
    if (!has("/canary")) {
      replace(body, off("canary analysis: off — configure upstreams and split.weights (see docs/canary.md)"));
      return;
    }
    if (!report) {
      replace(body, off("waiting for /canary"));
      return;
    }
    const nodes = [];
    const weights = split && split.weights ? Object.entries(split.weights).map(([n, w]) => `${n} ${fmt(w)}`).join(" · ") : null;
    nodes.push(el("div", { class: "reason" },
      `baseline ${report.baseline}` + (weights ? ` · split ${weights}` : "") +
      (isNum(report.evaluated_at) ? ` · evaluated ${new Date(report.evaluated_at * 1000).toLocaleTimeString()}` : " · not evaluated yet")));
    const variants = Object.entries(report.variants || {});
    if (!variants.length) nodes.push(off("no variant besides the baseline has been seen yet"));
    for (const [name, v] of variants) {
      const rows = [];
      for (const [cname, c] of Object.entries(v.checks || {})) {
        rows.push(el("tr", { "data-check": cname, class: "check" },
          el("td", { text: cname }), el("td", {}, badge(c.result)),
          el("td", { class: "figs", text: checkFigures(cname, c) })));
        if (c.reason) rows.push(el("tr", { class: "why" }, el("td", {}), el("td", { colspan: 2, class: "reason", text: c.reason })));
      }
      nodes.push(el("div", { class: "variant", "data-variant": name, "data-verdict": v.result },
        el("div", { class: "head" }, el("span", { class: "name", text: name }), badge(v.result),
          el("span", { class: "reason", text: `${fmt(v.requests)} requests against ${fmt(v.baseline_requests)}` })),
        el("div", { class: "reason verdict-reason", text: v.reason || "" }),
        rows.length ? el("table", {}, el("tr", {}, ...["check", "result", "figures and why"].map((h) => el("th", { text: h }))), ...rows) : null));
    }
    replace(body, ...nodes);
  }

  function histogram(h) {
    const width = 150, height = 34;
    const root = svg("svg", { width, height, class: "hist", role: "img" });
    if (!h || !Array.isArray(h.bins) || !h.bins.length) return root;
    const ref = h.reference || [];
    const liveCounts = h.live || [];
    const total = liveCounts.reduce((a, b) => a + (isNum(b) ? b : 0), 0);
    const live = liveCounts.map((n) => (total > 0 && isNum(n) ? n / total : 0));
    const n = h.bins.length;
    const max = Math.max(1e-9, ...ref.filter(isNum), ...live);
    const slot = width / n;
    const bar = Math.max(1, slot / 2 - 1);
    for (let i = 0; i < n; i += 1) {
      const r = isNum(ref[i]) ? ref[i] : 0;
      const l = live[i] || 0;
      const rh = (r / max) * (height - 2), lh = (l / max) * (height - 2);
      const label = (h.ranges && h.ranges[i]) || h.bins[i];
      root.append(svg("rect", { x: i * slot, y: height - 1 - rh, width: bar, height: rh, class: "ref" },
        svg("title", { text: `${label}: reference ${fmtPct(r)}` })));
      root.append(svg("rect", { x: i * slot + bar, y: height - 1 - lh, width: bar, height: lh, class: "live" },
        svg("title", { text: `${label}: live ${fmtPct(l)}` })));
    }
    root.append(svg("line", { x1: 0, x2: width, y1: height - 0.5, y2: height - 0.5, class: "base" }));
    return root;
  }

  function decisive(col) {
    const stats = col.statistics || {};
    const m = col.method;
    const parts = [];
    if (m && isNum(stats[m])) {
      const pvalue = ["ks", "chisquare", "z"].includes(m);
      parts.push(pvalue ? `${m} p=${fmt(stats[m])} (drift below ${fmt(col.threshold)})` : `${m} ${fmt(stats[m])} (drift from ${fmt(col.threshold)})`);
    }
    if (col.psi && isNum(col.psi.value) && m !== "psi") parts.push(`psi ${fmt(col.psi.value)}`);
    return parts.join(" · ") || col.status || "";
  }

  function renderDrift(report) {
    const body = panelBody("drift");
    if (!report) {
      replace(body, off(has("/drift") ? "waiting for /drift" : "drift: off"));
      return;
    }
    if (report.enabled === false) {
      replace(body, off(`drift: ${report.reason || "off"} — see docs/drift.md`));
      return;
    }
    const ref = report.reference || {};
    if (ref.status && ref.status !== "ready") {
      replace(body, off(`drift: building the reference from the first samples (${fmt(ref.rows)} of ${fmt(ref.target)})`));
      return;
    }
    const top = report.variant;
    const variants = report.variants || {};
    const names = Object.keys(variants).length ? Object.keys(variants) : [top];
    if (!names.includes(driftVariant)) driftVariant = null;
    const shown = driftVariant || top;
    const columns = shown === top ? report.columns || [] : (variants[shown] || {}).columns || [];
    const lines = names.map((name) => {
      const drifted = name === top ? report.drifted || [] : (variants[name] || {}).drifted || [];
      return el("div", { class: "drifted-list", "data-variant": name },
        el("b", { text: `${name}: ` }),
        drifted.length ? el("span", { class: "feat", text: drifted.join(", ") }) : el("span", { class: "reason", text: "nothing drifted" }));
    });
    const tabs = el("span", { class: "tabs" }, ...names.map((name) => {
      const b = el("button", { type: "button", class: name === shown ? "on" : null, text: name });
      b.addEventListener("click", () => { driftVariant = name; renderDrift(report); });
      return b;
    }));
    const rows = columns.map((col) =>
      el("tr", { class: col.drifted ? "drifted" : null, "data-feature": col.name, "data-drifted": String(col.drifted) },
        el("td", { class: "feature", text: col.name }),
        el("td", {}, col.drifted === true ? badge("fail") : col.drifted === false ? badge("pass") : badge("none")),
        el("td", { class: "figs", text: decisive(col) }),
        el("td", {}, histogram(col.histogram))));
    replace(body, ...lines,
      el("div", { class: "reason" }, `histograms of `, el("b", { text: shown }), " (grey: reference, orange: live)", names.length > 1 ? tabs : null),
      rows.length ? el("table", {}, el("tr", {}, ...["feature", "drift", "score", "reference / live"].map((h) => el("th", { text: h }))), ...rows)
        : off("no columns evaluated yet"));
  }

  function renderQuality(report) {
    const body = panelBody("quality");
    if (!report) {
      replace(body, off(has("/quality") ? "waiting for /quality" : "model scores: off"));
      return;
    }
    if (report.enabled === false) {
      replace(body, off(`model scores: ${report.reason || "off"} — see docs/quality.md`));
      return;
    }
    const rows = [];
    for (const set of report.label_sets || []) {
      for (const [wname, w] of Object.entries(set.windows || {})) {
        const scores = Object.entries(w.scores || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ");
        const missing = Object.keys(w.missing || {}).length ? `missing: ${Object.entries(w.missing).map(([k, v]) => `${k} (${v})`).join(", ")}` : "";
        rows.push(el("tr", { "data-variant": set.variant },
          el("td", { text: [set.model, set.version, set.variant].filter(Boolean).join(" / ") }),
          el("td", { text: wname }), el("td", { class: "num", text: fmt(w.labels) }),
          el("td", { class: "figs", text: scores || missing || "–" })));
      }
    }
    replace(body, rows.length
      ? el("table", {}, el("tr", {}, ...["model / version / variant", "window", "labels", "scores"].map((h) => el("th", { text: h }))), ...rows)
      : off("no labelled predictions yet: POST /feedback with the request ids (docs/quality.md)"));
  }

  function renderProbes(report) {
    const body = panelBody("probes");
    if (!has("/probes")) {
      replace(body, off("probes: off — set probes.file (see docs/probes.md)"));
      return;
    }
    if (!report) {
      replace(body, off("waiting for /probes"));
      return;
    }
    const ups = Object.keys(report.upstreams || {});
    const rounds = ups.map((u) => {
      const r = report.upstreams[u];
      const last = r.last_round || {};
      return el("div", { class: "reason", "data-upstream": u },
        el("b", { text: `${u}: ` }), last.outcome ? badge(last.outcome === "ok" ? "pass" : last.outcome === "failed" ? "fail" : "inconclusive") : badge("none"),
        ` rounds ok ${fmt((r.rounds || {}).ok)} · failed ${fmt((r.rounds || {}).failed)} · in a row failed ${fmt(r.consecutive_failed_rounds)}`);
    });
    const rows = (report.probes || []).map((p) =>
      el("tr", { "data-probe": p.name }, el("td", { text: p.name }),
        ...ups.map((u) => {
          const res = (p.results || {})[u];
          if (!res) return el("td", { class: "reason", text: "–" });
          return el("td", { title: res.reason || "" },
            el("span", { class: res.ok ? "ok" : "bad", text: res.ok ? "ok" : "failed" }),
            el("span", { class: "reason", text: ` ${fmtSeconds(res.duration_seconds)}${res.ok ? "" : ` ${res.reason || res.error || ""}`}` }));
        })));
    replace(body, ...rounds, rows.length
      ? el("table", {}, el("tr", {}, el("th", { text: "probe" }), ...ups.map((u) => el("th", { text: u }))), ...rows)
      : off("no probes in the file"));
  }

  function renderGpu(report) {
    const body = panelBody("gpu");
    if (!report) {
      replace(body, off(has("/gpu") ? "waiting for /gpu" : "GPU: off"));
      return;
    }
    if (report.enabled === false) {
      replace(body, off(`GPU: off — ${report.reason}`));
      return;
    }
    if (!report.up) {
      replace(body, el("p", { class: "error", text: `GPU: the node agent at ${report.agent} cannot be read: ${report.error}` }));
      return;
    }
    const head = el("div", { class: "reason", text: `agent ${report.agent} · NVML ${report.collector_up ? "up" : `down (${report.collector_reason || "?"})`} · ${fmt(report.devices)} GPUs` });
    const rows = (report.gpus || []).map((g) =>
      el("tr", { "data-uuid": g.uuid },
        el("td", { text: `${g.gpu}${g.mig_profile ? ` ${g.mig_profile}` : ""} ${g.model_name || ""}`.trim() }),
        el("td", { class: "num", text: fmtPct(g.utilization) }),
        el("td", { class: "num", text: `${fmtBytes(g.memory_used_bytes)} / ${fmtBytes(g.memory_total_bytes)}` }),
        el("td", { class: "num", text: isNum(g.temperature_celsius) ? `${fmt(g.temperature_celsius)} °C` : "–" }),
        el("td", { class: "num", text: isNum(g.power_watts) ? `${fmt(g.power_watts)} W` : "–" }),
        el("td", { class: "num", text: fmt(g.processes) })));
    replace(body, head, rows.length
      ? el("table", {}, el("tr", {}, ...["GPU", "util", "memory", "temp", "power", "procs"].map((h) => el("th", { text: h }))), ...rows)
      : off("the agent reports no GPU on this node"));
  }

  // -- the refresh loop ----------------------------------------------------------------------------

  async function optional(path) {
    return has(path) ? getJSON(path.slice(1)) : null;
  }

  async function refresh() {
    failures.delete("refresh");
    const index = await getJSON("./");
    if (index && Array.isArray(index.endpoints)) endpoints = index.endpoints;
    if (endpoints === null) {
      markStale();
      return;
    }
    const [ts, canary, split, drift, quality, probes, gpu] = await Promise.all([
      optional("/timeseries"), optional("/canary"), optional("/split"), optional("/drift"),
      optional("/quality"), optional("/probes"), optional("/gpu"),
    ]);
    const panels = [
      () => renderOverview(ts), () => renderCanary(canary, split), () => renderDrift(drift),
      () => renderQuality(quality), () => renderProbes(probes), () => renderGpu(gpu),
    ];
    failures.delete("render"); // a panel that failed last time and renders now is no longer stale
    for (const render of panels) {
      try {
        render();
      } catch (err) {
        failures.set("render", err && err.message ? err.message : String(err));
      }
    }
    try {
      headline(canary, drift);
    } catch (err) {
      failures.set("render", err && err.message ? err.message : String(err));
    }
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    markStale();
  }

  // the top bar: the request figures (renderOverview), then each canary verdict and what drifted
  function headline(canary, drift) {
    const summary = document.getElementById("summary");
    summary.querySelectorAll(".kv.extra").forEach((n) => n.remove());
    for (const [name, v] of Object.entries((canary && canary.variants) || {})) {
      const item = kv(name, "");
      item.classList.add("extra");
      item.lastChild.replaceWith(badge(v.result));
      summary.append(item);
    }
    if (drift && drift.enabled !== false && Array.isArray(drift.drifted)) {
      const per = Object.entries(drift.variants || {}).map(([name, v]) => [name, name === drift.variant ? drift.drifted : v.drifted || []]);
      if (!per.length) per.push([drift.variant, drift.drifted]);
      const text = per.map(([name, cols]) => `${name}: ${cols.length ? cols.join(", ") : "none"}`).join(" · ");
      const item = kv("drifted", text);
      item.classList.add("extra");
      summary.append(item);
    }
  }

  function markStale() {
    const stale = document.getElementById("stale");
    if (failures.size) {
      stale.hidden = false;
      stale.textContent = `stale: ${[...failures].map(([p, why]) => `${p === "./" ? "index" : p} (${why})`).join(", ")}`;
    } else {
      stale.hidden = true;
      stale.textContent = "";
    }
  }

  // one refresh at a time, the next one REFRESH_MS after it ends, whatever went wrong in this one
  async function loop() {
    try {
      await refresh();
    } catch (err) {
      failures.set("refresh", err && err.message ? err.message : String(err));
      markStale();
    } finally {
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
      setTimeout(loop, REFRESH_MS);
    }
  }

  loop();
})();

// The console's only script: live updates of the mesh page and the job page's charts.
// No libraries: charts are SVG drawn here; text always goes in through textContent.
(function () {
  "use strict";

  var SVGNS = "http://www.w3.org/2000/svg";
  var MARKED = { GERMINATED: 1, BLENDING: 1, FOSSILIZED: 1, CULLED: 1 };
  var TERMINAL = { SUCCEEDED: 1, FAILED: 1, CANCELLED: 1 };

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function num(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) return "-";
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    return Number(value).toPrecision(digits || 4).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
  }

  function duration(seconds) {
    if (!seconds || seconds <= 0) return "-";
    var s = Math.floor(seconds), m = Math.floor(s / 60), h = Math.floor(m / 60);
    if (h) return h + "h" + String(m % 60).padStart(2, "0") + "m";
    return m + "m" + String(s % 60).padStart(2, "0") + "s";
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .catch(function () { return null; });
  }

  function throttled(fn, ms) {
    var timer = null;
    return function () {
      if (timer !== null) return;
      timer = setTimeout(function () { timer = null; fn(); }, ms);
    };
  }

  // ------------------------------------------------------------------ mesh page

  function stateCell(state) {
    var td = el("td");
    td.appendChild(el("span", { "class": "state state-" + state.toLowerCase() }, state));
    return td;
  }

  function renderAgents(mesh) {
    var body = document.querySelector("#agents tbody");
    if (!body || !mesh) return;
    var rows = mesh.agents.map(function (a) {
      var tr = el("tr", { id: "agent-" + a.agent, "data-agent": a.agent, "data-state": a.state });
      tr.appendChild(el("td", {}, a.agent));
      tr.appendChild(el("td", {}, a.group));
      tr.appendChild(el("td", {}, a.machine));
      tr.appendChild(stateCell(a.state));
      tr.appendChild(el("td", {}, a.pid || "-"));
      tr.appendChild(el("td", {}, duration(a.uptime_s)));
      tr.appendChild(el("td", {}, a.restarts));
      tr.appendChild(el("td", {}, a.breaker));
      tr.appendChild(el("td", {}, a.health));
      tr.appendChild(el("td", {}, a.health_latency_ms ? num(a.health_latency_ms, 3) + " ms" : "-"));
      var issues = a.issues && a.issues.length ? " (" + a.issues.join("; ") + ")" : "";
      tr.appendChild(el("td", { "class": "wrap" }, a.message + issues));
      return tr;
    });
    body.replaceChildren.apply(body, rows);
    var state = document.getElementById("mesh-state");
    if (state) {
      state.textContent = mesh.mesh_state;
      state.className = "state state-" + mesh.mesh_state.toLowerCase();
    }
    var when = document.getElementById("mesh-time");
    if (when && mesh.timestamp) when.textContent = mesh.timestamp.replace("T", " ").replace("+00:00", "");
  }

  function time(epoch) {
    if (!epoch) return "-";
    return new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19);
  }

  function renderAlerts(data) {
    var body = document.querySelector("#alert-groups tbody");
    if (!body || !data) return;
    var more = document.getElementById("more-groups");
    if (more) more.textContent = data.more_groups ? "and " + data.more_groups + " older groups" : "";
    if (!data.groups.length) {
      var empty = el("tr", { "class": "empty" });
      empty.appendChild(el("td", { colspan: "7" }, "no alerts"));
      body.replaceChildren(empty);
      return;
    }
    body.replaceChildren.apply(body, data.groups.map(function (g) {
      var tr = el("tr", { "class": "sev-" + g.severity });
      tr.appendChild(el("td", {}, time(g.last_seen)));
      tr.appendChild(el("td", {}, g.severity));
      var kind = el("td", {}, g.kind + " ");
      if (g.summary) kind.appendChild(el("span", { "class": "badge" }, "summary"));
      else if (g.flood) kind.appendChild(el("span", { "class": "badge warn" }, "flooding"));
      tr.appendChild(kind);
      tr.appendChild(el("td", {}, g.agent));
      tr.appendChild(el("td", {}, g.count));
      tr.appendChild(el("td", {}, g.alerts));
      tr.appendChild(el("td", { "class": "wrap" }, g.message));
      return tr;
    }));
  }

  function initMesh() {
    if (!document.getElementById("agents")) return;
    var live = document.getElementById("live");
    var refreshMesh = throttled(function () {
      getJSON("/api/mesh").then(function (d) { if (d) renderAgents(d.mesh); });
    }, 250);
    var refreshAlerts = throttled(function () { getJSON("/api/alerts").then(renderAlerts); }, 250);
    var events = new EventSource("/api/events");
    events.addEventListener("agent", refreshMesh);
    events.addEventListener("alert", refreshAlerts);
    events.onopen = function () { live.textContent = "live"; live.dataset.live = "yes"; };
    events.onerror = function () { live.textContent = "reconnecting"; live.dataset.live = "no"; };
    // Health latency and uptime change without events.
    setInterval(refreshMesh, 5000);
  }

  // ------------------------------------------------------------------ job page

  function scale(lo, hi, outLo, outHi) {
    var span = hi - lo || 1;
    return function (v) { return outLo + ((v - lo) / span) * (outHi - outLo); };
  }

  function chart(target, lines, markers, opts) {
    var box = target.viewBox.baseVal, W = box.width, H = box.height;
    var pad = { l: 56, r: 12, t: 10, b: 22 };
    var points = [];
    lines.forEach(function (line) { points = points.concat(line.points); });
    target.replaceChildren();
    target.dataset.points = String(points.length);
    if (!points.length) {
      target.appendChild(svg("text", { x: W / 2, y: H / 2, "class": "placeholder" }, "waiting for data"));
      return;
    }
    var maxStep = Math.max.apply(null, points.map(function (p) { return p[0]; }).concat([opts.maxStep || 1]));
    var ys = points.map(function (p) { return p[1]; });
    var lo = Math.min.apply(null, ys), hi = Math.max.apply(null, ys);
    if (opts.zero) lo = Math.min(lo, 0);
    if (lo === hi) { hi = lo + 1; }
    var x = scale(0, maxStep, pad.l, W - pad.r), y = scale(lo, hi, H - pad.b, pad.t);
    target.appendChild(svg("line", { x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b, "class": "axis" }));
    target.appendChild(svg("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: H - pad.b, "class": "axis" }));
    target.appendChild(svg("text", { x: pad.l - 4, y: pad.t + 8, "class": "tick end" }, num(hi, 3)));
    target.appendChild(svg("text", { x: pad.l - 4, y: H - pad.b, "class": "tick end" }, num(lo, 3)));
    target.appendChild(svg("text", { x: W - pad.r, y: H - 6, "class": "tick end" }, "step " + maxStep));
    (markers || []).forEach(function (m) {
      var mark = svg("line", { x1: x(m.step), y1: pad.t, x2: x(m.step), y2: H - pad.b,
        "class": "marker m-" + m.state.toLowerCase() });
      mark.appendChild(svg("title", {}, "step " + m.step + ": " + m.slot + " " + m.state.toLowerCase()));
      target.appendChild(mark);
    });
    lines.forEach(function (line) {
      if (!line.points.length) return;
      var coords = [];
      line.points.forEach(function (p, i) {
        if (line.steps && i > 0) coords.push(x(p[0]).toFixed(1) + "," + y(line.points[i - 1][1]).toFixed(1));
        coords.push(x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1));
      });
      var poly = svg("polyline", { points: coords.join(" "), "class": "line " + line.cls });
      poly.appendChild(svg("title", {}, line.label));
      target.appendChild(poly);
      if (opts.labels) {
        var last = line.points[line.points.length - 1];
        target.appendChild(svg("text", { x: x(last[0]) - 4, y: y(last[1]) - 4, "class": "tick end" }, line.label));
      }
    });
  }

  function timeline(target, slots, transitions, maxStep) {
    var W = target.viewBox.baseVal.width, left = 140, right = 12;
    target.setAttribute("viewBox", "0 0 " + W + " " + (20 + 26 * Math.max(slots.length, 1)));
    var x = scale(0, Math.max(maxStep, 1), left, W - right);
    target.replaceChildren();
    slots.forEach(function (slot, row) {
      var y = 10 + row * 26;
      target.appendChild(svg("text", { x: 4, y: y + 14, "class": "tick" }, slot));
      var moves = transitions[slot] || [];
      if (!moves.length || moves[0].step > 0) moves = [{ step: 0, state: "DORMANT" }].concat(moves);
      moves.forEach(function (m, i) {
        var end = i + 1 < moves.length ? moves[i + 1].step : maxStep;
        var seg = svg("rect", { x: x(m.step), y: y, height: 18,
          width: Math.max(x(end) - x(m.step), 2), "class": "seg s-" + m.state.toLowerCase() });
        seg.appendChild(svg("title", {}, slot + ": " + m.state.toLowerCase() + " from step " + m.step));
        target.appendChild(seg);
      });
    });
  }

  function initJob() {
    var holder = document.getElementById("job-data");
    if (!holder) return;
    var job = JSON.parse(holder.textContent);
    var s = { train: [], val: [], metrics: {}, params: [], markers: [], moves: {}, maxStep: 0 };
    var list = document.getElementById("events");
    var status = document.getElementById("stream-state");
    var slots = job.slots.slice();

    function note(text) {
      list.insertBefore(el("li", {}, text), list.firstChild);
      while (list.children.length > 200) list.removeChild(list.lastChild);
    }

    function setText(id, text) { var n = document.getElementById(id); if (n) n.textContent = text; }

    function handle(ev) {
      s.maxStep = Math.max(s.maxStep, ev.step || 0);
      if (ev.kind === "progress") {
        if (ev.train_loss !== null) s.train.push([ev.step, ev.train_loss]);
        if (ev.param_count) {
          s.params.push([ev.step, ev.param_count]);
          setText("job-params", num(ev.param_count));
        }
        if (ev.val_loss !== null) s.val.push([ev.step, ev.val_loss]);
        Object.keys(ev.metrics || {}).forEach(function (k) {
          if (ev.metrics[k] === null) return;
          (s.metrics[k] = s.metrics[k] || []).push([ev.step, ev.metrics[k]]);
        });
        setText("job-step", ev.step);
        setText("job-train-loss", num(ev.train_loss));
        if (ev.val_loss !== null) setText("job-val-loss", num(ev.val_loss));
      } else if (ev.kind === "slot_transition") {
        if (MARKED[ev.to_state]) s.markers.push({ step: ev.step, state: ev.to_state, slot: ev.slot_id });
        (s.moves[ev.slot_id] = s.moves[ev.slot_id] || []).push({ step: ev.step, state: ev.to_state });
        if (slots.indexOf(ev.slot_id) < 0) slots.push(ev.slot_id);
        note("step " + ev.step + ": " + ev.slot_id + " " + ev.from_state.toLowerCase() + " → " +
          ev.to_state.toLowerCase() + (ev.blueprint ? " (" + ev.blueprint + ")" : "") +
          (ev.reason ? ": " + ev.reason : ""));
      } else if (ev.kind === "state_change") {
        var state = document.getElementById("job-state");
        if (state) { state.textContent = ev.to_state; state.className = "state state-" + ev.to_state.toLowerCase(); }
        var cancel = document.getElementById("cancel-form");
        if (cancel && TERMINAL[ev.to_state]) cancel.remove();
        note("step " + ev.step + ": job " + ev.to_state.toLowerCase() + (ev.message ? ": " + ev.message : ""));
      } else if (ev.kind === "checkpoint_saved") {
        note("step " + ev.step + ": checkpoint saved (" + num(ev.size_bytes) + " bytes)");
      }
    }

    function draw() {
      chart(document.getElementById("loss-chart"), [
        { points: s.train, cls: "k-train", label: "train loss" },
        { points: s.val, cls: "k-val", label: "val loss" }
      ], s.markers, { maxStep: s.maxStep });
      var names = Object.keys(s.metrics).filter(function (k) { return !/loss$/.test(k); }).sort();
      chart(document.getElementById("metric-chart"), names.map(function (k, i) {
        return { points: s.metrics[k], cls: "k-metric k-metric-" + (i % 4), label: k };
      }), s.markers, { maxStep: s.maxStep, labels: true });
      var params = s.params.slice();
      if (params.length) params.push([s.maxStep, params[params.length - 1][1]]);
      chart(document.getElementById("param-chart"),
        [{ points: params, cls: "k-params", label: "parameters", steps: true }], s.markers,
        { maxStep: s.maxStep, zero: true });
      timeline(document.getElementById("timeline"), slots, s.moves, s.maxStep);
    }

    var redraw = throttled(draw, 200);

    function renderSlots(view) {
      var body = document.querySelector("#slots tbody");
      if (!body || !view.slots.length) return;
      body.replaceChildren.apply(body, view.slots.map(function (sl) {
        var tr = el("tr");
        [sl.slot_id, sl.kind, sl.state, sl.blueprint || "-", num(sl.alpha, 3), num(sl.added_params),
          (sl.kernel_id || "-").slice(0, 12)].forEach(function (v) { tr.appendChild(el("td", {}, v)); });
        tr.lastChild.className = "mono";
        return tr;
      }));
      view.slots.forEach(function (sl) { if (slots.indexOf(sl.slot_id) < 0) slots.push(sl.slot_id); });
      setText("job-params", num(view.param_count));
      if (view.registered) setText("job-registered", view.registered.name + " v" + view.registered.version);
      if (TERMINAL[view.state]) {
        var cancel = document.getElementById("cancel-form");
        if (cancel) cancel.remove();
      }
    }

    var refreshJob = throttled(function () {
      getJSON("/api/jobs/" + encodeURIComponent(job.job_id)).then(function (d) {
        if (d) { renderSlots(d.job); redraw(); }
      });
    }, 1000);
    var stream = new EventSource("/api/jobs/" + encodeURIComponent(job.job_id) + "/events");
    stream.onopen = function () { status.textContent = "following live"; };
    stream.addEventListener("job", function (e) {
      var ev = JSON.parse(e.data);
      handle(ev);
      redraw();
      if (ev.kind === "slot_transition" || ev.kind === "state_change") refreshJob();
    });
    stream.addEventListener("end", function () {
      stream.close();
      status.textContent = "the job has ended";
      refreshJob();
      draw();
    });
    stream.addEventListener("failure", function (e) {
      stream.close();
      status.textContent = JSON.parse(e.data).error;
      status.className = "error-message";
    });
    stream.onerror = function () {
      if (stream.readyState !== EventSource.CLOSED) status.textContent = "reconnecting…";
    };
    draw();
  }

  document.addEventListener("DOMContentLoaded", function () {
    initMesh();
    initJob();
  });
})();

// The operations console. Keeps the key in localStorage (not in the address bar); polls
// /v1/stats every second for counters and the throughput charts; runs each env's connection
// test every 30 seconds; lists the jobs every 10 seconds; and, for the topic whose Operate
// button was pressed, shows its groups (refreshed every 5 seconds), its dead letters with
// redrive and purge, and a message browser.
(function () {
  "use strict";
  var key = document.body.dataset.key;
  var canWrite = document.body.dataset.write === "1";
  try { localStorage.setItem("polybusKey", key); } catch (e) {}
  history.replaceState(null, "", location.pathname);
  var auth = { Authorization: "Bearer " + key };
  var POINTS = 300;
  var previous = {};
  var series = {};
  var open = null;
  var groupsTimer = null;

  function $(id) { return document.getElementById(id); }

  $("sign-out").addEventListener("click", function () {
    try { localStorage.removeItem("polybusKey"); } catch (e) {}
    location.replace("/?signout=1");
  });

  // One call to the API: resolves with the JSON body, rejects with "CODE: message".
  function api(method, path, body) {
    var init = { method: method, headers: { Authorization: auth.Authorization } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (r) {
      return r.text().then(function (text) {
        var parsed = null;
        try { parsed = text ? JSON.parse(text) : null; } catch (e) {}
        if (!r.ok) {
          var error = parsed && parsed.error;
          var err = new Error(error ? error.code + ": " + error.message : "HTTP " + r.status);
          err.code = error && error.code;
          throw err;
        }
        return parsed;
      });
    });
  }

  function cell(row, text, className) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (className) { td.className = className; }
    row.appendChild(td);
    return td;
  }

  // A table row of class `className` with one cell per [text, class] pair.
  function row(className, cells) {
    var tr = document.createElement("tr");
    tr.className = className;
    cells.forEach(function (c) { cell(tr, c[0], c[1]); });
    return tr;
  }

  function clear(tbody) {
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
  }

  function preview(payload, encoding) {
    if (encoding === "base64") {
      return "(binary, " + Math.floor(String(payload).length * 3 / 4) + " bytes)";
    }
    var text = typeof payload === "string" ? payload : JSON.stringify(payload);
    return text.length > 80 ? text.slice(0, 79) + "…" : text;
  }

  function rows() {
    return Array.prototype.slice.call(document.querySelectorAll("tr.topic"));
  }

  function draw(canvas, points) {
    var ctx = canvas.getContext("2d");
    var w = canvas.width, h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    var top = 1;
    points.forEach(function (p) { top = Math.max(top, p.published, p.delivered); });
    [["published", "#1a73e8"], ["delivered", "#188038"]].forEach(function (line) {
      ctx.beginPath();
      ctx.strokeStyle = line[1];
      ctx.lineWidth = 1.5;
      points.forEach(function (p, i) {
        var x = w - (points.length - 1 - i) * (w / (POINTS - 1));
        var y = h - 2 - (p[line[0]] / top) * (h - 4);
        if (i === 0) { ctx.moveTo(x, y); } else { ctx.lineTo(x, y); }
      });
      ctx.stroke();
    });
    ctx.fillStyle = "#6b7280";
    ctx.font = "10px system-ui, sans-serif";
    ctx.fillText(top.toFixed(top < 10 ? 1 : 0) + "/s", 2, 10);
  }

  function poll() {
    api("GET", "/v1/stats").then(function (stats) {
      var now = Date.now();
      var byId = {};
      stats.topics.forEach(function (t) { byId[t.env + "|" + t.event] = t; });
      rows().forEach(function (row) {
        var id = row.dataset.env + "|" + row.dataset.event;
        var t = byId[id] || { published: 0, delivered: 0, acked: 0, nacked: 0, deadLettered: 0 };
        row.querySelector(".published").textContent = t.published;
        row.querySelector(".delivered").textContent = t.delivered;
        row.querySelector(".acked").textContent = t.acked;
        row.querySelector(".nacked").textContent = t.nacked;
        row.querySelector(".dead-lettered").textContent = t.deadLettered;
        var before = previous[id];
        previous[id] = { at: now, published: t.published, delivered: t.delivered };
        if (!before) { return; }
        var seconds = Math.max((now - before.at) / 1000, 0.001);
        var point = {
          published: Math.max(t.published - before.published, 0) / seconds,
          delivered: Math.max(t.delivered - before.delivered, 0) / seconds
        };
        var points = series[id] || (series[id] = []);
        points.push(point);
        if (points.length > POINTS) { points.shift(); }
        row.querySelector(".rate").textContent =
          point.published.toFixed(1) + " in / " + point.delivered.toFixed(1) + " out";
        draw(row.querySelector("canvas"), points);
      });
      $("status").textContent =
        "up " + Math.round(stats.uptimeSeconds) + " s, " + stats.openLeases + " open leases";
    }).catch(function (e) {
      $("status").textContent = String(e.message || e);
    });
  }

  function checkHealth() {
    Array.prototype.forEach.call(document.querySelectorAll("td.health"), function (td) {
      var url = "/v1/brokers/" + encodeURIComponent(td.dataset.broker) +
        "/test?env=" + encodeURIComponent(td.dataset.env);
      api("POST", url).then(function (body) {
        td.className = "health ok";
        td.textContent = "ok, " + body.latencyMs.toFixed(1) + " ms";
      }).catch(function (e) {
        td.className = "health down";
        td.textContent = String(e.message || e);
      });
    });
  }

  // The API path of the open topic, followed by `rest`.
  function topicPath(rest) {
    return "/v1/envs/" + encodeURIComponent(open.env) + "/events/" +
      encodeURIComponent(open.event) + rest;
  }

  function loadGroups() {
    if (!open) { return; }
    var tbody = $("groups").querySelector("tbody");
    api("GET", topicPath("/groups")).then(function (body) {
      var groups = (body && body.groups) || [];
      clear(tbody);
      $("groups-note").textContent = groups.length ? "" : "No consumer groups yet.";
      groups.forEach(function (g) {
        var oldest = g.oldestUnackedMs === null || g.oldestUnackedMs === undefined ? null :
          (g.oldestUnackedMs / 1000).toFixed(1) + " s";
        var tr = row("group", [[g.group, "name"], [g.members, "members"], [g.pending, "pending"],
          [g.lag, "lag"], [oldest, "oldest"]]);
        tr.dataset.group = g.group;
        tbody.appendChild(tr);
      });
    }).catch(function (e) {
      clear(tbody);
      $("groups-note").textContent = String(e.message || e);
    });
  }

  function settled(outcome, what) {
    var text = outcome.done.length + " " + what;
    if (outcome.failed.length) {
      text += ", " + outcome.failed.length + " failed (" + outcome.failed.map(function (f) {
        return f.id + ": " + f.error;
      }).join("; ") + ")";
    }
    return text + ".";
  }

  function act(action, ids) {
    var body = ids ? { ids: ids } : {};
    var what = action === "redrive" ? "redriven" : "purged";
    $("dlq-note").textContent = (action === "redrive" ? "Redriving" : "Purging") + "…";
    return api("POST", topicPath("/dead-letters/" + action), body).then(function (outcome) {
      outcome.done.forEach(function (id) {
        var tr = document.querySelector("#dead-letters tr[data-id=\"" + CSS.escape(id) + "\"]");
        if (tr) {
          tr.classList.add(what);
          tr.querySelector(".state").textContent = what;
        }
      });
      $("dlq-note").textContent = settled(outcome, what);
    }).catch(function (e) {
      $("dlq-note").textContent = String(e.message || e);
    });
  }

  function loadDeadLetters() {
    if (!open) { return; }
    var tbody = $("dead-letters").querySelector("tbody");
    $("dlq-note").textContent = "Reading dead letters…";
    api("GET", topicPath("/dead-letters?limit=100")).then(function (body) {
      var letters = (body && body.deadLetters) || [];
      clear(tbody);
      $("dlq-note").textContent = letters.length ? letters.length + " dead letters." : "No dead letters.";
      letters.forEach(function (l) {
        var tr = row("dead-letter", [[l.id, "id"], [l.reason, "reason"], [l.attempts, "attempts"],
          [l.group, "group"], [l.deadLetteredAt, "when"], [preview(l.payload, l.encoding), "payload"]]);
        tr.dataset.id = l.id;
        var actions = cell(tr, "", "state");
        if (canWrite) {
          var redrive = document.createElement("button");
          redrive.type = "button";
          redrive.className = "redrive";
          redrive.textContent = "Redrive";
          redrive.addEventListener("click", function () { act("redrive", [l.id]); });
          actions.appendChild(redrive);
          var purge = document.createElement("button");
          purge.type = "button";
          purge.className = "purge danger";
          purge.textContent = "Purge";
          purge.addEventListener("click", function () {
            if (confirm("Delete dead letter " + l.id + " for good?")) { act("purge", [l.id]); }
          });
          actions.appendChild(purge);
        }
        tbody.appendChild(tr);
      });
    }).catch(function (e) {
      clear(tbody);
      $("dlq-note").textContent = String(e.message || e);
    });
  }

  function browse(event) {
    if (event) { event.preventDefault(); }
    if (!open) { return; }
    var form = $("messages-form");
    var query = [];
    ["key", "since", "until", "limit"].forEach(function (name) {
      var value = form.elements[name].value.trim();
      if (value) { query.push(name + "=" + encodeURIComponent(value)); }
    });
    var tbody = $("messages").querySelector("tbody");
    $("messages-note").textContent = "Reading…";
    api("GET", topicPath("/messages" + (query.length ? "?" + query.join("&") : ""))).then(function (body) {
      var messages = (body && body.messages) || [];
      clear(tbody);
      $("messages-note").textContent = messages.length ? "" : "No messages match.";
      messages.forEach(function (m) {
        tbody.appendChild(row("message", [[m.id, "id"], [m.key, "key"], [m.publishedAt, "when"],
          [m.position, "position"], [preview(m.payload, m.encoding), "payload"]]));
      });
    }).catch(function (e) {
      clear(tbody);
      $("messages-note").textContent = e.code === "UNSUPPORTED" ?
        "This broker does not keep consumed messages, so there is nothing to browse (" + e.message + ")." :
        String(e.message || e);
    });
  }

  function schedule(job) {
    var s = job.schedule || {};
    if (s.cron) { return "cron " + s.cron + (s.tz ? " (" + s.tz + ")" : ""); }
    if (s.every) { return "every " + s.every; }
    if (s.at) { return "at " + s.at; }
    if (s.on) { return "on " + s.on + (s.delay ? " after " + s.delay : ""); }
    return "–";
  }

  // Every job with its next run; its runs give the last result and the failures.
  function loadJobs() {
    var tbody = $("jobs").querySelector("tbody");
    api("GET", "/v1/jobs").then(function (body) {
      var jobs = (body && body.jobs) || [];
      $("jobs-note").textContent = jobs.length ? "" : "No jobs: polybus job create --env E EVENT --every 1m …";
      return Promise.all(jobs.slice(0, 50).map(function (job) {
        return api("GET", "/v1/jobs/" + encodeURIComponent(job.id) + "/runs").then(function (runs) {
          return { job: job, runs: (runs && runs.runs) || [] };
        }, function () { return { job: job, runs: null }; });
      }));
    }).then(function (rows) {
      clear(tbody);
      rows.forEach(function (r) {
        var last = r.runs && r.runs.length ? r.runs[r.runs.length - 1] : null;
        var failed = r.runs ? r.runs.filter(function (run) { return run.state === "failed"; }).length : null;
        var next = r.job.paused ? "paused" : r.job.nextRun;
        var tr = row("job", [[r.job.name || r.job.id, "name"], [r.job.event, "event"], [r.job.env, "env"],
          [schedule(r.job), "schedule"], [next, "next"], [r.job.runs, "runs"],
          [last ? last.state + (last.error ? ": " + last.error : "") : null, "last"], [failed, "failures"]]);
        tr.dataset.id = r.job.id;
        tbody.appendChild(tr);
      });
    }).catch(function (e) {
      $("jobs-note").textContent = String(e.message || e);
    });
  }

  function operate(row) {
    open = { env: row.dataset.env, event: row.dataset.event };
    $("detail-event").textContent = open.event;
    $("detail-env").textContent = open.env;
    $("detail").hidden = false;
    clear($("messages").querySelector("tbody"));
    $("messages-note").textContent = "";
    loadGroups();
    loadDeadLetters();
    if (groupsTimer) { clearInterval(groupsTimer); }
    groupsTimer = setInterval(loadGroups, 5000);
    $("detail").scrollIntoView();
  }

  rows().forEach(function (row) {
    row.querySelector("button.open").addEventListener("click", function () { operate(row); });
  });
  $("detail-close").addEventListener("click", function () {
    open = null;
    if (groupsTimer) { clearInterval(groupsTimer); groupsTimer = null; }
    $("detail").hidden = true;
  });
  $("groups-refresh").addEventListener("click", loadGroups);
  $("dlq-refresh").addEventListener("click", loadDeadLetters);
  $("dlq-redrive-all").addEventListener("click", function () { act("redrive", null); });
  $("dlq-purge-all").addEventListener("click", function () {
    if (confirm("Delete every dead letter of " + open.event + " in " + open.env + " for good?")) {
      act("purge", null);
    }
  });
  $("messages-form").addEventListener("submit", browse);
  if (!canWrite) {
    Array.prototype.forEach.call(document.querySelectorAll(".write"), function (b) { b.hidden = true; });
  }

  $("jobs-refresh").addEventListener("click", loadJobs);
  loadJobs();
  setInterval(loadJobs, 10000);
  poll();
  setInterval(poll, 1000);
  checkHealth();
  setInterval(checkHealth, 30000);
})();

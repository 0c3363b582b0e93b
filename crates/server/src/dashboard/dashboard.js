// Keeps the key in localStorage (not in the address bar), polls /v1/stats every second for
// counters and throughput, and runs each env's connection test every 30 seconds.
(function () {
  "use strict";
  var key = document.body.dataset.key;
  try { localStorage.setItem("polybusKey", key); } catch (e) {}
  history.replaceState(null, "", location.pathname);
  var auth = { Authorization: "Bearer " + key };
  var POINTS = 60;
  var previous = {};
  var series = {};

  document.getElementById("sign-out").addEventListener("click", function () {
    try { localStorage.removeItem("polybusKey"); } catch (e) {}
    location.replace("/?signout=1");
  });

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
  }

  function poll() {
    fetch("/v1/stats", { headers: auth }).then(function (r) {
      if (!r.ok) { throw new Error("stats: HTTP " + r.status); }
      return r.json();
    }).then(function (stats) {
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
      document.getElementById("status").textContent =
        "up " + Math.round(stats.uptimeSeconds) + " s, " + stats.openLeases + " open leases";
    }).catch(function (e) {
      document.getElementById("status").textContent = String(e.message || e);
    });
  }

  function checkHealth() {
    Array.prototype.forEach.call(document.querySelectorAll("td.health"), function (cell) {
      var url = "/v1/brokers/" + encodeURIComponent(cell.dataset.broker) +
        "/test?env=" + encodeURIComponent(cell.dataset.env);
      fetch(url, { method: "POST", headers: auth }).then(function (r) {
        return r.json().then(function (body) { return { ok: r.ok, body: body }; });
      }).then(function (answer) {
        if (answer.ok) {
          cell.className = "health ok";
          cell.textContent = "ok, " + answer.body.latencyMs.toFixed(1) + " ms";
        } else {
          cell.className = "health down";
          cell.textContent = answer.body.error.code + ": " + answer.body.error.message;
        }
      }).catch(function (e) {
        cell.className = "health down";
        cell.textContent = String(e.message || e);
      });
    });
  }

  poll();
  setInterval(poll, 1000);
  checkHealth();
  setInterval(checkHealth, 30000);
})();

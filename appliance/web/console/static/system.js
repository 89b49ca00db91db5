// The system page's live figures: every few seconds, the same figures again from
// /console/admin/system.json. Without this script the page shows them as of its loading.
"use strict";

(function () {
  var note = document.querySelector("[data-refresh][data-source]");
  if (!note || !window.fetch) {
    return;
  }
  var everyMs = Number(note.getAttribute("data-refresh")) * 1000;
  var source = note.getAttribute("data-source");
  var live = note;
  var SVG = "http://www.w3.org/2000/svg";

  // `label` names the cell where a narrow window shows a row as lines (see console.css).
  function cell(row, text, className, label) {
    var td = document.createElement("td");
    td.textContent = text;
    if (className) {
      td.className = className;
    }
    if (label) {
      td.setAttribute("data-label", label);
    }
    row.appendChild(td);
  }

  function fill(name, rows, build) {
    var body = document.querySelector("[data-table='" + name + "']");
    if (!body) {
      return;
    }
    while (body.firstChild) {
      body.removeChild(body.firstChild);
    }
    rows.forEach(function (item, index) {
      var row = document.createElement("tr");
      build(row, item, index);
      body.appendChild(row);
    });
  }

  // The same drawing as web/console/charts.py column_chart: the largest bar fills the
  // chart's height, a zero stays a one-unit line on the baseline.
  function redraw(perMinute) {
    var svg = document.querySelector("svg[data-chart='sparkline']");
    if (!svg) {
      return;
    }
    var height = Number(svg.getAttribute("data-height"));
    var top = Math.max.apply(null, perMinute.concat([0]));
    var columns = svg.querySelectorAll("g.column");
    var count = perMinute.length;
    perMinute.forEach(function (images, index) {
      var column = columns[index];
      if (!column) {
        return;
      }
      var bar = column.querySelector("rect.bar");
      var shown = Math.max(top > 0 ? images / top * height : 0, 1);
      bar.setAttribute("y", String(height - shown));
      bar.setAttribute("height", String(shown));
      bar.setAttribute("class", images > 0 ? "bar" : "bar zero");
      column.querySelector("title").textContent =
        images + " images " + (count - 1 - index) + " to " + (count - index) + " min ago";
    });
    svg.setAttribute("aria-label", "Images made each minute over the last hour: " +
      perMinute.reduce(function (a, b) { return a + b; }, 0) + " in all");
  }

  function show(figures) {
    Object.keys(figures.text).forEach(function (field) {
      var element = document.querySelector("[data-field='" + field + "']");
      if (element) {
        element.textContent = figures.text[field];
      }
    });
    fill("workers", figures.workers, function (row, worker) {
      cell(row, worker.name, "mono small title");
      cell(row, worker.device, "mono", "Device");
      cell(row, worker.state, "state-" + (worker.busy ? "busy" : worker.state === "idle" ? "idle" : "down"),
           "State");
      cell(row, String(worker.maxBatchSize), "num", "Batch size");
      cell(row, worker.batchText, "", "Current batch");
      cell(row, worker.modelsText, "", "Models held");
      cell(row, worker.budgetText, "num", "Model budget");
    });
    fill("models", figures.models, function (row, model) {
      cell(row, model.name, "mono title");
      if (model["default"]) {
        var badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = "default";
        row.firstChild.appendChild(document.createTextNode(" "));
        row.firstChild.appendChild(badge);
      }
      cell(row, model.pipeline || "—", "mono small", "Pipeline");
      cell(row, String(model.creditsPerImage), "num", "Credits/image");
      cell(row, model.loadedText, "", "Loaded on");
      cell(row, model.problem || "none", model.problem ? "state-down" : "muted", "Problem");
    });
    var waiting = figures.queue.byAccount;
    fill("queue", waiting.length ? waiting : [null], function (row, entry) {
      if (entry === null) {
        cell(row, "Nothing is waiting.", "muted");
        row.firstChild.setAttribute("colspan", "2");
        return;
      }
      cell(row, entry.email);
      cell(row, String(entry.images), "num");
    });
    var perMinute = figures.images.perMinute;
    fill("per-minute", perMinute.slice().reverse(), function (row, images, index) {
      cell(row, index + "–" + (index + 1));
      cell(row, String(images), "num");
    });
    redraw(perMinute);
  }

  function poll() {
    fetch(source, {headers: {"Accept": "application/json"}, credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (figures) {
        show(figures);
        live.textContent = "Live: updated at " + new Date().toLocaleTimeString() +
          ", every " + everyMs / 1000 + " s.";
      })
      .catch(function () {
        live.textContent = "Not updating: the service did not answer. Reload to try again.";
      })
      .then(function () {
        setTimeout(poll, everyMs);
      });
  }

  live.textContent = "Live: updating every " + everyMs / 1000 + " s.";
  setTimeout(poll, everyMs);
})();

/* byok-proxy console: progressive enhancement only; every page works without it.
   Copy buttons, confirmations, sortable and searchable tables, and charts drawn
   (with the vendored Chart.js) from the tables beside them. */
(function () {
  "use strict";

  function copyButtons() {
    document.querySelectorAll("button[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var field = document.getElementById(button.getAttribute("data-copy"));
        var said = button.parentNode.querySelector(".copied");
        function done(ok) { if (said) { said.textContent = ok ? "Copied." : "Select the key and copy it."; } }
        field.select();
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(field.value).then(function () { done(true); }, function () { done(false); });
        } else {
          try { done(document.execCommand("copy")); } catch (e) { done(false); }
        }
      });
    });
  }

  function confirmations() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
      });
    });
  }

  function cellValue(row, index, numeric) {
    var cell = row.children[index];
    if (!cell) { return numeric ? 0 : ""; }
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim().toLowerCase();
    return numeric ? parseFloat(raw) || 0 : raw;
  }

  function sortable(table) {
    var headers = table.querySelectorAll("thead th");
    headers.forEach(function (th, index) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      while (th.firstChild) { button.appendChild(th.firstChild); }
      th.appendChild(button);
      button.addEventListener("click", function () {
        var numeric = th.getAttribute("data-type") === "number";
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows).filter(function (r) { return r.children.length > 1; });
        rows.sort(function (a, b) {
          var x = cellValue(a, index, numeric), y = cellValue(b, index, numeric);
          var order = x < y ? -1 : x > y ? 1 : 0;
          return ascending ? order : -order;
        });
        rows.forEach(function (r) { body.appendChild(r); });
        headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      });
    });
  }

  function filters() {
    document.querySelectorAll("input[data-filter]").forEach(function (input) {
      var table = document.getElementById(input.getAttribute("data-filter"));
      input.addEventListener("input", function () {
        var query = input.value.trim().toLowerCase();
        Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
          var text = row.getAttribute("data-search");
          if (text !== null) { row.hidden = query !== "" && text.indexOf(query) === -1; }
        });
      });
    });
  }

  function charts() {
    if (typeof window.Chart === "undefined") { return; }
    document.querySelectorAll("canvas[data-chart-for]").forEach(function (canvas) {
      var table = document.getElementById(canvas.getAttribute("data-chart-for"));
      var labels = [], cost = [], tokens = [];
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var c = row.querySelector("[data-cost]"), t = row.querySelector("[data-tokens]");
        if (!c || !t) { return; }
        labels.push(row.querySelector("th").textContent.trim());
        cost.push(parseFloat(c.getAttribute("data-cost")) || 0);
        tokens.push(parseInt(t.getAttribute("data-tokens"), 10) || 0);
      });
      if (!labels.length) { canvas.parentNode.hidden = true; return; }
      new window.Chart(canvas, {
        type: "bar",
        data: {
          labels: labels,
          datasets: [
            { label: "Cost (USD)", data: cost, yAxisID: "cost", backgroundColor: "#2a6fdb" },
            { label: "Tokens", data: tokens, yAxisID: "tokens", backgroundColor: "#e3a21a" }
          ]
        },
        options: {
          animation: false,
          responsive: true,
          maintainAspectRatio: false,
          scales: {
            cost: {
              type: "linear", position: "left", beginAtZero: true, title: { display: true, text: "USD" },
              ticks: { callback: function (v) { return "$" + (v === 0 ? "0" : Number(v).toPrecision(2)); } }
            },
            tokens: { type: "linear", position: "right", beginAtZero: true, grid: { drawOnChartArea: false }, title: { display: true, text: "tokens" } }
          }
        }
      });
    });
  }

  function start() {
    copyButtons();
    confirmations();
    document.querySelectorAll("table.sortable").forEach(sortable);
    filters();
    charts();
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();

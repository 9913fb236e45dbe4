// gpupool console: the few things plain HTML cannot do. No inline script
// (the Content-Security-Policy forbids it): data comes from data-*
// attributes and <script type="application/json"> blocks.
"use strict";

// The create form's price line: node-month price x billed months x nodes.
function updatePrice() {
  const out = document.getElementById("price");
  const spec = document.getElementById("spec");
  const months = document.getElementById("months");
  const nodes = document.getElementById("nodes");
  if (!out || !spec || !months || !nodes) return;
  const option = spec.selectedOptions[0];
  const billed = months.selectedOptions[0];
  if (!option || !billed) return;
  const micros = BigInt(option.dataset.monthPrice || "0") *
    BigInt(billed.dataset.billed || "0") * BigInt(Math.max(0, parseInt(nodes.value || "0", 10)));
  const whole = micros / 1000000n;
  const frac = (micros % 1000000n).toString().padStart(6, "0");
  out.textContent = `${whole}.${frac} ${option.dataset.currency || ""} for ` +
    `${billed.dataset.billed} billed month(s) of ${nodes.value} node(s) as a subscription`;
}

function usageChart() {
  const data = document.getElementById("usage-data");
  const canvas = document.getElementById("usage-chart");
  if (!data || !canvas || typeof Chart === "undefined" || canvas.dataset.drawn) return;
  canvas.dataset.drawn = "1";
  const d = JSON.parse(data.textContent);
  new Chart(canvas, {
    type: "bar",
    data: {
      labels: d.labels,
      datasets: [
        { label: "GPU-hours allocated", data: d.allocated, backgroundColor: "#2357c6" },
        { label: "GPU-hours used", data: d.used, backgroundColor: "#1e7b34" },
      ],
    },
    options: { responsive: true, maintainAspectRatio: false, animation: false,
      scales: { y: { beginAtZero: true, title: { display: true, text: "GPU-hours" } } } },
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["spec", "months", "nodes"]) {
    const el = document.getElementById(id);
    if (el) el.addEventListener("input", updatePrice);
  }
  updatePrice();
  usageChart();
});

// Upload page: file picker and drag-and-drop -> POST /api/predict?gradcam=1 -> render verdicts.
// No framework and no external assets: the page works offline.
(function () {
  "use strict";

  var form = document.getElementById("upload-form");
  var input = document.getElementById("file-input");
  var statusEl = document.getElementById("status");
  var errorEl = document.getElementById("error");
  var refusalEl = document.getElementById("refusal");
  var result = document.getElementById("result");
  var preview = document.getElementById("preview");
  var maxBytes = parseFloat(form.dataset.maxMb) * 1024 * 1024;
  var objectUrl = null;

  function pct(p) { return (100 * p).toFixed(1) + "%"; }

  function show(el, text) { el.textContent = text; el.hidden = !text; }

  function reset() {
    show(errorEl, "");
    show(refusalEl, "");
    document.querySelectorAll(".model").forEach(function (card) {
      card.className = "model";
      card.querySelector(".verdict").textContent = "";
      card.querySelector(".probs").textContent = "";
      card.querySelector(".meta").textContent = "";
      card.querySelector(".bar span").style.width = "0";
      card.querySelector(".cam").hidden = true;
    });
  }

  function render(data) {
    if (data.preview) { preview.src = data.preview; }
    if (!data.in_distribution) { show(refusalEl, data.message); }
    Object.keys(data.models).forEach(function (name) {
      var m = data.models[name];
      var card = document.querySelector('.model[data-model="' + name + '"]');
      if (!card) { return; }
      var verdict = card.querySelector(".verdict");
      if (m.label === null) {
        card.classList.add("none");
        verdict.textContent = "No verdict (image refused)";
      } else {
        card.classList.add(m.label === "POSITIVE" ? "pos" : "neg");
        verdict.textContent = m.label + ": " + m["class"] + " (COVID-19 probability " +
          pct(m.covid_probability) + ")";
        card.querySelector(".bar span").style.width = pct(m.covid_probability);
        card.querySelector(".probs").textContent = Object.keys(m.probabilities).map(function (c) {
          return c + " " + pct(m.probabilities[c]);
        }).join(" \u00b7 ") + " \u00b7 threshold " + pct(m.threshold);
      }
      if (m.gradcam) {
        var cam = card.querySelector(".cam");
        cam.querySelector("img").src = m.gradcam;
        cam.hidden = false;
      }
      card.querySelector(".meta").textContent = "model " + m.version.file + " @ " +
        m.version.revision + " (sha256 " + m.version.sha256 + ") \u00b7 " + m.timing_ms + " ms";
    });
    result.hidden = false;
  }

  function upload(file) {
    reset();
    if (!file) { return; }
    if (file.size > maxBytes) {
      show(errorEl, "This file is larger than the " + form.dataset.maxMb + " MB limit.");
      return;
    }
    if (objectUrl) { URL.revokeObjectURL(objectUrl); }
    objectUrl = URL.createObjectURL(file);
    preview.src = objectUrl;
    result.hidden = false;
    show(statusEl, "Analysing\u2026");
    form.classList.add("busy");
    var body = new FormData();
    body.append("file", file);
    fetch("/api/predict?gradcam=1", { method: "POST", body: body })
      .then(function (response) {
        return response.json().catch(function () {
          return { error: "the server answered " + response.status + " without JSON" };
        });
      })
      .then(function (data) {
        if (data.error) { throw new Error(data.error); }
        render(data);
        show(statusEl, "Done in " + Math.round(data.timing_ms.total) + " ms.");
      })
      .catch(function (err) {
        show(statusEl, "");
        result.hidden = true;
        show(errorEl, "Could not analyse this file: " + err.message);
      })
      .finally(function () { form.classList.remove("busy"); });
  }

  input.addEventListener("change", function () { upload(input.files[0]); });
  form.addEventListener("submit", function (event) { event.preventDefault(); });

  ["dragenter", "dragover"].forEach(function (type) {
    form.addEventListener(type, function (event) {
      event.preventDefault();
      form.classList.add("over");
    });
  });
  ["dragleave", "drop"].forEach(function (type) {
    form.addEventListener(type, function (event) {
      event.preventDefault();
      form.classList.remove("over");
    });
  });
  form.addEventListener("drop", function (event) {
    var files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) { upload(files[0]); }
  });
  // A file dropped outside the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", function (event) { event.preventDefault(); });
  window.addEventListener("drop", function (event) { event.preventDefault(); });
})();

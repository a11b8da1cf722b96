// The dashboard's only script (no library, no build step): the overview refreshes itself, select-all
// on the jobs list, and a confirmation before a delete. Every page works without it.
(function () {
  "use strict";

  function refresh(box) {
    var url = box.dataset.refresh;
    var every = (parseInt(box.dataset.every, 10) || 5) * 1000;
    var paused = false;
    var button = document.getElementById("pause");
    var stamp = document.getElementById("updated");
    function tick() {
      if (paused || document.hidden) return;
      fetch(url, {credentials: "same-origin", headers: {"X-Requested-With": "fetch"}})
        .then(function (response) {
          if (response.redirected || !response.ok) {  // signed out or expired: the sign-in page says why
            window.location.assign(response.redirected ? response.url : window.location.href);
            return null;
          }
          return response.text();
        })
        .then(function (html) {
          if (html === null || paused) return;
          box.innerHTML = html;
          var tiles = box.querySelector("[data-as-of]");
          if (stamp && tiles) stamp.textContent = "as of " + tiles.dataset.asOf;
        })
        .catch(function () { if (stamp) stamp.textContent = "the server did not answer; retrying"; });
    }
    if (button) {
      button.addEventListener("click", function () {
        paused = !paused;
        button.textContent = paused ? "Resume" : "Pause";
        button.setAttribute("aria-pressed", paused ? "true" : "false");
        if (stamp && paused) stamp.textContent = stamp.textContent.replace(/ \(paused\)$/, "") + " (paused)";
        if (!paused) tick();
      });
    }
    window.setInterval(tick, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.querySelector("[data-refresh]");
    if (box) refresh(box);

    var all = document.getElementById("select-all");
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll("input.pick").forEach(function (box) { box.checked = all.checked; });
      });
    }

    document.querySelectorAll("[data-confirm]").forEach(function (button) {
      button.addEventListener("click", function (event) {
        if (!window.confirm(button.dataset.confirm)) event.preventDefault();
      });
    });
  });
})();

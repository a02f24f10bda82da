// Live pages (body[data-refresh]) fetch themselves again and swap #live, unless paused
// or the operator is typing in a form; everything works without this script.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh"));
  var live = document.getElementById("live");
  if (!seconds || !live || !window.fetch) { return; }
  var pause = document.getElementById("pause-refresh");
  function busy() {
    var active = document.activeElement;
    return (pause && pause.checked) || (active && active.closest && active.closest("form") && active.id !== "pause-refresh");
  }
  function refresh() {
    if (busy()) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { window.location.reload(); return null; }
        return response.text();
      })
      .then(function (text) {
        if (text === null) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        if (fresh) { live.replaceChildren.apply(live, Array.prototype.slice.call(fresh.childNodes)); }
      })
      .catch(function () { /* the daemon may be restarting: try again next time */ });
  }
  window.setInterval(refresh, seconds * 1000);
}());

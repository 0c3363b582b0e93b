// Reuses a key kept by an earlier visit, unless this page says not to (bad key, signed out).
(function () {
  var stored = null;
  try { stored = localStorage.getItem("polybusKey"); } catch (e) {}
  if (document.body.dataset.noReuse) {
    try { localStorage.removeItem("polybusKey"); } catch (e) {}
  } else if (stored) {
    location.replace("/?key=" + encodeURIComponent(stored));
  }
})();

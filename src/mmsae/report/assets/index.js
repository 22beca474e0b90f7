// The feature list: search, sort, filter, paginate. List chunks are written in the default order
// (best first, dead last), so the default view loads only the chunks of the page it shows;
// searching, filtering or another sort loads every chunk once, with progress shown.
"use strict";
(function () {
  var meta = MMSAE.store.meta;
  var $ = function (id) { return document.getElementById(id); };
  var state = { q: "", sort: "default", cat: "", dead: true, dense: false, page: 0 };
  var all = null;       // every row, once all chunks are loaded
  var result = null;    // filtered and sorted rows for the current state
  var resultKey = null;

  function readHash() {
    var p = new URLSearchParams(location.hash.slice(1));
    state.q = p.get("q") || "";
    state.sort = p.get("sort") || "default";
    state.cat = p.get("cat") || "";
    state.dead = p.get("dead") !== "0";
    state.dense = p.get("dense") === "1";
    state.page = Math.max(0, parseInt(p.get("page") || "1", 10) - 1) || 0;
  }
  function writeHash() {
    var p = new URLSearchParams();
    if (state.q) p.set("q", state.q);
    if (state.sort !== "default") p.set("sort", state.sort);
    if (state.cat) p.set("cat", state.cat);
    if (!state.dead) p.set("dead", "0");
    if (state.dense) p.set("dense", "1");
    if (state.page) p.set("page", String(state.page + 1));
    var h = p.toString();
    history.replaceState(null, "", h ? "#" + h : location.pathname);
  }

  function isDirect() { return !state.q && !state.cat && !state.dense && state.sort === "default"; }

  function loadChunks(ids) {
    return Promise.all(ids.map(function (i) { return MMSAE.load("list/" + i, MMSAE.listSrc(i)); }));
  }
  function loadAll() {
    if (all) return Promise.resolve(all);
    var done = 0, ids = [];
    for (var i = 0; i < meta.n_chunks; i++) ids.push(i);
    // one after another keeps memory and the page responsive; progress after each
    var chain = Promise.resolve();
    ids.forEach(function (i) {
      chain = chain.then(function () {
        return MMSAE.load("list/" + i, MMSAE.listSrc(i)).then(function () {
          done++;
          if (meta.n_chunks > 1) $("status").textContent = "loading features… " + done + " / " + meta.n_chunks + " chunks";
        });
      });
    });
    return chain.then(function () {
      all = [];
      ids.forEach(function (i) { all = all.concat(MMSAE.store["list/" + i]); });
      return all;
    });
  }

  function score(r, s) { var v = r.s && r.s[s]; return typeof v === "number" ? v : null; }
  function desc(get) {
    return function (a, b) {
      var x = get(a), y = get(b);
      if (x === null && y === null) return a.f - b.f;
      if (x === null) return 1;
      if (y === null) return -1;
      return y - x || a.f - b.f;
    };
  }
  function comparator() {
    var s = state.sort;
    if (s === "id") return function (a, b) { return a.f - b.f; };
    if (s === "frequency") return desc(function (r) { return typeof r.fr === "number" ? r.fr : null; });
    if (s === "rare") return function (a, b) { return (a.fr === undefined) - (b.fr === undefined) || (a.fr || 0) - (b.fr || 0) || a.f - b.f; };
    if (s === "max") return desc(function (r) { return typeof r.mx === "number" ? r.mx : null; });
    if (s === "category") {
      var byScore = desc(function (r) { return meta.primary ? score(r, meta.primary) : null; });
      return function (a, b) {
        if (!a.c !== !b.c) return a.c ? -1 : 1;
        return (a.c || "").localeCompare(b.c || "") || byScore(a, b);
      };
    }
    if (s.indexOf("score:") === 0) { var name = s.slice(6); return desc(function (r) { return score(r, name); }); }
    return null; // default: the file order
  }
  function matches(r, q) {
    if (!q) return true;
    var m = /^#?(\d+)$/.exec(q);
    if (m && r.f === parseInt(m[1], 10)) return true;
    return (r.e && r.e.toLowerCase().indexOf(q) >= 0) || (r.k && r.k.toLowerCase().indexOf(q) >= 0) ||
           (r.c && r.c.toLowerCase().indexOf(q) >= 0);
  }
  function compute() {
    var key = JSON.stringify([state.q, state.sort, state.cat, state.dead, state.dense]);
    if (key === resultKey) return result;
    var q = state.q.trim().toLowerCase();
    result = all.filter(function (r) {
      return (!state.dead || !r.d) && (!state.dense || !r.n) && (!state.cat || r.c === state.cat) && matches(r, q);
    });
    var cmp = comparator();
    if (cmp) result.sort(cmp);
    resultKey = key;
    return result;
  }

  function cell(r, key) {
    var v = r[key];
    return el("td", { class: "num" }, [typeof v === "number" ? fmt(v) : ""]);
  }
  function renderRows(rows, total) {
    var tbody = clear(document.querySelector("#features tbody"));
    rows.forEach(function (r) {
      var id = r.p ? el("a", { href: "feature.html#" + r.f }, ["#" + r.f]) : el("span", { class: "muted" }, ["#" + r.f]);
      var badges = [];
      if (r.d) badges.push(el("span", { class: "badge dead" }, ["dead"]));
      if (r.n) badges.push(el("span", { class: "badge dense" }, ["dense"]));
      var text = r.e ? [r.e] : [el("span", { class: "muted" }, ["(no explanation)"])];
      var scores = el("td", { class: "num" }, (meta.scorers || []).map(function (s) {
        var v = score(r, s);
        return el("span", { class: "score", title: s }, [v === null ? "–" : fmt(v)]);
      }));
      var thumb = r.t ? el("img", { src: r.t, alt: "", class: "thumb", loading: "lazy" }) : null;
      tbody.appendChild(el("tr", { class: r.d ? "dead" : "" }, [
        el("td", {}, [id]), el("td", { class: "thumbcell" }, [thumb]), el("td", { class: "expl" }, text.concat(badges)),
        el("td", {}, [r.c || ""]),
        scores, cell(r, "fr"), cell(r, "mx"),
      ]));
    });
    var pages = Math.max(1, Math.ceil(total / meta.page_size));
    var pager = clear($("pager"));
    function go(p, label) {
      var b = el("button", { type: "button" }, [label]);
      b.disabled = p < 0 || p >= pages || p === state.page;
      b.addEventListener("click", function () { state.page = p; update(); });
      return b;
    }
    pager.appendChild(go(0, "« first"));
    pager.appendChild(go(state.page - 1, "‹ prev"));
    pager.appendChild(el("span", { id: "page-info" }, ["page " + (state.page + 1) + " of " + pages + " · " + total + " features"]));
    pager.appendChild(go(state.page + 1, "next ›"));
    pager.appendChild(go(pages - 1, "last »"));
  }

  var generation = 0;
  function update() {
    writeHash();
    var mine = ++generation;
    var ps = meta.page_size;
    if (isDirect()) {
      var total = state.dead ? meta.n_live : meta.n_rows;
      state.page = Math.min(state.page, Math.max(0, Math.ceil(total / ps) - 1));
      var start = state.page * ps, end = Math.min(total, start + ps);
      var ids = [];
      for (var i = Math.floor(start / meta.chunk_size); end > start && i <= Math.floor((end - 1) / meta.chunk_size); i++) ids.push(i);
      loadChunks(ids).then(function () {
        if (mine !== generation) return;
        var rows = [];
        ids.forEach(function (i) { rows = rows.concat(MMSAE.store["list/" + i]); });
        var offset = ids.length ? ids[0] * meta.chunk_size : 0;
        renderRows(rows.slice(start - offset, end - offset), total);
        $("status").textContent = "";
        document.body.setAttribute("data-ready", "1");
      }, fail);
      return;
    }
    loadAll().then(function () {
      if (mine !== generation) return;
      var res = compute();
      state.page = Math.min(state.page, Math.max(0, Math.ceil(res.length / ps) - 1));
      renderRows(res.slice(state.page * ps, (state.page + 1) * ps), res.length);
      $("status").textContent = res.length ? "" : "no feature matches";
      document.body.setAttribute("data-ready", "1");
    }, fail);
  }
  function fail(err) { $("status").textContent = "could not load the feature list: " + err.message; }

  function init() {
    readHash();
    var summary = [meta.model && ("model " + meta.model), meta.layer !== null && meta.layer !== undefined && ("layer " + meta.layer),
      meta.num_latents && (meta.num_latents + " latents"), meta.n_explained + " explained",
      meta.has_index ? meta.n_dead + " dead" : null, meta.has_index ? meta.n_dense + " dense" : null].filter(Boolean);
    $("summary").textContent = summary.join(" · ");
    showMissing($("missing"), meta);
    var sort = $("sort");
    var opts = [["default", "best first"]];
    (meta.scorers || []).forEach(function (s) { opts.push(["score:" + s, "score: " + s]); });
    opts.push(["frequency", "most frequent"], ["rare", "rarest"], ["max", "max activation"], ["category", "category"], ["id", "feature id"]);
    opts.forEach(function (o) { sort.appendChild(el("option", { value: o[0] }, [o[1]])); });
    (meta.categories || []).forEach(function (c) { $("category").appendChild(el("option", { value: c }, [c])); });
    $("score-heads").textContent = (meta.scorers || []).length ? (meta.scorers || []).join(" / ") : "scores";
    sort.value = state.sort; $("category").value = state.cat; $("search").value = state.q;
    $("hide-dead").checked = state.dead; $("hide-dense").checked = state.dense;
    var timer = null;
    $("search").addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { state.q = $("search").value; state.page = 0; update(); }, 150);
    });
    sort.addEventListener("change", function () { state.sort = sort.value; state.page = 0; update(); });
    $("category").addEventListener("change", function () { state.cat = $("category").value; state.page = 0; update(); });
    $("hide-dead").addEventListener("change", function () { state.dead = $("hide-dead").checked; state.page = 0; update(); });
    $("hide-dense").addEventListener("change", function () { state.dense = $("hide-dense").checked; state.page = 0; update(); });
    update();
  }
  init();
})();

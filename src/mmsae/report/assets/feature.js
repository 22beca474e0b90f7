// One feature: explanation, scores against baselines, activation histogram, top images with
// heat maps (raw / overlay / mask), top tokens in context, steering examples.
"use strict";
(function () {
  var meta = MMSAE.store.meta;
  var $ = function (id) { return document.getElementById(id); };
  var mode = "overlay";

  function section(title, children) { return el("section", {}, [el("h2", {}, [title])].concat(children)); }

  function kv(obj, keys) {
    return el("table", { class: "kv" }, keys.filter(function (k) { return obj[k] !== undefined && obj[k] !== null; })
      .map(function (k) { return el("tr", {}, [el("th", {}, [k]), el("td", {}, [fmt(obj[k])])]); }));
  }

  function scoresTable(rows) {
    var scorers = [], baselines = ["none"], cells = {};
    rows.forEach(function (r) {
      var b = r.baseline || "none";
      if (scorers.indexOf(r.scorer) < 0) scorers.push(r.scorer);
      if (baselines.indexOf(b) < 0) baselines.push(b);
      (cells[r.scorer] = cells[r.scorer] || {})[b] = r.value;
    });
    var head = el("tr", {}, [el("th", {}, ["score"])].concat(baselines.map(function (b) {
      return el("th", {}, [b === "none" ? "explanation" : "baseline: " + b]);
    })));
    var body = scorers.map(function (s) {
      return el("tr", {}, [el("th", {}, [s])].concat(baselines.map(function (b) {
        var v = cells[s][b];
        return el("td", { class: "num" }, [v === undefined ? "–" : fmt(v)]);
      })));
    });
    return el("table", { class: "rows", id: "scores" }, [el("thead", {}, [head]), el("tbody", {}, body)]);
  }

  function histogram(h) {
    var counts = h.counts || [], edges = h.edges || [];
    var W = 520, H = 160, pad = 28, n = counts.length;
    var max = Math.max.apply(null, counts.concat([1]));
    var logY = max > 50 * (counts.filter(function (c) { return c > 0; }).sort(function (a, b) { return a - b; })[0] || 1);
    var y = function (c) { return c <= 0 ? 0 : (logY ? Math.log10(c + 1) / Math.log10(max + 1) : c / max) * (H - pad); };
    var svg = svgEl("svg", { viewBox: "0 0 " + W + " " + (H + 4), class: "hist", role: "img" });
    var bw = (W - 2 * pad) / Math.max(1, n);
    counts.forEach(function (c, i) {
      var bar = svgEl("rect", { x: pad + i * bw, y: H - pad - y(c) + 4, width: Math.max(1, bw - 1), height: y(c), class: "bar" });
      var tip = svgEl("title", {});
      tip.textContent = fmt(edges[i]) + " – " + fmt(edges[i + 1]) + ": " + c;
      bar.appendChild(tip);
      svg.appendChild(bar);
    });
    svg.appendChild(svgEl("line", { x1: pad, y1: H - pad + 4, x2: W - pad, y2: H - pad + 4, class: "axis" }));
    [[pad, "start", edges[0]], [W - pad, "end", edges[edges.length - 1]]].forEach(function (t) {
      var txt = svgEl("text", { x: t[0], y: H - 8, "text-anchor": t[1], class: "tick" });
      txt.textContent = fmt(t[2]);
      svg.appendChild(txt);
    });
    var label = svgEl("text", { x: W / 2, y: H - 8, "text-anchor": "middle", class: "tick" });
    label.textContent = "activation" + (logY ? " (log count)" : "");
    svg.appendChild(label);
    return svg;
  }

  function images(examples, maskRecord) {
    var hasImages = examples.some(function (e) { return e.raw; });
    var toggle = el("div", { class: "toggle", id: "mode" }, ["raw", "overlay", "mask"].map(function (m) {
      var b = el("button", { type: "button", "data-mode": m, class: m === mode ? "on" : "" }, [m]);
      b.addEventListener("click", function () { mode = m; setMode(); });
      return b;
    }));
    var grid = el("div", { class: "grid", id: "examples" }, examples.map(function (e, i) {
      var img = e.raw ? el("img", { src: e[mode] || e.raw, alt: "top example " + (i + 1), loading: "lazy" }) :
        el("div", { class: "noimg" }, ["no image"]);
      return el("figure", {}, [img, el("figcaption", {}, ["#" + (i + 1) + " · sample " + e.sample_id + " · " + fmt(e.score)])]);
    }));
    function setMode() {
      Array.prototype.forEach.call(toggle.children, function (b) { b.className = b.getAttribute("data-mode") === mode ? "on" : ""; });
      Array.prototype.forEach.call(grid.querySelectorAll("img"), function (img, i) {
        var e = examples[i]; if (e) img.setAttribute("src", e[mode] || e.raw);
      });
    }
    if (maskRecord) {
      toggle.appendChild(el("span", { class: "muted note" }, [
        "mask: activation > " + fmt(maskRecord.threshold) + " (" + (maskRecord.method || "") + " binarisation)"]));
    }
    return hasImages ? [toggle, grid] : [grid];
  }

  function tokens(list) {
    return el("table", { class: "rows tokens" }, list.map(function (t) {
      var ctx = String(t.context || ""), tok = String(t.token || ""), parts;
      if (t.before || t.after) {
        parts = [String(t.before || ""), el("mark", {}, [tok]), String(t.after || "")];
      } else {
        var at = tok ? ctx.lastIndexOf(tok) : -1;
        parts = at >= 0 ? [ctx.slice(0, at), el("mark", {}, [tok]), ctx.slice(at + tok.length)] : [ctx, " ", el("mark", {}, [tok])];
      }
      return el("tr", {}, [el("td", { class: "num" }, [fmt(t.activation)]), el("td", { class: "ctx" }, parts)]);
    }));
  }

  function genericRows(rows) {
    var keys = [];
    rows.forEach(function (r) { Object.keys(r).forEach(function (k) { if (keys.indexOf(k) < 0) keys.push(k); }); });
    return el("div", { class: "scroll" }, [el("table", { class: "rows" }, [
      el("thead", {}, [el("tr", {}, keys.map(function (k) { return el("th", {}, [k]); }))]),
      el("tbody", {}, rows.map(function (r) {
        return el("tr", {}, keys.map(function (k) { return el("td", { class: "text" }, [fmt(r[k])]); }));
      })),
    ])]);
  }

  // rows from mmsae.steer: prompt, interventions, clean and steered outputs side by side
  function steering(rows) {
    if (!rows.every(function (r) { return "clean" in r && "steered" in r; })) return genericRows(rows);
    return el("table", { class: "rows" }, [
      el("thead", {}, [el("tr", {}, ["intervention", "prompt", "clean output", "steered output"].map(function (h) { return el("th", {}, [h]); }))]),
      el("tbody", {}, rows.map(function (r) {
        var how = (r.interventions || []).map(function (iv) {
          return iv.mode + " #" + iv.feature + " = " + fmt(iv.value);
        }).join("; ") + (r.span ? " · span " + r.span : "");
        return el("tr", {}, [el("td", {}, [how]), el("td", { class: "text" }, [String(r.prompt || "")]),
          el("td", { class: "text" }, [String(r.clean || "")]), el("td", { class: "text" }, [String(r.steered || "")])]);
      })),
    ]);
  }

  function render(d) {
    var root = clear($("feature"));
    var row = d.row || {};
    ["prev", "next"].forEach(function (id) {
      if (typeof d[id] === "number") { $(id).setAttribute("href", "#" + d[id]); $(id).className = ""; }
    });
    $("title").textContent = "Feature #" + d.f;
    document.title = "Feature #" + d.f + " · " + meta.title;
    var badges = [];
    if (row.c) badges.push(el("span", { class: "badge" }, [row.c]));
    if (row.d) badges.push(el("span", { class: "badge dead" }, ["dead"]));
    if (row.n) badges.push(el("span", { class: "badge dense" }, ["dense"]));
    root.appendChild(el("div", { class: "badges" }, badges));
    var exp = d.explanation;
    if (exp) {
      root.appendChild(el("blockquote", { id: "explanation" }, [String(exp.explanation || "")]));
      root.appendChild(kv(exp, ["concept", "category", "backend", "model", "prompt_version", "binarization"]));
    } else {
      root.appendChild(el("p", { class: "muted", id: "explanation" }, ["No explanation for this feature."]));
    }
    if (d.scores && d.scores.length) root.appendChild(section("Scores", [scoresTable(d.scores)]));
    if (d.stats) {
      var st = d.stats, kids = [kv(st, ["frequency", "max_activation", "mean_activation", "count"])];
      if (st.quantiles && typeof st.quantiles === "object") {
        kids.push(el("p", { class: "muted" }, ["quantiles over all image patches: " + Object.keys(st.quantiles).map(function (q) {
          return (Number(q) * 100) + "%: " + fmt(st.quantiles[q]);
        }).join(" · ")]));
      }
      if (st.histogram && st.histogram.counts) kids.push(histogram(st.histogram));
      root.appendChild(section("Activations", kids));
    }
    if (d.examples && d.examples.length) root.appendChild(section("Top images", images(d.examples, d.mask)));
    if (d.tokens && d.tokens.length) root.appendChild(section("Top text tokens", [tokens(d.tokens)]));
    if (d.steering && d.steering.length) root.appendChild(section("Steering", [steering(d.steering)]));
    document.body.setAttribute("data-ready", "1");
  }

  function show() {
    var f = parseInt(location.hash.slice(1), 10);
    ["prev", "next"].forEach(function (id) { $(id).className = "hidden"; });
    if (!(f >= 0)) { $("title").textContent = "No feature chosen"; return; }
    MMSAE.load("f/" + f, MMSAE.featureSrc(f)).then(render, function () {
      $("title").textContent = "Feature #" + f;
      clear($("feature")).appendChild(el("p", { class: "muted" }, [
        "This feature has no page: it is dead, beyond --max-features, or not in this run."]));
      document.body.setAttribute("data-ready", "1");
    });
  }
  window.addEventListener("hashchange", function () { document.body.removeAttribute("data-ready"); show(); });
  show();
})();

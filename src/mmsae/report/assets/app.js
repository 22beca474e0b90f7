// Shared by the dashboard pages. Data files are plain scripts that call MMSAE.put(key, value),
// so the site works from file:// with no server. Data only ever reaches the page as text
// (textContent, attribute values via setAttribute on safe attributes): never as markup.
"use strict";
var MMSAE = {
  store: {},
  waiting: {},
  put: function (key, value) {
    this.store[key] = value;
    var cbs = this.waiting[key];
    delete this.waiting[key];
    (cbs || []).forEach(function (cb) { cb.resolve(value); });
  },
  // Load a data file once; resolves with what it put under `key`.
  load: function (key, src) {
    var self = this;
    if (key in self.store) return Promise.resolve(self.store[key]);
    return new Promise(function (resolve, reject) {
      var first = !(key in self.waiting);
      (self.waiting[key] = self.waiting[key] || []).push({ resolve: resolve, reject: reject });
      if (!first) return;
      var s = document.createElement("script");
      s.src = src;
      s.onerror = function () {
        var cbs = self.waiting[key] || [];
        delete self.waiting[key];
        cbs.forEach(function (cb) { cb.reject(new Error("cannot load " + src)); });
      };
      document.head.appendChild(s);
    });
  },
  bucket: function (f) { return String(Math.floor(f / 1000)).padStart(3, "0"); },
  featureSrc: function (f) { return "data/f/" + MMSAE.bucket(f) + "/" + f + ".js"; },
  listSrc: function (i) { return "data/list/" + String(i).padStart(5, "0") + ".js"; },
};

// el("td", {class: "x", href: "..."}, ["text", child]) -- strings become text nodes.
var SAFE_ATTRS = { class: 1, href: 1, src: 1, alt: 1, title: 1, id: 1, type: 1, value: 1, "data-mode": 1, width: 1, height: 1, loading: 1 };
function el(tag, attrs, children) {
  var node = document.createElement(tag);
  Object.keys(attrs || {}).forEach(function (k) {
    if (!SAFE_ATTRS[k]) throw new Error("attribute not allowed: " + k);
    var v = String(attrs[k]);
    // only relative links into this site or in-page anchors
    if ((k === "href" || k === "src") && /^\s*[a-z][a-z0-9+.-]*:/i.test(v)) throw new Error("absolute URL refused: " + v);
    node.setAttribute(k, v);
  });
  (children || []).forEach(function (c) {
    if (c === null || c === undefined) return;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  });
  return node;
}

function svgEl(tag, attrs) {
  var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
  return node;
}

function fmt(v) {
  if (v === null || v === undefined || v === "") return "";
  if (typeof v === "number") {
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

function showMissing(target, meta) {
  var items = (meta.missing || []).concat(meta.problems || []);
  if (!items.length) return;
  target.appendChild(el("details", { class: "missing" }, [
    el("summary", {}, ["Not in this run (" + items.length + ")"]),
    el("ul", {}, items.map(function (m) { return el("li", {}, [m]); })),
  ]));
}

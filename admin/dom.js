// DOM helpers. Every string from the API reaches the page as a text node or an
// attribute value set through setAttribute, never as HTML, so a provider named
// `<script>…` shows as those characters. Style and event-handler attributes are
// refused outright: the Content-Security-Policy forbids them anyway.

const SVG_NS = 'http://www.w3.org/2000/svg';

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'style' || name.startsWith('on')) throw new Error(`refusing attribute ${name}`);
    if (name === 'dataset') {
      for (const [k, v] of Object.entries(value)) el.dataset[k] = String(v);
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

/** Appends children: nodes as they are, strings and numbers as text, arrays flattened. */
export function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
  return el;
}

/** `h('div', {class: 'x'}, 'text', child…)`: an HTML element. */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, same shape as `h`. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function on(el, event, fn) {
  el.addEventListener(event, fn);
  return el;
}

const usdFormat = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD', minimumFractionDigits: 2, maximumFractionDigits: 6 });
const numFormat = new Intl.NumberFormat('en-US', { maximumFractionDigits: 2 });

export function usd(v) {
  return typeof v === 'number' && Number.isFinite(v) ? usdFormat.format(v) : '–';
}
/** Integer micro-USD (the ads API) as dollars. */
export function micros(v) {
  return typeof v === 'number' ? usd(v / 1e6) : '–';
}
export function num(v) {
  return typeof v === 'number' && Number.isFinite(v) ? numFormat.format(v) : '–';
}
export function pct(v) {
  return typeof v === 'number' && Number.isFinite(v) ? `${(v * 100).toFixed(1)}%` : '–';
}
export function ms(v) {
  return typeof v === 'number' && Number.isFinite(v) ? `${Math.round(v)} ms` : '–';
}
export function time(v) {
  return typeof v === 'number' && v > 0 ? new Date(v).toISOString().replace('T', ' ').slice(0, 16) + ' UTC' : '–';
}

/** A table with a header row; `rows` are arrays of cells (strings or nodes). */
export function table(headers, rows, attrs = {}) {
  return h('div', { class: 'table-wrap' },
    h('table', attrs,
      h('thead', {}, h('tr', {}, headers.map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows.length
        ? rows.map((r) => h('tr', r.attrs || {}, (r.cells || r).map((c) => h('td', {}, c))))
        : h('tr', {}, h('td', { colspan: headers.length, class: 'empty' }, 'Nothing yet.')))));
}

/** A labelled form field. */
export function field(label, input, hint) {
  return h('label', { class: 'field' }, h('span', { class: 'label' }, label), input, hint ? h('small', {}, hint) : null);
}

/** A notice box for errors and results. */
export function notice(kind, ...children) {
  return h('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, ...children);
}

/** A stat card. */
export function stat(label, value, attrs = {}) {
  return h('div', { class: 'stat', ...attrs }, h('div', { class: 'stat-label' }, label), h('div', { class: 'stat-value' }, value));
}

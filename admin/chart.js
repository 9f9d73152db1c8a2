// Bar charts over time, drawn as SVG with DOM calls (no library, nothing inline that
// the Content-Security-Policy would block): axes with ticks and titles, a legend, and a
// tooltip that follows the pointer. Series are stacked, or grouped when values can be
// negative (a net balance change). Times are UTC.

import { h, s, clear, on } from './dom.js';

const HEIGHT = 260;
const M = { left: 68, right: 12, top: 14, bottom: 42 };
const HOUR = 3_600_000;

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const nice = norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10;
  return nice * mag;
}

function pad(n) {
  return String(n).padStart(2, '0');
}

/** A bucket's label: long for tooltips, short for the axis. */
export function bucketLabel(t, bucketMs, short = false) {
  const d = new Date(t);
  const date = `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
  if (bucketMs >= 86_400_000) return short ? date.slice(5) : date;
  const hour = `${pad(d.getUTCHours())}:00`;
  if (short) return `${date.slice(5)} ${hour}`;
  return `${date} ${hour}–${pad((d.getUTCHours() + 1) % 24)}:00 UTC`;
}

/** Contiguous bucket starts covering `[from, to)`. */
export function bucketsFor(from, to, bucketMs) {
  const out = [];
  const first = Math.floor(from / bucketMs) * bucketMs;
  for (let t = first; t < to && out.length < 2000; t += bucketMs) out.push(t);
  return out;
}

/**
 * `series`: `[{name, values}]` with one value per bucket. `format` prints a value,
 * `unit` titles the y axis. Returns a figure that draws itself to its width.
 */
export function barChart({ title, unit, buckets, bucketMs = HOUR, series, format = String, grouped = false, id, label }) {
  const labelOf = label || ((t, short) => bucketLabel(t, bucketMs, short));
  const plot = h('div', { class: 'plot' });
  const total = series.reduce((a, sr) => a + sr.values.reduce((x, v) => x + Math.abs(v), 0), 0);
  const figure = h('figure', { class: 'chart', id, dataset: { points: String(total > 0 ? buckets.length : 0) } },
    h('figcaption', {}, title),
    total > 0 ? plot : h('p', { class: 'empty' }, 'No data in this range.'),
    h('ul', { class: 'legend' }, series.map((sr, i) => h('li', {}, h('span', { class: `sw s${i % 8}` }), sr.name))));
  if (total === 0) return figure;
  let lastWidth = 0;
  const ro = new ResizeObserver(() => {
    // A chart replaced by a newer one stops observing (removal reports a 0×0 size).
    if (!plot.isConnected) {
      ro.disconnect();
      return;
    }
    const width = Math.max(280, Math.floor(plot.clientWidth));
    if (width === lastWidth) return;
    lastWidth = width;
    clear(plot).appendChild(draw(width));
  });
  ro.observe(plot);

  function draw(width) {
    const n = buckets.length;
    const pw = width - M.left - M.right;
    const ph = HEIGHT - M.top - M.bottom;
    let lo = 0;
    let hi = 0;
    for (let b = 0; b < n; b++) {
      if (grouped) {
        for (const sr of series) { lo = Math.min(lo, sr.values[b]); hi = Math.max(hi, sr.values[b]); }
      } else {
        let pos = 0;
        let neg = 0;
        for (const sr of series) { if (sr.values[b] >= 0) pos += sr.values[b]; else neg += sr.values[b]; }
        lo = Math.min(lo, neg);
        hi = Math.max(hi, pos);
      }
    }
    if (hi === lo) hi = lo + 1;
    const step = niceStep(hi - lo, 4);
    const y0 = Math.floor(lo / step) * step;
    const y1 = Math.ceil(hi / step) * step;
    const y = (v) => M.top + ph - ((v - y0) / (y1 - y0)) * ph;
    const bw = pw / n;
    const svg = s('svg', { viewBox: `0 0 ${width} ${HEIGHT}`, width, height: HEIGHT, role: 'img', 'aria-label': title });

    const grid = s('g', { class: 'grid' });
    for (let v = y0; v <= y1 + step / 2; v += step) {
      const yy = y(v).toFixed(1);
      grid.append(s('line', { x1: M.left, x2: M.left + pw, y1: yy, y2: yy, class: Math.abs(v) < step / 1e6 ? 'zero' : '' }));
      grid.append(s('text', { x: M.left - 6, y: yy, class: 'tick y', 'text-anchor': 'end', 'dominant-baseline': 'middle' }, format(Math.abs(v) < step / 1e6 ? 0 : v)));
    }
    svg.append(grid);
    svg.append(s('text', { class: 'axis-title', transform: `translate(14 ${M.top + ph / 2}) rotate(-90)`, 'text-anchor': 'middle' }, unit));

    // X labels: as many as fit without overlapping.
    const every = Math.max(1, Math.ceil(80 / bw));
    let shownDay = null;
    const xaxis = s('g', { class: 'xaxis' });
    xaxis.append(s('line', { x1: M.left, x2: M.left + pw, y1: M.top + ph, y2: M.top + ph, class: 'axis' }));
    for (let b = 0; b < n; b += every) {
      const x = M.left + bw * (b + 0.5);
      xaxis.append(s('line', { x1: x, x2: x, y1: M.top + ph, y2: M.top + ph + 4, class: 'axis' }));
      // Hourly labels name the day only where it changes.
      let text = labelOf(buckets[b], true);
      if (!label && bucketMs < 86_400_000) {
        const day = text.slice(0, 5);
        if (day === shownDay) text = text.slice(6);
        shownDay = day;
      }
      xaxis.append(s('text', { x, y: M.top + ph + 16, class: 'tick x', 'text-anchor': 'middle' }, text));
    }
    xaxis.append(s('text', { x: M.left + pw / 2, y: HEIGHT - 4, class: 'axis-title', 'text-anchor': 'middle' }, 'time (UTC)'));
    svg.append(xaxis);

    const bars = s('g', { class: 'bars' });
    for (let b = 0; b < n; b++) {
      let pos = 0;
      let neg = 0;
      series.forEach((sr, i) => {
        const v = sr.values[b];
        if (!v) return;
        let x;
        let w;
        let top;
        let bottom;
        if (grouped) {
          w = (bw * 0.8) / series.length;
          x = M.left + bw * b + bw * 0.1 + w * i;
          top = y(Math.max(0, v));
          bottom = y(Math.min(0, v));
        } else {
          w = Math.max(1, bw * 0.8);
          x = M.left + bw * b + bw * 0.1;
          if (v >= 0) { top = y(pos + v); bottom = y(pos); pos += v; } else { top = y(neg); bottom = y(neg + v); neg += v; }
        }
        bars.append(s('rect', { class: `bar s${i % 8}`, x: x.toFixed(1), y: top.toFixed(1), width: w.toFixed(1), height: Math.max(1, bottom - top).toFixed(1) },
          s('title', {}, `${sr.name}, ${labelOf(buckets[b], false)}: ${format(v)}`)));
      });
    }
    svg.append(bars);

    const highlight = s('rect', { class: 'highlight', x: 0, y: M.top, width: bw, height: ph, visibility: 'hidden' });
    svg.insertBefore(highlight, bars);
    const tip = s('g', { class: 'tooltip', visibility: 'hidden', 'pointer-events': 'none' });
    const tipBox = s('rect', { rx: 4, ry: 4 });
    const tipText = s('text', {});
    tip.append(tipBox, tipText);
    const overlay = s('rect', { class: 'overlay', x: M.left, y: M.top, width: pw, height: ph });
    svg.append(overlay, tip);

    function show(event) {
      const box = svg.getBoundingClientRect();
      const px = ((event.clientX - box.left) / box.width) * width;
      const b = Math.min(n - 1, Math.max(0, Math.floor((px - M.left) / bw)));
      highlight.setAttribute('x', (M.left + bw * b).toFixed(1));
      highlight.setAttribute('visibility', 'visible');
      const lines = [labelOf(buckets[b], false), ...series.map((sr) => `${sr.name}: ${format(sr.values[b])}`)];
      clear(tipText);
      lines.forEach((line, i) => tipText.append(s('tspan', { x: 8, dy: i === 0 ? 16 : 15, class: i === 0 ? 'head' : '' }, line)));
      const tw = Math.max(...lines.map((l) => l.length)) * 6.6 + 16;
      const th = lines.length * 15 + 10;
      tipBox.setAttribute('width', tw.toFixed(0));
      tipBox.setAttribute('height', th);
      let tx = M.left + bw * (b + 1) + 6;
      if (tx + tw > width) tx = Math.max(0, M.left + bw * b - tw - 6);
      tip.setAttribute('transform', `translate(${tx.toFixed(0)} ${M.top + 4})`);
      tip.setAttribute('visibility', 'visible');
      figure.dataset.tooltip = lines.join(' | ');
    }
    function hide() {
      highlight.setAttribute('visibility', 'hidden');
      tip.setAttribute('visibility', 'hidden');
    }
    on(overlay, 'pointermove', show);
    on(overlay, 'pointerdown', show);
    on(overlay, 'pointerleave', hide);
    return svg;
  }
  return figure;
}

// Minimal SVG line charts for reports (no plotting dependency): series of (x, y) points, linear or
// log axes, a legend. Pure: data in, SVG text out. PNG via resvg where wanted.

export interface Series {
  label: string;
  points: Array<[number, number]>;
}
export interface ChartOptions {
  title: string;
  xLabel: string;
  yLabel: string;
  logX?: boolean;
  logY?: boolean;
  width?: number;
  height?: number;
}

const COLORS = [
  '#1f77b4',
  '#d62728',
  '#2ca02c',
  '#9467bd',
  '#ff7f0e',
  '#8c564b',
  '#e377c2',
  '#17becf',
  '#bcbd22',
  '#7f7f7f',
];

function ticks(min: number, max: number, log: boolean): number[] {
  if (log) {
    const out: number[] = [];
    for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++) out.push(10 ** e);
    return out.filter((t) => t >= min / 1.0001 && t <= max * 1.0001);
  }
  const span = max - min || 1;
  const step = 10 ** Math.floor(Math.log10(span / 5));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => span / s <= 6) ?? step * 10;
  const out: number[] = [];
  for (let t = Math.ceil(min / nice) * nice; t <= max + 1e-9; t += nice) out.push(Number(t.toPrecision(6)));
  return out;
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;');
const fmt = (v: number) =>
  Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(0) : String(Number(v.toPrecision(3)));

export function lineChart(series: readonly Series[], o: ChartOptions): string {
  const W = o.width ?? 640;
  const H = o.height ?? 400;
  const m = { l: 70, r: 20, t: 40, b: 55 };
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => (!o.logX || x > 0) && (!o.logY || y > 0));
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (!pts.length) [x0, x1, y0, y1] = [1, 10, 1, 10];
  if (!o.logY) y0 = Math.min(0, y0);
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) y1 = y0 + 1;
  const tx = (v: number) => (o.logX ? Math.log10(v) : v);
  const ty = (v: number) => (o.logY ? Math.log10(v) : v);
  const sx = (v: number) => m.l + ((tx(v) - tx(x0)) / (tx(x1) - tx(x0))) * (W - m.l - m.r);
  const sy = (v: number) => H - m.b - ((ty(v) - ty(y0)) / (ty(y1) - ty(y0))) * (H - m.t - m.b);
  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
  );
  parts.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  parts.push(`<text x="${W / 2}" y="22" text-anchor="middle" font-size="15">${esc(o.title)}</text>`);
  for (const t of ticks(x0, x1, !!o.logX)) {
    parts.push(
      `<line x1="${sx(t)}" y1="${m.t}" x2="${sx(t)}" y2="${H - m.b}" stroke="#eee"/>`,
      `<text x="${sx(t)}" y="${H - m.b + 16}" text-anchor="middle">${fmt(t)}</text>`,
    );
  }
  for (const t of ticks(y0, y1, !!o.logY)) {
    parts.push(
      `<line x1="${m.l}" y1="${sy(t)}" x2="${W - m.r}" y2="${sy(t)}" stroke="#eee"/>`,
      `<text x="${m.l - 6}" y="${sy(t) + 4}" text-anchor="end">${fmt(t)}</text>`,
    );
  }
  parts.push(
    `<rect x="${m.l}" y="${m.t}" width="${W - m.l - m.r}" height="${H - m.t - m.b}" fill="none" stroke="#333"/>`,
  );
  parts.push(`<text x="${W / 2}" y="${H - 12}" text-anchor="middle">${esc(o.xLabel)}</text>`);
  parts.push(
    `<text x="16" y="${H / 2}" text-anchor="middle" transform="rotate(-90 16 ${H / 2})">${esc(o.yLabel)}</text>`,
  );
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length]!;
    const p = s.points.filter(([x, y]) => (!o.logX || x > 0) && (!o.logY || y > 0));
    if (p.length)
      parts.push(
        `<polyline fill="none" stroke="${c}" stroke-width="2" points="${p.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' ')}"/>`,
      );
    for (const [x, y] of p) parts.push(`<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="3" fill="${c}"/>`);
    parts.push(
      `<rect x="${m.l + 10}" y="${m.t + 8 + i * 16}" width="10" height="10" fill="${c}"/>`,
      `<text x="${m.l + 26}" y="${m.t + 17 + i * 16}">${esc(s.label)}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n');
}

/** Renders SVG to PNG with resvg (pure WASM-free native binary shipped in the npm package). */
export async function svgToPng(svg: string): Promise<Buffer> {
  const { Resvg } = await import('@resvg/resvg-js');
  return Buffer.from(new Resvg(svg, { background: 'white', font: { loadSystemFonts: true } }).render().asPng());
}

/**
 * Stacked horizontal bars on a categorical axis: one bar per category, its segments in order (each
 * label one color, a legend), the bar's total at its end. For "where the time goes".
 */
export function stackedBarChart(
  bars: readonly BarGroup[],
  o: { title: string; xLabel: string; width?: number },
): string {
  const W = o.width ?? 760;
  const labels = [...new Set(bars.flatMap((g) => g.values.map((v) => v.label)))];
  const legend = legendLayout(labels, 150, W - 20);
  const rowH = 26;
  const m = { l: 150, r: 60, t: 40, b: 40 + legend.rows * 16 };
  const H = m.t + bars.length * rowH + m.b + 10;
  const xmax = Math.max(1e-9, ...bars.map((g) => g.values.reduce((a, v) => a + Math.max(0, v.value), 0))) * 1.05;
  const sx = (v: number) => m.l + (v / xmax) * (W - m.l - m.r);
  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
  );
  parts.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  parts.push(`<text x="${W / 2}" y="22" text-anchor="middle" font-size="15">${esc(o.title)}</text>`);
  const bottom = m.t + bars.length * rowH;
  for (const t of ticks(0, xmax, false))
    parts.push(
      `<line x1="${sx(t)}" y1="${m.t}" x2="${sx(t)}" y2="${bottom}" stroke="#eee"/>`,
      `<text x="${sx(t)}" y="${bottom + 14}" text-anchor="middle">${fmt(t)}</text>`,
    );
  bars.forEach((g, i) => {
    const y = m.t + i * rowH + 4;
    let acc = 0;
    for (const v of g.values) {
      if (v.value <= 0) continue;
      const c = COLORS[labels.indexOf(v.label) % COLORS.length]!;
      parts.push(
        `<rect x="${sx(acc).toFixed(1)}" y="${y}" width="${(sx(acc + v.value) - sx(acc)).toFixed(1)}" height="${rowH - 8}" fill="${c}"/>`,
      );
      acc += v.value;
    }
    parts.push(
      `<text x="${m.l - 6}" y="${y + rowH / 2}" text-anchor="end">${esc(g.category)}</text>`,
      `<text x="${(sx(acc) + 4).toFixed(1)}" y="${y + rowH / 2}">${fmt(acc)}</text>`,
    );
  });
  parts.push(`<text x="${(m.l + W - m.r) / 2}" y="${bottom + 32}" text-anchor="middle">${esc(o.xLabel)}</text>`);
  labels.forEach((l, i) => {
    const { x, row } = legend.at[i]!;
    const y = bottom + 54 + row * 16;
    parts.push(
      `<rect x="${x}" y="${y - 9}" width="10" height="10" fill="${COLORS[i % COLORS.length]}"/>`,
      `<text x="${x + 14}" y="${y}">${esc(l)}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n');
}

/** Legend entries left to right, wrapped into rows between x `left` and `right` (≈ 7 px per character). */
function legendLayout(
  labels: readonly string[],
  left: number,
  right: number,
): { rows: number; at: Array<{ x: number; row: number }> } {
  const at: Array<{ x: number; row: number }> = [];
  let x = left;
  let row = 0;
  for (const l of labels) {
    const w = 14 + l.length * 7 + 18;
    if (x + w > right && x > left) {
      row++;
      x = left;
    }
    at.push({ x, row });
    x += w;
  }
  return { rows: row + 1, at };
}

export interface BarGroup {
  category: string;
  values: Array<{ label: string; value: number }>;
}

/**
 * Grouped bars on a categorical axis (one group per category, one bar per label, a legend), with an
 * optional horizontal reference line (e.g. 1.0 = unreplicated) and the values written on the bars.
 */
export function barChart(
  groups: readonly BarGroup[],
  o: ChartOptions & { reference?: { value: number; label: string } },
): string {
  const W = o.width ?? 720;
  const labels = [...new Set(groups.flatMap((g) => g.values.map((v) => v.label)))];
  // The legend wraps into rows under the axis label; the chart grows to hold them.
  const legend = legendLayout(labels, 70, W - 20);
  const H = (o.height ?? 400) + (legend.rows - 1) * 16;
  const m = { l: 70, r: 20, t: 40, b: 54 + legend.rows * 16 }; // category names, the axis label, the legend rows
  const ymax = Math.max(o.reference?.value ?? 0, ...groups.flatMap((g) => g.values.map((v) => v.value)), 1e-9) * 1.1;
  const sy = (v: number) => H - m.b - (v / ymax) * (H - m.t - m.b);
  const gw = (W - m.l - m.r) / Math.max(1, groups.length);
  const bw = (gw * 0.8) / Math.max(1, labels.length);
  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
  );
  parts.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  parts.push(`<text x="${W / 2}" y="22" text-anchor="middle" font-size="15">${esc(o.title)}</text>`);
  for (const t of ticks(0, ymax, false)) {
    parts.push(
      `<line x1="${m.l}" y1="${sy(t)}" x2="${W - m.r}" y2="${sy(t)}" stroke="#eee"/>`,
      `<text x="${m.l - 6}" y="${sy(t) + 4}" text-anchor="end">${fmt(t)}</text>`,
    );
  }
  groups.forEach((g, gi) => {
    const x0 = m.l + gi * gw + gw * 0.1;
    g.values.forEach((v) => {
      const li = labels.indexOf(v.label);
      const x = x0 + li * bw;
      const c = COLORS[li % COLORS.length]!;
      parts.push(
        `<rect x="${x.toFixed(1)}" y="${sy(v.value).toFixed(1)}" width="${(bw * 0.9).toFixed(1)}" height="${(sy(0) - sy(v.value)).toFixed(1)}" fill="${c}"/>`,
      );
      // The value on its bar, short enough to fit its width (two decimals below 10, whole numbers above).
      const label = Math.abs(v.value) < 10 ? v.value.toFixed(2) : String(Math.round(v.value));
      if (bw * 0.9 >= label.length * 5)
        parts.push(
          `<text x="${(x + bw * 0.45).toFixed(1)}" y="${(sy(v.value) - 3).toFixed(1)}" text-anchor="middle" font-size="9">${label}</text>`,
        );
    });
    parts.push(
      `<text x="${(m.l + gi * gw + gw / 2).toFixed(1)}" y="${H - m.b + 16}" text-anchor="middle">${esc(g.category)}</text>`,
    );
  });
  if (o.reference) {
    parts.push(
      `<line x1="${m.l}" y1="${sy(o.reference.value)}" x2="${W - m.r}" y2="${sy(o.reference.value)}" stroke="#333" stroke-dasharray="6 4"/>`,
    );
    parts.push(
      `<text x="${W - m.r - 4}" y="${sy(o.reference.value) - 4}" text-anchor="end">${esc(o.reference.label)}</text>`,
    );
  }
  parts.push(
    `<rect x="${m.l}" y="${m.t}" width="${W - m.l - m.r}" height="${H - m.t - m.b}" fill="none" stroke="#333"/>`,
  );
  parts.push(`<text x="${W / 2}" y="${H - m.b + 34}" text-anchor="middle">${esc(o.xLabel)}</text>`);
  parts.push(
    `<text x="16" y="${H / 2}" text-anchor="middle" transform="rotate(-90 16 ${H / 2})">${esc(o.yLabel)}</text>`,
  );
  labels.forEach((l, i) => {
    const { x, row } = legend.at[i]!;
    const y = H - m.b + 56 + row * 16;
    parts.push(
      `<rect x="${x}" y="${y - 9}" width="10" height="10" fill="${COLORS[i % COLORS.length]}"/>`,
      `<text x="${x + 14}" y="${y}">${esc(l)}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n');
}

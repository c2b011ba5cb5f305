// A small line chart on <canvas>: time on x, values from 0 on y, one line per series, a gap where a value is null.
// Colours come from the stylesheet (--series-N, --grid, --muted), so charts follow the light or dark theme.

const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

export function seriesColor(index) {
  return css(`--series-${(index % 6) + 1}`) || '#3b5bdb';
}

/** 0 = y0 < y1 < ...: about `count` round steps (1, 2 or 5 × 10^n) from 0 to at least `max`. */
export function niceTicks(max, count = 4) {
  const top = max > 0 && Number.isFinite(max) ? max : 1;
  const rough = top / count;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough) ?? 10 * power;
  const ticks = [];
  for (let value = 0; value < top + step * 0.999; value += step) ticks.push(Number(value.toPrecision(12)));
  return ticks;
}

export class LineChart {
  /** `format` writes a y value for the axis; the legend element (if any) lists the series and their last value. */
  constructor(canvas, { format = (value) => String(value), legend = null } = {}) {
    this.canvas = canvas;
    this.format = format;
    this.legend = legend;
    this.series = [];
    this.range = [0, 1];
    new ResizeObserver(() => this.draw()).observe(canvas);
    matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => this.draw());
  }

  /** `series`: [{name, points: [[t seconds, value or null], ...]}]; `range`: [t0, t1] of the x axis. */
  update(series, range) {
    this.series = series;
    this.range = range;
    this.draw();
    this.drawLegend();
  }

  drawLegend() {
    if (!this.legend) return;
    this.legend.replaceChildren(...this.series.map((line, index) => {
      const last = [...line.points].reverse().find(([, value]) => value !== null);
      const key = document.createElement('span');
      key.className = 'key';
      key.style.setProperty('--key', seriesColor(index));
      key.textContent = `${line.name}: ${last ? this.format(last[1]) : '–'}`;
      return key;
    }));
  }

  draw() {
    const { canvas } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const g = canvas.getContext('2d');
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = '11px system-ui, sans-serif';

    const values = this.series.flatMap((line) => line.points.map(([, value]) => value)).filter((v) => v !== null && Number.isFinite(v));
    const ticks = niceTicks(Math.max(0, ...values));
    const top = ticks[ticks.length - 1];
    const left = Math.max(...ticks.map((tick) => g.measureText(this.format(tick)).width)) + 10;
    const plot = { x: left, y: 8, w: Math.max(10, width - left - 10), h: Math.max(10, height - 30) };
    const [t0, t1] = this.range;
    const x = (t) => plot.x + ((t - t0) / (t1 - t0 || 1)) * plot.w;
    const y = (v) => plot.y + plot.h - (v / top) * plot.h;

    g.strokeStyle = css('--grid');
    g.fillStyle = css('--muted');
    g.lineWidth = 1;
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    for (const tick of ticks) {
      const ty = Math.round(y(tick)) + 0.5;
      g.beginPath();
      g.moveTo(plot.x, ty);
      g.lineTo(plot.x + plot.w, ty);
      g.stroke();
      g.fillText(this.format(tick), plot.x - 6, ty);
    }
    g.textAlign = 'center';
    g.textBaseline = 'top';
    const step = [10, 15, 30, 60, 120].find((s) => (t1 - t0) / s <= 6) ?? 300;
    for (let ago = 0; ago <= t1 - t0; ago += step) {
      const label = ago === 0 ? 'now' : ago % 60 ? `−${ago} s` : `−${ago / 60} min`;
      const half = g.measureText(label).width / 2;
      const tx = Math.min(x(t1 - ago), plot.x + plot.w - half);
      if (tx - half >= plot.x - 4) g.fillText(label, tx, plot.y + plot.h + 6);
    }

    let drawn = 0;
    this.series.forEach((line, index) => {
      g.strokeStyle = seriesColor(index);
      g.fillStyle = g.strokeStyle;
      g.lineWidth = 2;
      g.lineJoin = 'round';
      g.beginPath();
      let pen = false;
      let previous = null;
      for (const [t, value] of line.points) {
        if (value === null || !Number.isFinite(value) || t < t0) {
          if (pen && previous) g.fillRect(x(previous[0]) - 1.5, y(previous[1]) - 1.5, 3, 3);
          pen = false;
          previous = null;
          continue;
        }
        if (pen) g.lineTo(x(t), y(value));
        else g.moveTo(x(t), y(value));
        pen = true;
        previous = [t, value];
        drawn += 1;
      }
      g.stroke();
      if (previous) g.fillRect(x(previous[0]) - 1.5, y(previous[1]) - 1.5, 3, 3);
    });
    canvas.dataset.series = String(this.series.length);
    canvas.dataset.points = String(drawn);
    canvas.dataset.samples = String(Math.max(0, ...this.series.map((line) => line.points.length)));
    canvas.dataset.max = String(Math.max(0, ...values));
  }
}

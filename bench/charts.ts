/**
 * The bench's figures as SVG charts for docs/performance.md, drawn by Vega from bench/results.json:
 * CPU per request by route (ours beside the peer's), claim and lookup latency against table size,
 * and `first` requests before, during and after a purge. `npm run bench` calls `writeCharts()` at
 * its end; `npm run bench:charts` redraws them from the committed results.json.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import * as vega from 'vega';
import { PROJECT_ROOT } from './bench-config.js';

interface CpuPerRequest {
  readonly app_ms: number;
  readonly runner_ms: number;
  readonly postgres_ms: number;
  readonly redis_ms: number;
  readonly other_ms: number;
}

interface RouteFigures {
  readonly rps: number;
  readonly p50_ms: number;
  readonly p99_ms: number;
  readonly cpu_ms_per_req: CpuPerRequest;
}

interface Latency {
  readonly p50_ms: number;
  readonly p99_ms: number;
}

interface GrowthPoint {
  readonly rows: number;
  readonly claim_new: Latency;
  readonly claim_existing: Latency;
  readonly select_by_pk: Latency;
}

interface LoadFigures {
  readonly rps: number;
  readonly p50_ms: number;
  readonly p99_ms: number;
}

interface PurgeFigures {
  readonly deleted: number;
  readonly rows_per_s: number;
  readonly first_without_purge: LoadFigures;
  readonly first_during_purge: LoadFigures;
  readonly first_after_purge: LoadFigures;
}

interface DatabaseResults {
  readonly routes: Readonly<Record<string, RouteFigures | undefined>>;
  readonly growth?: { readonly points: readonly GrowthPoint[] } | null;
  readonly purge?: PurgeFigures | null;
}

type Results = Readonly<Record<string, DatabaseResults | undefined>>;

/** The routes of the CPU chart, in order: ours on PostgreSQL, on our Redis store, then the peer's. */
const CPU_ROUTES: readonly { readonly route: string; readonly label: string }[] = [
  { route: 'plain', label: 'plain, no @Idempotent() (PostgreSQL app)' },
  { route: 'first', label: 'ours, PostgreSQL: fresh key' },
  { route: 'replay', label: 'ours, PostgreSQL: completed key' },
  { route: 'redis_plain', label: 'plain (our Redis app)' },
  { route: 'redis_first', label: 'ours, Redis store: fresh key' },
  { route: 'redis_replay', label: 'ours, Redis store: completed key' },
  { route: 'peer_redis_plain', label: 'plain (peer app, NestJS 10)' },
  { route: 'peer_redis', label: 'peer on Redis: fresh key' },
  { route: 'peer_redis_replay', label: 'peer on Redis: completed key' },
];

const CPU_PARTS: readonly { readonly field: keyof CpuPerRequest; readonly label: string }[] = [
  { field: 'app_ms', label: 'app process' },
  { field: 'postgres_ms', label: 'PostgreSQL' },
  { field: 'redis_ms', label: 'Redis' },
  { field: 'runner_ms', label: 'load generator' },
  { field: 'other_ms', label: 'other' },
];

const FONT = 'Helvetica, Arial, sans-serif';

const CONFIG: Pick<vega.Spec, 'background' | 'padding' | 'config'> = {
  background: 'white',
  padding: 8,
  config: {
    text: { font: FONT },
    axis: { labelFont: FONT, titleFont: FONT, labelFontSize: 11, titleFontSize: 12 },
    legend: { labelFont: FONT, titleFont: FONT, labelFontSize: 11, titleFontSize: 12 },
    title: { font: FONT, fontSize: 14, anchor: 'start' },
  },
};

/** A stacked horizontal bar per route: the CPU milliseconds each process spent per request. */
function cpuSpec(results: Results): vega.Spec | null {
  const routes = results.postgres?.routes;
  if (!routes) return null;
  const values = CPU_ROUTES.flatMap(({ route, label }, order) => {
    const figures = routes[route];
    if (!figures) return [];
    return CPU_PARTS.map(({ field, label: part }, partOrder) => ({
      route: label,
      order,
      part,
      partOrder,
      ms: figures.cpu_ms_per_req[field],
    }));
  });
  if (values.length === 0) return null;
  return {
    ...CONFIG,
    width: 520,
    height: 26 * CPU_ROUTES.length,
    title: { text: 'CPU per request, by route (ms, 20 connections)' },
    data: [
      {
        name: 'cpu',
        values,
        transform: [
          { type: 'stack', groupby: ['route'], field: 'ms', sort: { field: 'partOrder' } },
        ],
      },
    ],
    scales: [
      {
        name: 'y',
        type: 'band',
        domain: { data: 'cpu', field: 'route', sort: { field: 'order', op: 'min' } },
        range: 'height',
        padding: 0.2,
      },
      {
        name: 'x',
        type: 'linear',
        domain: { data: 'cpu', field: 'y1' },
        range: 'width',
        nice: true,
        zero: true,
      },
      {
        name: 'color',
        type: 'ordinal',
        domain: CPU_PARTS.map(({ label }) => label),
        range: ['#4c78a8', '#f58518', '#e45756', '#72b7b2', '#bab0ac'],
      },
    ],
    axes: [
      { orient: 'bottom', scale: 'x', title: 'CPU ms per request', grid: true },
      { orient: 'left', scale: 'y', labelLimit: 400 },
    ],
    legends: [{ fill: 'color', orient: 'bottom', direction: 'horizontal', title: 'spent in' }],
    marks: [
      {
        type: 'rect',
        from: { data: 'cpu' },
        encode: {
          enter: {
            y: { scale: 'y', field: 'route' },
            height: { scale: 'y', band: 1 },
            x: { scale: 'x', field: 'y0' },
            x2: { scale: 'x', field: 'y1' },
            fill: { scale: 'color', field: 'part' },
          },
        },
      },
    ],
  };
}

/** p50 latency of the claim (new and existing key) and of a lookup, against the table's rows. */
function growthSpec(results: Results): vega.Spec | null {
  const values = (['postgres', 'pglite'] as const).flatMap((database) =>
    (results[database]?.growth?.points ?? []).flatMap((point) =>
      (
        [
          ['claim, new key', point.claim_new],
          ['claim, existing key', point.claim_existing],
          ['lookup by primary key', point.select_by_pk],
        ] as const
      ).map(([statement, latency]) => ({
        series: `${database === 'postgres' ? 'PostgreSQL' : 'PGlite'}: ${statement}`,
        rows: point.rows,
        p50: latency.p50_ms,
      })),
    ),
  );
  if (values.length === 0) return null;
  return {
    ...CONFIG,
    width: 520,
    height: 260,
    title: { text: 'Claim and lookup latency against table size (p50, ms)' },
    data: [{ name: 'growth', values }],
    scales: [
      {
        name: 'x',
        type: 'log',
        domain: { data: 'growth', field: 'rows' },
        range: 'width',
        nice: true,
      },
      {
        name: 'y',
        type: 'linear',
        domain: { data: 'growth', field: 'p50' },
        range: 'height',
        nice: true,
        zero: true,
      },
      {
        name: 'color',
        type: 'ordinal',
        domain: { data: 'growth', field: 'series' },
        range: 'category',
      },
    ],
    axes: [
      {
        orient: 'bottom',
        scale: 'x',
        title: 'rows in the table (log scale)',
        grid: true,
        format: '~s',
        values: [...new Set(values.map(({ rows }) => rows))],
      },
      { orient: 'left', scale: 'y', title: 'p50 ms', grid: true },
    ],
    legends: [
      {
        stroke: 'color',
        fill: 'color',
        orient: 'bottom',
        direction: 'vertical',
        columns: 2,
        labelLimit: 400,
        title: 'statement',
      },
    ],
    marks: [
      {
        type: 'group',
        from: { facet: { name: 'line', data: 'growth', groupby: 'series' } },
        marks: [
          {
            type: 'line',
            from: { data: 'line' },
            sort: { field: 'datum.rows' },
            encode: {
              enter: {
                x: { scale: 'x', field: 'rows' },
                y: { scale: 'y', field: 'p50' },
                stroke: { scale: 'color', field: 'series' },
                strokeWidth: { value: 2 },
              },
            },
          },
          {
            type: 'symbol',
            from: { data: 'line' },
            encode: {
              enter: {
                x: { scale: 'x', field: 'rows' },
                y: { scale: 'y', field: 'p50' },
                fill: { scale: 'color', field: 'series' },
                size: { value: 40 },
              },
            },
          },
        ],
      },
    ],
  };
}

/** `first` requests (req/s and p50/p99) before, during and after a purge of expired rows. */
function purgeSpec(results: Results): vega.Spec | null {
  const purge = results.postgres?.purge;
  if (!purge) return null;
  const phases = [
    ['before', purge.first_without_purge],
    ['during', purge.first_during_purge],
    ['after', purge.first_after_purge],
  ] as const;
  const latency = phases.flatMap(([phase, load], order) => [
    { phase, order, measure: 'p50', ms: load.p50_ms },
    { phase, order, measure: 'p99', ms: load.p99_ms },
  ]);
  const throughput = phases.map(([phase, load], order) => ({
    phase,
    order,
    rps: Math.round(load.rps),
  }));
  const title = `First requests while ${purge.deleted.toLocaleString('en')} expired rows are purged (${purge.rows_per_s.toLocaleString('en')} rows/s)`;
  return {
    ...CONFIG,
    width: 420,
    height: 220,
    title: {
      text: title,
      subtitle: 'latency of first requests (bars) and their rate (above the bars)',
      offset: 18,
    },
    data: [
      { name: 'latency', values: latency },
      { name: 'throughput', values: throughput },
    ],
    scales: [
      {
        name: 'x',
        type: 'band',
        domain: phases.map(([phase]) => phase),
        range: 'width',
        padding: 0.25,
      },
      {
        name: 'inner',
        type: 'band',
        domain: ['p50', 'p99'],
        range: { signal: "[0, bandwidth('x')]" },
        padding: 0.08,
      },
      {
        name: 'y',
        type: 'linear',
        domain: { data: 'latency', field: 'ms' },
        range: 'height',
        nice: true,
        zero: true,
      },
      { name: 'color', type: 'ordinal', domain: ['p50', 'p99'], range: ['#4c78a8', '#f58518'] },
    ],
    axes: [
      { orient: 'bottom', scale: 'x', title: 'the purge' },
      { orient: 'left', scale: 'y', title: 'ms', grid: true },
    ],
    legends: [{ fill: 'color', title: 'latency', orient: 'right' }],
    marks: [
      {
        type: 'rect',
        from: { data: 'latency' },
        encode: {
          enter: {
            x: { signal: "scale('x', datum.phase) + scale('inner', datum.measure)" },
            width: { scale: 'inner', band: 1 },
            y: { scale: 'y', field: 'ms' },
            y2: { scale: 'y', value: 0 },
            fill: { scale: 'color', field: 'measure' },
          },
        },
      },
      {
        type: 'text',
        from: { data: 'latency' },
        encode: {
          enter: {
            x: {
              signal:
                "scale('x', datum.phase) + scale('inner', datum.measure) + bandwidth('inner') / 2",
            },
            y: { scale: 'y', field: 'ms', offset: -3 },
            text: { signal: "datum.ms + ' ms'" },
            align: { value: 'center' },
            baseline: { value: 'bottom' },
            fontSize: { value: 10 },
          },
        },
      },
      {
        type: 'text',
        from: { data: 'throughput' },
        encode: {
          enter: {
            x: { scale: 'x', field: 'phase', band: 0.5 },
            y: { value: -4 },
            text: { signal: "format(datum.rps, ',') + ' req/s'" },
            align: { value: 'center' },
            baseline: { value: 'bottom' },
            fontSize: { value: 11 },
            fontWeight: { value: 'bold' },
          },
        },
      },
    ],
  };
}

async function render(spec: vega.Spec): Promise<string> {
  const view = new vega.View(vega.parse(spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/**
 * Draws the charts of `resultsPath` (bench/results.json) into `outDir` (docs/images/); a chart whose
 * figures are missing (a part of the bench skipped) is left as it was. Returns the files written.
 */
export async function writeCharts(
  resultsPath = join(PROJECT_ROOT, 'bench', 'results.json'),
  outDir = join(PROJECT_ROOT, 'docs', 'images'),
): Promise<string[]> {
  const results = JSON.parse(readFileSync(resultsPath, 'utf8')) as Results;
  mkdirSync(outDir, { recursive: true });
  const written: string[] = [];
  const charts: readonly [string, vega.Spec | null][] = [
    ['bench-cpu-per-request.svg', cpuSpec(results)],
    ['bench-table-size.svg', growthSpec(results)],
    ['bench-purge-under-load.svg', purgeSpec(results)],
  ];
  for (const [file, spec] of charts) {
    if (!spec) continue;
    const path = join(outDir, file);
    writeFileSync(path, (await render(spec)) + '\n');
    written.push(path);
  }
  console.log(
    `[bench] charts: ${written.map((path) => path.slice(PROJECT_ROOT.length)).join(', ')}`,
  );
  return written;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) await writeCharts();

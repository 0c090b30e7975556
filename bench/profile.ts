import { writeFileSync } from 'node:fs';
import type { Profiler } from 'node:inspector';
import { join } from 'node:path';
import { BENCH_CONFIG, ROUTES } from './bench-config.js';
import { runLoad, type KeyPlan } from './load.js';
import type { QueryCounts } from './query-counter.js';
import type { Target } from './route-rounds.js';
import { round } from './stats.js';

/** Where the app's CPU went, per request, by the code that spent it. */
export type CategoryTimes = Record<string, number>;

export interface ProfileSummary {
  readonly target: string;
  /** ms of CPU per request, by category, for `plain` and for `first`/`replay`. */
  readonly plain: CategoryTimes;
  readonly first: CategoryTimes;
  readonly replay: CategoryTimes;
  /** The library's own functions with the most self time per `first` request, in µs. */
  readonly libraryTop: { readonly fn: string; readonly us_per_req: number }[];
  /**
   * Under this load (not one request at a time): statements per request, and rows per statement
   * of the batched ones, on `first` and `replay` — how much concurrent requests share statements.
   */
  readonly underLoad: Record<
    'plain' | 'first' | 'replay',
    {
      readonly rps: number;
      readonly statements_per_req: number;
      readonly rows_per_batch: number | null;
    }
  >;
}

/** Categories, by the script a function comes from (first match wins). */
const CATEGORIES: readonly [string, (url: string, fn: string) => boolean][] = [
  ['GC', (_url, fn) => fn === '(garbage collector)'],
  ['idle', (_url, fn) => fn === '(idle)'],
  ['nestjs-idempotency', (url) => url.includes('/dist/lib/')],
  ['@nestjs', (url) => url.includes('/node_modules/@nestjs/')],
  [
    'express & body parsing',
    (url) =>
      /\/node_modules\/(express|router|body-parser|raw-body|iconv-lite|qs|finalhandler|send|on-finished|type-is|content-type|mime)/.test(
        url,
      ),
  ],
  ['typeorm', (url) => url.includes('/node_modules/typeorm/')],
  ['pg driver', (url) => /\/node_modules\/(pg|pg-protocol|pg-pool|pg-types)\//.test(url)],
  ['pglite', (url) => url.includes('pglite')],
  ['ioredis', (url) => /\/node_modules\/(ioredis|redis-parser|@ioredis)\//.test(url)],
  ['rxjs', (url) => url.includes('/node_modules/rxjs/')],
  [
    'node: http, net, streams',
    (url) => /^node:(_http|http|net|stream|internal\/(streams|http|stream_base|net))/.test(url),
  ],
  ['node: other', (url) => url.startsWith('node:')],
  ['(program, native)', (url) => url === ''],
  ['other', () => true],
];

function categoryOf(node: Profiler.ProfileNode): string {
  const { url, functionName } = node.callFrame;
  return CATEGORIES.find(([, matches]) => matches(url, functionName))![0];
}

/** Self time per node id, µs. */
function selfTimes(profile: Profiler.Profile): Map<number, number> {
  const times = new Map<number, number>();
  const samples = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  for (let i = 0; i < samples.length; i++)
    times.set(samples[i], (times.get(samples[i]) ?? 0) + (deltas[i] ?? 0));
  return times;
}

function byCategory(profile: Profiler.Profile, requests: number): CategoryTimes {
  const times = selfTimes(profile);
  const totals: CategoryTimes = {};
  for (const node of profile.nodes) {
    const us = times.get(node.id) ?? 0;
    if (us === 0) continue;
    const category = categoryOf(node);
    totals[category] = (totals[category] ?? 0) + us;
  }
  return Object.fromEntries(
    Object.entries(totals).map(([category, us]) => [category, round(us / 1000 / requests, 4)]),
  );
}

function libraryTop(
  profile: Profiler.Profile,
  requests: number,
  count = 12,
): ProfileSummary['libraryTop'] {
  const times = selfTimes(profile);
  const byFunction = new Map<string, number>();
  for (const node of profile.nodes) {
    if (!node.callFrame.url.includes('/dist/lib/')) continue;
    const file = node.callFrame.url.split('/dist/lib/')[1];
    const name = `${node.callFrame.functionName || '(anonymous)'} (${file}:${node.callFrame.lineNumber + 1})`;
    byFunction.set(name, (byFunction.get(name) ?? 0) + (times.get(node.id) ?? 0));
  }
  return [...byFunction.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, count)
    .map(([fn, us]) => ({ fn, us_per_req: round(us / requests, 1) }));
}

/** Loads one route for `durationS` with the app's CPU profiler on; returns the profile and the requests. */
async function profiledLoad(target: Target, path: string, keys: KeyPlan, durationS: number) {
  await target.app.command('queries-reset');
  await target.app.command('profile-start');
  const result = await runLoad({
    port: target.app.port,
    path,
    keys,
    connections: BENCH_CONFIG.connections,
    durationS,
  });
  const profile = await target.app.command<Profiler.Profile>('profile-stop');
  const counts = await target.app.command<QueryCounts>('queries-read');
  // BENCH_PROFILE_DIR=dir keeps each profile (open it in Chrome DevTools, Performance tab).
  const dir = process.env.BENCH_PROFILE_DIR;
  if (dir)
    writeFileSync(
      join(dir, `${target.name}-${path.replaceAll('/', '_')}-${keys.kind}.cpuprofile`),
      JSON.stringify(profile),
    );
  const underLoad = {
    rps: round(result.rps, 0),
    statements_per_req: round(counts.typeorm / Math.max(1, result.requests), 2),
    rows_per_batch: counts.batches > 0 ? round(counts.batchRows / counts.batches, 1) : null,
  };
  return { profile, requests: result.requests, underLoad };
}

/**
 * Where the app's CPU per request goes on `plain`, `first` and `replay`, by category, from V8 CPU
 * profiles of the running app (the profiler is on only while each route is loaded). The profiler
 * slows the app down, so the absolute figures are higher than in the rounds; the differences
 * between routes are what it is for.
 */
export async function profileTarget(target: Target, durationS = 5): Promise<ProfileSummary> {
  const plain = await profiledLoad(target, ROUTES.plain, { kind: 'none' }, durationS);
  const first = await profiledLoad(
    target,
    ROUTES.idempotent,
    { kind: 'fresh', prefix: `profile-${Date.now()}` },
    durationS,
  );
  const replay = await profiledLoad(
    target,
    ROUTES.idempotent,
    { kind: 'cycle', keys: target.replayKeys },
    durationS,
  );
  return {
    target: target.name,
    plain: byCategory(plain.profile, plain.requests),
    first: byCategory(first.profile, first.requests),
    replay: byCategory(replay.profile, replay.requests),
    libraryTop: libraryTop(first.profile, first.requests),
    underLoad: { plain: plain.underLoad, first: first.underLoad, replay: replay.underLoad },
  };
}

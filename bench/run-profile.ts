/**
 * `npm run bench:profile`: where our app's CPU per request goes, by category (the library, Nest,
 * Express, TypeORM, the driver, …), on `plain`, `first` and `replay`, for the PostgreSQL, Redis and
 * PGlite apps. The same phase runs inside `npm run bench`; this runs it alone, in about a minute.
 */
import { BENCH_CONFIG } from './bench-config.js';
import { detectServices, dropSchema, resetSchema } from './environment.js';
import { profileTable } from './report-markdown.js';
import { profileTarget, type ProfileSummary } from './profile.js';
import { startTargets } from './route-rounds.js';

const log = (line: string) => console.log(`[profile] ${line}`);
const services = await detectServices();
if (services.postgres) await resetSchema(BENCH_CONFIG.schema);
const targets = await startTargets({ ...services, peer: false }, log);
const summaries: ProfileSummary[] = [];
try {
  for (const target of targets) {
    log(`profiling ${target.name}`);
    summaries.push(await profileTarget(target));
  }
} finally {
  for (const target of targets) await target.app.stop().catch(() => undefined);
  if (services.postgres) await dropSchema(BENCH_CONFIG.schema);
}
console.log(profileTable(summaries));
process.exit(0);

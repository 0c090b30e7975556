#!/usr/bin/env node
import { Logger, type LoggerService } from '@nestjs/common';
import { userInfo } from 'node:os';
import { parseArgs } from 'node:util';
import {
  IdempotencyAdmin,
  IdempotencyAdminRefusal,
  type AdminRecord,
} from './idempotency-admin.service.js';
import { openAdminStore, type AdminStoreConnection } from './admin-store.js';
import { ResponseSealer } from '../security/response-sealer.js';
import { toMilliseconds } from '../utils/duration.js';

/**
 * `npx nestjs-idempotency <command> [options]`: the operator's controls (see `IdempotencyAdmin`)
 * against the records in a database or Redis. Exit code 0 when done, 1 when refused (no such
 * record, ambiguous, wrong state, changed meanwhile) or the store cannot be reached, 2 for a usage
 * error. Results go to stdout, the audit log to stderr.
 */

const USAGE = `Usage: nestjs-idempotency <command> [options]

Commands:
  inspect <key>          every record with this key (under every scope and endpoint): state,
                         scope, endpoint, created / locked-until / expires, status, fingerprint
  list                   records, oldest claim first (e.g. --in-progress --older-than 5m)
  release <key>          delete an in-progress record whose process is gone: the next request
                         with the key runs the handler; a handler still running has its result refused
  forget <key>           delete a completed record (a wrong stored response): the next request
                         with the key runs the handler, in every process

Options:
      --url <url>        postgres://…, mysql://… or mariadb://…, sqlite:<file>, pglite:<dir>,
                         redis://… or rediss://… (default: $IDEMPOTENCY_STORE_URL, else
                         $DATABASE_URL)
      --table <name>     the records table (default idempotency_records)
      --schema <name>    its PostgreSQL schema (default: the connection's search_path)
      --prefix <prefix>  the Redis store's key prefix (default idempotency:)
      --scope <scope>    release, forget, inspect: only under this scope ('' for unscoped keys)
      --endpoint <e>     only on this endpoint, e.g. "POST /orders"
      --body             inspect: print the stored headers and body (a sealed body is opened only
                         with --encryption-key-env)
      --encryption-key-env <NAME>
                         the name of an environment variable holding an encryption key of the
                         app (repeatable); never the key itself on the command line
      --in-progress      list: only records in progress
      --completed        list: only completed records
      --older-than <d>   list: only records claimed at least this long ago (30s, 5m, 2h, 1d)
      --limit <n>        list: at most n records (default 100)
      --actor <who>      who asks, for the audit log (default: the OS user)
      --json             print the records as JSON
  -h, --help             this text

release and forget need exactly one record: when the key exists under several scopes or
endpoints they refuse and list them; give --scope and --endpoint.
`;

const COMMANDS = ['inspect', 'list', 'release', 'forget'] as const;
type Command = (typeof COMMANDS)[number];

async function main(argv: readonly string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...argv],
      allowPositionals: true,
      options: {
        url: { type: 'string' },
        table: { type: 'string' },
        schema: { type: 'string' },
        prefix: { type: 'string' },
        scope: { type: 'string' },
        endpoint: { type: 'string' },
        body: { type: 'boolean' },
        'encryption-key-env': { type: 'string', multiple: true },
        'in-progress': { type: 'boolean' },
        completed: { type: 'boolean' },
        'older-than': { type: 'string' },
        limit: { type: 'string' },
        actor: { type: 'string' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (error) {
    return usage((error as Error).message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const [command, ...rest] = positionals;
  if (!COMMANDS.includes(command as Command))
    return usage(command ? `unknown command: ${command}` : 'expected a command');
  const wantsKey = command !== 'list';
  if (rest.length !== (wantsKey ? 1 : 0))
    return usage(wantsKey ? `${command} takes exactly one <key>` : 'list takes no key');
  const url = values.url ?? process.env.IDEMPOTENCY_STORE_URL ?? process.env.DATABASE_URL;
  if (!url) return usage('no store: give --url (or set IDEMPOTENCY_STORE_URL)');
  if (values['in-progress'] && values.completed)
    return usage('--in-progress and --completed exclude each other');
  const limit = values.limit === undefined ? undefined : Number(values.limit);
  if (limit !== undefined && !(Number.isInteger(limit) && limit > 0))
    return usage('--limit must be a positive whole number');
  const olderThan = values['older-than'];
  if (olderThan !== undefined) {
    if (!/^\d+(\.\d+)?\s*(ms|s|m|h|d)$/.test(olderThan))
      return usage('--older-than is a duration such as 30s, 5m, 2h or 1d');
    try {
      toMilliseconds(olderThan, '--older-than');
    } catch (error) {
      return usage((error as Error).message);
    }
  }
  let sealer: ResponseSealer | undefined;
  const keyNames = values['encryption-key-env'] ?? [];
  if (keyNames.length > 0) {
    const missing = keyNames.filter((name) => !process.env[name]);
    if (missing.length) return usage(`environment variable(s) not set: ${missing.join(', ')}`);
    try {
      sealer = new ResponseSealer({ keys: keyNames.map((name) => process.env[name]!) });
    } catch (error) {
      return usage((error as Error).message);
    }
  }
  const actor = values.actor ?? osUser();

  Logger.overrideLogger(stderrLogger);
  let connection: AdminStoreConnection;
  try {
    connection = await openAdminStore(url, {
      table: values.table,
      schema: values.schema,
      prefix: values.prefix,
    });
  } catch (error) {
    process.stderr.write(
      `nestjs-idempotency: cannot open the store at ${redacted(url)}: ${(error as Error).message}\n`,
    );
    return 1;
  }
  try {
    const admin = new IdempotencyAdmin(connection.store, { replayCache: undefined, sealer });
    const selector = { actor, scope: values.scope, endpoint: values.endpoint };
    const key = rest[0];
    let records: AdminRecord[];
    let summary: string;
    switch (command as Command) {
      case 'inspect':
        records = await admin.inspect(key, { ...selector, body: values.body });
        summary = `${records.length} record(s) with this key`;
        break;
      case 'list':
        records = await admin.list({
          actor,
          state: values['in-progress'] ? 'in_progress' : values.completed ? 'completed' : undefined,
          endpoint: values.endpoint,
          olderThan,
          limit,
        });
        summary = `${records.length} record(s)`;
        break;
      case 'release':
        records = [await admin.release(key, selector)];
        summary = 'released: the next request with this key runs the handler';
        break;
      case 'forget':
        records = [await admin.forget(key, selector)];
        summary = 'forgotten: the next request with this key runs the handler';
        break;
    }
    process.stdout.write(
      values.json ? `${JSON.stringify(records.map(forJson), null, 2)}\n` : format(records, summary),
    );
    return command === 'inspect' && records.length === 0 ? 1 : 0;
  } catch (error) {
    if (error instanceof IdempotencyAdminRefusal) {
      process.stderr.write(`nestjs-idempotency: ${command} refused: ${error.message}\n`);
      if (error.records.length)
        process.stdout.write(
          values.json
            ? `${JSON.stringify(error.records.map(forJson), null, 2)}\n`
            : format(error.records, ''),
        );
      return 1;
    }
    process.stderr.write(`nestjs-idempotency: ${command} failed: ${(error as Error).message}\n`);
    return 1;
  } finally {
    await connection.close().catch(() => undefined);
  }
}

/** Times as ISO strings in JSON, so a reader need not convert epoch milliseconds. */
function forJson(record: AdminRecord): object {
  const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());
  return {
    ...record,
    createdAt: iso(record.createdAt),
    lockedUntil: iso(record.lockedUntil),
    expiresAt: iso(record.expiresAt),
  };
}

/** One block per record, then a summary line. */
function format(records: readonly AdminRecord[], summary: string): string {
  const iso = (ms: number | null) => (ms === null ? '-' : new Date(ms).toISOString());
  const blocks = records.map((record) => {
    const lines: [string, string][] = [
      ['key', record.key],
      ['endpoint', record.endpoint],
      ['scope', JSON.stringify(record.scope)],
      ['state', `${record.state}${record.expired ? ' (expired)' : ''}`],
      ['created', iso(record.createdAt)],
      ['locked until', iso(record.lockedUntil)],
      ['expires', iso(record.expiresAt)],
      [
        'status',
        record.status === null ? '-' : `${record.status}${record.isError ? ' (error)' : ''}`,
      ],
      ['fingerprint', record.fingerprint],
      [
        'body',
        record.bodyEncoding === null ? '-' : `${record.bodyLength} chars, ${record.bodyEncoding}`,
      ],
    ];
    if (record.headers !== undefined) lines.push(['headers', JSON.stringify(record.headers)]);
    if (record.body !== undefined) lines.push(['stored body', record.body ?? '(none)']);
    if (record.sealed)
      lines.push(['stored body', '(sealed: give --encryption-key-env to open it)']);
    return lines.map(([name, value]) => `${name.padEnd(13)}${value}`).join('\n');
  });
  return `${[...blocks, ...(summary ? [summary] : [])].join('\n\n')}\n`;
}

/** The audit log (and anything else Nest logs) on stderr, one line each. */
const stderrLogger: LoggerService = {
  log: (message: unknown, context?: unknown) => logLine('LOG', message, context),
  warn: (message: unknown, context?: unknown) => logLine('WARN', message, context),
  error: (message: unknown, context?: unknown) => logLine('ERROR', message, context),
  debug: () => undefined,
  verbose: () => undefined,
};

function logLine(level: string, message: unknown, context: unknown) {
  const where = typeof context === 'string' ? ` [${context}]` : '';
  process.stderr.write(`${new Date().toISOString()} ${level}${where} ${String(message)}\n`);
}

function osUser(): string {
  try {
    return userInfo().username;
  } catch {
    return process.env.USER ?? process.env.USERNAME ?? 'unknown';
  }
}

/** The URL without its password, for messages. */
function redacted(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = '***';
    return parsed.toString();
  } catch {
    return url;
  }
}

function usage(problem: string): number {
  process.stderr.write(`nestjs-idempotency: ${problem}\n\n${USAGE}`);
  return 2;
}

process.exitCode = await main(process.argv.slice(2));

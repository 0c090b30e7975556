#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { checkConformance, DRAFT, type ConformanceReport } from './conformance-checks.js';

/**
 * `npx nestjs-idempotency-check <url> [options]`: runs the IETF draft's checks against any HTTP
 * endpoint and prints a report, one line per check with the draft's section. Exit code 0 when no
 * check failed, 1 when one did, 2 for a usage error.
 */

const USAGE = `Usage: nestjs-idempotency-check <url> [options]

Checks an endpoint against ${DRAFT}
(The Idempotency-Key HTTP Header Field): missing key, key syntax, replay, key reuse with another
payload, a concurrent duplicate, problem+json errors. Each check uses fresh keys and runs the
operation for real: point it at a test or staging deployment.

Options:
  -X, --method <method>    HTTP method (default POST)
  -d, --body <json>        a body the endpoint accepts (default {})
      --other-body <json>  another payload for the key-reuse check (default: the body plus one member)
  -H, --header <h: v>      extra request header, repeatable (authentication, say); a Content-Type
                           or Accept given here replaces the checker's own
      --concurrency <n>    duplicates sent at once (default 5)
      --key-optional       the endpoint documents the key as optional: skip the missing-key check
      --timeout <ms>       per request (default 30000); a request without an answer fails its check
      --json               print the report as JSON
  -h, --help               this text
`;

async function main(argv: readonly string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...argv],
      allowPositionals: true,
      options: {
        method: { type: 'string', short: 'X' },
        body: { type: 'string', short: 'd' },
        'other-body': { type: 'string' },
        header: { type: 'string', short: 'H', multiple: true },
        concurrency: { type: 'string' },
        'key-optional': { type: 'boolean' },
        timeout: { type: 'string' },
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
  if (positionals.length !== 1) return usage('expected exactly one <url>');
  const url = positionals[0];
  if (!URL.canParse(url) || !/^https?:$/.test(new URL(url).protocol)) {
    return usage(`not an http(s) URL: ${url}`);
  }
  const headers: Record<string, string> = {};
  for (const line of values.header ?? []) {
    const colon = line.indexOf(':');
    if (colon <= 0) return usage(`a header is "Name: value"; got ${JSON.stringify(line)}`);
    headers[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
  }
  const json = (name: string, text: string | undefined): { value?: unknown; error?: string } => {
    if (text === undefined) return {};
    try {
      return { value: JSON.parse(text) };
    } catch {
      return { error: `--${name} is not JSON: ${text}` };
    }
  };
  const body = json('body', values.body);
  const otherBody = json('other-body', values['other-body']);
  const badJson = body.error ?? otherBody.error;
  if (badJson) return usage(badJson);
  const concurrency = wholeNumber(values.concurrency, 2);
  const timeoutMs = wholeNumber(values.timeout, 1);
  if (concurrency === null) return usage('--concurrency must be a whole number above 1');
  if (timeoutMs === null) return usage('--timeout must be a positive whole number of ms');
  const method = (values.method ?? 'POST').toUpperCase();
  try {
    // The method and the header names must be HTTP tokens: a usage error, not an unreachable URL.
    new Request(url, { method, headers });
  } catch (error) {
    return usage((error as Error).message);
  }

  let report: ConformanceReport;
  try {
    report = await checkConformance({
      url,
      method,
      body: body.value,
      otherBody: otherBody.value,
      headers,
      concurrency,
      timeoutMs,
      keyOptional: values['key-optional'],
    });
  } catch (error) {
    const cause = (error as { cause?: { message?: string } }).cause?.message;
    process.stderr.write(
      `nestjs-idempotency-check: ${url} could not be reached: ${(error as Error).message}${cause ? ` (${cause})` : ''}\n`,
    );
    return 1;
  }
  process.stdout.write(values.json ? `${JSON.stringify(report, null, 2)}\n` : format(report));
  return report.passed ? 0 : 1;
}

/** The report as text: one line per check, then a summary. */
function format(report: ConformanceReport): string {
  const label = { pass: 'PASS', fail: 'FAIL', skip: 'SKIP' } as const;
  const lines = [`${report.draft}`, `${report.method} ${report.url}`, ''];
  for (const check of report.checks) {
    lines.push(`${label[check.status]}  §${check.section.padEnd(4)} ${check.title}`);
    lines.push(`            ${check.detail}`);
  }
  const count = (status: string) => report.checks.filter((c) => c.status === status).length;
  lines.push(
    '',
    `${report.checks.length} checks: ${count('pass')} passed, ${count('fail')} failed, ${count('skip')} skipped`,
  );
  return `${lines.join('\n')}\n`;
}

/** `undefined` when not given, `null` when not a whole number of at least `min`. */
function wholeNumber(text: string | undefined, min: number): number | undefined | null {
  if (text === undefined) return undefined;
  const value = Number(text);
  return Number.isInteger(value) && value >= min ? value : null;
}

function usage(problem: string): number {
  process.stderr.write(`nestjs-idempotency-check: ${problem}\n\n${USAGE}`);
  return 2;
}

process.exitCode = await main(process.argv.slice(2));

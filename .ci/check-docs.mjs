#!/usr/bin/env node
// Checks the Markdown documentation (README.md and docs/**/*.md) in well under a second:
//
// - every relative link and image resolves to a file or folder of the repository, and every
//   `#anchor` (in the same page or another) to a heading of that page, as GitHub slugs headings;
// - every page under docs/ is linked from README.md (the docs map), so a new page cannot be
//   forgotten there;
// - every `##`/`###` section of the README before it was split into docs/ (OLD_SECTIONS below) has
//   a home that still resolves, so no section was lost in the move and old links can be followed.
//
// `node .ci/check-docs.mjs --facts-from <git revision>` also compares the README of that revision
// with today's README and docs/: every inline code span and every figure (a number with its unit)
// of the old README must still appear somewhere. It was run once for the split (see
// docs/development.md); it needs the git history, so CI runs only the checks above.
//
// Adding a page: write docs/<page>.md and link it from the README's docs map. Nothing to add here.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** Each section of the README before the split, and where it lives now (page#anchor). */
const OLD_SECTIONS = {
  Installing: 'docs/getting-started.md#installing',
  'NestJS 11 on CommonJS': 'docs/getting-started.md#nestjs-11-on-commonjs',
  'Quick start in your app': 'README.md#quick-start-in-your-app',
  'The sample shop': 'docs/getting-started.md#the-sample-shop',
  'Calling idempotent APIs: the retrying client': 'docs/client.md#the-retrying-client',
  'Conformance checker': 'docs/client.md#conformance-checker',
  Options: 'docs/getting-started.md#options',
  'What the client sees': 'README.md#what-the-client-sees',
  'How it works': 'docs/how-it-works.md',
  'Never twice: lease renewal, transactional mode, downstream keys': 'docs/transactional.md',
  'Downstream keys': 'docs/transactional.md#downstream-keys',
  'GraphQL and message handlers':
    'docs/how-it-works.md#every-transport-graphql-and-message-handlers',
  'GraphQL mutations': 'docs/graphql.md',
  'Microservice handlers': 'docs/messages.md',
  Storage: 'docs/storage.md',
  'Encryption at rest': 'docs/encryption.md',
  'Custom stores and the store kit': 'docs/storage.md#custom-stores-and-the-store-kit',
  'Redis store': 'docs/storage.md#redis-store',
  'Safe defaults': 'docs/production.md#safe-defaults',
  'Using PostgreSQL': 'docs/storage.md#using-postgresql',
  'Wait mode: LISTEN/NOTIFY on PostgreSQL': 'docs/storage.md#wait-mode-listennotify-on-postgresql',
  'With @nestjs/typeorm': 'docs/storage.md#with-nestjstypeorm',
  'OpenAPI (@nestjs/swagger)': 'docs/http.md#openapi-nestjsswagger',
  Observability: 'docs/observability.md',
  Performance: 'docs/performance.md',
  Fastify: 'docs/getting-started.md#fastify',
  'MySQL / MariaDB and SQLite': 'docs/storage.md#mysql--mariadb-and-sqlite',
  Reliability: 'docs/reliability.md',
  'Running in production': 'docs/production.md',
  'Behind PgBouncer': 'docs/production.md#behind-pgbouncer',
  'When the primary fails': 'docs/production.md#when-the-primary-fails',
  'Many instances, for minutes': 'docs/production.md#many-instances-for-minutes',
  'Past one database, on paper': 'docs/production.md#past-one-database-on-paper',
  Development: 'docs/development.md',
};

/** README.md and every Markdown file under docs/, as paths relative to the root. */
function pages() {
  const found = ['README.md'];
  const walk = (folder) => {
    for (const entry of readdirSync(join(ROOT, folder), { withFileTypes: true })) {
      const path = join(folder, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (entry.name.endsWith('.md')) found.push(path);
    }
  };
  if (existsSync(join(ROOT, 'docs'))) walk('docs');
  return found;
}

/** The page's lines outside fenced code blocks, with their line numbers. */
function proseLines(text) {
  const lines = [];
  let fence = null;
  text.split('\n').forEach((line, index) => {
    const marker = /^\s*(```+|~~~+)/.exec(line);
    if (marker) {
      if (fence === null) fence = marker[1][0];
      else if (marker[1][0] === fence) fence = null;
      return;
    }
    if (fence === null) lines.push({ line, number: index + 1 });
  });
  return lines;
}

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens. */
function slug(heading) {
  return heading
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, '$1')
    .replace(/<[^>]+>/g, '')
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{N}\p{M}\p{Pc}\s-]/gu, '')
    .replace(/\s/g, '-');
}

const anchorCache = new Map();
/** The anchors of a page: its headings' slugs (repeats get -1, -2, …) and explicit ids. */
function anchorsOf(page) {
  if (anchorCache.has(page)) return anchorCache.get(page);
  const anchors = new Set();
  const seen = new Map();
  for (const { line } of proseLines(readFileSync(join(ROOT, page), 'utf8'))) {
    const heading = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (heading) {
      const base = slug(heading[1]);
      const count = seen.get(base) ?? 0;
      seen.set(base, count + 1);
      anchors.add(count === 0 ? base : `${base}-${count}`);
    }
    for (const id of line.matchAll(/<a\s+(?:id|name)="([^"]+)"/g)) anchors.add(id[1]);
  }
  anchorCache.set(page, anchors);
  return anchors;
}

/** Link targets of a page: inline links and images, and reference definitions. */
function linksOf(page) {
  const links = [];
  for (const { line, number } of proseLines(readFileSync(join(ROOT, page), 'utf8'))) {
    const prose = line.replace(/`[^`]*`/g, '');
    for (const match of prose.matchAll(/\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/g)) {
      links.push({ target: match[1], number });
    }
    const definition = /^\s*\[[^\]]+\]:\s*(\S+)/.exec(prose);
    if (definition) links.push({ target: definition[1], number });
  }
  return links;
}

/** Why `target`, written in `page`, does not resolve; `null` when it does. */
function brokenReason(page, target) {
  if (/^[a-z][a-z0-9+.-]*:/i.test(target)) return null; // https:, mailto: …: not checked offline
  const [rawPath, anchor] = target.split('#', 2);
  const path = decodeURIComponent(rawPath);
  const file = path === '' ? page : relative(ROOT, resolve(ROOT, dirname(page), path));
  if (file.startsWith('..')) return `${target} leaves the repository`;
  if (!existsSync(join(ROOT, file))) return `${file} does not exist`;
  if (anchor === undefined || anchor === '') return null;
  if (statSync(join(ROOT, file)).isDirectory() || !file.endsWith('.md')) {
    return `#${anchor}: ${file} is not a Markdown page`;
  }
  return anchorsOf(file).has(anchor) ? null : `${file} has no heading #${anchor}`;
}

function checkDocs() {
  const problems = [];
  const all = pages();
  for (const page of all) {
    for (const { target, number } of linksOf(page)) {
      const reason = brokenReason(page, target);
      if (reason) problems.push(`${page}:${number}: broken link (${target}): ${reason}`);
    }
  }
  const mapped = new Set(
    linksOf('README.md')
      .map(({ target }) => target.split('#')[0])
      .filter((path) => path.startsWith('docs/'))
      .map((path) => relative(ROOT, resolve(ROOT, path))),
  );
  for (const page of all) {
    if (page.startsWith('docs') && !mapped.has(page)) {
      problems.push(`${page}: not linked from README.md (add it to the docs map)`);
    }
  }
  for (const [section, home] of Object.entries(OLD_SECTIONS)) {
    const reason = brokenReason('README.md', home);
    if (reason) problems.push(`old README section "${section}" → ${home}: ${reason}`);
  }
  return { problems, pages: all.length };
}

/** Inline code spans and figures (a number with its unit) of a Markdown text. */
function factsOf(text) {
  const facts = new Set();
  for (const match of text.matchAll(/`([^`\n]+)`/g)) facts.add(match[1]);
  for (const match of text.matchAll(
    /\d[\d,.]*\s?(?:ms|s|%|MB|MiB|KiB|kB|rows\/s|req\/s|×)(?![\p{L}])/gu,
  )) {
    facts.add(match[0]);
  }
  return facts;
}

function checkFacts(revision) {
  const before = execFileSync('git', ['show', `${revision}:README.md`], {
    cwd: ROOT,
    encoding: 'utf8',
  });
  const now = pages()
    .map((page) => readFileSync(join(ROOT, page), 'utf8'))
    .join('\n');
  const flat = (text) => text.replace(/\s+/g, ' ');
  const facts = [...factsOf(before)];
  const missing = facts.filter((fact) => !flat(now).includes(flat(fact)));
  console.log(
    `check-docs: ${facts.length - missing.length} of ${facts.length} code spans and figures of the README at ${revision} are still there`,
  );
  return missing.map((fact) => `a fact of the README at ${revision} is nowhere now: ${fact}`);
}

const factsFrom = process.argv.indexOf('--facts-from');
const { problems, pages: count } = checkDocs();
if (factsFrom !== -1) problems.push(...checkFacts(process.argv[factsFrom + 1]));
if (problems.length > 0) {
  console.error(problems.join('\n'));
  console.error(`check-docs: ${problems.length} problem(s) in ${count} pages`);
  process.exit(1);
}
console.log(`check-docs: ${count} pages, every link, anchor and old README section resolves`);

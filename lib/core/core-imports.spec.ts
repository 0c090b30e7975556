import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The arrows point one way: transports → core (the key's state machine) → storage. This spec reads
 * the sources' import lines, so the circle that once ran through the service, the options and the
 * transports cannot come back unnoticed.
 */
const LIB = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** What lib/core may import: itself, the store's interface, and leaves. */
const CORE_MAY_IMPORT = [
  /^core\//,
  /^storage\/idempotency-store\.interface\.ts$/,
  /^storage\/connection-failure\.ts$/,
  /^security\//,
  /^utils\//,
  /^replay-cache\.ts$/,
];
const CORE_MAY_IMPORT_PACKAGES = [/^node:/, /^@nestjs\/common$/, /^typeorm$/];

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return sources(path);
    return entry.name.endsWith('.ts') && !entry.name.endsWith('.spec.ts') ? [path] : [];
  });
}

/** Every module a file names: `import … from`, `export … from`, `import '…'`, `import('…')`. */
function specifiers(source: string): string[] {
  const found = source.matchAll(
    /(?:\b(?:import|export)\b[^'";]*?\bfrom\s*|\bimport\s*\(\s*|^\s*import\s+)['"]([^'"]+)['"]/gm,
  );
  return [...found].map((match) => match[1]);
}

const files = sources(LIB);
const name = (path: string) => relative(LIB, path).split('\\').join('/');
const graph = new Map<string, { local: string[]; packages: string[] }>(
  files.map((file) => {
    const named = specifiers(readFileSync(file, 'utf8'));
    return [
      name(file),
      {
        local: named
          .filter((specifier) => specifier.startsWith('.'))
          .map((specifier) => name(resolve(dirname(file), specifier.replace(/\.js$/, '.ts')))),
        packages: named.filter((specifier) => !specifier.startsWith('.')),
      },
    ];
  }),
);

describe('the import arrows', () => {
  it('the reader finds the imports it is meant to check', () => {
    expect(graph.get('idempotency.service.ts')?.local).toContain('core/key-state-machine.ts');
    expect(graph.get('core/key-state-machine.ts')?.local).toContain(
      'storage/idempotency-store.interface.ts',
    );
  });

  it('lib/core imports only itself, the store interface and leaves', () => {
    const wrong = [...graph]
      .filter(([file]) => file.startsWith('core/'))
      .flatMap(([file, { local, packages }]) => [
        ...local
          .filter((target) => !CORE_MAY_IMPORT.some((allowed) => allowed.test(target)))
          .map((target) => `${file} -> ${target}`),
        ...packages
          .filter((target) => !CORE_MAY_IMPORT_PACKAGES.some((allowed) => allowed.test(target)))
          .map((target) => `${file} -> ${target}`),
      ]);
    expect(wrong).toEqual([]);
  });

  it('no module of lib/ imports itself through others (no import cycle)', () => {
    const cycles: string[] = [];
    const done = new Set<string>();
    const path: string[] = [];
    const visit = (file: string) => {
      if (done.has(file)) return;
      const at = path.indexOf(file);
      if (at >= 0) {
        cycles.push([...path.slice(at), file].join(' -> '));
        return;
      }
      path.push(file);
      for (const target of graph.get(file)?.local ?? []) if (graph.has(target)) visit(target);
      path.pop();
      done.add(file);
    };
    for (const file of graph.keys()) visit(file);
    expect(cycles).toEqual([]);
  });
});

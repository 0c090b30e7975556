import { MAX_JSON_DEPTH } from '../utils/fingerprint.js';

/**
 * A mutation's value as its schema types see it, so a replay answers byte for byte as the first
 * call did. JSON alone loses what only the schema knows how to write: a `Date` (Nest's DateTime
 * serialises Dates only), a custom scalar's class, a BigInt, an enum's internal value, a getter,
 * a class instance that a union resolves by `instanceof`. So the stored value is the resolver's
 * value as JSON — the parent object that field resolvers get again on replay — with, where JSON
 * would not give the same answer, each such leaf in the form its type serialised it (revived on
 * replay with the type's `parseValue`), and `__typename` on the members of unions and interfaces.
 * graphql is an optional peer, never imported: its types are told apart by `Symbol.toStringTag`.
 */

/** The parts of graphql-js' types read here. */
export interface GraphQLTypeLike {
  readonly [Symbol.toStringTag]?: string;
  readonly name?: string;
  readonly ofType?: GraphQLTypeLike;
  serialize?(value: unknown): unknown;
  parseValue?(value: unknown): unknown;
  getFields?(): Record<string, { readonly type: GraphQLTypeLike }>;
  resolveType?(value: unknown, context: unknown, info: unknown, type: unknown): unknown;
  isTypeOf?(value: unknown, context: unknown, info: unknown): unknown;
}

/** The parts of graphql-js' GraphQLSchema read here. */
export interface GraphQLSchemaLike {
  getMutationType(): { readonly name: string } | null | undefined;
  getType?(name: string): GraphQLTypeLike | null | undefined;
  getPossibleTypes?(type: GraphQLTypeLike): readonly GraphQLTypeLike[];
}

type Path = readonly (string | number)[];

/** A leaf stored in its serialised form, and the type that revives it. */
interface Revival {
  readonly at: Path;
  readonly type: string;
}

/** What a stored value holds when its JSON needed the schema's help (the key never is a field). */
const TYPED_VALUE = '__idempotencyGraphQL';

interface TypedValue {
  readonly value: unknown;
  readonly revive: readonly Revival[];
}

/**
 * What to store for a field's value: the value itself when its JSON answers as it did (a record
 * as every version stored it), else the JSON with the changes it needs. Falls back to the value
 * when its walk fails (a getter or `resolveType` that throws): stored as before.
 */
export function storedFieldValue(
  value: unknown,
  type: GraphQLTypeLike | undefined,
  schema: GraphQLSchemaLike | undefined,
  graphqlContext: unknown,
  info: unknown,
): unknown {
  if (!type || !schema) return value;
  try {
    const capture = new ValueCapture(schema, graphqlContext, info);
    capture.value(type, value, []);
    if (capture.patches.length === 0) return value;
    let tree = jsonCopy(value);
    for (const patch of capture.patches) tree = withValueAt(tree, patch.at, () => patch.value);
    return { [TYPED_VALUE]: { value: tree, revive: capture.revive } satisfies TypedValue };
  } catch {
    return value;
  }
}

/** The value to hand back to graphql on replay: its leaves revived by their schema types. */
export function replayedFieldValue(
  stored: unknown,
  schema: GraphQLSchemaLike | undefined,
): unknown {
  const typed = typedValueOf(stored);
  if (!typed) return stored;
  let tree = typed.value;
  for (const { at, type } of typed.revive) {
    const leaf = schema?.getType?.(type);
    if (!leaf || !isLeaf(leaf)) continue;
    tree = withValueAt(tree, at, (serialised) => {
      try {
        return leaf.parseValue!(serialised);
      } catch {
        return serialised;
      }
    });
  }
  return tree;
}

/**
 * The field's arguments as fingerprinted: as graphql coerced them, except leaves JSON cannot tell
 * apart (a custom scalar's class, whose JSON may be `{}`; a BigInt, which JSON refuses), which are
 * fingerprinted in their serialised form. Dates keep their JSON (the ISO string), so fingerprints
 * stored by earlier versions stay valid.
 */
export function fingerprintedArguments(
  args: Record<string, unknown>,
  definitions: readonly { readonly name: string; readonly type: GraphQLTypeLike }[] | undefined,
): unknown {
  if (!definitions) return args;
  try {
    const types = new Map(definitions.map((definition) => [definition.name, definition.type]));
    const out: Record<string, unknown> = {};
    for (const [name, value] of Object.entries(args)) {
      const type = types.get(name);
      out[name] = type ? inputForFingerprint(type, value, 0) : value;
    }
    return out;
  } catch {
    return args;
  }
}

function inputForFingerprint(type: GraphQLTypeLike, value: unknown, depth: number): unknown {
  if (value === null || value === undefined || depth > MAX_JSON_DEPTH) return value;
  switch (kindOf(type)) {
    case 'GraphQLNonNull':
      return inputForFingerprint(type.ofType!, value, depth);
    case 'GraphQLList':
      return Array.isArray(value)
        ? value.map((item) => inputForFingerprint(type.ofType!, item, depth + 1))
        : inputForFingerprint(type.ofType!, value, depth);
    case 'GraphQLInputObjectType': {
      if (typeof value !== 'object') return value;
      const fields = type.getFields?.() ?? {};
      const out: Record<string, unknown> = {};
      for (const [name, item] of Object.entries(value)) {
        const field = fields[name];
        out[name] = field ? inputForFingerprint(field.type, item, depth + 1) : item;
      }
      return out;
    }
    case 'GraphQLScalarType':
    case 'GraphQLEnumType':
      if (!isOpaqueToJson(value)) return value;
      try {
        return type.serialize!(value);
      } catch {
        return value;
      }
    default:
      return value;
  }
}

/** A BigInt, a symbol, or a class instance other than a Date, array or plain object. */
function isOpaqueToJson(value: unknown): boolean {
  if (typeof value === 'bigint' || typeof value === 'symbol') return true;
  if (typeof value !== 'object' || value === null || value instanceof Date) return false;
  const prototype: unknown = Object.getPrototypeOf(value);
  return prototype !== null && prototype !== Object.prototype && prototype !== Array.prototype;
}

/** A change the stored JSON needs over the value's JSON, at a path from the field's value. */
interface Patch {
  readonly at: Path;
  readonly value: unknown;
}

/** Walks a field's value along its type, noting what JSON alone would not give back. */
class ValueCapture {
  readonly patches: Patch[] = [];
  readonly revive: Revival[] = [];
  private readonly ancestors = new Set<object>();

  constructor(
    private readonly schema: GraphQLSchemaLike,
    private readonly graphqlContext: unknown,
    private readonly info: unknown,
  ) {}

  value(type: GraphQLTypeLike, value: unknown, at: Path): void {
    // A promise or a function graphql would resolve later: nothing to read here.
    if (value === null || value === undefined || typeof value === 'function' || isThenable(value))
      return;
    if (at.length > MAX_JSON_DEPTH) throw new RangeError('value nested too deeply');
    switch (kindOf(type)) {
      case 'GraphQLNonNull':
        return this.value(type.ofType!, value, at);
      case 'GraphQLList':
        return this.list(type.ofType!, value, at);
      case 'GraphQLScalarType':
      case 'GraphQLEnumType':
        return this.leaf(type, value, at);
      case 'GraphQLObjectType':
        return this.object(type, value, at);
      case 'GraphQLInterfaceType':
      case 'GraphQLUnionType': {
        const concrete = this.concreteType(type, value);
        if (!concrete) return;
        if (!isEnumerableOwn(value, '__typename'))
          this.patches.push({ at: [...at, '__typename'], value: concrete.name });
        return this.object(concrete, value, at);
      }
    }
  }

  /** Arrays, and Sets (graphql takes any iterable; a Set's JSON is `{}`, and it iterates again). */
  private list(itemType: GraphQLTypeLike, value: unknown, at: Path): void {
    if (!Array.isArray(value) && !(value instanceof Set)) return;
    const items: unknown[] = Array.isArray(value) ? value : [...(value as Set<unknown>)];
    if (items !== value) this.patches.push({ at, value: jsonCopy(items) });
    this.enter(value);
    items.forEach((item, index) => this.value(itemType, item, [...at, index]));
    this.ancestors.delete(value);
  }

  private object(type: GraphQLTypeLike, value: unknown, at: Path): void {
    if (typeof value !== 'object' || value === null) return;
    this.enter(value);
    const source = value as Record<string, unknown>;
    const jsonOfItsOwn = typeof source.toJSON === 'function';
    for (const [name, field] of Object.entries(type.getFields?.() ?? {})) {
      if (!(name in source)) continue;
      const child = source[name];
      if (child === (Object.prototype as Record<string, unknown>)[name]) continue;
      const childAt = [...at, name];
      // A getter (on the class): graphql reads it, JSON leaves it out.
      if (child !== undefined && !jsonOfItsOwn && !isEnumerableOwn(source, name))
        this.patches.push({ at: childAt, value: jsonCopy(child) });
      this.value(field.type, child, childAt);
    }
    this.ancestors.delete(value);
  }

  /**
   * A leaf whose JSON the type would not serialise as it serialised the value is stored in its
   * serialised form. Strings, numbers and booleans are their own JSON.
   */
  private leaf(type: GraphQLTypeLike, value: unknown, at: Path): void {
    if (typeof value === 'string' || typeof value === 'number' || typeof value === 'boolean')
      return;
    let serialised: unknown;
    try {
      serialised = type.serialize!(value);
    } catch {
      return; // the response has an error here; the value's JSON gives the same one, or none
    }
    if (serialised === null || serialised === undefined) return;
    if (
      typeof value === 'object' &&
      sameJson(serialisedOrFailure(type, jsonCopy(value)), serialised)
    )
      return;
    this.patches.push({ at, value: serialised });
    this.revive.push({ at, type: type.name! });
  }

  /** The member of a union or interface the value is, as graphql decides it (synchronously). */
  private concreteType(abstract: GraphQLTypeLike, value: unknown): GraphQLTypeLike | undefined {
    if (typeof value !== 'object' || value === null) return undefined;
    const named = (name: unknown) => {
      const type = typeof name === 'string' ? this.schema.getType?.(name) : undefined;
      return type && kindOf(type) === 'GraphQLObjectType' ? type : undefined;
    };
    const own = named((value as { __typename?: unknown }).__typename);
    if (own) return own;
    const resolved = quietly(() =>
      abstract.resolveType?.(value, this.graphqlContext, this.info, abstract),
    );
    // graphql 16 wants a name; earlier versions took the type itself.
    const byResolver = named(
      typeof resolved === 'object' && resolved !== null
        ? (resolved as { name?: unknown }).name
        : resolved,
    );
    if (byResolver) return byResolver;
    return this.schema
      .getPossibleTypes?.(abstract)
      .find(
        (type) => quietly(() => type.isTypeOf?.(value, this.graphqlContext, this.info)) === true,
      );
  }

  /** A value met again inside itself: its JSON would fail, so the walk gives up. */
  private enter(value: object): void {
    if (this.ancestors.has(value)) throw new TypeError('cyclic value');
    this.ancestors.add(value);
  }
}

function kindOf(type: GraphQLTypeLike): string | undefined {
  return type[Symbol.toStringTag];
}

function isLeaf(type: GraphQLTypeLike): boolean {
  const kind = kindOf(type);
  return (
    (kind === 'GraphQLScalarType' || kind === 'GraphQLEnumType') &&
    typeof type.parseValue === 'function'
  );
}

function isThenable(value: unknown): boolean {
  return (
    typeof value === 'object' &&
    value !== null &&
    typeof (value as { then?: unknown }).then === 'function'
  );
}

function isEnumerableOwn(value: object, name: string): boolean {
  return Object.prototype.propertyIsEnumerable.call(value, name);
}

/** A user callback's synchronous answer, or undefined (it threw, or answered later). */
function quietly(call: () => unknown): unknown {
  try {
    const answer = call();
    if (!isThenable(answer)) return answer;
    (answer as Promise<unknown>).then(undefined, () => undefined);
  } catch {
    // the walk only misses this one's type
  }
  return undefined;
}

/** The value's JSON as parsed data; BigInts become strings (where no schema type writes them). */
function jsonCopy(value: unknown): unknown {
  const json = JSON.stringify(value, (_key, item: unknown) =>
    typeof item === 'bigint' ? item.toString() : item,
  );
  return json === undefined ? null : JSON.parse(json);
}

const FAILED = Symbol('serialize failed');

function serialisedOrFailure(type: GraphQLTypeLike, value: unknown): unknown {
  try {
    return type.serialize!(value);
  } catch {
    return FAILED;
  }
}

function sameJson(a: unknown, b: unknown): boolean {
  if (a === FAILED || b === FAILED) return false;
  try {
    return JSON.stringify(a) === JSON.stringify(b);
  } catch {
    return false;
  }
}

/** `tree` with the value at `at` replaced by `replace(current)`; a path that is not there is left. */
function withValueAt(tree: unknown, at: Path, replace: (current: unknown) => unknown): unknown {
  if (at.length === 0) return replace(tree);
  let container: unknown = tree;
  for (const step of at.slice(0, -1)) {
    if (typeof container !== 'object' || container === null || !Object.hasOwn(container, step))
      return tree;
    container = (container as Record<string | number, unknown>)[step];
  }
  const last = at[at.length - 1]!;
  if (typeof container === 'object' && container !== null && !UNSAFE_KEYS.has(last))
    (container as Record<string | number, unknown>)[last] = replace(
      (container as Record<string | number, unknown>)[last],
    );
  return tree;
}

const UNSAFE_KEYS: ReadonlySet<string | number> = new Set([
  '__proto__',
  'constructor',
  'prototype',
]);

function typedValueOf(stored: unknown): TypedValue | undefined {
  if (typeof stored !== 'object' || stored === null || !Object.hasOwn(stored, TYPED_VALUE))
    return undefined;
  const typed = (stored as Record<string, unknown>)[TYPED_VALUE] as Partial<TypedValue> | null;
  if (typeof typed !== 'object' || typed === null || !Array.isArray(typed.revive)) return undefined;
  return { value: typed.value, revive: typed.revive };
}

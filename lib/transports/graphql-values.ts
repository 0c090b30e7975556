import { MAX_JSON_DEPTH } from '../utils/fingerprint.js';

/**
 * A mutation's value as its schema types see it, so a replay answers byte for byte as the first
 * call did. JSON alone loses what only the schema knows how to write: a `Date` (Nest's DateTime
 * serialises Dates only), a custom scalar's class, a BigInt, an enum's internal value, a getter,
 * a class instance that a union resolves by `instanceof`. So the stored value is the resolver's
 * value as JSON — the parent object that field resolvers get again on replay — with, where JSON
 * would not give the same answer, each such leaf in the form its type serialised it (revived on
 * replay with the type's `parseValue`), `__typename` on the members of unions and interfaces, the
 * Dates and BigInts anywhere in it revived (a renamed field's, one a field resolver reads), the
 * values of the promises graphql awaits (lazy relations), and a relation that points back at its
 * owner pointing back again. graphql is an optional peer, never imported: its types are told apart by `Symbol.toStringTag`.
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

/** A Date or a BigInt the resolver's value held where no schema type revives it (JSON keeps its text). */
interface BuiltInRevival {
  readonly at: Path;
  readonly as: 'Date' | 'BigInt';
}

/** A value that held itself: stored as null at `at`, the object at `of` (an ancestor) on replay. */
interface Cycle {
  readonly at: Path;
  readonly of: Path;
}

interface TypedValue {
  readonly value: unknown;
  readonly revive: readonly Revival[];
  readonly builtIns?: readonly BuiltInRevival[];
  readonly cycles?: readonly Cycle[];
}

/**
 * What to store for a field's value: the value itself when its JSON answers as it did (a record
 * as every version stored it), else the JSON with the changes it needs. Promises in the fields
 * the operation selects (lazy relations) are awaited first, as graphql awaits them. Falls back to
 * the value when its walk fails (a getter or `resolveType` that throws): stored as before.
 */
export async function storedFieldValue(
  value: unknown,
  type: GraphQLTypeLike | undefined,
  schema: GraphQLSchemaLike | undefined,
  graphqlContext: unknown,
  info: unknown,
): Promise<unknown> {
  if (!type || !schema) return value;
  try {
    const capture = new ValueCapture(schema, graphqlContext, info);
    await capture.walk(type, value);
    const root = new StorageCopy(capture.resolved);
    let tree = root.copy(value, [], undefined, '');
    if (capture.patches.length === 0 && !root.changed) return value;
    // A note (a Date, a cycle) that a later patch replaces, at its path or above: not revived.
    const lastPatchAt = new Map<string, number>();
    capture.patches.forEach((patch, index) => lastPatchAt.set(pathKey(patchPath(patch)), index));
    const replaced = (at: Path, since: number) => {
      for (let length = 0; length <= at.length; length++) {
        const index = lastPatchAt.get(pathKey(at.slice(0, length)));
        if (index !== undefined && index > since) return true;
      }
      return false;
    };
    const builtIns: BuiltInRevival[] = [];
    const cycles: Cycle[] = [];
    const keepNotes = (copy: StorageCopy, since: number) => {
      builtIns.push(...copy.builtIns.filter((note) => !replaced(note.at, since)));
      cycles.push(...copy.cycles.filter((note) => !replaced(note.at, since)));
    };
    keepNotes(root, -1);
    const revive: Revival[] = [];
    capture.patches.forEach((patch, index) => {
      const at = patchPath(patch);
      let replacement: unknown;
      if ('typename' in patch) replacement = patch.typename;
      else if ('type' in patch) {
        replacement = patch.serialised;
        revive.push({ at, type: patch.type });
      } else {
        const copy = new StorageCopy(capture.resolved);
        replacement = copy.copy(patch.copy, at, undefined, '') ?? null;
        keepNotes(copy, index);
      }
      tree = withValueAt(tree, at, () => replacement);
    });
    const typed: TypedValue = {
      value: tree,
      revive,
      ...(builtIns.length > 0 ? { builtIns } : {}),
      ...(cycles.length > 0 ? { cycles } : {}),
    };
    return { [TYPED_VALUE]: typed };
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
  for (const { at, as } of listOf<BuiltInRevival>(typed.builtIns)) {
    tree = withValueAt(tree, at, (text) => {
      if (typeof text !== 'string') return text;
      if (as === 'Date') return new Date(text);
      try {
        return as === 'BigInt' ? BigInt(text) : text;
      } catch {
        return text;
      }
    });
  }
  for (const { at, of } of listOf<Cycle>(typed.cycles)) {
    const target = valueAt(tree, of);
    if (typeof target === 'object' && target !== null) tree = withValueAt(tree, at, () => target);
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
type Patch =
  /** A leaf in its serialised form, revived by its type on replay. */
  | { readonly at: Path; readonly serialised: unknown; readonly type: string }
  /** A value its JSON leaves out or writes otherwise (a getter, a Set): stored as its own copy. */
  | { readonly at: Path; readonly copy: unknown }
  /** The member of a union or interface (or a type with an `isTypeOf`) the value at `at` is. */
  | { readonly at: Path; readonly typename: string };

/** The objects (and their paths) that contain the value being walked or copied. */
interface Ancestors {
  readonly value: object;
  readonly at: Path;
  readonly up: Ancestors | undefined;
}

function ancestorPath(ancestors: Ancestors | undefined, value: object): Path | undefined {
  for (let at = ancestors; at; at = at.up) if (at.value === value) return at.at;
  return undefined;
}

/**
 * The parts of graphql-js' AST (the operation's selections) read here, to know which promises
 * graphql awaits: only those of the fields the operation selects are awaited, never a lazy
 * relation it does not read.
 */
interface SelectionSetLike {
  readonly selections: readonly SelectionLike[];
}
interface SelectionLike {
  readonly kind: string;
  readonly name?: { readonly value: string };
  readonly typeCondition?: { readonly name: { readonly value: string } };
  readonly selectionSet?: SelectionSetLike;
  readonly directives?: readonly {
    readonly name: { readonly value: string };
    readonly arguments?: readonly {
      readonly name: { readonly value: string };
      readonly value: {
        readonly kind: string;
        readonly value?: unknown;
        readonly name?: { readonly value: string };
      };
    }[];
  }[];
}
interface InfoLike {
  readonly fieldNodes?: readonly { readonly selectionSet?: SelectionSetLike }[];
  readonly fragments?: Record<
    string,
    | {
        readonly typeCondition?: SelectionLike['typeCondition'];
        readonly selectionSet: SelectionSetLike;
      }
    | undefined
  >;
  readonly variableValues?: Record<string, unknown>;
}

/**
 * What the operation selects at a value: the selection sets that apply to it, `NOT_SELECTED` for
 * a field it does not select, `undefined` when unknown (no resolve info).
 */
type Selected = readonly SelectionSetLike[] | typeof NOT_SELECTED | undefined;
const NOT_SELECTED = null;

/** Walks a field's value along its type, noting what JSON alone would not give back. */
class ValueCapture {
  readonly patches: Patch[] = [];
  /** Each promise met in a selected field, and what it resolved to (null when it rejected). */
  readonly resolved = new Map<object, unknown>();
  private readonly pending: Promise<void>[] = [];

  constructor(
    private readonly schema: GraphQLSchemaLike,
    private readonly graphqlContext: unknown,
    private readonly info: unknown,
  ) {}

  /** Walks `value`, and the values of the promises it holds in selected fields once they resolve. */
  async walk(type: GraphQLTypeLike, value: unknown): Promise<void> {
    const nodes = (this.info as InfoLike | undefined)?.fieldNodes;
    const selected = nodes
      ? nodes.flatMap((node) => (node.selectionSet ? [node.selectionSet] : []))
      : undefined;
    this.value(type, value, [], undefined, selected);
    while (this.pending.length > 0) await Promise.all(this.pending.splice(0));
  }

  private value(
    type: GraphQLTypeLike,
    value: unknown,
    at: Path,
    ancestors: Ancestors | undefined,
    selected: Selected,
  ): void {
    if (value === null || value === undefined || typeof value === 'function') return;
    if (isThenable(value))
      return this.thenable(type, value as PromiseLike<unknown>, at, ancestors, selected);
    if (at.length > MAX_JSON_DEPTH) throw new RangeError('value nested too deeply');
    switch (kindOf(type)) {
      case 'GraphQLNonNull':
        return this.value(type.ofType!, value, at, ancestors, selected);
      case 'GraphQLList':
        return this.list(type.ofType!, value, at, ancestors, selected);
      case 'GraphQLScalarType':
      case 'GraphQLEnumType':
        return this.leaf(type, value, at);
      case 'GraphQLObjectType':
        return this.object(type, value, at, ancestors, selected, false);
      case 'GraphQLInterfaceType':
      case 'GraphQLUnionType': {
        const concrete = this.concreteType(type, value);
        if (concrete) this.object(concrete, value, at, ancestors, selected, true);
      }
    }
  }

  /**
   * A promise graphql awaits (a lazy relation the operation selects): walked once it resolves, so
   * its value is stored. One the operation does not select is left as it is (graphql never reads
   * it), its rejection handled so that it cannot end the process.
   */
  private thenable(
    type: GraphQLTypeLike,
    thenable: PromiseLike<unknown>,
    at: Path,
    ancestors: Ancestors | undefined,
    selected: Selected,
  ): void {
    if (selected === NOT_SELECTED || selected === undefined) {
      quietly(() => thenable);
      return;
    }
    this.pending.push(
      Promise.resolve(thenable).then(
        (resolved) => {
          this.resolved.set(thenable, resolved);
          this.value(type, resolved, at, ancestors, selected);
        },
        () => void this.resolved.set(thenable, null),
      ),
    );
  }

  /** Arrays, and Sets (graphql takes any iterable; a Set's JSON is `{}`, and it iterates again). */
  private list(
    itemType: GraphQLTypeLike,
    value: unknown,
    at: Path,
    ancestors: Ancestors | undefined,
    selected: Selected,
  ): void {
    if (!Array.isArray(value) && !(value instanceof Set)) return;
    if (ancestorPath(ancestors, value)) return;
    const items: unknown[] = Array.isArray(value) ? value : [...(value as Set<unknown>)];
    if (items !== value) this.patches.push({ at, copy: items });
    const inside: Ancestors = { value, at, up: ancestors };
    items.forEach((item, index) => this.value(itemType, item, [...at, index], inside, selected));
  }

  private object(
    type: GraphQLTypeLike,
    value: unknown,
    at: Path,
    ancestors: Ancestors | undefined,
    selected: Selected,
    abstract: boolean,
  ): void {
    if (typeof value !== 'object' || value === null) return;
    // Met again inside itself: stored as a reference to where it was first (see StorageCopy).
    if (ancestorPath(ancestors, value)) return;
    // A union's or interface's member, or a type whose `isTypeOf` tells its objects apart: the
    // stored object says which type it is (graphql's and Nest's resolvers read `__typename`).
    if ((abstract || typeof type.isTypeOf === 'function') && !isEnumerableOwn(value, '__typename'))
      this.patches.push({ at, typename: type.name! });
    const inside: Ancestors = { value, at, up: ancestors };
    const fields = selected ? this.selectedFields(selected, type.name!) : undefined;
    const source = value as Record<string, unknown>;
    // A JSON of its own (a Mongoose document's, without its virtuals): what it writes is stored.
    const json: unknown =
      typeof source.toJSON === 'function' ? (source.toJSON as () => unknown)() : undefined;
    for (const [name, field] of Object.entries(type.getFields?.() ?? {})) {
      if (!(name in source)) continue;
      const child = source[name];
      if (child === (Object.prototype as Record<string, unknown>)[name]) continue;
      const childAt = [...at, name];
      // What graphql reads and JSON leaves out (a getter on the class) or writes otherwise.
      const leftOut =
        json === undefined
          ? !isEnumerableOwn(source, name)
          : typeof json !== 'object' ||
            json === null ||
            !isEnumerableOwn(json, name) ||
            isThenable(child) ||
            !sameJson((json as Record<string, unknown>)[name], child);
      if (child !== undefined && leftOut) this.patches.push({ at: childAt, copy: child });
      const childSelected: Selected = fields ? (fields.get(name) ?? NOT_SELECTED) : selected;
      this.value(field.type, child, childAt, inside, childSelected);
    }
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
    this.patches.push({ at, serialised, type: type.name! });
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

  /**
   * The fields the selection sets select on an object of type `typeName`, each with its own
   * selection sets (fragments spread, inline fragments of its type, `@skip` and `@include`).
   */
  private selectedFields(sets: readonly SelectionSetLike[], typeName: string) {
    const fields = new Map<string, SelectionSetLike[]>();
    const { fragments = {}, variableValues = {} } = (this.info ?? {}) as InfoLike;
    const seen = new Set<string>();
    const included = (selection: SelectionLike) =>
      (selection.directives ?? []).every((directive) => {
        const name = directive.name.value;
        if (name !== 'skip' && name !== 'include') return true;
        const argument = directive.arguments?.find((arg) => arg.name.value === 'if')?.value;
        const condition =
          argument?.kind === 'Variable' ? variableValues[argument.name!.value] : argument?.value;
        return name === 'skip' ? condition !== true : condition !== false;
      });
    const applies = (condition: SelectionLike['typeCondition']) => {
      if (!condition || condition.name.value === typeName) return true;
      const abstract = this.schema.getType?.(condition.name.value);
      return (
        !!abstract &&
        (this.schema.getPossibleTypes?.(abstract) ?? []).some((type) => type.name === typeName)
      );
    };
    const collect = (set: SelectionSetLike) => {
      for (const selection of set.selections) {
        if (!included(selection)) continue;
        if (selection.kind === 'Field') {
          const name = selection.name!.value;
          const children = fields.get(name) ?? [];
          if (selection.selectionSet) children.push(selection.selectionSet);
          fields.set(name, children);
        } else if (selection.kind === 'InlineFragment') {
          if (selection.selectionSet && applies(selection.typeCondition))
            collect(selection.selectionSet);
        } else if (selection.kind === 'FragmentSpread') {
          const name = selection.name!.value;
          const fragment = fragments[name];
          if (fragment && !seen.has(name) && applies(fragment.typeCondition)) {
            seen.add(name);
            collect(fragment.selectionSet);
          }
        }
      }
    };
    for (const set of sets) collect(set);
    return fields;
  }
}

/**
 * The stored JSON of a value, as `JSON.stringify` writes it, except that what JSON cannot give
 * back is noted: Dates and BigInts (revived on replay), a value held inside itself (a loaded
 * relation pointing back at its owner: null here, the owner again on replay), and the promises
 * the walk awaited (their values). `changed` when any of that was met.
 */
class StorageCopy {
  readonly builtIns: BuiltInRevival[] = [];
  readonly cycles: Cycle[] = [];
  changed = false;

  constructor(private readonly resolved: ReadonlyMap<object, unknown>) {}

  copy(value: unknown, at: Path, ancestors: Ancestors | undefined, key: string): unknown {
    if (isThenable(value)) {
      if (!this.resolved.has(value as object)) return quietly(() => value) ?? {};
      this.changed = true;
      value = this.resolved.get(value as object);
    }
    if (typeof value === 'bigint') {
      this.changed = true;
      this.builtIns.push({ at, as: 'BigInt' });
      return value.toString();
    }
    if (typeof value !== 'object' || value === null) return jsonPrimitive(value);
    if (value instanceof Date) {
      if (!Number.isNaN(value.getTime())) {
        this.changed = true;
        this.builtIns.push({ at, as: 'Date' });
      }
      return value.toJSON();
    }
    const toJSON = (value as { toJSON?: unknown }).toJSON;
    if (typeof toJSON === 'function') {
      const json: unknown = toJSON.call(value, key);
      if (typeof json !== 'object' || json === null) return this.copy(json, at, ancestors, key);
      value = json;
    }
    if (value instanceof Number || value instanceof String || value instanceof Boolean)
      return jsonPrimitive(value.valueOf());
    if (at.length > MAX_JSON_DEPTH) throw new RangeError('value nested too deeply');
    const of = ancestorPath(ancestors, value as object);
    if (of) {
      this.changed = true;
      this.cycles.push({ at, of });
      return null;
    }
    const inside: Ancestors = { value: value as object, at, up: ancestors };
    if (Array.isArray(value))
      return value.map(
        (item, index) => this.copy(item, [...at, index], inside, String(index)) ?? null,
      );
    const out: Record<string, unknown> = {};
    for (const name of Object.keys(value as object)) {
      const item = this.copy((value as Record<string, unknown>)[name], [...at, name], inside, name);
      if (item === undefined) continue;
      if (name === '__proto__')
        Object.defineProperty(out, name, { value: item, enumerable: true, writable: true });
      else out[name] = item;
    }
    return out;
  }
}

/** A primitive as JSON writes it: non-finite numbers as null; undefined, functions, symbols left out. */
function jsonPrimitive(value: unknown): unknown {
  if (typeof value === 'number') return Number.isFinite(value) ? value : null;
  if (typeof value === 'string' || typeof value === 'boolean' || value === null) return value;
  return undefined;
}

/** Where a patch writes: its path, or the `__typename` below it. */
function patchPath(patch: Patch): Path {
  return 'typename' in patch ? [...patch.at, '__typename'] : patch.at;
}

function pathKey(at: Path): string {
  return JSON.stringify(at);
}

function valueAt(tree: unknown, at: Path): unknown {
  let value = tree;
  for (const step of at) {
    if (typeof value !== 'object' || value === null || !Object.hasOwn(value, step))
      return undefined;
    value = (value as Record<string | number, unknown>)[step];
  }
  return value;
}

function listOf<T>(value: unknown): readonly T[] {
  return Array.isArray(value) ? (value as T[]) : [];
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
  const last = at[at.length - 1];
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
  return {
    value: typed.value,
    revive: typed.revive,
    builtIns: typed.builtIns,
    cycles: typed.cycles,
  };
}

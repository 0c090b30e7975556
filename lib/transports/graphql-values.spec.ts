import { buildSchema, graphql, GraphQLScalarType, type GraphQLSchema } from 'graphql';
import { replayedFieldValue, storedFieldValue } from './graphql-values.js';

/** A scalar like Nest's DateTime: it serialises Dates only. */
const Instant = new GraphQLScalarType<Date, string>({
  name: 'Instant',
  serialize: (value) => (value instanceof Date ? value.toISOString() : null) as string,
  parseValue: (value) => new Date(value as string),
});

function schemaOf(sdl: string): GraphQLSchema {
  const schema = buildSchema(sdl);
  Object.assign(schema.getType('Instant') ?? {}, {
    serialize: Instant.serialize,
    parseValue: Instant.parseValue,
  });
  return schema;
}

/**
 * Runs `source` with `answer` resolving to `value`, then again with what was stored for it (as
 * JSON, as a store keeps it) revived: both responses, and the stored JSON.
 */
async function firstAndReplay(schema: GraphQLSchema, source: string, value: unknown) {
  let stored = '';
  const first = await graphql({
    schema,
    source,
    rootValue: {
      answer: (_args: unknown, context: unknown, info: Parameters<typeof storedFieldValue>[4]) => {
        const { returnType, schema: of } = info as { returnType: never; schema: never };
        stored = JSON.stringify(storedFieldValue(value, returnType, of, context, info));
        return value;
      },
    },
  });
  const replay = await graphql({
    schema,
    source,
    rootValue: {
      answer: (_args: unknown, _context: unknown, info: { schema: never }) =>
        replayedFieldValue(JSON.parse(stored), info.schema),
    },
  });
  return { first: JSON.stringify(first), replay: JSON.stringify(replay), stored };
}

describe('storedFieldValue and replayedFieldValue', () => {
  it('give the first answer back for Dates in nested lists, beside nulls', async () => {
    const schema = schemaOf(`
      scalar Instant
      type Slot { at: Instant, tags: [String!]! }
      type Query { answer: [[Slot]]! }
    `);
    const value = [
      [{ at: new Date('2024-02-29T12:00:00Z'), tags: ['a'] }, null],
      [],
      [{ at: null, tags: [] }],
    ];
    const { first, replay } = await firstAndReplay(schema, '{ answer { at tags } }', value);
    expect(first).toContain('"2024-02-29T12:00:00.000Z"');
    expect(replay).toBe(first);
  });

  it('store a value whose JSON answers the same as that value, as earlier versions did', () => {
    const schema = schemaOf('type Item { id: ID!, n: Int } type Query { answer: Item }');
    const value = { id: 'x', n: 3, internal: { any: ['thing'] } };
    const returnType = schema.getQueryType()!.getFields().answer!.type;
    expect(storedFieldValue(value, returnType as never, schema as never, {}, {})).toBe(value);
    // A record stored by an earlier version (plain JSON) replays as it is.
    expect(replayedFieldValue(JSON.parse(JSON.stringify(value)), schema as never)).toEqual(value);
  });

  it('leave a property that a field resolver reads in its JSON when the type would not change it', async () => {
    const schema = schemaOf('type Item { price: String! } type Query { answer: Item! }');
    const seen: unknown[] = [];
    Object.assign(
      (schema.getType('Item') as unknown as { getFields(): Record<string, object> }).getFields()
        .price!,
      {
        resolve: (item: { price: number }) => {
          seen.push(item.price);
          return `${item.price / 100} EUR`;
        },
      },
    );
    const { first, replay } = await firstAndReplay(schema, '{ answer { price } }', { price: 1230 });
    expect(replay).toBe(first);
    expect(seen).toEqual([1230, 1230]);
  });

  it('fall back to the value itself when it cannot be walked (a cycle: JSON refuses it too)', () => {
    const schema = schemaOf(
      'scalar Instant type Node { at: Instant, next: Node } type Query { answer: Node }',
    );
    const node: Record<string, unknown> = { at: new Date() };
    node.next = node;
    const returnType = schema.getQueryType()!.getFields().answer!.type;
    expect(storedFieldValue(node, returnType as never, schema as never, {}, {})).toBe(node);
  });
});

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
      answer: async (
        _args: unknown,
        context: unknown,
        info: Parameters<typeof storedFieldValue>[4],
      ) => {
        const { returnType, schema: of } = info as { returnType: never; schema: never };
        stored = JSON.stringify(await storedFieldValue(value, returnType, of, context, info));
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

  it('store a value whose JSON answers the same as that value, as earlier versions did', async () => {
    const schema = schemaOf('type Item { id: ID!, n: Int } type Query { answer: Item }');
    const value = { id: 'x', n: 3, internal: { any: ['thing'] } };
    const returnType = schema.getQueryType()!.getFields().answer.type;
    expect(await storedFieldValue(value, returnType as never, schema as never, {}, {})).toBe(value);
    // A record stored by an earlier version (plain JSON) replays as it is.
    expect(replayedFieldValue(JSON.parse(JSON.stringify(value)), schema as never)).toEqual(value);
  });

  it('leave a property that a field resolver reads in its JSON when the type would not change it', async () => {
    const schema = schemaOf('type Item { price: String! } type Query { answer: Item! }');
    const seen: unknown[] = [];
    Object.assign(
      (schema.getType('Item') as unknown as { getFields(): Record<string, object> }).getFields()
        .price,
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

  it('store a value that holds itself (a relation pointing back at its owner) and give it back', async () => {
    const schema = schemaOf(
      'scalar Instant type Node { at: Instant, next: Node } type Query { answer: Node }',
    );
    const node: Record<string, unknown> = { at: new Date('2024-02-29T12:00:00Z') };
    node.next = node;
    const { first, replay } = await firstAndReplay(
      schema,
      '{ answer { at next { at next { at } } } }',
      node,
    );
    expect(first).toContain('"next":{"at":"2024-02-29T12:00:00.000Z","next":{"at":');
    expect(replay).toBe(first);
  });

  it('store the values of the promises graphql awaits, and no promise a field it does not select holds', async () => {
    const schema = schemaOf(`
      scalar Instant
      type Tag { name: String!, at: Instant! }
      type Item { tags: [Tag!]!, owner: Tag }
      type Query { answer: Item! }
    `);
    let ownerRead = false;
    const value = {
      tags: Promise.resolve([{ name: 'a', at: new Date('2024-02-29T12:00:00Z') }]),
      get owner() {
        ownerRead = true;
        return Promise.reject(new Error('not loaded'));
      },
    };
    const { first, replay, stored } = await firstAndReplay(
      schema,
      '{ answer { tags { name at } } }',
      value,
    );
    expect(first).toContain('"tags":[{"name":"a","at":"2024-02-29T12:00:00.000Z"}]');
    expect(replay).toBe(first);
    // The walk reads the getter (graphql does not: it is not selected), but never waits for it.
    expect(ownerRead).toBe(true);
    expect(stored).not.toContain('not loaded');
  });
});

import { ApolloDriver, type ApolloDriverConfig } from '@nestjs/apollo';
import { GraphQLModule } from '@nestjs/graphql';
import type { HttpPlatform } from './databases.js';
import { jsonOf, type Exchange, type HttpClient } from './http-client.js';

/**
 * Apollo at /graphql on `platform`, the request reaching the resolvers as `req` in the GraphQL
 * context, as the README shows (Express hands the context `{ req }`, Fastify the request itself).
 */
export function apolloModule(
  platform: HttpPlatform,
  config: Omit<ApolloDriverConfig, 'driver' | 'context'>,
) {
  return GraphQLModule.forRoot<ApolloDriverConfig>({
    driver: ApolloDriver,
    ...config,
    context:
      platform === 'express'
        ? ({ req }: { req: unknown }) => ({ req })
        : (request: unknown) => ({ req: request }),
  });
}

/** A GraphQL response body, its `data` as the spec's schema has it. */
export interface GraphQLAnswer<Data = Record<string, any>> {
  data?: Data | null;
  errors?: { message: string; path?: (string | number)[]; extensions?: Record<string, unknown> }[];
}

/** An exchange with /graphql: its status, headers and text, and its body parsed. */
export interface GraphQLExchange<Answer> extends Pick<Exchange, 'status' | 'headers' | 'text'> {
  readonly body: Answer;
}

/** Posts `body` (an operation, or a batch of them) to /graphql through `client`. */
export async function postGraphQL<Answer = any>(
  client: HttpClient,
  body: object,
  headers: Record<string, string> = {},
): Promise<GraphQLExchange<Answer>> {
  const exchange = await client.send('/graphql', { body, headers });
  return {
    status: exchange.status,
    headers: exchange.headers,
    text: exchange.text,
    body: jsonOf(exchange) as Answer,
  };
}

/** The `extensions.code` of the answer's first error. */
export const codeOf = (answer: GraphQLAnswer<unknown>) => answer.errors?.[0]?.extensions?.code;

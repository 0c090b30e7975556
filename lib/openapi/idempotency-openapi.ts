import { Logger, RequestMethod, type Provider } from '@nestjs/common';
import { HTTP_CODE_METADATA, METHOD_METADATA, PATH_METADATA } from '@nestjs/common/constants.js';
import { DiscoveryService, MetadataScanner } from '@nestjs/core';
import { IDEMPOTENT_ROUTE_OPTIONS } from '../idempotency.constants.js';
import {
  controllerRouteOptions,
  RESOLVED_OPTIONS,
  resolveRouteOptionsFor,
  type ResolvedModuleOptions,
  type ResolvedRouteOptions,
} from '../idempotency.options.js';
import type { IdempotencyRouteOptions } from '../interfaces/idempotency-options.interface.js';
import {
  KEY_HEADER_NAME,
  keyHeaderParameter,
  problemResponses,
  REPLAYED_RESPONSE_HEADER,
} from './openapi-objects.js';

/**
 * OpenAPI documentation of `@Idempotent()` routes, for apps that use `@nestjs/swagger` (an optional
 * peer dependency: without it this does nothing).
 *
 * Why at startup and not in the decorator: what the document must say depends on things the
 * decorator cannot know when it runs. Whether the key is required falls back to the module's
 * `required` option; the success status (201 for `@Post()`, or `@HttpCode()`) and the responses
 * the developer documented come from decorators that may be applied after ours. So a provider of
 * the module writes swagger's metadata while the app is being created (`NestFactory.create` /
 * `Test…compile()` build every provider), before any `SwaggerModule.createDocument(app)` can read
 * it; `onModuleInit` would be too late, since apps usually create the document before `listen()`.
 *
 * Why `await import()`: a provider factory may be async, so `@nestjs/swagger` is imported the
 * standard way, with no top-level await (which `require(esm)` from a CommonJS app forbids). The
 * synchronous alternatives fail somewhere real: `createRequire(import.meta.url)('@nestjs/swagger')`
 * works on plain Node ≥ 20.19 but throws "Must use import to load ES Module" under jest's ESM
 * runtime and is invisible to bundlers such as esbuild; Nest's `loadPackageSync` exits the process
 * when the package is missing.
 *
 * The metadata keys come from swagger's exported `DECORATORS`; the values are OpenAPI parameter
 * and response objects, which swagger passes through. Entries the developer wrote are kept.
 */
export const IDEMPOTENCY_OPENAPI = Symbol('IdempotencyOpenApi');

type SwaggerPackage = typeof import('@nestjs/swagger');
type ResponseEntries = Record<string, { headers?: object; description?: string }>;

const logger = new Logger('Idempotency');

/**
 * What this module wrote into swagger's metadata, each mapped to the developer's entry it replaced
 * (undefined: none). Several apps in one process (tests) may document the same controller class
 * with different module options: each run first takes back the previous run's entries.
 */
const written = new WeakMap<object, object | undefined>();

export const idempotencyOpenApiProvider: Provider = {
  provide: IDEMPOTENCY_OPENAPI,
  useFactory: async (
    discovery: DiscoveryService,
    scanner: MetadataScanner,
    moduleOptions: ResolvedModuleOptions,
  ): Promise<boolean> => {
    const swagger = await importSwagger();
    if (!swagger) return false;
    for (const { metatype } of discovery.getControllers()) {
      if (!metatype) continue;
      const prototype = metatype.prototype as Record<string, Function>;
      for (const method of scanner.getAllMethodNames(prototype)) {
        const handler = prototype[method];
        if (Reflect.getMetadata(PATH_METADATA, handler) === undefined) continue;
        // As the interceptor reads them: a method's options over its controller's, field by field.
        const route = Reflect.getMetadata(IDEMPOTENT_ROUTE_OPTIONS, handler) as
          IdempotencyRouteOptions | undefined;
        // Merged down the class chain, as the interceptor does (a base class's keyFrom counts).
        const controller = controllerRouteOptions(metatype);
        if (!route && !controller) continue;
        documentRoute(
          swagger,
          metatype,
          handler,
          resolveRouteOptionsFor(moduleOptions, controller, route),
        );
      }
    }
    return true;
  },
  inject: [DiscoveryService, MetadataScanner, RESOLVED_OPTIONS],
};

/** `@nestjs/swagger`, or undefined when it is not installed. */
async function importSwagger(): Promise<SwaggerPackage | undefined> {
  try {
    return await import('@nestjs/swagger');
  } catch (error) {
    const { code, message } = error as { code?: string; message?: string };
    const absent =
      (code === 'ERR_MODULE_NOT_FOUND' || code === 'MODULE_NOT_FOUND') &&
      /['"]@nestjs\/swagger['"]/.test(message ?? '');
    // Installed but broken: the app still runs; only its document lacks the idempotency parts.
    if (!absent) {
      logger.warn(
        `@nestjs/swagger could not be loaded, so @Idempotent() routes are not documented: ${message}`,
      );
    }
    return undefined;
  }
}

function documentRoute(
  swagger: SwaggerPackage,
  controller: Function,
  handler: Function,
  route: ResolvedRouteOptions,
): void {
  const { API_HEADERS, API_PARAMETERS, API_RESPONSE } = swagger.DECORATORS;

  const parameters = (
    (Reflect.getMetadata(API_PARAMETERS, handler) ?? []) as HeaderParameter[]
  ).filter((parameter) => !written.has(parameter));
  // The header the route reads: Idempotency-Key, or `keyFrom`'s; none when the key comes from
  // the body or a function.
  const source = route.keyFrom?.sources.http;
  const header =
    source === undefined
      ? KEY_HEADER_NAME
      : typeof source === 'object' && 'header' in source
        ? source.header
        : undefined;
  // A developer's own @ApiHeader for it, on the method or its controller, wins.
  const documentedByDeveloper = [
    ...parameters,
    ...((Reflect.getMetadata(API_HEADERS, controller) ?? []) as HeaderParameter[]),
  ].some((parameter) => header !== undefined && isHeader(parameter, header));
  if (header !== undefined && !documentedByDeveloper)
    parameters.push(ours(keyHeaderParameter(route.required, header)));
  Reflect.defineMetadata(API_PARAMETERS, parameters, handler);

  const developers = takeBack(
    Reflect.getMetadata(API_RESPONSE, handler) as ResponseEntries | undefined,
  );
  // Swagger applies the controller's responses under the method's.
  const effective: ResponseEntries = {
    ...(Reflect.getMetadata(API_RESPONSE, controller) as ResponseEntries | undefined),
    ...developers,
  };
  const responses: ResponseEntries = { ...developers };
  // With no response documented, swagger shows the success status; ours would hide it otherwise.
  const success = successStatus(handler);
  if (!developers && !(success in effective)) effective[success] = { description: '' };
  if (route.replayStatus !== undefined && !(route.replayStatus in effective)) {
    effective[route.replayStatus] = {
      ...effective[success],
      description: `Replay of a stored ${success} response (replayStatus ${route.replayStatus}).`,
    };
  }
  // Every response that can be stored can come back as a replay.
  for (const [status, entry] of Object.entries(effective)) {
    if (!/^\d{3}$/.test(status) || !storable(route, Number(status))) continue;
    const withHeader = { ...entry, headers: { ...entry.headers, ...REPLAYED_RESPONSE_HEADER } };
    responses[status] = ours(withHeader, developers?.[status]);
  }
  const problems = problemResponses(route.required, {
    // With `fingerprint: false` every payload under a key is the same request: never 422.
    keyReused: route.fingerprint !== false,
    retryAfterSeconds: route.retryAfterSeconds,
  });
  for (const [status, problem] of Object.entries(problems)) {
    if (!(status in effective)) responses[status] = ours(problem);
  }
  Reflect.defineMetadata(API_RESPONSE, responses, handler);
}

/** Whether a returned value of this status is stored: a `storeIf` that throws documents no replay. */
function storable(route: ResolvedRouteOptions, status: number): boolean {
  try {
    return route.shouldStore(status);
  } catch {
    return false;
  }
}

type HeaderParameter = { name?: string; in?: string };

function isHeader(parameter: HeaderParameter, name: string): boolean {
  return parameter.in === 'header' && parameter.name?.toLowerCase() === name.toLowerCase();
}

function ours<T extends object>(entry: T, replaced?: object): T {
  written.set(entry, replaced);
  return entry;
}

/** The developer's own responses of a handler, without what an earlier run of ours wrote. */
function takeBack(responses: ResponseEntries | undefined): ResponseEntries | undefined {
  if (!responses) return undefined;
  const restored: ResponseEntries = {};
  for (const [status, entry] of Object.entries(responses)) {
    const original = written.has(entry) ? written.get(entry) : entry;
    if (original) restored[status] = original;
  }
  return Object.keys(restored).length > 0 ? restored : undefined;
}

/** The status swagger documents for a handler with no documented response. */
function successStatus(handler: Function): number {
  return (
    (Reflect.getMetadata(HTTP_CODE_METADATA, handler) as number | undefined) ??
    (Reflect.getMetadata(METHOD_METADATA, handler) === RequestMethod.POST ? 201 : 200)
  );
}

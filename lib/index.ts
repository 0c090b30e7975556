export { IdempotencyModule } from './idempotency.module.js';
export { IDEMPOTENCY_MODULE_OPTIONS } from './idempotency.module-definition.js';
export { Idempotent } from './decorators/idempotent.decorator.js';
export { IdempotencyInterceptor } from './interceptors/idempotency.interceptor.js';
export {
  IdempotencyService,
  LeaseLostError,
  TransactionUnavailableError,
  UnstoredResultError,
  type CaptureOutcome,
  type Decision,
  type ExecuteOptions,
  type Outcome,
} from './idempotency.service.js';
export {
  IdempotencyContext,
  IdempotentTransaction,
  downstreamKeyOf,
  type IdempotentOperation,
} from './idempotency.context.js';
export { IdempotencyPurgeJob } from './idempotency-purge.job.js';
export {
  IdempotencyAdmin,
  IdempotencyAdminRefusal,
  IDEMPOTENCY_ADMIN_CHANNEL,
  type AdminAction,
  type AdminActionMessage,
  type AdminActor,
  type AdminInspectOptions,
  type AdminListOptions,
  type AdminModuleOptions,
  type AdminRecord,
  type AdminRecordSelector,
  type AdminRefusalReason,
} from './admin/idempotency-admin.service.js';
export {
  IdempotencyMetrics,
  type IdempotencyEvent,
  type IdempotencyEventListener,
} from './idempotency-metrics.js';
export type {
  ConcurrencyMode,
  FingerprintOption,
  IdempotencyModuleOptions,
  IdempotencyRouteOptions,
  KeyFunction,
  KeySource,
  KeySourcesByTransport,
  ReplayedResponse,
  ScopeOption,
  ScopeResolver,
  ScopeResolversByTransport,
  ScopeValue,
  StoreStatusPolicy,
} from './interfaces/idempotency-options.interface.js';
export {
  IdempotencyStore,
  type ClaimRequest,
  type ClaimResult,
  type Lease,
  type LeaseState,
  type IdempotencyAdminStore,
  type RecordDetails,
  type RecordId,
  type RecordInvalidation,
  type RecordQuery,
  type RecordSnapshot,
  type RecordWatch,
  type BodyEncoding,
  type StoredResponse,
  type StoreTransaction,
} from './storage/idempotency-store.interface.js';
export {
  RedisIdempotencyStore,
  type RedisClient,
  type RedisIdempotencyStoreOptions,
  type RedisSubscriber,
} from './storage/redis/redis-idempotency.store.js';
export { pgliteDriver, type PGliteDriverOptions } from './storage/typeorm/pglite-driver.js';
export {
  IdempotencyRecord,
  IDEMPOTENCY_RECORDS_TABLE,
} from './storage/typeorm/idempotency-record.entity.js';
export { CreateIdempotencyRecords1763900000000 } from './storage/typeorm/create-idempotency-records.migration.js';
export { IdempotencyRecordsExactIds1767000000000 } from './storage/typeorm/idempotency-records-exact-ids.migration.js';
export { IdempotencyRecordsHotCompletion1768000000000 } from './storage/typeorm/idempotency-records-hot-completion.migration.js';
export {
  TypeOrmIdempotencyStore,
  type TypeOrmIdempotencyStoreOptions,
  type TransactionRunner,
} from './storage/typeorm/typeorm-idempotency.store.js';
export {
  IdempotencyException,
  IdempotencyKeyInvalidException,
  IdempotencyKeyMissingException,
  IdempotencyKeyReusedException,
  IdempotencyLeaseLostException,
  IdempotencyRequestInProgressException,
  IdempotencyResultNotStoredException,
  IdempotencyResponseUnreadableException,
  IdempotencyScopeInvalidException,
  IdempotencyStoreUnavailableException,
  IdempotencyBodyUnreadableException,
  PROBLEM_CONTENT_TYPE,
  type ProblemDetails,
} from './errors/idempotency.exceptions.js';
export { IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER } from './idempotency.constants.js';
export {
  graphqlCodeOf,
  rejection,
  IdempotencyRejectionError,
  type IdempotencyRejection,
  type RejectionCode,
} from './errors/idempotency-rejection.js';
export type {
  IdempotencyTransport,
  OperationDescription,
} from './transports/idempotency-transport.js';
export { HttpTransport } from './transports/http.transport.js';
export {
  GraphQLTransport,
  GRAPHQL_KEY_ARGUMENT,
  IdempotencyGraphQLError,
} from './transports/graphql.transport.js';
export {
  RpcTransport,
  rabbitMqAcknowledgement,
  transportKey,
  type MessageAcknowledgement,
  type MessageScopeSource,
  type SettledMessage,
} from './transports/rpc.transport.js';
export type { Duration } from './utils/duration.js';
export type { ReplayCacheOptions } from './replay-cache.js';
export {
  SEALED_ENCODING,
  type EncryptionKey,
  type IdempotencyEncryptionOptions,
} from './security/response-sealer.js';
export { idempotencyChannelName, type IdempotencyEventMessage } from './idempotency-metrics.js';
export {
  idempotentAxios,
  idempotentFetch,
  isRetryableStatus,
  parseRetryAfter,
  retryDelay,
  type AxiosLike,
  type AxiosRequestLike,
  type AxiosResponseLike,
  type IdempotentFetchOptions,
  type IdempotentRetryOptions,
  type RetryEvent,
  type RetryReason,
} from './client/index.js';
export {
  IdempotencyRunner,
  IdempotentMethod,
  IDEMPOTENT_METHOD_OPTIONS,
  type CompiledCallOptions,
  type IdempotentCallOptions,
  type IdempotentMethodOptions,
  type IdempotentRunContext,
  type IdempotentRunOptions,
  type IdempotentRunResult,
} from './functions/index.js';
export {
  IdempotencyConflictError,
  IdempotencyInvalidCallError,
  IdempotencyLeaseLostError,
  IdempotencyPayloadMismatchError,
  IdempotencyResultNotStoredError,
  IdempotencyResultUnreadableError,
  IdempotencyRunError,
  IdempotencyStoreUnavailableError,
  type IdempotencyRunErrorDetails,
} from './errors/idempotency-run.errors.js';

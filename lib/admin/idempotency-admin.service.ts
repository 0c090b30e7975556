import {
  Inject,
  Injectable,
  type OnApplicationBootstrap,
  type OnApplicationShutdown,
} from '@nestjs/common';
import { channel } from 'node:diagnostics_channel';
import { RESOLVED_OPTIONS, type ResolvedModuleOptions } from '../idempotency.options.js';
import { invalidate, type CachedRecord, type ReplayCache } from '../replay-cache.js';
import {
  IdempotencyStore,
  type RecordDetails,
  type RecordId,
  type RecordState,
} from '../storage/idempotency-store.interface.js';
import { toMilliseconds, type Duration } from '../utils/duration.js';
import { truncateKeyForLog } from '../utils/idempotency-key.js';
import { quietLogger } from '../utils/quiet-logger.js';
import { UnreadableResponseError } from '../security/response-sealer.js';

/** What every admin call says about who asked. */
export interface AdminActor {
  /** Who asked (a person, a ticket, a job): logged with every action. */
  readonly actor: string;
}

/** Narrows a key to one record: the key may exist under several scopes and endpoints. */
export interface AdminRecordSelector extends AdminActor {
  /** The caller's scope, as the scope resolver gave it ('' when keys are not per caller). */
  readonly scope?: string;
  /** The route, e.g. `POST /orders`. */
  readonly endpoint?: string;
}

/** Options of `IdempotencyAdmin.inspect`. */
export interface AdminInspectOptions extends AdminRecordSelector {
  /**
   * Include the stored headers and body. A sealed body is opened only with the module's
   * encryption keys; without them it stays sealed (`sealed: true`, no body).
   * @default false
   */
  readonly body?: boolean;
}

/** Options of `IdempotencyAdmin.list`. */
export interface AdminListOptions extends AdminActor {
  /** Only records in this state. @default both */
  readonly state?: RecordState;
  /** Only records of this endpoint, e.g. `POST /orders`. @default every endpoint */
  readonly endpoint?: string;
  /** Only records claimed at least this long ago (`'5m'`, or ms). @default any age */
  readonly olderThan?: Duration;
  /** At most this many records, oldest claim first. @default 100 */
  readonly limit?: number;
}

/** A record as `IdempotencyAdmin` shows it. Times are epoch ms. */
export interface AdminRecord {
  /** The caller's scope, as the scope resolver gave it ('' when keys are not per caller). */
  readonly scope: string;
  /** The route the key belongs to, e.g. `POST /orders`. */
  readonly endpoint: string;
  /** The client's Idempotency-Key. */
  readonly key: string;
  /** `in_progress`: claimed, its handler running (or its process gone); `completed`: stored. */
  readonly state: RecordState;
  /** SHA-256 of the payload the key is bound to. */
  readonly fingerprint: string;
  /** When its claim was made; `null` when the store does not know. */
  readonly createdAt: number | null;
  /** In progress: the end of its lock, after which a retry takes it over. Else `null`. */
  readonly lockedUntil: number | null;
  /** Completed: the end of its TTL, after which the key runs again. Else `null`. */
  readonly expiresAt: number | null;
  /** Its end (lock or TTL) has passed: the next request with the key runs the handler. */
  readonly expired: boolean;
  /** The stored status code; `null` while in progress. */
  readonly status: number | null;
  /** The stored response is an error the handler threw (an HttpException). */
  readonly isError: boolean;
  /** How the stored body is serialised; `sealed`: encrypted. `null` while in progress. */
  readonly bodyEncoding: string | null;
  /** Length of the stored body (as stored: base64 or envelope), 0 for none. */
  readonly bodyLength: number;
  /** With `body: true`: the stored headers (of the opened response, when sealed). */
  readonly headers?: Readonly<Record<string, string | string[]>>;
  /** With `body: true`: the stored body (opened, when sealed and the keys are configured). */
  readonly body?: string | null;
  /** With `body: true`: the body is sealed and was not opened (no keys, or they do not open it). */
  readonly sealed?: boolean;
}

/** Why an admin action did nothing. */
export type AdminRefusalReason =
  /** No record has this key (under the scope and endpoint given). */
  | 'not-found'
  /** Several records have this key: give `scope` and `endpoint`. */
  | 'ambiguous'
  /** `release` of a completed record, or `forget` of one in progress. */
  | 'wrong-state'
  /** The record changed between its read and its delete (completed, released, taken over). */
  | 'changed'
  /** The store has no admin methods. */
  | 'unsupported';

/** An admin action refused; nothing was changed. `records`: what was found. */
export class IdempotencyAdminRefusal extends Error {
  constructor(
    /** Why nothing was done. */
    readonly reason: AdminRefusalReason,
    message: string,
    /** The records found with the key (several when `ambiguous`); `[]` when there were none. */
    readonly records: readonly AdminRecord[] = [],
  ) {
    super(message);
    this.name = 'IdempotencyAdminRefusal';
  }
}

/** The admin actions, as published on {@link IDEMPOTENCY_ADMIN_CHANNEL}. */
export type AdminAction = 'inspect' | 'list' | 'release' | 'forget';

/** The message of an admin action on {@link IDEMPOTENCY_ADMIN_CHANNEL}. */
export interface AdminActionMessage {
  /** Which action was asked for. */
  readonly action: AdminAction;
  /** Who asked (`AdminActor.actor`). */
  readonly actor: string;
  /**
   * The record acted on (release, forget), or the key looked up (inspect, and a release or forget
   * refused before one record was found); absent for `list`.
   */
  readonly id?:
    | RecordId
    | {
        /** The client's Idempotency-Key. */
        readonly key: string;
      };
  /** `done`, or the refusal's reason. */
  readonly outcome: 'done' | AdminRefusalReason;
}

/** The `node:diagnostics_channel` on which each admin action is published (audit, alerts). */
export const IDEMPOTENCY_ADMIN_CHANNEL = 'nestjs-idempotency:admin';

const adminChannel = channel(IDEMPOTENCY_ADMIN_CHANNEL);

/** What the admin needs of the module's options (the CLI builds it with neither). */
export type AdminModuleOptions = Pick<ResolvedModuleOptions, 'replayCache' | 'sealer'>;

/** Most records `inspect` reads for one key. */
const INSPECT_LIMIT = 1000;

/**
 * The operator's controls over the store's records: look up a key (`inspect`), list records
 * (`list`, e.g. those in progress for too long), give up the claim of an in-progress record whose
 * process is gone (`release`) and delete a completed record whose stored response is wrong
 * (`forget`), so the next request with the key runs the handler.
 *
 * `release` and `forget` delete the record only if it is still as it was read (same state, same
 * lease token): a live handler's completion under that token then matches nothing and is refused
 * (and logged as a lost lease). The record is dropped from this process's replay cache at once, and
 * from every other process's where the store can tell them (PostgreSQL through `pg`: NOTIFY;
 * Redis: pub/sub); on MySQL/MariaDB and SQLite other processes replay a forgotten record from their
 * caches until its TTL ends (turn `replayCache` off there if `forget` must be immediate). Every
 * action is logged and published on {@link IDEMPOTENCY_ADMIN_CHANNEL} with its actor.
 *
 * Injected anywhere once `IdempotencyModule` is imported; `nestjs-idempotency` (the package's CLI)
 * runs the same actions against a database or Redis URL.
 */
@Injectable()
export class IdempotencyAdmin implements OnApplicationBootstrap, OnApplicationShutdown {
  private readonly logger = quietLogger('IdempotencyAdmin');
  private stopInvalidations: (() => void) | undefined;

  constructor(
    @Inject(IdempotencyStore) private readonly store: IdempotencyStore,
    @Inject(RESOLVED_OPTIONS) private readonly options: AdminModuleOptions,
  ) {}

  /**
   * Drops the records that operators forget or release in other processes from this process's
   * replay cache, from the first record it caches on (the store's listening connection opens then:
   * a process that never replays opens none).
   */
  onApplicationBootstrap(): void {
    const cache = this.options.replayCache;
    if (!cache || !this.store.onInvalidated) return;
    let stopped = false;
    this.stopInvalidations = () => (stopped = true);
    cache.onFirstUse(() => {
      if (!stopped) this.listenForInvalidations(cache);
    });
  }

  private listenForInvalidations(cache: ReplayCache): void {
    let live = false;
    this.stopInvalidations = this.store.onInvalidated?.((invalidation) => {
      if (invalidation.all && invalidation.listening !== false && !live) {
        // Listening for the first time: what was cached before was read from the store moments
        // ago; keep what is still stored rather than empty the cache (a reconnect empties it).
        live = true;
        // A connection lost before this process heard it listen suspended the cache (emptied it,
        // and it has cached nothing since): it caches again from now on, as after any reconnect.
        // Resumed now rather than once the check ends: a suspended cache holds nothing to check,
        // and a loss during the check suspends it again, which a late resume would undo.
        cache.resume();
        void cache
          .revalidate((id, record) => this.stillStored(id, record))
          .then(() =>
            this.logger.debug(
              'Listening for records that operators delete: kept the cached records still stored',
            ),
          );
        return;
      }
      invalidate(cache, invalidation);
      this.logger.debug(
        !invalidation.all
          ? 'An operator deleted a record: dropped from the replay cache, if it held it'
          : invalidation.listening === false
            ? 'Stopped hearing of records that operators delete (connection lost): replay cache emptied and unused until it is back'
            : 'Listening for records that operators delete: replay cache emptied (what was deleted while nobody listened is unknown)',
      );
    });
  }

  /** Whether the store still holds `record` completed under `id`. */
  private async stillStored(id: RecordId, record: CachedRecord): Promise<boolean> {
    if (!this.store.findRecords) return false;
    const [found] = await this.store.findRecords({ ...id, state: 'completed', limit: 1 });
    // The same completion: a record forgotten and run again (same payload) has another token.
    return found?.token === record.token && found.fingerprint === record.fingerprint;
  }

  /** Stops listening for the records that operators delete in other processes. */
  onApplicationShutdown(): void {
    this.stopInvalidations?.();
    this.stopInvalidations = undefined;
  }

  /** Every record with this key (under every scope and endpoint, unless narrowed). */
  async inspect(key: string, options: AdminInspectOptions): Promise<AdminRecord[]> {
    const records = await this.find(key, options);
    this.audit('inspect', options.actor, { key }, 'done', `${records.length} record(s)`);
    return records.map((record) => this.view(record, options.body ?? false));
  }

  /** Records by state and age, oldest claim first. */
  async list(options: AdminListOptions): Promise<AdminRecord[]> {
    const findRecords = this.requireAdminStore();
    const olderThanMs =
      options.olderThan === undefined ? undefined : toMilliseconds(options.olderThan, 'olderThan');
    const limit = options.limit ?? 100;
    if (!(Number.isInteger(limit) && limit > 0))
      throw new TypeError('nestjs-idempotency: list: limit must be a positive whole number');
    const records = await findRecords({
      state: options.state,
      endpoint: options.endpoint,
      createdBefore: olderThanMs === undefined ? undefined : Date.now() - olderThanMs,
      limit,
    });
    this.audit(
      'list',
      options.actor,
      undefined,
      'done',
      `${records.length} record(s)${options.state ? ` ${options.state}` : ''}${options.olderThan === undefined ? '' : ` older than ${String(options.olderThan)}`}`,
    );
    return records.map((record) => this.view(record, false));
  }

  /**
   * Deletes an in-progress record, so the next request with the key runs the handler: for a claim
   * whose process is gone (it would otherwise hold the key until its lock times out). If its
   * handler is still running after all, its completion is refused. Refused for a completed record
   * (see `forget`). Resolves to the record as it was.
   */
  release(key: string, options: AdminRecordSelector): Promise<AdminRecord> {
    return this.delete('release', 'in_progress', key, options);
  }

  /**
   * Deletes a completed record (a wrong stored response), so the next request with the key runs
   * the handler, in every process (see the class). Refused for an in-progress record (see
   * `release`). Resolves to the record as it was.
   */
  forget(key: string, options: AdminRecordSelector): Promise<AdminRecord> {
    return this.delete('forget', 'completed', key, options);
  }

  private async delete(
    action: 'release' | 'forget',
    state: RecordState,
    key: string,
    options: AdminRecordSelector,
  ): Promise<AdminRecord> {
    const { actor } = options;
    const refuse = (
      reason: AdminRefusalReason,
      message: string,
      records: RecordDetails[],
      id: RecordId | { key: string } = { key },
    ) => {
      this.audit(action, actor, id, reason, message);
      return new IdempotencyAdminRefusal(
        reason,
        message,
        records.map((record) => this.view(record, false)),
      );
    };
    const deleteRecord = this.store.deleteRecord?.bind(this.store);
    if (!deleteRecord) throw refuse('unsupported', 'this store has no admin methods', []);
    const records = await this.find(key, options);
    if (records.length === 0)
      throw refuse(
        'not-found',
        `no record has key ${truncateKeyForLog(key)}${narrowing(options)}`,
        [],
      );
    if (records.length > 1)
      throw refuse(
        'ambiguous',
        `${records.length} records have key ${truncateKeyForLog(key)}${narrowing(options)}: give the scope and the endpoint of the one to ${action}`,
        records,
      );
    const [record] = records;
    if (record.state !== state)
      throw refuse(
        'wrong-state',
        action === 'release'
          ? 'the record is completed: `release` gives up an in-progress claim; `forget` deletes a stored response'
          : 'the record is in progress: `forget` deletes a stored response; `release` gives up an in-progress claim',
        records,
        record.id,
      );
    if (!(await deleteRecord(record.id, { state, token: record.token })))
      throw refuse(
        'changed',
        'the record changed since it was read (completed, released or taken over): inspect it again',
        records,
        record.id,
      );
    this.options.replayCache?.delete(record.id);
    const live = record.expiresAt > Date.now();
    this.audit(
      action,
      actor,
      record.id,
      'done',
      action === 'release' && live
        ? 'released while its lock was live: if its handler is still running, its completion is refused'
        : 'deleted; the next request with the key runs the handler',
    );
    return this.view(record, false);
  }

  private async find(key: string, selector: AdminRecordSelector): Promise<RecordDetails[]> {
    const findRecords = this.requireAdminStore();
    return findRecords({
      key,
      scope: selector.scope,
      endpoint: selector.endpoint,
      limit: INSPECT_LIMIT,
    });
  }

  private requireAdminStore(): NonNullable<IdempotencyStore['findRecords']> {
    if (!this.store.findRecords)
      throw new IdempotencyAdminRefusal(
        'unsupported',
        'this store has no admin methods (findRecords, deleteRecord)',
      );
    return this.store.findRecords.bind(this.store);
  }

  private view(record: RecordDetails, withBody: boolean): AdminRecord {
    const { id, response } = record;
    const inProgress = record.state === 'in_progress';
    const view: AdminRecord = {
      ...id,
      state: record.state,
      fingerprint: record.fingerprint,
      createdAt: record.createdAt,
      lockedUntil: inProgress ? record.expiresAt : null,
      expiresAt: inProgress ? null : record.expiresAt,
      expired: record.expiresAt <= Date.now(),
      status: response?.status ?? null,
      isError: response?.isError ?? false,
      bodyEncoding: response?.bodyEncoding ?? null,
      bodyLength: response?.body?.length ?? 0,
    };
    if (!withBody || !response) return view;
    if (response.bodyEncoding !== 'sealed')
      return { ...view, headers: response.headers, body: response.body };
    const sealer = this.options.sealer;
    if (!sealer) return { ...view, sealed: true };
    try {
      const opened = sealer.open(
        { id, fingerprint: record.fingerprint, token: record.token },
        response,
      );
      return { ...view, headers: opened.headers, body: opened.body };
    } catch (error) {
      if (!(error instanceof UnreadableResponseError)) throw error;
      return { ...view, sealed: true };
    }
  }

  /** Logs an action with its actor, and publishes it on the admin channel. */
  private audit(
    action: AdminAction,
    actor: string,
    id: RecordId | { readonly key: string } | undefined,
    outcome: 'done' | AdminRefusalReason,
    detail: string,
  ) {
    const what =
      id === undefined
        ? ''
        : 'endpoint' in id
          ? ` of key ${truncateKeyForLog(id.key)} on ${id.endpoint}${id.scope ? ' (scoped)' : ''}`
          : ` of key ${truncateKeyForLog(id.key)}`;
    const line = `${action}${what} by ${JSON.stringify(actor)}: ${outcome === 'done' ? detail : `refused (${outcome}): ${detail}`}`;
    if (outcome === 'done' && action !== 'inspect' && action !== 'list') this.logger.warn(line);
    else this.logger.log(line);
    if (adminChannel.hasSubscribers)
      adminChannel.publish({ action, actor, id, outcome } satisfies AdminActionMessage);
  }
}

function narrowing({ scope, endpoint }: AdminRecordSelector): string {
  const parts = [
    ...(endpoint === undefined ? [] : [`endpoint ${endpoint}`]),
    ...(scope === undefined ? [] : ['the scope given']),
  ];
  return parts.length ? ` (${parts.join(', ')})` : '';
}

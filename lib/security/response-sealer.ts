import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import type { RecordId, StoredResponse } from '../storage/idempotency-store.interface.js';

/**
 * What a sealed response is bound to: its record, the fingerprint of the payload it answers, and
 * the lease token of the claim that completed it (one per lifetime of the key).
 */
export interface SealedRecord {
  readonly id: RecordId;
  readonly fingerprint: string;
  readonly token: string;
}

/** A 256-bit key: 32 bytes, or their base64 (44 characters) or hex (64 characters). */
export type EncryptionKey = Buffer | string;

/** Options of `encryption` (see `IdempotencyModuleOptions.encryption`). */
export interface IdempotencyEncryptionOptions {
  /**
   * AES-256 keys. New responses are sealed under the first; any of them opens a stored response,
   * so a key is rotated by putting the new one first and keeping the old one until the TTL of the
   * responses sealed under it has passed.
   */
  readonly keys: readonly EncryptionKey[];
  /**
   * Replay responses stored before encryption was turned on (not sealed). By default such a
   * response is refused like a tampered one (500, the handler is not run again): set this for one
   * TTL after turning encryption on, then remove it.
   * @default false
   */
  readonly acceptUnsealed?: boolean;
  /**
   * Replay responses sealed by earlier versions of the module (envelope `v1`), whose authenticated
   * data does not include the payload's fingerprint or the claim that completed them. By default
   * they are refused like a tampered response (500, the handler is not run again): set this for
   * one TTL after upgrading, then remove it.
   * @default false
   */
  readonly acceptV1Envelopes?: boolean;
}

/** The `bodyEncoding` of a sealed response: its body is the envelope, its headers are empty. */
export const SEALED_ENCODING = 'sealed';

const ENVELOPE_VERSION = 'v2';
/** The envelope of earlier versions: its authenticated data is the record's id and status only. */
const V1_ENVELOPE = 'v1';
const IV_BYTES = 12;
const TAG_BYTES = 16;

/** Why a stored response cannot be replayed. */
export class UnreadableResponseError extends Error {}

interface SealingKey {
  /** First 8 bytes of SHA-256 of the key, hex: names the key in the envelope without revealing it. */
  readonly id: string;
  readonly secret: Buffer;
}

/**
 * Seals stored responses with AES-256-GCM (node:crypto) and opens them again. The envelope is
 * `v2.<key id>.<iv>.<ciphertext>.<tag>` (base64url parts); the plaintext is the response's headers,
 * body and body encoding. The authenticated data is the record's identity (scope, endpoint, key),
 * the fingerprint of the payload it answers, the lease token of the claim that completed it, and
 * the response's status and error flag: a sealed response copied under another key, into an
 * earlier or later lifetime of the same key, or beside a changed fingerprint or status, does not
 * open.
 */
export class ResponseSealer {
  private readonly keys: readonly SealingKey[];
  private readonly acceptUnsealed: boolean;
  private readonly acceptV1: boolean;

  constructor(options: IdempotencyEncryptionOptions) {
    // Checked through a copy: Array.isArray would narrow `options.keys` itself to `any[]`.
    const keys: unknown = options.keys;
    if (!Array.isArray(keys) || keys.length === 0) {
      throw new TypeError('nestjs-idempotency: encryption.keys must list at least one key');
    }
    this.keys = options.keys.map((key, index) => {
      const secret = toSecret(key, index);
      return { id: createHash('sha256').update(secret).digest('hex').slice(0, 16), secret };
    });
    this.acceptUnsealed = options.acceptUnsealed ?? false;
    this.acceptV1 = options.acceptV1Envelopes ?? false;
  }

  seal(record: SealedRecord, response: StoredResponse): StoredResponse {
    const key = this.keys[0];
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv('aes-256-gcm', key.secret, iv);
    cipher.setAAD(associatedData(ENVELOPE_VERSION, record, response));
    const plaintext = JSON.stringify({
      h: response.headers,
      b: response.body,
      e: response.bodyEncoding,
    });
    const ciphertext = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()]);
    const envelope = [
      ENVELOPE_VERSION,
      key.id,
      iv.toString('base64url'),
      ciphertext.toString('base64url'),
      cipher.getAuthTag().toString('base64url'),
    ].join('.');
    return {
      status: response.status,
      headers: {},
      body: envelope,
      bodyEncoding: SEALED_ENCODING,
      isError: response.isError,
    };
  }

  /** The response as it was before sealing; throws `UnreadableResponseError` when it cannot be. */
  open(record: SealedRecord, stored: StoredResponse): StoredResponse {
    if (stored.bodyEncoding !== SEALED_ENCODING) {
      if (this.acceptUnsealed) return stored;
      throw new UnreadableResponseError(
        'it was stored without encryption (set encryption.acceptUnsealed to replay such responses)',
      );
    }
    const parts = (stored.body ?? '').split('.');
    if (parts.length !== 5 || (parts[0] !== ENVELOPE_VERSION && parts[0] !== V1_ENVELOPE))
      throw new UnreadableResponseError('its envelope is malformed');
    const [version, keyId, iv, ciphertext, tag] = parts;
    if (version === V1_ENVELOPE && !this.acceptV1)
      throw new UnreadableResponseError(
        'it was sealed by an earlier version of the module, whose envelope (v1) does not authenticate the payload it answers (set encryption.acceptV1Envelopes for one TTL to replay such responses)',
      );
    const key = this.keys.find((candidate) => candidate.id === keyId);
    if (!key)
      throw new UnreadableResponseError(
        `it was sealed under a key that is not configured (key id ${keyId})`,
      );
    let plaintext: string;
    try {
      const decipher = createDecipheriv('aes-256-gcm', key.secret, Buffer.from(iv, 'base64url'), {
        authTagLength: TAG_BYTES,
      });
      decipher.setAAD(associatedData(version, record, stored));
      decipher.setAuthTag(Buffer.from(tag, 'base64url'));
      plaintext = Buffer.concat([
        decipher.update(Buffer.from(ciphertext, 'base64url')),
        decipher.final(),
      ]).toString('utf8');
    } catch {
      throw new UnreadableResponseError(
        'it does not authenticate (tampered with, or copied from another record)',
      );
    }
    const { h, b, e } = JSON.parse(plaintext) as {
      h: StoredResponse['headers'];
      b: string | null;
      e: StoredResponse['bodyEncoding'];
    };
    return { status: stored.status, headers: h, body: b, bodyEncoding: e, isError: stored.isError };
  }
}

/**
 * Without encryption: a sealed response cannot be replayed (encryption was turned off, or the row
 * came from a deployment that has it on), anything else is replayed as it is.
 */
export function openUnencrypted(stored: StoredResponse): StoredResponse {
  if (stored.bodyEncoding === SEALED_ENCODING) {
    throw new UnreadableResponseError('it is sealed and no encryption keys are configured');
  }
  return stored;
}

/** The authenticated data of an envelope of `version`. */
function associatedData(
  version: string,
  { id, fingerprint, token }: SealedRecord,
  response: Pick<StoredResponse, 'status' | 'isError'>,
): Buffer {
  const parts =
    version === V1_ENVELOPE
      ? ['nestjs-idempotency/v1', id.scope, id.endpoint, id.key, response.status, response.isError]
      : [
          'nestjs-idempotency/v2',
          id.scope,
          id.endpoint,
          id.key,
          fingerprint,
          token,
          response.status,
          response.isError,
        ];
  return Buffer.from(JSON.stringify(parts));
}

function toSecret(key: EncryptionKey, index: number): Buffer {
  let secret: Buffer | undefined;
  if (Buffer.isBuffer(key)) secret = Buffer.from(key);
  else if (/^[0-9a-f]{64}$/i.test(key)) secret = Buffer.from(key, 'hex');
  else if (/^[A-Za-z0-9+/]{43}=$/.test(key)) secret = Buffer.from(key, 'base64');
  if (secret?.length !== 32) {
    throw new TypeError(
      `nestjs-idempotency: encryption.keys[${index}] must be 32 bytes: a Buffer, 64 hex digits or 44 base64 characters (e.g. from \`openssl rand -base64 32\`)`,
    );
  }
  return secret;
}

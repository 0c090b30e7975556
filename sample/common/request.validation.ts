import { BadRequestException } from '@nestjs/common';

/**
 * Hand-written checks (the sample avoids a class-validator dependency). Each throws a 400 naming
 * the field. The idempotency library does not store a 400: the key is released, so the client can
 * fix the body and retry with the same key.
 */

function invalid(field: string, message: string): never {
  throw new BadRequestException({
    statusCode: 400,
    error: 'invalid_request',
    message: `${field} ${message}`,
    field,
  });
}

/** The JSON body as an object (express.json leaves other bodies as `{}` or an array). */
export function requireObject(value: unknown, field = 'body'): Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    invalid(field, 'must be a JSON object');
  }
  return value as Record<string, unknown>;
}

/** Money and quantities are whole numbers: amounts in the currency's smallest unit (cents). */
export function requirePositiveInteger(value: unknown, field: string, max = 100_000_000): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value <= 0 || value > max) {
    invalid(field, `must be a whole number between 1 and ${max}`);
  }
  return value;
}

export function requireText(value: unknown, field: string, maxLength: number): string {
  if (typeof value !== 'string' || value.trim() === '' || value.length > maxLength) {
    invalid(field, `must be a non-empty string of at most ${maxLength} characters`);
  }
  return value.trim();
}

export function optionalText(value: unknown, field: string, maxLength: number): string | null {
  return value === undefined || value === null ? null : requireText(value, field, maxLength);
}

/** ISO 4217 code, stored lower-case (`eur`) like most payment APIs. */
export function requireCurrency(value: unknown, field = 'currency'): string {
  if (typeof value !== 'string' || !/^[a-zA-Z]{3}$/.test(value)) {
    invalid(field, 'must be a three-letter ISO 4217 code, e.g. "eur"');
  }
  return value.toLowerCase();
}

export function requireArray(value: unknown, field: string, maxLength: number): unknown[] {
  if (!Array.isArray(value) || value.length === 0 || value.length > maxLength) {
    invalid(field, `must be a non-empty array of at most ${maxLength} entries`);
  }
  return value;
}

export function requireDifferent(a: string, b: string, field: string): void {
  if (a === b) invalid(field, 'must differ from the other account');
}

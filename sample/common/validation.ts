import { ValidationPipe } from '@nestjs/common';
import { Transform } from 'class-transformer';
import { ValidateBy, type ValidationOptions } from 'class-validator';

/**
 * The sample validates request bodies the way most Nest apps do: DTO classes with class-validator
 * decorators, checked by one global `ValidationPipe` (registered as `APP_PIPE` in AppModule).
 *
 * Pipes run after interceptors, so `@Idempotent()` has already claimed the key when the pipe
 * answers 400. The library does not store a 400: it releases the key, and the client can fix the
 * body and retry with the same key (test/sample-app.spec.ts shows it).
 */
export function sampleValidationPipe(): ValidationPipe {
  return new ValidationPipe({
    // The handler gets an instance of its DTO class, with the @Transform()s below applied.
    transform: true,
    // Properties no DTO declares are dropped before the handler sees them.
    whitelist: true,
  });
}

/** Surrounding whitespace is not part of a name or a reference. */
export const Trim = () =>
  Transform(({ value }: { value: unknown }) => (typeof value === 'string' ? value.trim() : value));

/** Codes such as ISO 4217 currencies are stored lower-case (`eur`), like most payment APIs. */
export const LowerCase = () =>
  Transform(({ value }: { value: unknown }) =>
    typeof value === 'string' ? value.toLowerCase() : value,
  );

/**
 * No U+0000 in the string. PostgreSQL's text types cannot store it, so without this check such a
 * value gets past the pipe and fails in the INSERT: a 500 instead of a 400 (and, for a payment,
 * after the gateway has charged the card).
 */
export function HasNoNulCharacter(options?: ValidationOptions): PropertyDecorator {
  return ValidateBy(
    {
      name: 'hasNoNulCharacter',
      validator: {
        validate: (value) => typeof value !== 'string' || !value.includes('\0'),
        defaultMessage: (args) => `${args?.property} must not contain a NUL character`,
      },
    },
    options,
  );
}

/** The value must differ from the one in `property` (a transfer's two accounts). */
export function DiffersFrom(property: string, options?: ValidationOptions): PropertyDecorator {
  return ValidateBy(
    {
      name: 'differsFrom',
      constraints: [property],
      validator: {
        validate: (value, args) =>
          value !== (args?.object as Record<string, unknown> | undefined)?.[property],
        defaultMessage: (args) => `${args?.property} must differ from ${property}`,
      },
    },
    options,
  );
}

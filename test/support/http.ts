import { randomUUID } from 'node:crypto';
import request from 'supertest';

/** A fresh key per operation, as a client would make one. */
export const newKey = () => randomUUID();

/** POST `body` to `path` with an Idempotency-Key (omitted when `key` is undefined). */
export function post(http: any, path: string, key: string | undefined, body: object = {}) {
  const call = request(http).post(path).send(body);
  return key === undefined ? call : call.set('Idempotency-Key', key);
}

/** Asserts an RFC 9457 problem response of this module. */
export function expectProblem(response: request.Response, status: number, type: string) {
  expect(response.status).toBe(status);
  expect(response.headers['content-type']).toMatch(/^application\/problem\+json/);
  expect(response.body).toMatchObject({
    type: `tag:nestjs-idempotency,2026:${type}`,
    status,
    title: expect.any(String),
    detail: expect.any(String),
  });
  expect(JSON.stringify(response.body)).not.toMatch(/\bat .+\.(js|ts):\d+/);
}

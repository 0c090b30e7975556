import type { INestApplication } from '@nestjs/common';
import { existsSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { chromium, type Browser, type Locator, type Page } from 'playwright-core';
import { createSampleApp } from '../sample/app.factory.js';

/**
 * Swagger UI in a real browser: Debian's Chromium, driven by playwright-core. `.ci/run` installs
 * Chromium when it is missing; `npm test` on a machine without it skips this file, saying so.
 */
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const haveChromium = existsSync(CHROMIUM);
if (!haveChromium) {
  console.warn(`[sample-docs] SKIPPED: no Chromium at ${CHROMIUM} (apt-get install chromium)`);
}
const describeWithBrowser = haveChromium ? describe : describe.skip;

describeWithBrowser('Swagger UI of the sample at /docs, in Chromium', () => {
  let app: INestApplication;
  let baseUrl: string;
  let browser: Browser;
  let page: Page;

  beforeAll(async () => {
    app = await createSampleApp({ dataDir: 'memory://', gatewayLatencyMs: 20, logger: false });
    await app.listen(0, '127.0.0.1');
    baseUrl = `http://127.0.0.1:${(app.getHttpServer().address() as AddressInfo).port}`;
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      // As root in a sandbox-less container, and with no network beyond localhost.
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    page = await browser.newPage();
  });
  afterAll(async () => {
    await browser?.close();
    await app?.close();
  });

  it('documents the Idempotency-Key header and the 400, 409 and 422 answers of POST /payments', async () => {
    await page.goto(`${baseUrl}/docs`);
    const operation = await openPostPayments(page);
    const keyRow = operation.locator('tr[data-param-name="Idempotency-Key"]');
    // Swagger UI marks a required parameter's name with the class `required` (and a red star).
    expect(await keyRow.locator('.parameter__name.required').innerText()).toMatch(
      /^Idempotency-Key/,
    );
    expect(await keyRow.locator('.parameter__in').innerText()).toContain('header');
    const statuses = await operation
      .locator('.responses-table tr.response')
      .evaluateAll((rows) => rows.map((row) => row.getAttribute('data-code')));
    expect(statuses).toEqual(expect.arrayContaining(['201', '400', '409', '422', '503']));
    const conflict = operation.locator('.responses-table tr.response[data-code="422"]').first();
    expect(await conflict.innerText()).toContain('application/problem+json');
  });

  it('sends POST /payments twice with one key through "Try it out": the second is a replay, one payment', async () => {
    await page.goto(`${baseUrl}/docs`);
    const operation = await openPostPayments(page);
    await operation.getByRole('button', { name: 'Try it out' }).click();

    const key = randomUUID();
    const reference = `docs-${randomUUID()}`;
    await operation.locator('tr[data-param-name="Idempotency-Key"] input').fill(key);
    await operation
      .locator('textarea.body-param__text')
      .fill(JSON.stringify({ amount: 1250, currency: 'eur', source: 'tok_visa', reference }));

    const first = await execute(page, operation);
    expect(first.status).toBe(201);
    expect(first.headers).not.toContain('idempotent-replayed');
    const second = await execute(page, operation);
    expect(second.status).toBe(201);
    expect(second.headers).toContain('idempotent-replayed: true');
    expect(JSON.parse(second.body).id).toBe(JSON.parse(first.body).id);

    const payments = (await (await fetch(`${baseUrl}/payments`)).json()) as {
      reference: string | null;
    }[];
    expect(payments.filter((payment) => payment.reference === reference)).toHaveLength(1);
  });
});

async function openPostPayments(page: Page): Promise<Locator> {
  const operation = page.locator('.opblock-post', {
    has: page.locator('.opblock-summary-path[data-path="/payments"]'),
  });
  await operation.locator('.opblock-summary').first().click();
  await operation.locator('.opblock-body').waitFor();
  return operation;
}

/** Clicks Execute and reads what Swagger UI shows of the live response. */
async function execute(
  page: Page,
  operation: Locator,
): Promise<{ status: number; headers: string; body: string }> {
  const clear = operation.locator('button.btn-clear');
  if (await clear.isVisible()) {
    await clear.click();
    await operation.locator('.live-responses-table').waitFor({ state: 'detached' });
  }
  const answered = page.waitForResponse(
    (response) => response.url().endsWith('/payments') && response.request().method() === 'POST',
  );
  await operation.locator('button.execute').click();
  await answered;
  const live = operation.locator('.live-responses-table .response').first();
  const body = live.locator('.response-col_description .microlight').first();
  await body.filter({ hasText: '"id"' }).waitFor();
  return {
    status: Number((await live.locator('.response-col_status').innerText()).trim()),
    headers: (await live.locator('.response-col_description').innerText()).toLowerCase(),
    body: await body.innerText(),
  };
}

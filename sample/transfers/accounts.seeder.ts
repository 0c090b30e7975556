import { Inject, Injectable, Logger, type OnModuleInit } from '@nestjs/common';
import { DataSource } from 'typeorm';
import { Account } from './account.entity.js';

/** Balances in cents, like every amount in the sample. */
const SEED_ACCOUNTS: Account[] = [
  { id: 'acc_alice', owner: 'Alice', balance: 1000, currency: 'eur' },
  { id: 'acc_bob', owner: 'Bob', balance: 500, currency: 'eur' },
  { id: 'acc_carol', owner: 'Carol', balance: 0, currency: 'eur' },
];

/**
 * Creates the demo accounts when they are missing, and leaves existing balances alone. Several
 * sample processes may share one PostgreSQL and start together, so the insert is
 * `ON CONFLICT DO NOTHING` rather than check-then-insert.
 */
@Injectable()
export class AccountsSeeder implements OnModuleInit {
  private readonly logger = new Logger('AccountsSeeder');

  constructor(@Inject(DataSource) private readonly dataSource: DataSource) {}

  async onModuleInit(): Promise<void> {
    const result = await this.dataSource
      .createQueryBuilder()
      .insert()
      .into(Account)
      .values(SEED_ACCOUNTS)
      .orIgnore()
      // Only rows actually inserted come back, so skipped accounts are not counted.
      .returning(['id'])
      .execute();
    const created = Array.isArray(result.raw) ? result.raw.length : 0;
    if (created > 0) this.logger.log(`Seeded ${created} account(s)`);
  }
}

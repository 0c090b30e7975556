import { Column, Entity, PrimaryColumn } from 'typeorm';

@Entity({ name: 'accounts' })
export class Account {
  /** Readable ids (`acc_alice`) so the curl examples need no lookup. */
  @PrimaryColumn({ type: 'varchar', length: 64 })
  id!: string;

  @Column({ type: 'varchar', length: 100 })
  owner!: string;

  /** In cents. `integer` rather than `bigint`, which pg returns as a string. */
  @Column({ type: 'integer' })
  balance!: number;

  @Column({ type: 'varchar', length: 3 })
  currency!: string;
}

export function toAccountView(account: Account) {
  return {
    id: account.id,
    owner: account.owner,
    balance: account.balance,
    currency: account.currency,
  };
}

import { Column, Entity, PrimaryColumn } from 'typeorm';

/** A completed move of money; refused transfers leave no row. */
@Entity({ name: 'transfers' })
export class Transfer {
  @PrimaryColumn({ type: 'varchar', length: 64 })
  id!: string;

  @Column({ name: 'from_account', type: 'varchar', length: 64 })
  fromAccount!: string;

  @Column({ name: 'to_account', type: 'varchar', length: 64 })
  toAccount!: string;

  @Column({ type: 'integer' })
  amount!: number;

  @Column({ name: 'created_at', type: 'timestamptz' })
  createdAt!: Date;
}

export function toTransferView(transfer: Transfer) {
  return {
    id: transfer.id,
    from_account: transfer.fromAccount,
    to_account: transfer.toAccount,
    amount: transfer.amount,
    status: 'completed' as const,
    created_at: transfer.createdAt.toISOString(),
  };
}

import { Column, Entity, PrimaryColumn } from 'typeorm';

export interface OrderItem {
  sku: string;
  quantity: number;
}

@Entity({ name: 'orders' })
export class Order {
  @PrimaryColumn({ type: 'varchar', length: 64 })
  id!: string;

  @Column({ type: 'varchar', length: 100 })
  customer!: string;

  /** The lines are only ever read with their order, so one jsonb column is enough. */
  @Column({ type: 'jsonb' })
  items!: OrderItem[];

  @Column({ type: 'varchar', length: 16 })
  status!: 'placed';

  @Column({ name: 'created_at', type: 'timestamptz' })
  createdAt!: Date;
}

export function toOrderView(order: Order) {
  return {
    id: order.id,
    customer: order.customer,
    items: order.items,
    status: order.status,
    created_at: order.createdAt.toISOString(),
  };
}

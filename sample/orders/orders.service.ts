import { Inject, Injectable } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { DataSource } from 'typeorm';
import { Order, toOrderView, type OrderItem } from './order.entity.js';

export interface PlaceOrder {
  customer: string;
  items: OrderItem[];
}

export type OrderView = ReturnType<typeof toOrderView>;

@Injectable()
export class OrdersService {
  constructor(@Inject(DataSource) private readonly dataSource: DataSource) {}

  /** Each call places a new order: a double-clicked "Buy" is two orders unless the route is idempotent. */
  async place(request: PlaceOrder): Promise<OrderView> {
    const repository = this.dataSource.getRepository(Order);
    const order = repository.create({
      id: `ord_${randomUUID()}`,
      customer: request.customer,
      items: request.items,
      status: 'placed',
      createdAt: new Date(),
    });
    await repository.insert(order);
    return toOrderView(order);
  }

  async list(): Promise<OrderView[]> {
    const orders = await this.dataSource
      .getRepository(Order)
      .find({ order: { createdAt: 'ASC', id: 'ASC' } });
    return orders.map(toOrderView);
  }
}

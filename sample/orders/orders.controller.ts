import { Body, Controller, Get, Post } from '@nestjs/common';
import { Idempotent } from '../../lib/index.js';
import {
  requireArray,
  requireObject,
  requirePositiveInteger,
  requireText,
} from '../common/request.validation.js';
import type { OrderItem } from './order.entity.js';
import { OrdersService, type OrderView, type PlaceOrder } from './orders.service.js';

@Controller('orders')
export class OrdersController {
  constructor(private readonly orders: OrdersService) {}

  /** Module defaults: a duplicate sent while the first still runs gets 409 with Retry-After. */
  @Post()
  @Idempotent()
  place(@Body() body: unknown): Promise<OrderView> {
    return this.orders.place(parsePlaceOrder(body));
  }

  @Get()
  list(): Promise<OrderView[]> {
    return this.orders.list();
  }
}

function parsePlaceOrder(body: unknown): PlaceOrder {
  const input = requireObject(body);
  const items = requireArray(input.items, 'items', 50).map((raw, index): OrderItem => {
    const item = requireObject(raw, `items[${index}]`);
    return {
      sku: requireText(item.sku, `items[${index}].sku`, 64),
      quantity: requirePositiveInteger(item.quantity, `items[${index}].quantity`, 1000),
    };
  });
  return { customer: requireText(input.customer, 'customer', 100), items };
}

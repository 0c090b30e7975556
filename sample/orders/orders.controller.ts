import { Body, Controller, Get, Post } from '@nestjs/common';
import { ApiCreatedResponse, ApiTags } from '@nestjs/swagger';
import { Idempotent } from '../../lib/index.js';
import { OrdersService, type OrderView } from './orders.service.js';
import { PlaceOrderDto } from './place-order.dto.js';

@ApiTags('orders')
@Controller('orders')
export class OrdersController {
  constructor(private readonly orders: OrdersService) {}

  /** Module defaults: a duplicate sent while the first still runs gets 409 with Retry-After. */
  @Post()
  @Idempotent()
  @ApiCreatedResponse({ description: 'The order, placed once.' })
  place(@Body() order: PlaceOrderDto): Promise<OrderView> {
    return this.orders.place(order.toCommand());
  }

  @Get()
  list(): Promise<OrderView[]> {
    return this.orders.list();
  }
}

import { Body, Controller, HttpCode, Inject, Module, Post } from '@nestjs/common';
import {
  ClientProxy,
  ClientsModule,
  EventPattern,
  Payload,
  Transport,
} from '@nestjs/microservices';
import { firstValueFrom } from 'rxjs';
import { Idempotent, IdempotencyContext, rabbitMqAcknowledgement } from '../../lib/index.js';
import { TransfersModule } from './transfers.module.js';
import { MakeTransferDto } from './make-transfer.dto.js';
import { TransfersService, type MakeTransfer } from './transfers.service.js';

const TRANSFER_QUEUE_CLIENT = Symbol('TransferQueueClient');
/** The queue the sample's consumer reads; its messages are transfer commands. */
export const TRANSFER_QUEUE = 'sample_transfers';
const EXECUTE_TRANSFER = 'transfers.execute';

/** A queued transfer: the command, and the key that makes its execution once-only. */
interface TransferCommand extends MakeTransfer {
  readonly idempotencyKey: string;
}

/**
 * `POST /transfers/async`: answers 202 at once and queues the transfer as a command on RabbitMQ.
 * The command's key is derived from the request's operation, so a retried request (even one that
 * ran twice) queues the same key, and the consumer moves the money once.
 */
@Controller('transfers')
class TransferQueueController {
  constructor(
    @Inject(TRANSFER_QUEUE_CLIENT) private readonly queue: ClientProxy,
    private readonly idempotency: IdempotencyContext,
  ) {}

  @Post('async')
  @HttpCode(202)
  @Idempotent()
  async enqueue(@Body() transfer: MakeTransferDto) {
    const command: TransferCommand = {
      ...transfer.toCommand(),
      idempotencyKey: this.idempotency.downstreamKey('execute'),
    };
    await firstValueFrom(this.queue.emit(EXECUTE_TRANSFER, command));
    return { status: 'queued', command_key: command.idempotencyKey };
  }
}

/**
 * The consumer: executes each transfer command once, in the transactional mode (the balances, the
 * transfer row and the record of the command commit together), and lets the module acknowledge the
 * message once it is committed — a consumer that dies before its ack has the broker deliver the
 * command again, and the module recognises it as done.
 */
@Controller()
class TransferQueueConsumer {
  constructor(private readonly transfers: TransfersService) {}

  @EventPattern(EXECUTE_TRANSFER)
  @Idempotent({ transactional: true, acknowledge: rabbitMqAcknowledgement })
  async execute(@Payload() command: TransferCommand) {
    await this.transfers.transfer({
      fromAccount: command.fromAccount,
      toAccount: command.toAccount,
      amount: command.amount,
    });
  }
}

/** Only with RABBITMQ_URL: the async transfers and their consumer (see main.ts). */
@Module({})
export class TransferQueueModule {
  static register(rabbitmqUrl: string) {
    return {
      module: TransferQueueModule,
      imports: [
        TransfersModule,
        ClientsModule.register([
          {
            name: TRANSFER_QUEUE_CLIENT,
            transport: Transport.RMQ,
            options: {
              urls: [rabbitmqUrl],
              queue: TRANSFER_QUEUE,
              queueOptions: { durable: true },
            },
          },
        ]),
      ],
      controllers: [TransferQueueController, TransferQueueConsumer],
    };
  }
}

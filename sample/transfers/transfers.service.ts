import { HttpException, HttpStatus, Inject, Injectable, NotFoundException } from '@nestjs/common';
import { randomUUID } from 'node:crypto';
import { DataSource, EntityManager, In } from 'typeorm';
import { IdempotencyContext } from '../../lib/index.js';
import { SAMPLE_CONFIG, type SampleConfig } from '../config/sample.config.js';
import { Account, toAccountView } from './account.entity.js';
import { Transfer, toTransferView } from './transfer.entity.js';

export interface MakeTransfer {
  fromAccount: string;
  toAccount: string;
  amount: number;
}

export type TransferView = ReturnType<typeof toTransferView>;
export type AccountView = ReturnType<typeof toAccountView>;

@Injectable()
export class TransfersService {
  constructor(
    @Inject(DataSource) private readonly dataSource: DataSource,
    private readonly idempotency: IdempotencyContext,
    @Inject(SAMPLE_CONFIG) private readonly config: SampleConfig,
  ) {}

  /**
   * Debit, credit and the transfer row commit together or not at all. On `POST /transfers`
   * (transactional) they run in the idempotency module's transaction, which also stores the
   * response: the money moves if and only if the response is stored. Elsewhere (the demo's
   * plain-mode route) in a transaction of their own, committed before the response is stored.
   */
  async transfer(request: MakeTransfer): Promise<TransferView> {
    const manager = this.idempotency.operation?.entityManager;
    const view = manager
      ? await this.move(manager, request)
      : await this.dataSource.transaction((own) => this.move(own, request));
    if (this.config.crashAfterTransfer) {
      // The demo's crash: the money moved (committed in the plain mode; written, not yet committed,
      // in the transactional mode), and the process dies before the response is stored or sent.
      process.kill(process.pid, 'SIGKILL');
    }
    return view;
  }

  /** Everything goes through `manager` (the transaction's connection), never `this.dataSource`. */
  private async move(manager: EntityManager, request: MakeTransfer): Promise<TransferView> {
    // Both rows locked, in id order: two opposite transfers queue instead of deadlocking, and a
    // concurrent transfer cannot spend the balance read here.
    const accounts = await manager.getRepository(Account).find({
      where: { id: In([request.fromAccount, request.toAccount]) },
      order: { id: 'ASC' },
      lock: { mode: 'pessimistic_write' },
    });
    const from = findAccount(accounts, request.fromAccount);
    const to = findAccount(accounts, request.toAccount);
    if (from.balance < request.amount) {
      // A business refusal: the library stores this 409 and replays it for the same key. Its
      // body says what went wrong, unlike the library's own 409 for a request still in progress.
      throw new HttpException(
        {
          statusCode: HttpStatus.CONFLICT,
          error: 'insufficient_funds',
          message: `Account ${from.id} cannot cover a transfer of ${request.amount}.`,
          available: from.balance,
        },
        HttpStatus.CONFLICT,
      );
    }
    await manager.decrement(Account, { id: from.id }, 'balance', request.amount);
    await manager.increment(Account, { id: to.id }, 'balance', request.amount);
    const transfer = manager.create(Transfer, {
      id: `tr_${randomUUID()}`,
      fromAccount: from.id,
      toAccount: to.id,
      amount: request.amount,
      createdAt: new Date(),
    });
    await manager.insert(Transfer, transfer);
    return toTransferView(transfer);
  }

  async account(id: string): Promise<AccountView> {
    // No id holds a NUL (PostgreSQL would refuse it in the query: a 500), so none is looked up.
    const account = id.includes('\0')
      ? null
      : await this.dataSource.getRepository(Account).findOneBy({ id });
    return toAccountView(findAccount(account ? [account] : [], id));
  }
}

function findAccount(accounts: Account[], id: string): Account {
  const account = accounts.find((candidate) => candidate.id === id);
  if (!account) {
    throw new NotFoundException({
      statusCode: HttpStatus.NOT_FOUND,
      error: 'account_not_found',
      message: `Account ${id} does not exist.`,
    });
  }
  return account;
}

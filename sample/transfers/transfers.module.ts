import { Module } from '@nestjs/common';
import { AccountsSeeder } from './accounts.seeder.js';
import { TransfersController } from './transfers.controller.js';
import { TransfersService } from './transfers.service.js';

@Module({
  controllers: [TransfersController],
  providers: [TransfersService, AccountsSeeder],
  exports: [TransfersService],
})
export class TransfersModule {}

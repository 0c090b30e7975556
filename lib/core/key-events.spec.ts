import type { RecordId } from '../storage/idempotency-store.interface.js';
import { KeyEvents, UNTRACED, type KeyEvent, type StepTracer } from './key-events.js';

const ID: RecordId = { scope: '', endpoint: 'POST /t', key: 'k' };

describe('KeyEvents', () => {
  it('tells every listener, in order, until it unsubscribes', () => {
    const events = new KeyEvents();
    const heard: string[] = [];
    const first = events.subscribe((event) => heard.push(`first ${event.type}`));
    events.subscribe((event) => heard.push(`second ${event.type}`));
    expect(events.listened).toBe(true);
    events.emit({ type: 'released', id: ID });
    first();
    events.emit({ type: 'taken-over', id: ID });
    expect(heard).toEqual(['first released', 'second released', 'second taken-over']);
  });

  it('a listener that throws changes nothing for the others, nor for the emitter', () => {
    const events = new KeyEvents();
    const heard: KeyEvent[] = [];
    events.subscribe(() => {
      throw new Error('broken listener');
    });
    events.subscribe((event) => heard.push(event));
    expect(() => events.emit({ type: 'released', id: ID })).not.toThrow();
    expect(heard).toEqual([{ type: 'released', id: ID }]);
  });

  it('runs a step as it is when no tracer is attached, or the tracer is not active', async () => {
    const events = new KeyEvents();
    expect(events.tracing).toBe(false);
    expect(await events.step('claim', ID, (traced) => Promise.resolve(traced))).toBe(UNTRACED);
    const traced: string[] = [];
    let active = false;
    const tracer: StepTracer = {
      active: () => active,
      step: (step, id, work) => {
        traced.push(`${step} ${id.key}`);
        return work({ outcome: (outcome) => traced.push(outcome) });
      },
    };
    events.traceWith(tracer);
    await events.step('run', ID, () => Promise.resolve());
    expect(traced).toEqual([]);
    active = true;
    expect(events.tracing).toBe(true);
    const value = await events.step('complete', ID, (step) => {
      step.outcome('stored');
      return Promise.resolve(42);
    });
    expect(value).toBe(42);
    expect(traced).toEqual(['complete k', 'stored']);
  });
});

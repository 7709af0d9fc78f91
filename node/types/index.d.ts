// Types for fastify-accman: the fastify plugin, the Node client and the
// typed errors.  Amounts are int64 on AccMan: the client returns numbers by
// default and bigints with { bigint: true }; it accepts either.

import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'

export type Amount = number | bigint

export interface ClientOptions {
  /** AccMan's base URL, http:// or https://, with an optional path prefix. */
  url: string
  /** Bearer token (roles read, charge; mint for funding); left out or '': none. */
  token?: string
  /** Per attempt, from asking for a connection to the parsed reply. Default 5000. */
  timeoutMs?: number
  /** Keep-alive connections. Default 8. */
  connections?: number
  /** Extra attempts for calls that are safe to repeat. Default 2. */
  retries?: number
  /** Integers as bigints instead of numbers. */
  bigint?: boolean
  /** https: the certificates trusted instead of Node's default ones (PEM), as node:tls's `ca`. */
  ca?: string | Buffer | Array<string | Buffer>
}

export interface ModResult<N> { tot: N, seq: N }
export interface HoldResult<N> { hold: N, tot: N, seq: N }
export interface Entry<N> { seq: N, by: N, tot: N, at: N, key: string | null, hold: N | null }
export interface Page<N> { account: string | null, past: Array<Entry<N>>, next: N | null }

export interface AccManClient<N extends number | bigint = number> {
  readonly bigint: boolean
  readonly timeoutMs: number
  readonly retries: number
  /** The durable balance. NoAccount for an unknown credential. */
  tot (cred: string): Promise<N>
  /** Changes the balance by `by` once durable; Insufficient under `min`; at most once per `key`; `low` (funding only) sets the low-balance threshold. */
  mod (cred: string, by: Amount, options?: { min?: Amount | null, key?: string | null, low?: Amount | null }): Promise<ModResult<N>>
  /** One page of history, newest first. */
  past (cred: string, options?: { limit?: Amount | null, before?: Amount | null }): Promise<Page<N>>
  /** Holds -by (by < 0) for ttlS seconds. */
  hold (cred: string, by: Amount, options: { ttlS: Amount, min?: Amount | null, key?: string | null }): Promise<HoldResult<N>>
  /** Ends a hold: `use` is spent, the rest returns. */
  settle (cred: string, hold: Amount, use: Amount): Promise<ModResult<N>>
  close (): Promise<void>
}

export interface AccManClientConstructor {
  new (options: ClientOptions & { bigint: true }): AccManClient<bigint>
  new (options: ClientOptions & { bigint?: false }): AccManClient<number>
}
export declare const AccManClient: AccManClientConstructor

export declare class AccManError extends Error {
  code: string
  status: number
  detail: string
}
export declare class BadRequest extends AccManError {}
export declare class Unauthorized extends AccManError {}
export declare class Forbidden extends AccManError {}
export declare class NoAccount extends AccManError {}
export declare class NoHold extends AccManError {}
export declare class Conflict extends AccManError {}
export declare class Insufficient extends Conflict {
  /** The balance the change was judged on. */
  tot: number | bigint
}
export declare class KeyReused extends Conflict {}
export declare class Overflow extends Conflict {}
export declare class HoldEnded extends Conflict {}
export declare class TooManyHolds extends Conflict {}
/** AccMan's 503: not acknowledged; a plain one (a commit that failed) may have applied. */
export declare class Unavailable extends AccManError {}
/** A 503 for a change refused before it applied: nothing of this request applied, send
 * it again; an earlier request of the same key that got no answer may still apply. */
export declare class NotApplied extends Unavailable {}
export declare class Busy extends NotApplied {}
export declare class ShuttingDown extends NotApplied {}
/** Nothing reached AccMan: nothing was applied. */
export declare class Unreachable extends Unavailable {}
/** Sent, no complete reply: a mod may or may not have applied. */
export declare class OutcomeUnknown extends AccManError {}
export declare class CallTimeout extends OutcomeUnknown {}
export declare class BadReply extends OutcomeUnknown {}
/** A 503 without AccMan's error body (a proxy's): a mod may have applied. */
export declare class ProxyUnavailable extends OutcomeUnknown {}
export declare class UnexpectedReply extends AccManError {}
/**
 * A 200 or 409 with an integer past 2^53 (a client without `bigint: true`):
 * a 200 applied, a 409 (`insufficient`) did not.
 */
export declare class Unrepresentable extends AccManError {
  /** The reply, with bigints. */
  reply: Record<string, unknown>
}

/** 'estimate' before the handler (what must be covered or held), 'charge' in onSend. */
export type CostStage = 'estimate' | 'charge'
export type CostFunction = (request: FastifyRequest, reply: FastifyReply, stage: CostStage) => Amount
export type Price = Amount | CostFunction

/** The plugin's own client, made from these (the default). */
export interface OwnClientOptions {
  url?: string
  token?: string
  timeoutMs?: number
  retries?: number
  connections?: number
  ca?: string | Buffer | Array<string | Buffer>
  client?: never
}

/** A client to share instead of the plugin's own: its settings are the client's. */
export interface SharedClientOptions {
  /** Must be made with { bigint: true }. */
  client: AccManClient<bigint>
  url?: never
  token?: never
  timeoutMs?: never
  retries?: never
  connections?: never
  ca?: never
}

export type FastifyAccmanOptions = (OwnClientOptions | SharedClientOptions) & {
  /** The default price of a request. Default 1. */
  cost?: Price
  /** 'check' (tot, then charge) or 'reserve' (hold, then settle). Default 'check'. */
  mode?: 'check' | 'reserve'
  /** 'closed': 503 when AccMan cannot be reached; 'open': serve unpaid. Default 'closed'. */
  onUnavailable?: 'closed' | 'open'
  /** Routes never metered, by the path they were declared with (a trailing * matches a prefix), or a test of the request. */
  exempt?: string[] | ((request: FastifyRequest) => boolean)
  /** The request and response header. Default 'accman'. */
  header?: string
  /** Charge responses of 400 and over too. Default false. */
  chargeErrors?: boolean
  /** Reserve mode: a hold's ttl in seconds. Default 90. Refused in check mode, which holds nothing. */
  holdTtlS?: number
  /** Check mode: admit on a balance read this recently. Default 1000; 0 reads every time. */
  checkFreshMs?: number
  /** Told of every request served or charged without payment. */
  onUnpaid?: ((cred: string, amount: bigint, why: string) => void | Promise<void>) | null
}

export interface AccManRequest {
  readonly estimate: bigint
  readonly tot: bigint | null
  readonly hold: bigint | null
}

export interface AccManDecoration {
  client: AccManClient<bigint>
  stats: Record<string, number>
  metrics (): string
  drain (timeoutMs?: number): Promise<boolean>
}

declare module 'fastify' {
  interface FastifyInstance {
    accman: AccManDecoration
  }
  interface FastifyRequest {
    accman: AccManRequest | null
  }
  interface FastifyContextConfig {
    /** This route's price, or false to exempt it. */
    accman?: Price | false
  }
}

export declare function fingerprint (cred: string): string
export declare const limits: Readonly<Record<string, number | bigint>>

declare const fastifyAccman: FastifyPluginAsync<FastifyAccmanOptions>
export { fastifyAccman }
export default fastifyAccman

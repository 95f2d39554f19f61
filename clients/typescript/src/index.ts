// @entitlements/client: the generated entitlements.v1 code (./gen, written by `make ts-protos`, never by hand) and a
// small typed face over Connect's gRPC transport: one client per process (one HTTP/2 connection that every call
// reuses), the caller token on every call, a default deadline, and failures as EntitlementsError carrying the
// server's google.rpc.ErrorInfo (reason and metadata) already decoded.
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import type { CallOptions, Client, Interceptor } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import {
  EntitlementEventKind,
  EntitlementService,
  GetSubscriptionRequestSchema,
} from "./gen/entitlements/v1/entitlements_pb.js";
import type {
  EntitlementEvent,
  GetSubscriptionRequest,
  GetSubscriptionResponse,
} from "./gen/entitlements/v1/entitlements_pb.js";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

export * from "./gen/entitlements/v1/entitlements_pb.js";
export { Code } from "@connectrpc/connect";
export type { CallOptions } from "@connectrpc/connect";
// The protobuf-es functions a caller needs with these messages (JSON, building, Timestamps), from the same copy.
export { create, toJson, toJsonString } from "@bufbuild/protobuf";
export { timestampDate } from "@bufbuild/protobuf/wkt";

/** The ErrorInfo domain of every error the service explains. */
export const ERROR_DOMAIN = "entitlements.v1";

const DEFAULT_TIMEOUT_MS = 5000;
// What an HTTP/2 header value may hold; a token outside it would fail on every call, so it fails at creation.
const TOKEN_PATTERN = /^[\x21-\x7e]+$/;

export interface TlsOptions {
  /** PEM roots to trust instead of the system's (a private CA). */
  ca?: string | Buffer;
  /** PEM client certificate and key, for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name the server certificate must carry, when it differs from the target's host. */
  serverName?: string;
}

export interface EntitlementsClientOptions {
  /** `host:port` of the gRPC port (e.g. `127.0.0.1:50051`), or a full `http://` / `https://` URL. */
  target: string;
  /** Sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** `true` for TLS with the system roots; an object for a private CA or mutual TLS. Default: plaintext. */
  tls?: boolean | TlsOptions;
  /** Deadline of each call unless the call passes its own `timeoutMs`. Default 5000. */
  timeoutMs?: number;
}

type Rpcs = Client<typeof EntitlementService>;
type Selector = Exclude<GetSubscriptionRequest["selector"], { case: undefined }>;
/** GetSubscription's oneof as one plain object, e.g. `{ customerId: "cus_..." }` or `{ subscriptionId: "sub_..." }`. */
export type SubscriptionSelector = {
  [C in Selector["case"]]: { [K in C]: Extract<Selector, { case: C }>["value"] };
}[Selector["case"]];
export type GetSubscriptionInit = MessageInitShape<typeof GetSubscriptionRequestSchema>;

/**
 * One method per RPC of entitlements.v1 (named as in Connect: `checkAccess`, `consumeCredits`, ...), taking the
 * request's fields and per-call options (`timeoutMs`, `signal`, `headers`). A failed call rejects with an
 * EntitlementsError.
 */
export type EntitlementsClient = Omit<Rpcs, "getSubscription"> & {
  /** Takes `{ customerId }`, `{ subscriptionId }`, ... or the request message itself. */
  getSubscription(
    request: SubscriptionSelector | GetSubscriptionInit,
    options?: CallOptions,
  ): Promise<GetSubscriptionResponse>;
  /**
   * WatchEntitlements as an AsyncIterable of events that resumes by itself from its last cursor (see WatchOptions):
   * `for await (const event of client.watch({ customerIds: ["cus_..."] })) { ... }`.
   */
  watch(options?: WatchOptions): EntitlementWatch;
  /** Closes the connection; calls still in flight fail with CANCELED. */
  close(): void;
};

export interface ReconnectOptions {
  /** Backoff before the first reconnect; doubles (`multiplier`) up to `maxBackoffMs`, with up to 50% jitter. */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  multiplier?: number;
  /** Give up (throwing the last failure) after this many failures in a row; default: never. */
  maxAttempts?: number;
}

export interface WatchOptions {
  /** Only these customers' events (at most 1000); empty or absent: every customer. */
  customerIds?: string[];
  /** Resume right after this cursor (an event's or a heartbeat's); absent: from now. */
  afterCursor?: string;
  /** Also yield HEARTBEAT events (the first one means "caught up, live from here"). */
  heartbeats?: boolean;
  /** Ends the watch (the iteration simply finishes). */
  signal?: AbortSignal;
  reconnect?: ReconnectOptions;
  /** Reconnect when no message arrived for this long (the server heartbeats every 15 s). Default 45000; 0: never. */
  heartbeatTimeoutMs?: number;
}

/**
 * An AsyncIterable of EntitlementEvents in commit order. After UNAVAILABLE, CANCELED from the far side,
 * RESOURCE_EXHAUSTED / WATCH_SUBSCRIBER_TOO_SLOW (from the cursor its ErrorInfo names), an ended stream or a silent
 * one, it reconnects from `cursor` with backoff: nothing is lost or repeated. CURSOR_EXPIRED (FAILED_PRECONDITION)
 * and an unknown cursor (INVALID_ARGUMENT) are thrown as EntitlementsError, never retried; so is any other failure.
 */
export interface EntitlementWatch extends AsyncIterable<EntitlementEvent> {
  /** The last cursor received: where a new watch would resume. */
  readonly cursor: string;
  /** How many times the stream was reopened. */
  readonly reconnects: number;
  /** True from the first heartbeat of the current stream until it breaks. */
  readonly live: boolean;
  /** Ends the watch; a pending iteration finishes. */
  close(): void;
}

/**
 * A failed call: the gRPC status code, and the service's `google.rpc.ErrorInfo` when it sent one (the reason to
 * branch on, e.g. `INSUFFICIENT_CREDITS`, and its metadata, e.g. `{ balance: "3" }`).
 */
export class EntitlementsError extends Error {
  override readonly name = "EntitlementsError";
  /** Connect's Code: the same numbers as gRPC status codes (Code.InvalidArgument === 3). */
  readonly code: Code;
  /** The status code as gRPC spells it, e.g. `"RESOURCE_EXHAUSTED"`. */
  readonly codeName: string;
  /** ErrorInfo.reason, e.g. `"FIELD_INVALID"`; undefined when the status carries no ErrorInfo. */
  readonly reason: string | undefined;
  readonly domain: string | undefined;
  /** ErrorInfo.metadata, e.g. `{ field: "customer_id" }`; empty when there is none. */
  readonly metadata: Readonly<Record<string, string>>;
  /** The server's message, without Connect's `[code]` prefix. */
  readonly rawMessage: string;

  constructor(cause: ConnectError) {
    super(cause.message, { cause });
    const [info] = cause.findDetails(ErrorInfoSchema);
    this.code = cause.code;
    this.codeName = grpcCodeName(cause.code);
    this.reason = info?.reason;
    this.domain = info?.domain;
    this.metadata = Object.freeze({ ...info?.metadata });
    this.rawMessage = cause.rawMessage;
  }

  static from(error: unknown): EntitlementsError {
    return error instanceof EntitlementsError ? error : new EntitlementsError(ConnectError.from(error));
  }
}

function grpcCodeName(code: Code): string {
  const name = Code[code] as string | undefined;
  return name === undefined ? `CODE_${code}` : name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function baseUrl(target: string, tls: boolean): string {
  if (/^https?:\/\//.test(target)) return target;
  return `${tls ? "https" : "http"}://${target}`;
}

function bearer(token: string): Interceptor {
  const value = `Bearer ${token}`;
  return (next) => async (request) => {
    request.header.set("authorization", value);
    return next(request);
  };
}

function withEntitlementsErrors<A extends unknown[], T>(rpc: (...args: A) => Promise<T>) {
  return async (...args: A): Promise<T> => {
    try {
      return await rpc(...args);
    } catch (error) {
      throw EntitlementsError.from(error);
    }
  };
}

const selectorCases = new Set(
  GetSubscriptionRequestSchema.oneofs.find((oneof) => oneof.name === "selector")?.fields.map((field) => field.localName),
);

function getSubscriptionRequest(request: SubscriptionSelector | GetSubscriptionInit): GetSubscriptionInit {
  if ("selector" in request || "$typeName" in request) return request;
  const named = Object.entries(request).filter(([, value]) => value !== undefined);
  const [only] = named;
  if (named.length !== 1 || only === undefined || !selectorCases.has(only[0])) {
    throw new TypeError(`getSubscription: name exactly one of ${[...selectorCases].join(", ")}`);
  }
  return { selector: { case: only[0], value: only[1] } as Selector };
}

function resumable(error: EntitlementsError): boolean {
  return (
    error.code === Code.Unavailable ||
    error.code === Code.Canceled ||
    (error.code === Code.ResourceExhausted && error.reason === "WATCH_SUBSCRIBER_TOO_SLOW")
  );
}

function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}

type WatchRpc = (
  request: { customerIds: string[]; afterCursor: string },
  options: CallOptions,
) => AsyncIterable<EntitlementEvent>;

function createWatch(rpc: WatchRpc, options: WatchOptions): EntitlementWatch {
  const customerIds = [...(options.customerIds ?? [])];
  const heartbeats = options.heartbeats ?? false;
  const reconnect = options.reconnect ?? {};
  const initial = reconnect.initialBackoffMs ?? 100;
  const max = reconnect.maxBackoffMs ?? 5000;
  const multiplier = reconnect.multiplier ?? 2;
  const silentMs = options.heartbeatTimeoutMs ?? 45000;
  const stop = new AbortController();
  if (options.signal) {
    if (options.signal.aborted) stop.abort();
    else options.signal.addEventListener("abort", () => stop.abort(), { once: true });
  }
  const state = { cursor: options.afterCursor ?? "", reconnects: 0, live: false };

  async function* run(): AsyncGenerator<EntitlementEvent> {
    let failures = 0;
    while (!stop.signal.aborted) {
      const attempt = new AbortController();
      const onStop = () => attempt.abort();
      stop.signal.addEventListener("abort", onStop, { once: true });
      let silent = false;
      let timer: NodeJS.Timeout | undefined;
      const arm = () => {
        if (silentMs <= 0) return;
        clearTimeout(timer);
        timer = setTimeout(() => {
          silent = true;
          attempt.abort();
        }, silentMs);
      };
      let failure: EntitlementsError;
      try {
        arm();
        const stream = rpc({ customerIds, afterCursor: state.cursor }, { signal: attempt.signal, timeoutMs: 0 });
        for await (const event of stream) {
          arm();
          failures = 0;
          if (event.cursor) state.cursor = event.cursor;
          if (event.kind === EntitlementEventKind.HEARTBEAT) {
            state.live = true;
            if (!heartbeats) continue;
          }
          yield event;
        }
        failure = new EntitlementsError(new ConnectError("the server ended the watch stream", Code.Unavailable));
      } catch (error) {
        if (stop.signal.aborted) return;
        failure = silent
          ? new EntitlementsError(new ConnectError(`no message for ${silentMs} ms`, Code.Unavailable))
          : EntitlementsError.from(error);
      } finally {
        clearTimeout(timer);
        stop.signal.removeEventListener("abort", onStop);
        attempt.abort();
        state.live = false;
      }
      if (!resumable(failure)) throw failure;
      const resumeAt = failure.metadata["cursor"];
      if (failure.reason === "WATCH_SUBSCRIBER_TOO_SLOW" && resumeAt) state.cursor = resumeAt;
      failures += 1;
      if (reconnect.maxAttempts !== undefined && failures >= reconnect.maxAttempts) throw failure;
      state.reconnects += 1;
      const cap = Math.min(max, initial * multiplier ** (failures - 1));
      await pause(cap * (1 - 0.5 * Math.random()), stop.signal);
    }
  }

  return {
    get cursor() {
      return state.cursor;
    },
    get reconnects() {
      return state.reconnects;
    },
    get live() {
      return state.live;
    },
    close: () => stop.abort(),
    [Symbol.asyncIterator]: () => run(),
  };
}

/** One client for the whole process: every call shares its HTTP/2 connection (opened on the first call). */
export function createEntitlementsClient(options: EntitlementsClientOptions): EntitlementsClient {
  const { target, token, tls = false, timeoutMs = DEFAULT_TIMEOUT_MS } = options;
  if (!target) throw new TypeError("createEntitlementsClient: target is required (host:port)");
  if (token !== undefined && !TOKEN_PATTERN.test(token)) {
    throw new TypeError("createEntitlementsClient: token must be printable ASCII without spaces");
  }
  const url = baseUrl(target, tls !== false);
  const tlsOptions = typeof tls === "object" ? tls : {};
  const session = new Http2SessionManager(
    url,
    {},
    { ca: tlsOptions.ca, cert: tlsOptions.cert, key: tlsOptions.key, servername: tlsOptions.serverName },
  );
  const transport = createGrpcTransport({
    baseUrl: url,
    sessionManager: session,
    defaultTimeoutMs: timeoutMs,
    interceptors: token === undefined ? [] : [bearer(token)],
  });
  const rpcs = createClient(EntitlementService, transport);

  // Every RPC the generated service names, so a new one in the contract needs `make ts-protos` and nothing else.
  const methods: Record<string, unknown> = {};
  for (const method of EntitlementService.methods) {
    const rpc = rpcs[method.localName as keyof Rpcs] as (...args: unknown[]) => unknown;
    methods[method.localName] =
      method.methodKind === "unary" ? withEntitlementsErrors(rpc as (...args: unknown[]) => Promise<unknown>) : rpc;
  }
  const getSubscription = methods["getSubscription"] as Rpcs["getSubscription"];
  const watchEntitlements = rpcs.watchEntitlements as unknown as WatchRpc;
  return {
    ...(methods as Omit<Rpcs, "getSubscription">),
    getSubscription: async (request, callOptions) => getSubscription(getSubscriptionRequest(request), callOptions),
    watch: (watchOptions = {}) => createWatch(watchEntitlements, watchOptions),
    close: () => session.abort(),
  };
}

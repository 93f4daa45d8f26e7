/**
 * Typed errors for the daemon's `{"error": {"code", "message"}}` answers: one class per
 * status, the same names as the Python SDK's.
 */
import type { PolicyFinding } from "./types.js";

/** Any error the daemon answered (or failing to reach it). */
export class MoatError extends Error {
  /** The HTTP status; null when there was no answer, or for an error inside a streamed exec. */
  readonly status: number | null;
  /** The daemon's stable machine-readable code: `bad_request`, `not_found`, … */
  readonly code: string;

  constructor(status: number | null, code: string, message: string) {
    super(message);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
  }

  override toString(): string {
    const where = this.status !== null ? `${this.status} ` : "";
    return `${this.name}: ${where}${this.code}: ${this.message}`;
  }
}

/** 400: the request was invalid; the message says what was wrong and what is allowed. */
export class BadRequest extends MoatError {}
/** 401: no API key, or one the daemon does not know. */
export class Unauthorized extends MoatError {}
/** 403: the key's role does not allow this (e.g. a reader creating a sandbox). */
export class Forbidden extends MoatError {}
/** 403 `policy_denied`: the group's policy refused the request before it reached the VM. */
export class PolicyDenied extends Forbidden {
  /** Why, each with its rule id (`command.denied`, `python.process`, …). */
  readonly findings: PolicyFinding[];
  /** The policy version that decided. */
  readonly policyVersion: number | null;

  constructor(
    status: number | null,
    code: string,
    message: string,
    findings: PolicyFinding[] = [],
    policyVersion: number | null = null,
  ) {
    super(status, code, message);
    this.findings = findings;
    this.policyVersion = policyVersion;
  }
}

/** 404: no such group, sandbox, file or process, or one the key cannot see. */
export class NotFound extends MoatError {}
/** 405. */
export class MethodNotAllowed extends MoatError {}
/** 409: the resource is in a state that does not allow this (or a wait ran out). */
export class Conflict extends MoatError {}
/** 413: the request body or an exec's collected output is too large. */
export class PayloadTooLarge extends MoatError {}
/**
 * 422 `unprocessable`: well-formed by the OpenAPI document, but refused by a rule it cannot
 * state (one field excludes another, an egress rule that can never match, a policy that does
 * not compile); the message names the rule. A BadRequest: either way the request must change.
 */
export class Unprocessable extends BadRequest {}
/** 429: the host is full; retry later. */
export class TooManyRequests extends MoatError {}
/** The same class as {@link TooManyRequests}. */
export const CapacityError = TooManyRequests;
/** 429 `rate_limited`: this API key is over its rate limit; `Retry-After` says when to retry. */
export class RateLimited extends TooManyRequests {}
/** 500: the daemon failed; the details are in its log. */
export class InternalError extends MoatError {}
/**
 * 502 `bad_gateway` (by its code: a proxy's own 502 is an InternalError): the sandbox's agent
 * did not answer or broke the protocol (its `health` says so), a port of the sandbox could
 * not be reached, or the fleet node that runs the sandbox could not be reached (the message
 * names it).
 */
export class BadGateway extends MoatError {}
/**
 * 421 `other_node`: a request one node of the fleet forwarded reached a node that does not run
 * the sandbox (requests are forwarded once, never twice); the message names the node that runs
 * it and its URL.
 */
export class OtherNode extends MoatError {}
/**
 * 503: the daemon cannot do this now (store busy, sandboxes being prepared, the fleet node that
 * runs the sandbox lost); retry.
 */
export class Unavailable extends MoatError {}
/** 507: the sandbox's disk is full. */
export class NoSpace extends MoatError {}
/** The daemon could not be reached, or the connection broke off (`status` is null). */
export class ConnectionFailed extends MoatError {}

type ErrorClass = new (status: number | null, code: string, message: string) => MoatError;

const BY_STATUS: Record<number, ErrorClass> = {
  400: BadRequest,
  401: Unauthorized,
  403: Forbidden,
  404: NotFound,
  405: MethodNotAllowed,
  409: Conflict,
  413: PayloadTooLarge,
  421: OtherNode,
  422: Unprocessable,
  429: TooManyRequests,
  500: InternalError,
  503: Unavailable,
  507: NoSpace,
};

const BY_CODE: Record<string, ErrorClass> = {
  bad_request: BadRequest,
  unauthorized: Unauthorized,
  forbidden: Forbidden,
  not_found: NotFound,
  method_not_allowed: MethodNotAllowed,
  conflict: Conflict,
  payload_too_large: PayloadTooLarge,
  other_node: OtherNode,
  unprocessable: Unprocessable,
  too_many_requests: TooManyRequests,
  internal: InternalError,
  bad_gateway: BadGateway,
  unavailable: Unavailable,
  no_space: NoSpace,
};

/**
 * The error for an error answer. A body that is not the daemon's error shape (a proxy in
 * between, say) still gives an error of the status's class, with the body as message.
 */
export function errorFromResponse(status: number, body: string): MoatError {
  let code = `http_${status}`;
  let message = "";
  try {
    const detail = (JSON.parse(body) as { error: { code: unknown; message: unknown } }).error;
    if (typeof detail.code !== "string" || typeof detail.message !== "string") {
      throw new TypeError("not the error shape");
    }
    code = detail.code;
    message = detail.message;
    if (code === "policy_denied") return policyDenied(status, detail);
  } catch {
    message = body.slice(0, 500).trim() || `HTTP status ${status}`;
  }
  if (code === "rate_limited") return new RateLimited(status, code, message);
  const cls = BY_STATUS[status] ?? BY_CODE[code] ?? (status >= 500 ? InternalError : MoatError);
  return new cls(status, code, message);
}

/** The error for an `{"error": {...}}` line of a streamed exec (no status of its own). */
export function errorFromFrame(detail: unknown): MoatError {
  const d = (detail ?? {}) as { code?: unknown; message?: unknown };
  const code = typeof d.code === "string" ? d.code : "internal";
  const message = typeof d.message === "string" ? d.message : JSON.stringify(detail);
  if (code === "policy_denied") return policyDenied(null, d);
  const cls = BY_CODE[code] ?? MoatError;
  return new cls(null, code, message);
}

function policyDenied(status: number | null, detail: Record<string, unknown>): PolicyDenied {
  const raw = Array.isArray(detail["findings"]) ? (detail["findings"] as Record<string, unknown>[]) : [];
  const num = (v: unknown) => (typeof v === "number" ? v : null);
  const findings = raw.map(
    (f) =>
      ({
        rule: String(f["rule"] ?? ""),
        message: String(f["message"] ?? ""),
        line: num(f["line"]),
        column: num(f["column"]),
        snippet: String(f["snippet"] ?? ""),
      }) as PolicyFinding,
  );
  return new PolicyDenied(
    status,
    "policy_denied",
    String(detail["message"] ?? ""),
    findings,
    num(detail["policy_version"]),
  );
}

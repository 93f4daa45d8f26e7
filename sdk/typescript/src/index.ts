/**
 * TypeScript SDK of moat: sandboxes in microVMs, through the moat daemon's REST API.
 *
 *     import { Client } from "moat-sdk";
 *     const client = new Client(); // MOAT_URL, MOAT_API_KEY
 *     const sb = await client.sandboxes.create("web");
 *     console.log((await sb.exec("echo hi")).stdout);
 *     await sb.delete();
 */
export {
  ApiKeys,
  Client,
  DEFAULT_TIMEOUT,
  DEFAULT_URL,
  ExecStream,
  Files,
  Groups,
  Policies,
  Process,
  Nodes,
  Processes,
  Sandbox,
  Sandboxes,
  Snapshots,
} from "./client.js";
export type { ClientOptions } from "./client.js";
export {
  BadGateway,
  BadRequest,
  CapacityError,
  Conflict,
  ConnectionFailed,
  Forbidden,
  InternalError,
  MethodNotAllowed,
  MoatError,
  NoSpace,
  NotFound,
  OtherNode,
  PayloadTooLarge,
  PolicyDenied,
  RateLimited,
  TooManyRequests,
  Unauthorized,
  Unavailable,
  Unprocessable,
} from "./errors.js";
export { Shell } from "./shell.js";
export type * from "./types.js";

/**
 * The SDK's types: the daemon's own schemas (generated into openapi.ts from its
 * /openapi.json, so tsc checks the SDK against the API), under the Python SDK's names.
 */
import type { components } from "./openapi.js";

type Schemas = components["schemas"];

/** A request type: the daemon fills in what is left out (its defaults). */
type DeepPartial<T> = T extends readonly (infer U)[]
  ? DeepPartial<U>[]
  : T extends object
    ? { [K in keyof T]?: DeepPartial<T[K]> }
    : T;

export type Tier = Schemas["Tier"];
export type Role = Schemas["Role"];
export type SandboxState = Schemas["SandboxState"];
export type Node = Schemas["Node"];
export type NodeState = Schemas["NodeState"];
export type NodeCapacity = Schemas["NodeCapacity"];
export type NodeUse = Schemas["NodeUse"];
export type SealingKeyRotation = Schemas["SealingKeyRotation"];
export type FileKind = Schemas["EntryKind"];
/** A group's spec as given to `groups.apply`: every field optional (`Group.spec` has them all). */
export type GroupSpec = DeepPartial<Schemas["GroupSpec"]>;
export type PoolSpec = DeepPartial<Schemas["PoolSpec"]>;
export type PlacementSpec = DeepPartial<Schemas["PlacementSpec"]>;
export type LifecycleSpec = DeepPartial<Schemas["LifecycleSpec"]>;
export type EgressSpec = DeepPartial<Schemas["EgressSpec"]>;
export type EgressRule = DeepPartial<Schemas["EgressRule"]>;
export type NetworkLimits = DeepPartial<Schemas["LimitsSpec"]>;
export type Group = Schemas["Group"];
/** A group's policy object (docs/POLICY.md); what is left out takes the daemon's defaults. */
export type Policy = DeepPartial<Schemas["Policy"]>;
export type PolicyVersion = Schemas["PolicyVersion"];
/** What a dry run checks: an exec request, or `{python: CODE}` / `{shell: CODE}`. */
export type CheckRequest = DeepPartial<Schemas["CheckRequest"]>;
export type PolicyCheck = Schemas["PolicyCheck"];
export type PolicyFinding = Schemas["Finding"];
export type DecisionList = Schemas["DecisionList"];
export type LogEntry = Schemas["LogEntry"];
export type Verdict = Schemas["Verdict"];
export type ReplayResult = Schemas["ReplayResult"];
export type GroupStatus = Schemas["GroupStatus"];
export type Health = Schemas["Health"];
export type SandboxesHealth = Schemas["SandboxesHealth"];
export type ApiKey = Schemas["ApiKey"];
/** An API key as created: `key` is the secret, shown this once. */
export type CreatedApiKey = Schemas["CreatedApiKey"];
/** A key's own rate limit: `per_s` requests a second on average, bursts of up to `burst`. */
export type RateLimit = Schemas["RateLimit"];
/** One mutating API call in the audit log (never a request body). */
export type AuditEvent = Schemas["AuditEvent"];
export type AuditList = Schemas["AuditList"];
/** What the daemon says about a sandbox (the `Sandbox` schema). */
export type SandboxInfo = Schemas["Sandbox"];
export type ExecResult = Schemas["ExecResult"];
export type FileEntry = Schemas["FileEntry"];
/** A written file; `created` is true when there was no file at `path` before (201). */
export type FileWritten = Schemas["FileWritten"] & { created: boolean };
export type ProcessInfo = Schemas["Process"];
export type ProcessExit = Schemas["ProcessExit"];
export type ProcessLogs = Schemas["ProcessLogs"];
export type Snapshot = Schemas["Snapshot"];
export type ShellExit = Schemas["ShellExit"];
/** How a command ended: `exit_code` as a shell reports it (128+N after signal N, 124 after its timeout). */
export type ExecExit = Schemas["ExecExit"];

/** A piece of output of a streamed exec, as the command wrote it. */
export interface ExecOutput {
  type: "output";
  stream: "stdout" | "stderr";
  data: string;
}

/** The last event of a streamed exec. */
export type ExecExitEvent = { type: "exit" } & ExecExit;

export type ExecEvent = ExecOutput | ExecExitEvent;

/** A command: a shell command line (run as `/bin/sh -c`), or an argv list (run as given). */
export type Command = string | readonly string[];

/** Options of an exec (and, without `stdin`, of a background process). */
export interface ExecOptions {
  /** Over the sandbox's env, over the image's. */
  env?: Record<string, string>;
  /** Absolute working directory; default the image's. */
  cwd?: string;
  /** User name or uid (`:group` allowed); default the image's. */
  user?: string | number;
  /** Given as standard input, then closed. */
  stdin?: string | Uint8Array;
  /** Seconds; then the process tree is killed (`timed_out`, exit code 124). */
  timeout?: number;
}

export interface CreateOptions {
  image?: string;
  tier?: Tier;
  env?: Record<string, string>;
  labels?: Record<string, string>;
}

/** Data for `files.write`: streamed when it is a stream or an async iterable. */
export type FileData =
  | string
  | Uint8Array
  | ArrayBuffer
  | Blob
  | ReadableStream<Uint8Array>
  | AsyncIterable<Uint8Array>;

export interface ShellOptions {
  cols?: number;
  rows?: number;
  /** A shell command line; default `bash -l` (or `sh -l`). */
  command?: string;
  user?: string;
  cwd?: string;
  /** TERM; default `xterm-256color`. */
  term?: string;
}

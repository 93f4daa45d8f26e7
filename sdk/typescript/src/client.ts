/**
 * The client: the moat daemon's REST API with the Python SDK's surface (groups, sandboxes,
 * exec collected or streamed, files, background processes, snapshots, forks, API keys), on
 * the platform's `fetch` (Node 18+, browsers).
 */
import { ConnectionFailed, MoatError, NotFound, errorFromFrame, errorFromResponse } from "./errors.js";
import { Shell } from "./shell.js";
import type {
  ApiKey,
  AuditList,
  CheckRequest,
  Command,
  CreateOptions,
  CreatedApiKey,
  DecisionList,
  ExecEvent,
  ExecExit,
  ExecOptions,
  ExecResult,
  FileData,
  FileEntry,
  FileWritten,
  Group,
  GroupSpec,
  Health,
  Node,
  Policy,
  PolicyCheck,
  PolicyVersion,
  ProcessInfo,
  ProcessLogs,
  RateLimit,
  ReplayResult,
  Role,
  SandboxInfo,
  SandboxState,
  SealingKeyRotation,
  ShellOptions,
  Snapshot,
  Verdict,
} from "./types.js";

export const DEFAULT_URL = "http://127.0.0.1:7070";
/** Seconds an ordinary request may take. */
export const DEFAULT_TIMEOUT = 300;

export interface ClientOptions {
  /** Seconds an ordinary request may take (default 300; null for none). Execs, file
   * transfers and process waits last as long as they need. */
  timeout?: number | null;
  /** Another fetch (a test double, a proxy-aware one). */
  fetch?: typeof fetch;
}

interface Request {
  method: string;
  path: string;
  query?: Record<string, string | number | boolean | undefined>;
  json?: unknown;
  body?: BodyInit;
  headers?: Record<string, string>;
  /** Seconds, or null for none. */
  timeout?: number | null;
  signal?: AbortSignal;
}

const env = (k: string): string | undefined => {
  const v = (globalThis as { process?: { env: Record<string, string | undefined> } }).process?.env[k];
  return v ? v : undefined;
};

const enc = encodeURIComponent;

/** A client of the moat daemon. `url` defaults to MOAT_URL, else http://127.0.0.1:7070;
 * `apiKey` to MOAT_API_KEY. */
export class Client {
  readonly url: string;
  readonly groups: Groups;
  readonly sandboxes: Sandboxes;
  readonly apiKeys: ApiKeys;
  readonly snapshots: Snapshots;
  readonly nodes: Nodes;
  /** @internal */
  readonly apiKey: string | undefined;
  private readonly timeout: number | null;
  private readonly fetchFn: typeof fetch;

  constructor(url?: string, apiKey?: string, options: ClientOptions = {}) {
    this.url = (url ?? env("MOAT_URL") ?? DEFAULT_URL).replace(/\/+$/, "");
    if (!/^https?:\/\//.test(this.url)) {
      throw new TypeError(`invalid moat URL ${JSON.stringify(this.url)}: http:// or https:// only`);
    }
    this.apiKey = apiKey ?? env("MOAT_API_KEY");
    this.timeout = options.timeout === undefined ? DEFAULT_TIMEOUT : options.timeout;
    this.fetchFn = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.groups = new Groups(this);
    this.sandboxes = new Sandboxes(this);
    this.apiKeys = new ApiKeys(this);
    this.snapshots = new Snapshots(this);
    this.nodes = new Nodes(this);
  }

  health(): Promise<Health> {
    return this.json({ method: "GET", path: "/healthz" });
  }

  /** Sends a request and returns the answer, an error status thrown as its MoatError. @internal */
  async send(req: Request): Promise<Response> {
    const q = Object.entries(req.query ?? {}).filter(([, v]) => v !== undefined);
    const url =
      this.url + req.path + (q.length ? "?" + q.map(([k, v]) => `${enc(k)}=${enc(String(v))}`).join("&") : "");
    const headers: Record<string, string> = { ...req.headers };
    if (this.apiKey) headers["authorization"] = `Bearer ${this.apiKey}`;
    let body = req.body;
    if (req.json !== undefined) {
      body = JSON.stringify(req.json);
      headers["content-type"] = "application/json";
    }
    const timeout = req.timeout === undefined ? this.timeout : req.timeout;
    const signals = [req.signal, timeout !== null ? AbortSignal.timeout(timeout * 1000) : undefined].filter(
      (s): s is AbortSignal => s !== undefined,
    );
    const init: RequestInit & { duplex?: "half" } = { method: req.method, headers, body: body ?? null };
    if (signals.length) init.signal = anySignal(signals);
    // A streamed request body needs half duplex (Node's fetch refuses it otherwise).
    if (body instanceof ReadableStream) init.duplex = "half";
    let resp: Response;
    try {
      resp = await this.fetchFn(url, init);
    } catch (e) {
      throw connectionFailed(this.url, e);
    }
    if (resp.status >= 400) {
      let text: string;
      try {
        text = await resp.text();
      } catch (e) {
        throw connectionFailed(this.url, e);
      }
      throw errorFromResponse(resp.status, text);
    }
    return resp;
  }

  /** A request whose answer is JSON (undefined for 204). @internal */
  async json<T>(req: Request): Promise<T> {
    const resp = await this.send(req);
    try {
      const text = await resp.text();
      return (text ? JSON.parse(text) : undefined) as T;
    } catch (e) {
      throw connectionFailed(this.url, e);
    }
  }
}

function anySignal(signals: AbortSignal[]): AbortSignal {
  if (signals.length === 1) return signals[0]!;
  const ctl = new AbortController();
  for (const s of signals) {
    if (s.aborted) ctl.abort(s.reason);
    else s.addEventListener("abort", () => ctl.abort(s.reason), { once: true });
  }
  return ctl.signal;
}

function connectionFailed(url: string, e: unknown): MoatError {
  if (e instanceof MoatError) return e;
  const err = e as { name?: string; message?: string; cause?: { message?: string } };
  if (err?.name === "TimeoutError") {
    return new ConnectionFailed(null, "timeout", `the moat daemon at ${url} did not answer in time`);
  }
  const why = err?.cause?.message ?? err?.message ?? String(e);
  return new ConnectionFailed(null, "connection_failed", `cannot reach the moat daemon at ${url}: ${why}`);
}

const groupPath = (g: string) => `/v1/sandbox-groups/${enc(g)}`;
const sandboxPath = (g: string, id: string) => `${groupPath(g)}/sandboxes/${enc(id)}`;

function commandBody(cmd: Command, opts: ExecOptions): Record<string, unknown> {
  const body: Record<string, unknown> = typeof cmd === "string" ? { command: cmd } : { argv: [...cmd] };
  if (opts.env !== undefined) body["env"] = opts.env;
  if (opts.cwd !== undefined) body["cwd"] = opts.cwd;
  if (opts.user !== undefined) body["user"] = String(opts.user);
  if (opts.timeout !== undefined) body["timeout_s"] = opts.timeout;
  if (opts.stdin !== undefined) {
    body["stdin"] = typeof opts.stdin === "string" ? opts.stdin : new TextDecoder().decode(opts.stdin);
  }
  return body;
}

export class Groups {
  /** The group's policy (docs/POLICY.md). */
  readonly policy: Policies;

  constructor(private readonly c: Client) {
    this.policy = new Policies(c);
  }

  /** Creates the group or replaces its whole spec (idempotent). */
  apply(name: string, spec: GroupSpec = {}): Promise<Group> {
    return this.c.json({ method: "PUT", path: groupPath(name), json: spec });
  }

  get(name: string): Promise<Group> {
    return this.c.json({ method: "GET", path: groupPath(name) });
  }

  async list(): Promise<Group[]> {
    return (await this.c.json<{ groups: Group[] }>({ method: "GET", path: "/v1/sandbox-groups" })).groups;
  }

  /** Refused (Conflict) while the group has sandboxes or snapshots, unless `force`. */
  async delete(name: string, options: { force?: boolean } = {}): Promise<void> {
    await this.c.json({ method: "DELETE", path: groupPath(name), query: { force: options.force || undefined } });
  }
}

/** A group's policy: versions, the dry run, the decisions log, replay and rollback. */
export class Policies {
  constructor(private readonly c: Client) {}

  /** The policy in force (version 0: none was ever applied, so it is off). */
  get(group: string): Promise<PolicyVersion> {
    return this.c.json({ method: "GET", path: `${groupPath(group)}/policy` });
  }

  /** Applies `policy` as a new version (owner or admin); BadRequest lists every problem,
   * including examples in its `tests` it contradicts. */
  apply(group: string, policy: Policy): Promise<PolicyVersion> {
    return this.c.json({ method: "PUT", path: `${groupPath(group)}/policy`, json: policy });
  }

  /** Makes version `version`'s policy the one in force again, as a new version (the history
   * stays append-only); NotFound when there is no such version. */
  rollback(group: string, version: number): Promise<PolicyVersion> {
    return this.c.json({ method: "POST", path: `${groupPath(group)}/policy/rollback`, json: { version } });
  }

  async versions(group: string): Promise<PolicyVersion[]> {
    return (await this.c.json<{ items: PolicyVersion[] }>({ method: "GET", path: `${groupPath(group)}/policy/versions` }))
      .items;
  }

  /** Dry run: what the policy in force decides; nothing runs, nothing is recorded. */
  check(group: string, request: CheckRequest): Promise<PolicyCheck> {
    return this.c.json({ method: "POST", path: `${groupPath(group)}/policy/check`, json: request });
  }

  /** A page of the hash-chained decisions log, oldest first (owner or admin). */
  decisions(
    group: string,
    options: { verdict?: Verdict; since?: number; after?: number; limit?: number } = {},
  ): Promise<DecisionList> {
    return this.c.json({ method: "GET", path: `${groupPath(group)}/policy/decisions`, query: { ...options } });
  }

  /** The newest recorded requests checked again under `policy`: those it decides differently. */
  replay(group: string, policy: Policy, options: { limit?: number } = {}): Promise<ReplayResult> {
    const body: Record<string, unknown> = { policy };
    if (options.limit !== undefined) body["limit"] = options.limit;
    // Each recorded request is checked again in a worker process.
    return this.c.json({ method: "POST", path: `${groupPath(group)}/policy/replay`, json: body, timeout: null });
  }
}

export class ApiKeys {
  constructor(private readonly c: Client) {}

  /**
   * The answer's `key` is the secret, shown this once. `expiresInS`: the key stops working that
   * many seconds from now; `rateLimit`: its own, instead of the daemon's.
   */
  create(
    name: string,
    role: Role,
    groups: readonly string[] = [],
    options: { expiresInS?: number; rateLimit?: RateLimit } = {},
  ): Promise<CreatedApiKey> {
    const json: Record<string, unknown> = { name, role, groups };
    if (options.expiresInS !== undefined) json["expires_in_s"] = options.expiresInS;
    if (options.rateLimit !== undefined) json["rate_limit"] = options.rateLimit;
    return this.c.json({ method: "POST", path: "/v1/api-keys", json });
  }

  async list(): Promise<ApiKey[]> {
    return (await this.c.json<{ api_keys: ApiKey[] }>({ method: "GET", path: "/v1/api-keys" })).api_keys;
  }

  get(id: string): Promise<ApiKey> {
    return this.c.json({ method: "GET", path: `/v1/api-keys/${enc(id)}` });
  }

  /**
   * A new secret for the key (same id, role, groups and rate limit), shown this once; the old
   * secret stops working at once. `expiresInS` is needed when the key has expired; without it
   * the expiry stays as it was.
   */
  rotate(id: string, options: { expiresInS?: number } = {}): Promise<CreatedApiKey> {
    const json: Record<string, unknown> = {};
    if (options.expiresInS !== undefined) json["expires_in_s"] = options.expiresInS;
    return this.c.json({ method: "POST", path: `/v1/api-keys/${enc(id)}/rotate`, json });
  }

  /** A page of the audit log of mutating API calls (admin keys), oldest first. */
  audit(
    options: { since?: number; key?: string; group?: string; after?: number; limit?: number } = {},
  ): Promise<AuditList> {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(options)) if (v !== undefined) q.set(k, String(v));
    const qs = q.toString();
    return this.c.json({ method: "GET", path: `/v1/audit${qs ? `?${qs}` : ""}` });
  }

  async delete(id: string): Promise<void> {
    await this.c.json({ method: "DELETE", path: `/v1/api-keys/${enc(id)}` });
  }
}

export class Sandboxes {
  constructor(private readonly c: Client) {}

  /** A new running sandbox; image and tier default to the group's. */
  async create(group: string, options: CreateOptions = {}): Promise<Sandbox> {
    const info = await this.c.json<SandboxInfo>({ method: "POST", path: `${groupPath(group)}/sandboxes`, json: options });
    return new Sandbox(this.c, info);
  }

  /** `count` (1–16) new sandboxes from the group's snapshot: processes, memory and files as
   * they were, with fresh entropy, clock and hostname. All or none. */
  async fork(
    group: string,
    snapshot: string,
    count = 1,
    options: { env?: Record<string, string>; labels?: Record<string, string> } = {},
  ): Promise<Sandbox[]> {
    const r = await this.c.json<{ sandboxes: SandboxInfo[] }>({
      method: "POST",
      path: `${groupPath(group)}/sandboxes`,
      json: { from_snapshot: snapshot, count, ...options },
    });
    return r.sandboxes.map((i) => new Sandbox(this.c, i));
  }

  async get(group: string, id: string): Promise<Sandbox> {
    return new Sandbox(this.c, await this.c.json<SandboxInfo>({ method: "GET", path: sandboxPath(group, id) }));
  }

  /** The group's sandboxes; with `labels`, those that have every one of them. */
  async list(group: string, options: { labels?: Record<string, string> } = {}): Promise<Sandbox[]> {
    const labels = options.labels
      ? Object.entries(options.labels)
          .map(([k, v]) => `${k}=${v}`)
          .join(",")
      : undefined;
    const r = await this.c.json<{ sandboxes: SandboxInfo[] }>({
      method: "GET",
      path: `${groupPath(group)}/sandboxes`,
      query: { labels },
    });
    return r.sandboxes.map((i) => new Sandbox(this.c, i));
  }
}

/** A group's named snapshots (taken with `Sandbox.snapshot`, used by `sandboxes.fork`). */
/** The daemons sharing the store (a fleet's nodes): list, get, and (admin keys) drain, undrain and rotate the sealing key they share. */
export class Nodes {
  constructor(private readonly c: Client) {}

  async list(): Promise<Node[]> {
    return (await this.c.json<{ nodes: Node[] }>({ method: "GET", path: "/v1/nodes" })).nodes;
  }

  get(name: string): Promise<Node> {
    return this.c.json({ method: "GET", path: `/v1/nodes/${enc(name)}` });
  }

  /** The node takes no new sandboxes; those it runs stay. */
  drain(name: string): Promise<Node> {
    return this.c.json({ method: "POST", path: `/v1/nodes/${enc(name)}/drain` });
  }

  undrain(name: string): Promise<Node> {
    return this.c.json({ method: "POST", path: `/v1/nodes/${enc(name)}/undrain` });
  }

  /**
   * Re-seals the store's secrets and signing keys with the key every node holds as
   * `MOAT_HOME/secrets.key.next` (admin keys; made with `moat sealing-key new`).
   */
  rotateSealingKey(): Promise<SealingKeyRotation> {
    return this.c.json({ method: "POST", path: "/v1/sealing-key/rotate" });
  }
}

export class Snapshots {
  constructor(private readonly c: Client) {}

  get(group: string, name: string): Promise<Snapshot> {
    return this.c.json({ method: "GET", path: `${groupPath(group)}/snapshots/${enc(name)}` });
  }

  async list(group: string): Promise<Snapshot[]> {
    return (await this.c.json<{ snapshots: Snapshot[] }>({ method: "GET", path: `${groupPath(group)}/snapshots` }))
      .snapshots;
  }

  /** Its forks are not affected. */
  async delete(group: string, name: string): Promise<void> {
    await this.c.json({ method: "DELETE", path: `${groupPath(group)}/snapshots/${enc(name)}` });
  }
}

/** A sandbox. */
export class Sandbox {
  /** What the daemon said about it last (see `refresh`). */
  info: SandboxInfo;
  readonly files: Files;
  readonly processes: Processes;

  constructor(
    private readonly c: Client,
    info: SandboxInfo,
  ) {
    this.info = info;
    this.files = new Files(c, this);
    this.processes = new Processes(c, this);
  }

  get id(): string {
    return this.info.id;
  }

  get group(): string {
    return this.info.group;
  }

  get state(): SandboxState {
    return this.info.state;
  }

  /** @internal */
  get path(): string {
    return sandboxPath(this.group, this.id);
  }

  async refresh(): Promise<SandboxInfo> {
    this.info = await this.c.json<SandboxInfo>({ method: "GET", path: this.path });
    return this.info;
  }

  /** Runs `cmd` to its end and returns its output (at most 16 MiB of each stream; beyond that
   * use `execStream`). A suspended sandbox is resumed first. */
  exec(cmd: Command, options: ExecOptions = {}): Promise<ExecResult> {
    return this.c.json({ method: "POST", path: `${this.path}/exec`, json: commandBody(cmd, options), timeout: null });
  }

  /** Like `exec`, but yields output events as the command writes them, then one exit event.
   * Breaking out of the loop (or `close()`) closes the connection, which kills the command. */
  execStream(cmd: Command, options: ExecOptions = {}): ExecStream {
    return new ExecStream(this.c, `${this.path}/exec`, commandBody(cmd, options));
  }

  /** Saves memory and disk and stops the VM; the next exec or file request (or `resume`)
   * brings it back as it was. */
  async suspend(): Promise<SandboxInfo> {
    this.info = await this.c.json<SandboxInfo>({ method: "POST", path: `${this.path}/suspend` });
    return this.info;
  }

  async resume(): Promise<SandboxInfo> {
    this.info = await this.c.json<SandboxInfo>({ method: "POST", path: `${this.path}/resume` });
    return this.info;
  }

  /** A named snapshot of the sandbox (unique in its group), for `sandboxes.fork`. */
  snapshot(name: string): Promise<Snapshot> {
    return this.c.json({ method: "POST", path: `${this.path}/snapshots`, json: { name } });
  }

  async delete(): Promise<void> {
    await this.c.json({ method: "DELETE", path: this.path });
  }

  /** Deletes the sandbox unless it is already gone: for `finally` blocks. */
  async dispose(): Promise<void> {
    try {
      await this.delete();
    } catch (e) {
      if (!(e instanceof NotFound)) throw e;
    }
  }

  /** An interactive terminal (a PTY) over the daemon's WebSocket; see {@link Shell}. */
  shell(options: ShellOptions = {}): Promise<Shell> {
    return Shell.open(this.c.url, this.c.apiKey, this.path, options);
  }

  toString(): string {
    return `Sandbox(id=${this.id}, group=${this.group}, state=${this.state})`;
  }
}

/** The events of a streamed exec; iterate it once. `exit` holds the exit after the end. */
export class ExecStream implements AsyncIterable<ExecEvent> {
  exit: ExecExit | undefined;
  private readonly abort = new AbortController();
  private started = false;

  constructor(
    private readonly c: Client,
    private readonly path: string,
    private readonly body: Record<string, unknown>,
  ) {}

  /** Ends the stream: the connection closes and the command is killed. */
  close(): void {
    this.abort.abort();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<ExecEvent> {
    if (this.started) throw new Error("an exec stream can be iterated only once");
    this.started = true;
    try {
      const resp = await this.c.send({
        method: "POST",
        path: this.path,
        json: this.body,
        headers: { accept: "application/x-ndjson" },
        timeout: null,
        signal: this.abort.signal,
      });
      if (!resp.body) throw new ConnectionFailed(null, "connection_failed", "the exec answer has no body");
      const decoder = new TextDecoder();
      let buf = "";
      const reader = resp.body.getReader();
      try {
        for (;;) {
          let chunk: ReadableStreamReadResult<Uint8Array>;
          try {
            chunk = await reader.read();
          } catch (e) {
            throw connectionFailed(this.c.url, e);
          }
          if (chunk.done) break;
          buf += decoder.decode(chunk.value, { stream: true });
          let nl: number;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl).trim();
            buf = buf.slice(nl + 1);
            if (!line) continue;
            const ev = parseFrame(line);
            if (ev.type === "exit") {
              const { type: _, ...exit } = ev;
              this.exit = exit;
            }
            yield ev;
            if (this.exit) return;
          }
        }
      } finally {
        reader.releaseLock();
      }
      throw new ConnectionFailed(null, "connection_failed", "the exec stream ended before the command's exit");
    } finally {
      this.abort.abort();
    }
  }
}

function parseFrame(line: string): ExecEvent {
  const f = JSON.parse(line) as Record<string, unknown>;
  if (typeof f["stdout"] === "string") return { type: "output", stream: "stdout", data: f["stdout"] };
  if (typeof f["stderr"] === "string") return { type: "output", stream: "stderr", data: f["stderr"] };
  if (f["exit"] && typeof f["exit"] === "object") return { type: "exit", ...(f["exit"] as ExecExit) };
  if ("error" in f) throw errorFromFrame(f["error"]);
  throw new MoatError(null, "bad_frame", `unexpected line in the exec stream: ${line.slice(0, 200)}`);
}

function toBody(data: FileData): BodyInit {
  if (typeof data === "string" || data instanceof ArrayBuffer) return data;
  // TypeScript's DOM types want an ArrayBuffer-backed view; fetch takes any.
  if (data instanceof Uint8Array) return data as Uint8Array<ArrayBuffer>;
  if (typeof Blob !== "undefined" && data instanceof Blob) return data;
  if (data instanceof ReadableStream) return data;
  const it = (data as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>({
    async pull(ctl) {
      const { value, done } = await it.next();
      if (done) ctl.close();
      else ctl.enqueue(value);
    },
    async cancel() {
      await it.return?.();
    },
  });
}

/** Files in the sandbox; paths are absolute paths inside it. */
export class Files {
  constructor(
    private readonly c: Client,
    private readonly sb: Sandbox,
  ) {}

  /** Writes (atomically replaces) the file: a string (UTF-8), bytes, a Blob, or a stream or
   * async iterable of bytes (streamed). `mode` as a number, e.g. 0o755; `parents` creates
   * missing directories. */
  async write(path: string, data: FileData, options: { mode?: number; parents?: boolean } = {}): Promise<FileWritten> {
    const resp = await this.c.send({
      method: "PUT",
      path: `${this.sb.path}/files`,
      query: {
        path,
        mode: options.mode !== undefined ? options.mode.toString(8).padStart(4, "0") : undefined,
        parents: options.parents || undefined,
      },
      body: toBody(data),
      headers: { "content-type": "application/octet-stream" },
      timeout: null,
    });
    const w = (await resp.json()) as Omit<FileWritten, "created">;
    return { ...w, created: resp.status === 201 };
  }

  /** The whole file. */
  async read(path: string): Promise<Uint8Array> {
    const resp = await this.c.send({ method: "GET", path: `${this.sb.path}/files`, query: { path }, timeout: null });
    try {
      return new Uint8Array(await resp.arrayBuffer());
    } catch (e) {
      throw connectionFailed(this.c.url, e);
    }
  }

  /** The file as a stream (a transfer that breaks off errors the stream: never a short file). */
  async readStream(path: string): Promise<ReadableStream<Uint8Array>> {
    const resp = await this.c.send({ method: "GET", path: `${this.sb.path}/files`, query: { path }, timeout: null });
    if (!resp.body) throw new ConnectionFailed(null, "connection_failed", "the download has no body");
    return resp.body;
  }

  async list(path: string): Promise<FileEntry[]> {
    const r = await this.c.json<{ entries: FileEntry[] }>({
      method: "GET",
      path: `${this.sb.path}/files/list`,
      query: { path },
    });
    return r.entries;
  }

  async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    await this.c.json({
      method: "DELETE",
      path: `${this.sb.path}/files`,
      query: { path, recursive: options.recursive || undefined },
    });
  }
}

/** A background process of a sandbox. */
export class Process {
  constructor(
    private readonly processes: Processes,
    /** The sandbox's name for it: `p1`, `p2`, … */
    readonly id: string,
    /** Its pid in the guest (informational). */
    readonly pid: number,
  ) {}

  kill(signal = 15): Promise<void> {
    return this.processes.kill(this.id, signal);
  }

  wait(timeout = 30): Promise<ExecExit> {
    return this.processes.wait(this.id, timeout);
  }

  logs(): Promise<ProcessLogs> {
    return this.processes.logs(this.id);
  }
}

/** Background processes: they outlive the request that started them, a daemon restart and a
 * suspend. */
export class Processes {
  constructor(
    private readonly c: Client,
    private readonly sb: Sandbox,
  ) {}

  async start(cmd: Command, options: Omit<ExecOptions, "stdin"> = {}): Promise<Process> {
    const r = await this.c.json<{ id: string; pid: number }>({
      method: "POST",
      path: `${this.sb.path}/processes`,
      json: commandBody(cmd, options),
    });
    return new Process(this, r.id, r.pid);
  }

  /** Running processes and the newest finished ones, oldest first. */
  async list(): Promise<ProcessInfo[]> {
    return (await this.c.json<{ processes: ProcessInfo[] }>({ method: "GET", path: `${this.sb.path}/processes` }))
      .processes;
  }

  /** Signals the process's group (9 kills everything it started). */
  async kill(id: string, signal = 15): Promise<void> {
    await this.c.json({ method: "POST", path: `${this.sb.path}/processes/${enc(id)}/kill`, json: { signal } });
  }

  /** How the process ended; throws Conflict if it still runs after `timeout` seconds (0–300). */
  wait(id: string, timeout = 30): Promise<ExecExit> {
    return this.c.json({
      method: "POST",
      path: `${this.sb.path}/processes/${enc(id)}/wait`,
      query: { timeout_s: timeout },
      timeout: null,
    });
  }

  logs(id: string): Promise<ProcessLogs> {
    return this.c.json({ method: "GET", path: `${this.sb.path}/processes/${enc(id)}/logs` });
  }
}

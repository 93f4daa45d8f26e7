/**
 * The interactive shell: a PTY in the sandbox over the daemon's WebSocket (docs/API.md,
 * "Shell"). Binary messages are terminal bytes both ways; text messages are JSON control
 * messages (resize out, exit in). On Node the socket is the `ws` package's, because the
 * daemon needs the API key in a header, which browsers' WebSocket cannot send.
 */
import WebSocket from "ws";

import { ConnectionFailed, MoatError, errorFromResponse } from "./errors.js";
import type { ShellExit, ShellOptions } from "./types.js";

/** An open terminal. Iterate it for output; `exit` resolves when the command ends. */
export class Shell implements AsyncIterable<Uint8Array> {
  /** How the command ended (rejects if the connection broke off first). */
  readonly exit: Promise<ShellExit>;
  private readonly chunks: Uint8Array[] = [];
  private wake: (() => void) | undefined;
  private ended = false;
  private failure: MoatError | undefined;

  private constructor(private readonly ws: WebSocket) {
    let settle!: { resolve: (e: ShellExit) => void; reject: (e: MoatError) => void };
    this.exit = new Promise<ShellExit>((resolve, reject) => (settle = { resolve, reject }));
    // A caller that only reads the output must not see an unhandled rejection.
    this.exit.catch(() => undefined);
    let exit: ShellExit | undefined;
    ws.on("message", (data: Buffer, isBinary: boolean) => {
      if (isBinary) {
        this.chunks.push(new Uint8Array(data));
      } else {
        const msg = JSON.parse(data.toString("utf8")) as ShellExit;
        if (msg.type === "exit") exit = msg;
      }
      this.notify();
    });
    ws.on("close", (code: number, reason: Buffer) => {
      this.ended = true;
      if (exit) settle.resolve(exit);
      else {
        this.failure = new ConnectionFailed(
          null,
          "connection_failed",
          `the shell closed before the command ended (${code} ${reason.toString("utf8")})`.trim(),
        );
        settle.reject(this.failure);
      }
      this.notify();
    });
    ws.on("error", () => undefined);
  }

  /** @internal */
  static open(url: string, apiKey: string | undefined, path: string, o: ShellOptions): Promise<Shell> {
    const q = new URLSearchParams({ cols: String(o.cols ?? 80), rows: String(o.rows ?? 24) });
    for (const k of ["command", "user", "cwd", "term"] as const) {
      const v = o[k];
      if (v !== undefined) q.set(k, v);
    }
    const ws = new WebSocket(`${url.replace(/^http/, "ws")}${path}/shell?${q}`, {
      headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
    });
    return new Promise((resolve, reject) => {
      // Refusals come before the upgrade, as ordinary JSON errors.
      ws.on("unexpected-response", (req, res) => {
        let body = "";
        res.on("data", (c: Buffer) => (body += c.toString("utf8")));
        res.on("end", () => {
          // With this listener, ending the refused request is ours to do (ws's contract).
          req.destroy();
          ws.terminate();
          reject(errorFromResponse(res.statusCode ?? 500, body));
        });
      });
      ws.once("error", (e: Error) =>
        reject(new ConnectionFailed(null, "connection_failed", `cannot open the shell at ${url}: ${e.message}`)),
      );
      ws.once("open", () => resolve(new Shell(ws)));
    });
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** Types `data` into the terminal. */
  write(data: string | Uint8Array): void {
    this.ws.send(typeof data === "string" ? Buffer.from(data, "utf8") : data, { binary: true });
  }

  resize(cols: number, rows: number): void {
    this.ws.send(JSON.stringify({ type: "resize", cols, rows }));
  }

  /** Closes the terminal; the command's process tree is killed. */
  close(): void {
    this.ws.close(1000);
  }

  /** The terminal's output as it comes, until the command ends. */
  async *[Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    for (;;) {
      const c = this.chunks.shift();
      if (c) {
        yield c;
        continue;
      }
      if (this.ended) {
        if (this.failure) throw this.failure;
        return;
      }
      await new Promise<void>((r) => (this.wake = r));
    }
  }

  /** All output until the command ends, as text, and how it ended. */
  async collect(): Promise<{ output: string; exit: ShellExit }> {
    const dec = new TextDecoder();
    let output = "";
    for await (const c of this) output += dec.decode(c, { stream: true });
    return { output: output + dec.decode(), exit: await this.exit };
  }
}
